"""``DeltaXdsClient(keep_resources=False)`` (ztunnel-py's client): handlers still see every packed resource,
the state keeps only names and versions, and a reconnect still resumes from those versions."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from xds_harness import Harness, pod, service, start_harness, stop_harness

from istiopy.api.xds_client import DeltaUpdate, DeltaXdsClient
from istiopy.testing.envoy import free_port
from istiopy.xds import types

CDS = types.CLUSTER


def cluster(name: str) -> str:
    return f"outbound|80||{name}.default.svc.cluster.local"


def node() -> base_pb2.Node:
    return base_pb2.Node(id="sidecar~127.0.0.1~c0.default~default.svc.cluster.local")


def seed(h: Harness, *names: str) -> None:
    for i, name in enumerate(names):
        h.store.apply(service(name, 80, 8080, vip=f"10.96.0.{i + 10}"))
        h.store.apply(pod(f"{name}-1", f"10.0.0.{i + 10}", {"app": name}))


async def test_handler_sees_resources_but_state_keeps_only_names_and_versions(harness: Harness) -> None:
    seed(harness, "a", "b")
    seen: dict[str, str] = {}

    def handler(update: DeltaUpdate) -> None:
        for name, held in update.updated.items():
            seen[name] = held.unpack(cluster_pb2.Cluster).name

    client = DeltaXdsClient(f"127.0.0.1:{harness.port}", node(), keep_resources=False)
    client.subscribe(CDS, handler)
    async with client, asyncio.timeout(10):
        await client.wait_for(lambda c: len(c.resources(CDS)) == 2)
    assert seen == {cluster("a"): cluster("a"), cluster("b"): cluster("b")}
    held = client.resources(CDS)[cluster("a")]
    assert held.resource is None
    assert held.version  # what initial_resource_versions needs on a reconnect
    with pytest.raises(ValueError, match="was not kept"):
        held.unpack(cluster_pb2.Cluster)


async def test_reconnect_without_kept_resources_resends_nothing_unchanged() -> None:
    port = free_port()
    h = await start_harness(plaintext_address=f"127.0.0.1:{port}")
    seed(h, "a", "b")
    updates: list[DeltaUpdate] = []
    client = DeltaXdsClient(
        f"127.0.0.1:{port}", node(), backoff_initial=0.05, backoff_max=0.2, keep_resources=False
    )
    client.subscribe(CDS, updates.append)
    try:
        async with asyncio.timeout(20):
            await client.start()
            await client.wait_for(lambda c: len(c.resources(CDS)) == 2)
            await stop_harness(h)
            await client.wait_for(lambda c: not c.connected.is_set())

            h = await start_harness(plaintext_address=f"127.0.0.1:{port}")
            seed(h, "a", "b", "c")
            before = len(updates)
            await client.wait_for(lambda c: c.connects >= 2 and cluster("c") in c.resources(CDS))
            sent = sorted(n for u in updates[before:] for n in u.updated)
            assert sent == [cluster("c")]  # a and b unchanged: their versions went up, nothing came back
    finally:
        await client.stop()
        await stop_harness(h)


async def test_max_connection_age_moves_clients_to_a_new_connection_without_losing_config() -> None:
    """istiod's KEEPALIVE_MAX_SERVER_CONNECTION_AGE: the server sends GOAWAY once a connection is that old;
    the client dials again and resumes from its versions, and a change made meanwhile still arrives."""
    h = await start_harness(max_connection_age=1.0, max_connection_age_grace=0.3)
    seed(h, "a", "b")
    client = DeltaXdsClient(
        f"127.0.0.1:{h.port}", node(), backoff_initial=0.05, backoff_max=0.2, keep_resources=False
    )
    client.subscribe(CDS, lambda _u: None)
    try:
        async with asyncio.timeout(20):
            await client.start()
            await client.wait_for(lambda c: len(c.resources(CDS)) == 2)
            await client.wait_for(lambda c: c.connects >= 3)  # aged out twice
            assert len(client.resources(CDS)) == 2  # nothing lost across the reconnects
            seed(h, "a", "b", "c")
            await client.wait_for(lambda c: cluster("c") in c.resources(CDS))
    finally:
        await client.stop()
        await stop_harness(h)


def test_max_connection_age_is_a_grpc_server_option() -> None:
    from istiopy.xds.server import ServerOptions

    opts = dict(ServerOptions(max_connection_age=1800.0).channel_options())
    assert opts["grpc.max_connection_age_ms"] == 1_800_000
    assert opts["grpc.max_connection_age_grace_ms"] == 10_000
    assert "grpc.max_connection_age_ms" not in dict(ServerOptions().channel_options())
