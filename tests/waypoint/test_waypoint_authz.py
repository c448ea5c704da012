"""AuthorizationPolicy with targetRefs enforced by the real waypoint Envoy (RBAC), Istio's evaluation order,
source identity from the HBONE peer certificate."""

from __future__ import annotations

from typing import Any

import pytest
from wp_helpers import istio, service
from wp_mesh import CLIENT_ID, TD, WaypointMesh

from istiopy.api.identity import SpiffeId
from istiopy.mesh.waypoint_diagnostics import waypoint_diagnostics

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

OTHER_NS_CLIENT = SpiffeId(TD, "other", "client")
ADMIN = SpiffeId(TD, "default", "admin")


def policy(name: str, target: str, spec: dict[str, Any], kind: str = "Service") -> Any:
    group = "" if kind == "Service" else "gateway.networking.k8s.io"
    return istio(
        "AuthorizationPolicy",
        name,
        {"targetRefs": [{"group": group, "kind": kind, "name": target}], **spec},
        group="security.istio.io/v1",
    )


async def svc(wmesh: WaypointMesh, name: str, n: int) -> str:
    await wmesh.add_pod(f"{name}-1", name)
    await wmesh.apply(service(name, wmesh.vip(n)))
    return f"{wmesh.vip(n)}:80"


async def status(wmesh: WaypointMesh, target: str, path: str = "/", **kw: Any) -> int:
    return (await wmesh.request(target, path, **kw)).status


async def test_deny_on_header_and_allow_on_method_path(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "authz", 30)
    assert await status(wmesh, target) == 200
    await wmesh.apply(
        policy(
            "deny-blocked",
            "authz",
            {"action": "DENY", "rules": [{"when": [{"key": "request.headers[x-block]", "values": ["yes"]}]}]},
        )
    )
    assert await status(wmesh, target, headers={"x-block": "yes"}) == 403
    assert await status(wmesh, target, headers={"x-block": "no"}) == 200
    assert await status(wmesh, target) == 200  # no ALLOW policy yet: allowed

    await wmesh.apply(
        policy(
            "allow-get-public",
            "authz",
            {"rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/public*"]}}]}]},
        )
    )
    assert await status(wmesh, target, "/public/x") == 200
    assert await status(wmesh, target, "/private") == 403
    assert await status(wmesh, target, "/public/x", method="POST") == 403
    # DENY is evaluated before ALLOW
    assert await status(wmesh, target, "/public/x", headers={"x-block": "yes"}) == 403
    r = await wmesh.request(target, "/private")
    assert "RBAC" in r.text
    await wmesh.delete(policy("deny-blocked", "authz", {}), policy("allow-get-public", "authz", {}))
    assert await status(wmesh, target, "/private") == 200


async def test_source_principal_and_namespace_from_hbone_peer(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "peers", 31)
    await wmesh.apply(
        policy(
            "allow-default-ns",
            "peers",
            {"rules": [{"from": [{"source": {"namespaces": ["default"]}}]}]},
        ),
        policy(
            "deny-admin-deletes",
            "peers",
            {
                "action": "DENY",
                "rules": [
                    {
                        "from": [{"source": {"principals": [f"{TD}/ns/default/sa/admin"]}}],
                        "to": [{"operation": {"methods": ["DELETE"]}}],
                    }
                ],
            },
        ),
    )
    assert await status(wmesh, target, identity=CLIENT_ID) == 200
    assert await status(wmesh, target, identity=OTHER_NS_CLIENT) == 403
    assert await status(wmesh, target, identity=ADMIN) == 200
    assert await status(wmesh, target, method="DELETE", identity=ADMIN) == 403
    assert await status(wmesh, target, method="DELETE", identity=CLIENT_ID) == 200


async def test_hosts_ports_not_values_and_empty_policy(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "ops", 32)
    host = "ops.default.svc.cluster.local"
    await wmesh.apply(
        policy(
            "allow-host",
            "ops",
            {
                "rules": [
                    {
                        "to": [{"operation": {"hosts": [host], "ports": ["80"], "notPaths": ["/admin*"]}}],
                        "when": [{"key": "request.headers[x-env]", "notValues": ["prod"]}],
                    }
                ]
            },
        )
    )
    assert await status(wmesh, target, host=host) == 200
    assert await status(wmesh, target, host=f"{host}:80") == 200
    assert await status(wmesh, target, host="other.example") == 403
    assert await status(wmesh, target, "/admin/x", host=host) == 403
    assert await status(wmesh, target, host=host, headers={"x-env": "prod"}) == 403
    # ``spec: {}`` on top: "allow nothing" adds no rule, the existing ALLOW still decides
    await wmesh.apply(policy("empty", "ops", {}))
    assert await status(wmesh, target, host=host) == 200
    await wmesh.delete(policy("allow-host", "ops", {}))
    assert await status(wmesh, target, host=host) == 403  # only the empty ALLOW policy remains: deny all


async def test_audit_does_not_decide_and_custom_fails_closed(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "modes", 33)
    await wmesh.apply(
        policy("audit-all", "modes", {"action": "AUDIT", "rules": [{}]}),
    )
    assert await status(wmesh, target) == 200
    custom = policy(
        "ext",
        "modes",
        {
            "action": "CUSTOM",
            "provider": {"name": "ext-authz"},
            "rules": [{"to": [{"operation": {"paths": ["/guarded*"]}}]}],
        },
    )
    await wmesh.apply(custom)
    found = [d for d in waypoint_diagnostics(wmesh.store) if d.resource == custom.key]
    assert found
    assert "CUSTOM" in found[0].message
    assert "not supported" in found[0].message
    assert await status(wmesh, target, "/guarded/1") == 403
    assert await status(wmesh, target, "/open") == 200


async def test_gateway_target_applies_to_every_service(wmesh: WaypointMesh) -> None:
    a = await svc(wmesh, "gwa", 34)
    b = await svc(wmesh, "gwb", 35)
    gw = policy(
        "waypoint-deny",
        "waypoint",
        {"action": "DENY", "rules": [{"when": [{"key": "request.headers[x-evil]", "values": ["*"]}]}]},
        kind="Gateway",
    )
    await wmesh.apply(gw)
    for target in (a, b):
        assert await status(wmesh, target, headers={"x-evil": "1"}) == 403
        assert await status(wmesh, target) == 200
    await wmesh.delete(gw)
    assert await status(wmesh, a, headers={"x-evil": "1"}) == 200
    assert not wmesh.nacks
