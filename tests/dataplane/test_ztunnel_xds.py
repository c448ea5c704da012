"""ztunnel-py's WDS/WADS handlers behind the real delta ADS client and server: node identity, ACK, NACK with
keep-last-good, reconnect catching up. The served resources come from generators over a plain dict, so a
test can serve exactly what it needs (including a malformed resource no real generator would produce)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import istiopy.mesh.resources  # noqa: F401  (registers every kind)
from istiopy.api.identity import SpiffeId
from istiopy.api.tls import CertBundle
from istiopy.api.xds_client import DeltaXdsClient
from istiopy.ca.authority import generate_root
from istiopy.ca.service import CaConfig, CertificateAuthority
from istiopy.dataplane.identity import SecretManager
from istiopy.dataplane.proxy import ProxyConfig, Ztunnel, build_node
from istiopy.dataplane.state import ADDRESS_TYPE, AUTHORIZATION_TYPE
from istiopy.mesh.kinds import parse
from istiopy.mesh.store import ConfigStore
from istiopy.testing import ztunnel as b
from istiopy.xds.push import PushPipeline
from istiopy.xds.registry import Generator, GeneratorRegistry, shared
from istiopy.xds.server import ServerOptions, XdsServer
from istiopy.xds.stream import Kind, RequestOutcome

SVC = b.service_key("echo", "srv")


@dataclass
class Served:
    """What the test control plane serves, per type URL: resource name -> message."""

    store: ConfigStore
    resources: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {ADDRESS_TYPE: {}, AUTHORIZATION_TYPE: {}}
    )
    bump: int = 0

    def push(self) -> None:
        """Change the store so the pipeline regenerates (content comes from ``resources``)."""
        self.bump += 1
        self.store.apply(parse({"apiVersion": "v1", "kind": "Namespace",
                                "metadata": {"name": "bump", "labels": {"n": str(self.bump)}}}))  # fmt: skip


@dataclass
class Plane:
    served: Served
    pipeline: PushPipeline
    server: XdsServer
    port: int
    outcomes: list[RequestOutcome]

    async def restart(self) -> None:
        await self.server.stop(0.1)
        self.server = XdsServer(self.pipeline, ServerOptions(plaintext_address=f"127.0.0.1:{self.port}"))
        self.server.request_listeners.append(lambda c, o, now: self.outcomes.append(o))
        await self.server.start()


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    served = Served(ConfigStore())
    registry = GeneratorRegistry()
    for type_url in (ADDRESS_TYPE, AUTHORIZATION_TYPE):
        registry.register(
            Generator(
                type_url=type_url,
                generate=lambda store, proxy, t=type_url: sorted(served.resources[t].items()),  # type: ignore[misc]
                scope=shared,
                proxy_kinds=frozenset({"ztunnel"}),
                name=f"test-{type_url.rsplit('.', 1)[-1]}",
            )
        )
    pipeline = PushPipeline(served.store, registry, debounce_after=0.01, debounce_max=0.2)
    server = XdsServer(pipeline, ServerOptions(plaintext_address="127.0.0.1:0"))
    outcomes: list[RequestOutcome] = []
    server.request_listeners.append(lambda c, o, now: outcomes.append(o))
    await pipeline.start()
    port = (await server.start())["plaintext"]
    p = Plane(served, pipeline, server, port, outcomes)
    try:
        yield p
    finally:
        await p.server.stop(0.1)
        await pipeline.stop()


@pytest.fixture
async def ztunnel(plane: Plane) -> AsyncIterator[Ztunnel]:
    authority = CertificateAuthority(CaConfig(), generate_root("cluster.local"))

    async def fetch(ident: SpiffeId) -> CertBundle:
        return authority.issue_workload(ident)

    config = ProxyConfig(node_name="node-x", pod_name="ztunnel-x", instance_ip="10.9.9.9")
    zt = Ztunnel(config, SecretManager(fetch), admin_addr=None)
    zt.attach_xds(
        DeltaXdsClient(f"127.0.0.1:{plane.port}", build_node(config), backoff_initial=0.05, backoff_max=0.2)
    )
    await zt.start()
    try:
        yield zt
    finally:
        await zt.stop()


async def _until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):
        while not cond():  # noqa: ASYNC110 - state is applied by the client's task
            await asyncio.sleep(0.02)


async def test_node_identity_ack_nack_and_reconnect(plane: Plane, ztunnel: Ztunnel) -> None:
    served = plane.served.resources
    a = b.workload("echo-1", "srv", "10.8.0.1", services={SVC: {80: 8080}})
    served[ADDRESS_TYPE] = {SVC: b.service("echo", "srv", "10.96.8.1", {80: 8080}), a.workload.uid: a}
    served[AUTHORIZATION_TYPE] = {
        "srv/deny": b.policy("deny", "srv", [[[b.match(destination_ports=[9])]]], action="DENY")
    }
    plane.served.push()
    st = ztunnel.state
    await _until(lambda: st.ready and st.workload_by_ip("10.8.0.1") is not None and "srv/deny" in st.policies)
    # istiod saw a ztunnel: the node id and metadata as upstream ztunnel sends them.
    [conn] = list(plane.server.connections.values())
    assert conn.proxy is not None
    assert conn.proxy.id == "ztunnel~10.9.9.9~ztunnel-x.istio-system~istio-system.svc.cluster.local"
    assert conn.proxy.kind == "ztunnel"
    await _until(lambda: any(o.kind == Kind.ACK and o.type_url == AUTHORIZATION_TYPE for o in plane.outcomes))

    # A malformed workload next to a good one: NACK naming it; the last good one keeps serving.
    bad = b.workload("echo-1", "srv", "10.8.0.1", services={SVC: {80: 8080}})
    bad.workload.addresses[0] = b"\x0a\x08\x00"
    good = b.workload("echo-2", "srv", "10.8.0.2", services={SVC: {80: 8080}})
    served[ADDRESS_TYPE] = {**served[ADDRESS_TYPE], a.workload.uid: bad, good.workload.uid: good}
    plane.served.push()
    await _until(lambda: any(o.kind == Kind.NACK for o in plane.outcomes))
    nack = next(o for o in plane.outcomes if o.kind == Kind.NACK)
    assert nack.type_url == ADDRESS_TYPE
    assert a.workload.uid in nack.error
    assert "4 or 16 bytes" in nack.error
    assert st.workload_by_ip("10.8.0.1") is not None  # last good
    assert st.workload_by_ip("10.8.0.2") is not None  # the valid sibling applied
    assert ztunnel.outbound.plan(("10.96.8.1", 80)).hbone

    # The control plane goes away and comes back with different content: the client catches up.
    await plane.server.stop(0.1)
    served[ADDRESS_TYPE] = {SVC: served[ADDRESS_TYPE][SVC], good.workload.uid: good}
    served[AUTHORIZATION_TYPE] = {}
    plane.served.push()
    await asyncio.sleep(0.3)
    assert "srv/deny" in st.policies  # nothing changes while it is away
    await plane.restart()
    await _until(lambda: "srv/deny" not in st.policies and st.workload_by_ip("10.8.0.1") is None)
    assert [w.name for w, _ in st.endpoints(SVC)] == ["echo-2"]


async def test_reconnect_drops_resources_deleted_while_away_after_a_partial_nack(
    plane: Plane, ztunnel: Ztunnel
) -> None:
    served = plane.served.resources
    a = b.workload("echo-1", "srv", "10.8.1.1")
    served[ADDRESS_TYPE] = {a.workload.uid: a}
    plane.served.push()
    st = ztunnel.state
    await _until(lambda: st.workload_by_ip("10.8.1.1") is not None)
    # A partly bad update: the good sibling is applied by the state but unknown to the client (NACK).
    bad = b.workload("echo-1", "srv", "10.8.1.1")
    bad.workload.ClearField("namespace")
    extra = b.workload("extra", "srv", "10.8.1.2")
    served[ADDRESS_TYPE] = {a.workload.uid: bad, extra.workload.uid: extra}
    plane.served.push()
    await _until(lambda: st.workload_by_ip("10.8.1.2") is not None)
    # While the control plane is away the extra workload is deleted.
    await plane.server.stop(0.1)
    del served[ADDRESS_TYPE][extra.workload.uid]
    plane.served.push()
    await plane.restart()
    await _until(lambda: st.workload_by_ip("10.8.1.2") is None)
    assert st.workload_by_ip("10.8.1.1") is not None  # still the last good version
    assert st.workload_by_uid(a.workload.uid).namespace == "srv"  # type: ignore[union-attr]
