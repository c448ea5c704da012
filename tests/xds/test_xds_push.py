"""Push pipeline, registry and snapshot consistency, driven without gRPC: targets wrap the real sans-I/O
delta core, so what a proxy would be sent is exactly what the server would send."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from xds_harness import pod, service

from istiopy.mesh.store import Change, ConfigStore
from istiopy.testing.envoy import wait_until
from istiopy.xds import types
from istiopy.xds.cache import InconsistentSnapshot, Snapshot, TypedResources
from istiopy.xds.envoygen import envoy_generators, generate_listeners, register_envoy_generators
from istiopy.xds.proxy import Proxy
from istiopy.xds.push import Debouncer, PushPipeline
from istiopy.xds.registry import Generator, GeneratorRegistry, UnknownType
from istiopy.xds.stream import DeltaResponse, DeltaStream


class Target:
    """A connection without a socket: the delta core plus the responses it would have written."""

    def __init__(self, proxy: Proxy, type_urls: list[str]) -> None:
        self.proxy = proxy
        self.stream = DeltaStream()
        for t in type_urls:
            self.stream.handle_request(discovery_pb2.DeltaDiscoveryRequest(type_url=t), 0)
        self.sent: list[DeltaResponse] = []

    def watched_types(self) -> list[str]:
        return self.stream.subscribed_types()

    def update(self, typed: list[TypedResources], trigger_time: float | None) -> None:
        self.stream.set_snapshot(self.stream.snapshot.with_types(typed, trigger_time))
        self.flush()

    def flush(self) -> list[DeltaResponse]:
        out = [r for r in self.stream.responses(0) if isinstance(r, DeltaResponse)]
        self.sent += out
        return out

    def connect(self, pipeline: PushPipeline) -> None:
        pipeline.attach(self)
        self.update([pipeline.generate(t, self.proxy) for t in self.stream.missing_types()], None)


def proxy(name: str, ns: str = "default", kind: str = "sidecar") -> Proxy:
    return Proxy.from_node(base_pb2.Node(id=f"{kind}~10.0.0.1~{name}.{ns}~{ns}.svc.cluster.local"))


ENVOY = [types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE]


def changes_of(store: ConfigStore, *resources: Any) -> list[Change]:
    out = []
    for r in resources:
        c = store.apply(r)
        assert c is not None
        out.append(c)
    return out


def test_debouncer_quiet_period_and_max_wait() -> None:
    d = Debouncer(quiet=0.1, max_wait=1.0)
    assert d.deadline() is None
    store = ConfigStore()
    [c] = changes_of(store, service("a"))
    d.add(c, 0.0)
    assert d.deadline() == pytest.approx(0.1)
    for t in (0.05, 0.1, 0.15, 0.2, 0.25):  # a steady trickle keeps pushing the quiet deadline out ...
        d.add(c, t)
    assert d.deadline() == pytest.approx(0.35)
    for i in range(1, 30):
        d.add(c, 0.25 + i * 0.05)
    assert d.deadline() == pytest.approx(1.0)  # ... but never past first + max_wait
    assert d.due(1.0)
    batch, first = d.take()
    assert len(batch) == 35
    assert first == 0.0
    assert d.deadline() is None


async def test_unaffecting_change_sends_nothing_and_generation_is_shared() -> None:
    store = ConfigStore()
    registry = GeneratorRegistry()
    register_envoy_generators(registry)
    pipeline = PushPipeline(store, registry)
    store.apply(service("web"))
    store.apply(pod("web-1", "10.1.0.1", {"app": "web"}))
    a, b = Target(proxy("a"), ENVOY), Target(proxy("b", ns="other"), ENVOY)
    a.connect(pipeline)
    b.connect(pipeline)
    assert [r.type_url for r in a.sent] == ENVOY

    # A pod of the service: only EDS is regenerated, once for both proxies (shared scope), and sent.
    a.sent.clear()
    b.sent.clear()
    stats = await pipeline.push(changes_of(store, pod("web-2", "10.1.0.2", {"app": "web"})))
    assert stats.proxies_affected == 2
    assert stats.generations == 1
    assert [r.type_url for r in a.sent] == [types.ENDPOINT]
    assert [r.type_url for r in b.sent] == [types.ENDPOINT]

    # A pod no service selects: EDS regenerates to identical content, so nothing is sent.
    a.sent.clear()
    await pipeline.push(changes_of(store, pod("loner", "10.1.0.9", {"app": "none"})))
    assert a.sent == []

    # A label-only Service change affects neither clusters nor routes.
    a.sent.clear()
    relabelled = service("web").model_copy(
        update={"metadata": service("web").metadata.model_copy(update={"labels": {"team": "x"}})}
    )
    stats = await pipeline.push(changes_of(store, relabelled))
    assert a.sent == []

    # A new service: CDS, EDS, RDS; RDS is generated per namespace scope (2), not per proxy.
    a.sent.clear()
    stats = await pipeline.push(changes_of(store, service("api", 8080, vip="10.96.0.11")))
    assert [r.type_url for r in a.sent] == [types.CLUSTER, types.ENDPOINT, types.ROUTE]
    assert stats.generations == 1 + 1 + 2


async def test_proxy_specific_predicate_targets_only_affected_proxies() -> None:
    """A generator that depends on the proxy's namespace: a change elsewhere costs that proxy nothing."""
    store = ConfigStore()
    registry = GeneratorRegistry()
    seen: list[str] = []

    def per_namespace(store: ConfigStore, p: Proxy) -> list[tuple[str, Any]]:
        seen.append(p.id)
        return [(s.name, cluster_pb2.Cluster(name=s.name)) for s in store.list("Service", p.namespace)]

    registry.register(
        Generator(
            types.ADDRESS,
            per_namespace,
            lambda c, p: c.key.namespace == p.namespace,
            lambda p: p.namespace,
            frozenset({"ztunnel"}),
        )
    )
    pipeline = PushPipeline(store, registry)
    za, zb = (
        Target(proxy("z1", "a", "ztunnel"), [types.ADDRESS]),
        Target(proxy("z2", "b", "ztunnel"), [types.ADDRESS]),
    )
    za.connect(pipeline)
    zb.connect(pipeline)
    seen.clear()
    za.sent.clear()
    zb.sent.clear()
    stats = await pipeline.push(changes_of(store, service("x", ns="a")))
    assert stats.proxies_affected == 1
    assert seen == [za.proxy.id]
    assert [list(r.resources) for r in za.sent] != []
    assert zb.sent == []
    # A sidecar has no generator for this type (kind-specific registration).
    with pytest.raises(UnknownType, match="proxy kind 'sidecar'"):
        pipeline.generate(types.ADDRESS, proxy("s"))


async def test_debounced_loop_merges_a_burst_into_one_push() -> None:
    store = ConfigStore()
    registry = GeneratorRegistry()
    register_envoy_generators(registry)
    pipeline = PushPipeline(store, registry, debounce_after=0.02, debounce_max=1.0)
    await pipeline.start()
    try:
        t = Target(proxy("a"), ENVOY)
        t.connect(pipeline)
        for i in range(20):
            store.apply(service(f"s{i}", vip=f"10.96.1.{i + 1}"))
        await asyncio.sleep(0)
        async with asyncio.timeout(30):
            await pipeline.settled()
        assert pipeline.pushes == 1
        assert pipeline.last_push.changes == 20
        assert len(t.stream.snapshot.resources[types.CLUSTER]) == 20
        assert pipeline.metrics.debounce_time.collect()[0].samples
    finally:
        await pipeline.stop()


def test_registry_prefers_kind_specific_generator() -> None:
    registry = GeneratorRegistry()
    generic = Generator(types.LISTENER, generate_listeners, name="generic")
    special = Generator(
        types.LISTENER, generate_listeners, proxy_kinds=frozenset({"waypoint"}), name="special"
    )
    registry.register(generic)
    undo = registry.register(special)
    assert registry.find(types.LISTENER, proxy("w", kind="waypoint")).name == "special"
    assert registry.find(types.LISTENER, proxy("s")).name == "generic"
    undo()
    assert registry.find(types.LISTENER, proxy("w", kind="waypoint")).name == "generic"
    with pytest.raises(UnknownType, match=r"known: .*Listener"):
        registry.find(types.SECRET, proxy("s"))


def test_snapshot_consistency_names_dangling_references() -> None:
    store = ConfigStore()
    store.apply(service("web"))
    p = proxy("a")
    typed = {g.type_url: TypedResources.build(g.type_url, g.generate(store, p)) for g in envoy_generators()}
    Snapshot.of(typed.values()).consistent()
    partial = Snapshot.of([typed[types.CLUSTER], typed[types.LISTENER]])
    with pytest.raises(InconsistentSnapshot) as err:
        partial.consistent()
    assert "eds resource 'outbound|80||web.default.svc.cluster.local' is referenced but missing" in str(
        err.value
    )
    assert "rds resource 'http' is referenced but missing" in str(err.value)


def test_resource_versions_are_content_hashes() -> None:
    one = TypedResources.build(types.CLUSTER, [("a", cluster_pb2.Cluster(name="a"))])
    two = TypedResources.build(types.CLUSTER, [("a", cluster_pb2.Cluster(name="a"))])
    other = TypedResources.build(types.CLUSTER, [("a", cluster_pb2.Cluster(name="a", alt_stat_name="x"))])
    assert one.items["a"].version == two.items["a"].version
    assert len(one.items["a"].version) == 64
    assert one.version == two.version
    assert other.version != one.version
    with pytest.raises(ValueError, match="duplicate cds resource name 'a'"):
        TypedResources.build(types.CLUSTER, [("a", cluster_pb2.Cluster()), ("a", cluster_pb2.Cluster())])


def test_endpoints_from_slices_win_over_pods_and_named_ports_resolve() -> None:
    from istiopy.mesh.kinds import parse
    from istiopy.xds.envoygen import generate_endpoints

    store = ConfigStore()
    store.apply(service("web", 80, "http"))  # named target port: the pod's container port 8080
    store.apply(pod("web-1", "10.1.0.1", {"app": "web"}))
    p = proxy("a")

    def endpoints() -> list[tuple[str, int]]:
        [res] = list(generate_endpoints(store, p))
        cla = res.message
        return [
            (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
            for loc in cla.endpoints
            for e in loc.lb_endpoints
        ]

    assert endpoints() == [("10.1.0.1", 8080)]
    store.apply(
        parse(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "addressType": "IPv4",
                "metadata": {
                    "name": "web-abc",
                    "namespace": "default",
                    "labels": {"kubernetes.io/service-name": "web"},
                },
                "ports": [{"name": "http", "port": 9090}],
                "endpoints": [
                    {"addresses": ["10.2.0.1"]},
                    {"addresses": ["10.2.0.2"], "conditions": {"ready": False}},
                ],
            }
        )
    )
    assert endpoints() == [("10.2.0.1", 9090)]


async def test_notify_pushes_a_synthetic_change_through_the_debouncer() -> None:
    """Certificate rotations are not store content: ``notify`` feeds them to the same pipeline."""
    from istiopy.mesh.meta import ResourceKey

    store = ConfigStore()
    registry = GeneratorRegistry()
    generation = {"n": 0}

    def secrets(store: ConfigStore, p: Proxy) -> list[tuple[str, Any]]:
        return [("default", cluster_pb2.Cluster(name=f"gen-{generation['n']}"))]

    registry.register(
        Generator(
            types.SECRET,
            secrets,
            lambda c, p: c.key.kind == "WorkloadCertificate",
            lambda p: ("sds", generation["n"]),
        )
    )
    pipeline = PushPipeline(store, registry, debounce_after=0.01)
    await pipeline.start()
    try:
        t = Target(proxy("w", kind="waypoint"), [types.SECRET])
        t.connect(pipeline)
        t.sent.clear()
        generation["n"] = 1
        change = Change("update", ResourceKey("WorkloadCertificate", "default", "sa"), None, None, 0, "ca")
        await asyncio.to_thread(pipeline.notify, change)
        await wait_until(lambda: bool(t.sent), timeout=30, what="pushed after notify")
        assert t.sent[0].resources[0].message.name == "gen-1"
    finally:
        await pipeline.stop()
