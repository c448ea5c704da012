"""The Python delta ADS client (``istiopy.api.xds_client``) against our server, no Envoy involved."""

from __future__ import annotations

import asyncio

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from xds_harness import Harness, pod, service, start_harness, stop_harness

from istiopy.api.xds_client import DeltaUpdate, DeltaXdsClient
from istiopy.testing.envoy import free_port, wait_until
from istiopy.xds import types

CDS, EDS = types.CLUSTER, types.ENDPOINT


def cluster(name: str) -> str:
    return f"outbound|80||{name}.default.svc.cluster.local"


def node(i: int = 0) -> base_pb2.Node:
    return base_pb2.Node(id=f"sidecar~127.0.0.{i + 1}~c{i}.default~default.svc.cluster.local")


class Recorder:
    """A handler keeping every update it saw."""

    def __init__(self) -> None:
        self.updates: list[DeltaUpdate] = []

    def __call__(self, update: DeltaUpdate) -> None:
        self.updates.append(update)

    def names(self) -> list[list[str]]:
        return [sorted(u.updated) for u in self.updates]


def seed(h: Harness, *names: str) -> None:
    for i, name in enumerate(names):
        h.store.apply(service(name, 80, 8080, vip=f"10.96.0.{i + 10}"))
        h.store.apply(pod(f"{name}-1", f"10.0.0.{i + 10}", {"app": name}))


async def test_wildcard_and_named_subscriptions_and_unsubscribe(harness: Harness) -> None:
    seed(harness, "a", "b", "c")
    cds, eds = Recorder(), Recorder()
    client = DeltaXdsClient(f"127.0.0.1:{harness.port}", node())
    client.subscribe(CDS, cds)  # wildcard
    client.subscribe(EDS, eds, names=[cluster("a")])
    async with client, asyncio.timeout(10):
        await client.wait_for(lambda c: len(c.resources(CDS)) == 3 and len(c.resources(EDS)) == 1)
        assert sorted(client.resources(CDS)) == [cluster("a"), cluster("b"), cluster("c")]
        cla = client.resources(EDS)[cluster("a")]
        assert cla.resource.type_url == EDS

        # Named: subscribe one more; only that one arrives.
        client.subscribe_names(EDS, [cluster("b")])
        await client.wait_for(lambda c: cluster("b") in c.resources(EDS))
        assert eds.names()[-1] == [cluster("b")]

        # Unsubscribe: a change to that resource is no longer sent; a change to a watched one is.
        client.unsubscribe_names(EDS, [cluster("a")])
        await asyncio.sleep(0)
        before = len(eds.updates)
        harness.store.apply(pod("a-2", "10.0.1.1", {"app": "a"}))
        harness.store.apply(pod("b-2", "10.0.1.2", {"app": "b"}))
        await client.wait_for(lambda c: len(eds.updates) > before)
        assert [n for u in eds.updates[before:] for n in u.updated] == [cluster("b")]
        assert sorted(client.resources(EDS)) == [cluster("b")]

        # Wildcard: a deleted service arrives as a removal.
        harness.store.delete(service("c").key)
        await client.wait_for(lambda c: cluster("c") not in c.resources(CDS))
        assert cds.updates[-1].removed == (cluster("c"),)
        # ACKs reached the server: syncz shows acked == sent for both types.
        await wait_until(
            lambda: all(t["acked_nonce"] == t["sent_nonce"] for t in harness.server.syncz()[0]["types"]),
            what="server saw every ACK",
        )


async def test_named_subscription_to_nothing_then_on_demand(harness: Harness) -> None:
    seed(harness, "a", "b")
    eds = Recorder()
    client = DeltaXdsClient(f"127.0.0.1:{harness.port}", node())
    client.subscribe(EDS, eds, names=[])
    async with client, asyncio.timeout(10):
        await client.wait_for(lambda c: len(eds.updates) == 1)  # the initial (empty) answer
        assert eds.updates[0].updated == {}
        client.subscribe_names(EDS, [cluster("b")])
        await client.wait_for(lambda c: cluster("b") in c.resources(EDS))
        assert sorted(client.resources(EDS)) == [cluster("b")]


async def test_handler_error_is_a_nack_and_state_is_kept(harness: Harness) -> None:
    seed(harness, "a")
    reject = {"on": False}

    def handler(update: DeltaUpdate) -> None:
        for res in update.updated.values():
            res.unpack(cluster_pb2.Cluster)
        if reject["on"]:
            raise ValueError("refusing this cluster set")

    client = DeltaXdsClient(f"127.0.0.1:{harness.port}", node())
    client.subscribe(CDS, handler)
    async with client, asyncio.timeout(10):
        await client.wait_for(lambda c: cluster("a") in c.resources(CDS))
        reject["on"] = True
        seed(harness, "a", "b")
        await client.wait_for(lambda c: c.status(CDS).nacks == 1)
        assert cluster("b") not in client.resources(CDS)

        def server_view() -> dict[str, object]:
            [conn] = harness.server.syncz()
            return next(t for t in conn["types"] if t["type"] == CDS)

        await wait_until(lambda: server_view()["nacks"] == 1, what="server saw the NACK")
        assert "refusing this cluster set" in str(server_view()["last_error"])
        assert harness.metric("pilot_total_xds_rejects_total", {"type": "cds"}) == 1
        reject["on"] = False
        seed(harness, "a", "b", "c")  # the next change resends what the client lacks: b and c
        await client.wait_for(lambda c: len(c.resources(CDS)) == 3)


async def test_reconnect_sends_initial_versions_and_nothing_unchanged_is_resent() -> None:
    port = free_port()
    h = await start_harness(plaintext_address=f"127.0.0.1:{port}")
    seed(h, "a", "b")
    rec = Recorder()
    client = DeltaXdsClient(f"127.0.0.1:{port}", node(), backoff_initial=0.05, backoff_max=0.2)
    client.subscribe(CDS, rec)
    try:
        async with asyncio.timeout(20):
            await client.start()
            await client.wait_for(lambda c: len(c.resources(CDS)) == 2)
            held = client.resources(CDS)
            await stop_harness(h)
            await client.wait_for(lambda c: not c.connected.is_set())
            assert client.resources(CDS) == held  # last state kept while the server is gone

            # New server, one service changed (b's port), one unchanged (a), one new (c).
            h = await start_harness(plaintext_address=f"127.0.0.1:{port}")
            seed(h, "a", "b", "c")
            h.store.apply(service("b", 81, 8080, vip="10.96.0.11"))
            before = len(rec.updates)
            await client.wait_for(lambda c: c.connects >= 2 and cluster("c") in c.resources(CDS))
            await client.wait_for(lambda c: "outbound|81||b.default.svc.cluster.local" in c.resources(CDS))
            sent = sorted(n for u in rec.updates[before:] for n in u.updated)
            assert cluster("a") not in sent  # unchanged: never resent
            assert sorted(client.resources(CDS)) == sorted(
                [cluster("a"), cluster("c"), "outbound|81||b.default.svc.cluster.local"]
            )
    finally:
        await client.stop()
        await stop_harness(h)


async def test_fifty_concurrent_streams(harness: Harness) -> None:
    seed(harness, "a")
    clients = [DeltaXdsClient(f"127.0.0.1:{harness.port}", node(i)) for i in range(50)]
    for c in clients:
        c.subscribe(CDS)
        c.subscribe(EDS, names=[cluster("a")])
    try:
        async with asyncio.timeout(30):
            await asyncio.gather(*(c.start() for c in clients))
            await asyncio.gather(*(c.wait_for(lambda c: cluster("a") in c.resources(EDS)) for c in clients))
            assert harness.metric("pilot_xds") == 50
            assert len(harness.server.syncz()) == 50
            seed(harness, "a", "b")
            await asyncio.gather(*(c.wait_for(lambda c: cluster("b") in c.resources(CDS)) for c in clients))
            versions = {c.resources(CDS)[cluster("b")].version for c in clients}
            assert len(versions) == 1
    finally:
        await asyncio.gather(*(c.stop() for c in clients))
