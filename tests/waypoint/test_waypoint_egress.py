"""An egress waypoint: a ServiceEntry bound with ``istio.io/use-waypoint`` is served at its VIP, routed by
VirtualService, guarded by AuthorizationPolicy (targetRefs ServiceEntry), and reaches the external
endpoints directly (STATIC or DNS resolution), not over HBONE."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from wp_helpers import istio
from wp_mesh import Backend, WaypointMesh

from istiopy.mesh.kinds import parse
from istiopy.testing.envoy import free_port

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]


async def plain_backend(name: str, ip: str, port: int) -> tuple[Backend, web.AppRunner]:
    b = Backend(name, ip)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", b.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, ip, port).start()
    return b, runner


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def external(wmesh: WaypointMesh) -> AsyncIterator[tuple[Backend, Backend, int]]:
    static, r1 = await plain_backend("ext-static", f"{wmesh.prefix}.240", 8080)
    port = free_port()
    dns, r2 = await plain_backend("ext-dns", "127.0.0.1", port)
    try:
        yield static, dns, port
    finally:
        await r1.cleanup()
        await r2.cleanup()


def entry(name: str, host: str, vip: str, spec: dict[str, Any]) -> Any:
    doc = istio(
        "ServiceEntry",
        name,
        {
            "hosts": [host],
            "addresses": [vip],
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
            **spec,
        },
    )
    return doc.model_copy(
        update={"metadata": doc.metadata.model_copy(update={"labels": {"istio.io/use-waypoint": "waypoint"}})}
    )


async def test_static_entry_routed_and_guarded(
    wmesh: WaypointMesh, external: tuple[Backend, Backend, int]
) -> None:
    static, _, _ = external
    vip = "240.240.0.10"
    await wmesh.apply(
        entry(
            "ext-api",
            "api.external.example",
            vip,
            {"resolution": "STATIC", "endpoints": [{"address": static.ip, "ports": {"http": 8080}}]},
        )
    )
    r = await wmesh.request(f"{vip}:80", "/v1/items", host="api.external.example")
    assert (r.status, r.text) == (200, "ext-static /v1/items")
    await wmesh.apply(
        istio(
            "VirtualService",
            "ext-api",
            {
                "hosts": ["api.external.example"],
                "http": [
                    {
                        "headers": {"request": {"set": {"x-egress": "waypoint"}}},
                        "retries": {"attempts": 2, "retryOn": "5xx"},
                        "route": [{"destination": {"host": "api.external.example"}}],
                    }
                ],
            },
        ),
        istio(
            "AuthorizationPolicy",
            "ext-api",
            {
                "targetRefs": [{"group": "networking.istio.io", "kind": "ServiceEntry", "name": "ext-api"}],
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
            },
            group="security.istio.io/v1",
        ),
    )
    static.reset()
    static.fail_next = 1
    r = await wmesh.request(f"{vip}:80", "/v1/items", host="api.external.example")
    assert r.status == 200
    assert static.hits == 2  # the retry reached the external endpoint again
    assert static.headers[-1]["x-egress"] == "waypoint"
    assert (await wmesh.request(f"{vip}:80", "/admin/x", host="api.external.example")).status == 403
    assert not wmesh.nacks


async def test_httproute_on_a_service_entry_routes_to_it(
    wmesh: WaypointMesh, external: tuple[Backend, Backend, int]
) -> None:
    """Gateway API at the egress waypoint: an HTTPRoute whose parent and backend are the ServiceEntry."""
    static, _, _ = external
    vip = "240.240.0.12"
    await wmesh.apply(
        entry(
            "ext-gw",
            "gw.external.example",
            vip,
            {"resolution": "STATIC", "endpoints": [{"address": static.ip, "ports": {"http": 8080}}]},
        )
    )
    se = {"group": "networking.istio.io", "kind": "ServiceEntry", "name": "ext-gw"}
    await wmesh.apply(
        parse(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "ext-gw", "namespace": "default"},
                "spec": {
                    "parentRefs": [se],
                    "rules": [
                        {
                            "matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                            "filters": [
                                {
                                    "type": "RequestHeaderModifier",
                                    "requestHeaderModifier": {"set": [{"name": "x-route", "value": "gw"}]},
                                }
                            ],
                            "backendRefs": [{**se, "port": 80}],
                        },
                    ],
                },
            }
        )
    )
    static.reset()
    r = await wmesh.request(f"{vip}:80", "/v2/things", host="gw.external.example")
    assert (r.status, r.text) == (200, "ext-static /v2/things")
    assert static.headers[-1]["x-route"] == "gw"
    # With a route in place, what it does not match is not routed (Gateway API: 404).
    assert (await wmesh.request(f"{vip}:80", "/v1/things", host="gw.external.example")).status == 404
    assert not wmesh.nacks


async def test_dns_entry(wmesh: WaypointMesh, external: tuple[Backend, Backend, int]) -> None:
    _, dns, port = external
    vip = "240.240.0.11"
    await wmesh.apply(
        entry(
            "ext-dns",
            "dns.external.example",
            vip,
            {"resolution": "DNS", "endpoints": [{"address": "localhost", "ports": {"http": port}}]},
        )
    )
    r = await wmesh.request(f"{vip}:80", "/hello", host="dns.external.example")
    assert (r.status, r.text) == (200, "ext-dns /hello")
    assert dns.hits == 1
    assert not wmesh.nacks
