"""VirtualService and HTTPRoute at the waypoint with real requests: matching, subsets, weights, redirect,
rewrite, direct response, header operations, CORS; bad rules left out without a NACK."""

from __future__ import annotations

from typing import Any

import pytest
from wp_helpers import istio, namespace, service
from wp_mesh import WaypointMesh

from istiopy.mesh.kinds import parse
from istiopy.mesh.resources.networking import VirtualService
from istiopy.mesh.waypoint_diagnostics import waypoint_diagnostics

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]


def subsets_dr(name: str, host: str, extra: dict[str, Any] | None = None) -> Any:
    return istio(
        "DestinationRule",
        name,
        {
            "host": host,
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
            **(extra or {}),
        },
    )


async def two_versions(wmesh: WaypointMesh, app: str, vip_n: int) -> str:
    """A service ``app`` with pods ``<app>-v1`` and ``<app>-v2`` and v1/v2 subsets; returns VIP:port."""
    await wmesh.add_pod(f"{app}-v1", app, {"version": "v1"})
    await wmesh.add_pod(f"{app}-v2", app, {"version": "v2"})
    await wmesh.apply(service(app, wmesh.vip(vip_n)), subsets_dr(app, app))
    return f"{wmesh.vip(vip_n)}:80"


async def test_match_uri_headers_method_query(wmesh: WaypointMesh) -> None:
    target = await two_versions(wmesh, "shop", 20)
    v2 = {"destination": {"host": "shop", "subset": "v2"}}
    v1 = {"destination": {"host": "shop", "subset": "v1"}}
    await wmesh.apply(
        istio(
            "VirtualService",
            "shop",
            {
                "hosts": ["shop"],
                "http": [
                    {"match": [{"uri": {"prefix": "/api/v2"}}], "route": [v2]},
                    {"match": [{"uri": {"exact": "/exact"}}], "route": [v2]},
                    {"match": [{"uri": {"regex": "/items/[0-9]+"}}], "route": [v2]},
                    {"match": [{"headers": {"x-user": {"exact": "alice"}}}], "route": [v2]},
                    {"match": [{"method": {"exact": "POST"}}], "route": [v2]},
                    {"match": [{"queryParams": {"beta": {"exact": "1"}}}], "route": [v2]},
                    {"route": [v1]},
                ],
            },
        )
    )

    async def who(path: str, **kw: Any) -> str:
        r = await wmesh.request(target, path, **kw)
        assert r.status == 200, r
        return r.text.split()[0]

    assert await who("/api/v1/list") == "shop-v1"
    assert await who("/api/v2/list") == "shop-v2"
    assert await who("/exact") == "shop-v2"
    assert await who("/exact/not") == "shop-v1"
    assert await who("/items/42") == "shop-v2"
    assert await who("/items/abc") == "shop-v1"
    assert await who("/", headers={"x-user": "alice"}) == "shop-v2"
    assert await who("/", headers={"x-user": "bob"}) == "shop-v1"
    assert await who("/", method="POST") == "shop-v2"
    assert await who("/?beta=1") == "shop-v2"
    assert await who("/?beta=2") == "shop-v1"
    assert not wmesh.nacks


async def test_weighted_canary_90_10(wmesh: WaypointMesh) -> None:
    target = await two_versions(wmesh, "canary", 21)
    await wmesh.apply(
        istio(
            "VirtualService",
            "canary",
            {
                "hosts": ["canary"],
                "http": [
                    {
                        "route": [
                            {"destination": {"host": "canary", "subset": "v1"}, "weight": 90},
                            {"destination": {"host": "canary", "subset": "v2"}, "weight": 10},
                        ]
                    }
                ],
            },
        )
    )
    n = 1000
    seen = {"canary-v1": 0, "canary-v2": 0}
    async with wmesh.session(target) as session:
        for _ in range(n):
            r = await session.request("/")
            assert r.status == 200
            seen[r.text.split()[0]] += 1
    # Binomial(1000, 0.1): mean 100, sd 9.5; +-4.5 sd is [57, 143] (a false failure ~1 in 100000 runs).
    assert 57 <= seen["canary-v2"] <= 143, seen
    assert seen["canary-v1"] + seen["canary-v2"] == n
    assert wmesh.backends["canary-v2"].hits == seen["canary-v2"]


async def test_redirect_rewrite_direct_response_headers(wmesh: WaypointMesh) -> None:
    await wmesh.add_pod("edit-1", "edit")
    await wmesh.apply(service("edit", wmesh.vip(22)))
    target = f"{wmesh.vip(22)}:80"
    await wmesh.apply(
        istio(
            "VirtualService",
            "edit",
            {
                "hosts": ["edit.default.svc.cluster.local"],
                "http": [
                    {
                        "match": [{"uri": {"prefix": "/old"}}],
                        "redirect": {"uri": "/new", "authority": "moved.example", "redirectCode": 308},
                    },
                    {
                        "match": [{"uri": {"prefix": "/legacy"}}],
                        "rewrite": {"uri": "/modern", "authority": "edit.internal"},
                        "route": [{"destination": {"host": "edit"}}],
                    },
                    {
                        "match": [{"uri": {"exact": "/teapot"}}],
                        "directResponse": {"status": 418, "body": {"string": "short and stout"}},
                    },
                    {
                        "headers": {
                            "request": {
                                "set": {"x-set": "one"},
                                "add": {"x-add": "two"},
                                "remove": ["x-drop"],
                            },
                            "response": {"set": {"x-resp": "yes"}, "remove": ["x-served-by"]},
                        },
                        "route": [{"destination": {"host": "edit"}}],
                    },
                ],
            },
        )
    )
    backend = wmesh.backends["edit-1"]

    r = await wmesh.request(target, "/old/page")
    assert r.status == 308
    assert r.headers["location"] == "http://moved.example/new"
    assert backend.hits == 0

    r = await wmesh.request(target, "/legacy/x?q=1")
    assert r.status == 200
    assert backend.paths[-1] == "/modern/x?q=1"
    assert backend.headers[-1]["host"] == "edit.internal"

    r = await wmesh.request(target, "/teapot")
    assert (r.status, r.text) == (418, "short and stout")

    r = await wmesh.request(target, "/plain", headers={"x-set": "client", "x-drop": "secret"})
    assert r.status == 200
    seen = backend.headers[-1]
    assert seen["x-set"] == "one"
    assert seen["x-add"] == "two"
    assert "x-drop" not in seen
    assert r.headers["x-resp"] == "yes"
    assert "x-served-by" not in r.headers
    assert not wmesh.nacks


async def test_cors(wmesh: WaypointMesh) -> None:
    await wmesh.add_pod("cors-1", "cors")
    await wmesh.apply(service("cors", wmesh.vip(23)))
    await wmesh.apply(
        istio(
            "VirtualService",
            "cors",
            {
                "hosts": ["cors"],
                "http": [
                    {
                        "corsPolicy": {
                            "allowOrigins": [{"exact": "https://app.example"}],
                            "allowMethods": ["GET", "PUT"],
                            "allowHeaders": ["x-token"],
                            "maxAge": "60s",
                        },
                        "route": [{"destination": {"host": "cors"}}],
                    }
                ],
            },
        )
    )
    target = f"{wmesh.vip(23)}:80"
    pre = {"origin": "https://app.example", "access-control-request-method": "PUT"}
    r = await wmesh.request(target, "/x", method="OPTIONS", headers=pre)
    assert r.status == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "PUT" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-max-age"] == "60"
    assert wmesh.backends["cors-1"].hits == 0  # the preflight is answered by the waypoint

    r = await wmesh.request(target, "/x", headers={"origin": "https://evil.example"})
    assert r.status == 200
    assert "access-control-allow-origin" not in r.headers
    r = await wmesh.request(target, "/x", headers={"origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"


async def test_gateway_api_httproute(wmesh: WaypointMesh) -> None:
    await wmesh.add_pod("gw-a", "gwa")
    await wmesh.add_pod("gw-b", "gwb")
    await wmesh.apply(
        service("gwroute", wmesh.vip(24), selector={"app": "gwa"}),
        service("gwb", wmesh.vip(25), waypoint=None),
    )
    route = parse(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "gwroute", "namespace": "default"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "gwroute", "port": 80}],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/b"}}],
                        "filters": [
                            {
                                "type": "RequestHeaderModifier",
                                "requestHeaderModifier": {"set": [{"name": "x-via", "value": "gw"}]},
                            }
                        ],
                        "backendRefs": [{"name": "gwb", "port": 80}],
                    },
                    {
                        "matches": [{"headers": [{"name": "x-pick", "value": "b"}]}],
                        "backendRefs": [{"name": "gwb", "port": 80}],
                    },
                    {
                        "matches": [{"path": {"type": "Exact", "value": "/moved"}}],
                        "filters": [
                            {
                                "type": "RequestRedirect",
                                "requestRedirect": {"hostname": "elsewhere.example", "statusCode": 301},
                            }
                        ],
                    },
                    {"backendRefs": [{"name": "gwroute", "port": 80}]},
                ],
            },
        }
    )
    await wmesh.apply(route)
    target = f"{wmesh.vip(24)}:80"
    r = await wmesh.request(target, "/b/1")
    assert r.text.startswith("gw-b"), r
    assert wmesh.backends["gw-b"].headers[-1]["x-via"] == "gw"
    assert (await wmesh.request(target, "/bx")).text.startswith("gw-a")  # PathPrefix matches segments
    assert (await wmesh.request(target, "/", headers={"x-pick": "b"})).text.startswith("gw-b")
    assert (await wmesh.request(target, "/other")).text.startswith("gw-a")
    r = await wmesh.request(target, "/moved")
    assert r.status == 301
    assert r.headers["location"].startswith("http://elsewhere.example/")


def reference_grant(name: str, ns: str, from_ns: str, to_name: str | None = None) -> Any:
    to: dict[str, Any] = {"group": "", "kind": "Service", **({"name": to_name} if to_name else {})}
    return parse(
        {
            "apiVersion": "gateway.networking.k8s.io/v1beta1",
            "kind": "ReferenceGrant",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": from_ns}],
                "to": [to],
            },
        }
    )


async def test_cross_namespace_backend_needs_a_reference_grant(wmesh: WaypointMesh) -> None:
    """A route's backend in another namespace is used only while a ReferenceGrant there allows it: until
    then (and again once it is deleted) its share of requests is answered 500, as Gateway API asks of
    every invalid backend."""
    await wmesh.add_pod("x-local", "xroute")
    await wmesh.add_pod("x-other", "xb", ns="other")
    await wmesh.apply(
        namespace("other"),
        service("xroute", wmesh.vip(27)),
        service("xb", wmesh.vip(28), ns="other", waypoint=None),
    )
    other = {"name": "xb", "namespace": "other", "port": 80}
    route = parse(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "xroute", "namespace": "default"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "xroute", "port": 80}],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/cross"}}],
                        "backendRefs": [other],
                    },
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/split"}}],
                        "backendRefs": [{"name": "xroute", "port": 80, "weight": 1}, {**other, "weight": 1}],
                    },
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/missing"}}],
                        "backendRefs": [{"name": "nowhere", "port": 80}],
                    },
                    {"backendRefs": [{"name": "xroute", "port": 80}]},
                ],
            },
        }
    )
    await wmesh.apply(route)
    target = f"{wmesh.vip(27)}:80"

    async def outcomes(path: str, n: int = 1) -> set[str]:
        seen = set()
        for _ in range(n):
            r = await wmesh.request(target, path)
            seen.add(r.text.split()[0] if r.status == 200 and r.text else str(r.status))
        return seen

    assert await outcomes("/cross") == {"500"}
    assert await outcomes("/split", 30) == {"x-local", "500"}  # the ungranted half only
    assert await outcomes("/") == {"x-local"}
    assert await outcomes("/missing") == {"500"}  # an unknown backend too: the rule stays, answering 500

    await wmesh.apply(reference_grant("for-someone-else", "other", "default", to_name="not-xb"))
    assert await outcomes("/cross") == {"500"}
    await wmesh.apply(reference_grant("from-default", "other", "default", to_name="xb"))
    assert await outcomes("/cross") == {"x-other"}
    assert await outcomes("/split", 30) == {"x-local", "x-other"}

    await wmesh.delete(reference_grant("from-default", "other", "default", to_name="xb"))
    assert await outcomes("/cross") == {"500"}  # deleting the grant revokes the reference


async def test_bad_rules_are_left_out_and_reported(wmesh: WaypointMesh) -> None:
    """A missing subset and a regex RE2 refuses: reported on the resource, never sent (no NACK), and the
    other rules of the same VirtualService keep working."""
    target = await two_versions(wmesh, "fragile", 26)
    nacks_before = len(wmesh.nacks)
    vs = VirtualService.model_validate(
        {
            "metadata": {"name": "fragile", "namespace": "default"},
            "spec": {
                "hosts": ["fragile"],
                "http": [
                    {
                        "match": [{"uri": {"prefix": "/gone"}}],
                        "route": [{"destination": {"host": "fragile", "subset": "v9"}}],
                    },
                    {
                        "match": [{"uri": {"regex": "/a(?>b)c"}}],
                        "route": [{"destination": {"host": "fragile", "subset": "v2"}}],
                    },
                    {
                        "match": [{"uri": {"prefix": "/two"}}],
                        "route": [{"destination": {"host": "fragile", "subset": "v2"}}],
                    },
                    {"route": [{"destination": {"host": "fragile", "subset": "v1"}}]},
                ],
            },
        }
    )
    await wmesh.apply(vs)
    found = {(d.field, d.reason) for d in waypoint_diagnostics(wmesh.store) if d.resource == vs.key}
    assert ("spec.http[0].route[0].destination.subset", "ReferencedResourceNotFound") in found
    assert ("spec.http[1].match[0].uri.regex", "InvalidRegex") in found
    assert (await wmesh.request(target, "/two")).text.startswith("fragile-v2")
    assert (await wmesh.request(target, "/gone")).text.startswith("fragile-v1")  # falls to the catch-all
    assert (await wmesh.request(target, "/abc")).text.startswith("fragile-v1")
    assert len(wmesh.nacks) == nacks_before
