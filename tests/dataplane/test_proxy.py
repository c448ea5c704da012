"""ztunnel-py's byte path end to end on real namespaces: two in-process node proxies, captured pods, HBONE.

The proxies run in the test's event loop (their data-path sockets live in the pods' namespaces, exactly as in
production); WDS/WADS are applied to their state directly (the xDS path is covered by the integration test).
Certificates come from a real in-process CA.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from istiopy.api.identity import SpiffeId
from istiopy.api.tls import CertBundle, client_context
from istiopy.ca.authority import generate_root
from istiopy.ca.service import CaConfig, CertificateAuthority
from istiopy.dataplane import sockets
from istiopy.dataplane.admin import LocalWorkloadInfo
from istiopy.dataplane.hbone import HboneError, HbonePool, hbone_headers
from istiopy.dataplane.identity import SecretManager
from istiopy.dataplane.proxy import ProxyConfig, Ztunnel
from istiopy.testing import ztunnel as b
from istiopy.testing.netns import Pod, Topology

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SVC_VIP = "10.96.7.10"
SVC = b.service_key("echo", "srv")


@dataclass
class Mesh:
    topo: Topology
    zts: list[Ztunnel]
    pods: dict[str, Pod]
    authority: CertificateAuthority
    # The CA holds back certificates for these identities until the event is set (an issuance in flight).
    held: dict[SpiffeId, asyncio.Event]

    def apply(self, *addrs: object, removed: tuple[str, ...] = ()) -> None:
        for zt in self.zts:
            zt.state.apply_addresses({b.resource_name(a): a for a in addrs}, removed)  # type: ignore[arg-type]

    def policies(self, *pols: object, removed: tuple[str, ...] = ()) -> None:
        for zt in self.zts:
            zt.state.apply_authorizations({f"{p.namespace}/{p.name}": p for p in pols}, removed)  # type: ignore[attr-defined]

    def workload(self, pod: Pod, **kw: object) -> object:
        return b.workload(
            pod.name,
            pod.namespace,
            pod.ip,
            service_account=pod.service_account,
            node=pod.node.name,
            uid=pod.uid,
            **kw,  # type: ignore[arg-type]
        )


async def _http_get(pod: Pod, host: str, port: int) -> dict[str, str]:
    r, w = await pod.open_connection(host, port)
    try:
        w.write(b"GET /hello HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        await w.drain()
        raw = await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
    if not raw:
        raise ConnectionResetError("empty response")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)  # type: ignore[no-any-return]


async def _refused(pod: Pod, host: str, port: int) -> bool:
    """True when the connection is closed/reset without an HTTP answer (policy deny, no upstream)."""
    try:
        await _http_get(pod, host, port)
    except (ConnectionError, OSError, asyncio.IncompleteReadError, json.JSONDecodeError):
        return True
    return False


@pytest.fixture
async def mesh(topology: Topology) -> AsyncIterator[Mesh]:
    authority = CertificateAuthority(CaConfig(), generate_root("cluster.local"))

    held: dict[SpiffeId, asyncio.Event] = {}

    async def fetch(ident: SpiffeId) -> CertBundle:
        if ident in held:
            await held[ident].wait()
        return authority.issue_workload(ident)

    n0, n1 = topology.add_node("node-0"), topology.add_node("node-1")
    pods = {
        "sleep": topology.add_pod("sleep", "cli", node=n0, service_account="sleep"),
        "other": topology.add_pod("other", "cli", node=n0, service_account="other"),
        "srv-1": topology.add_pod("srv-1", "srv", node=n1),
        "srv-2": topology.add_pod("srv-2", "srv", node=n1),
        "srv-3": topology.add_pod("srv-3", "srv", node=n0),
        "legacy": topology.add_pod("legacy", "legacy", node=n0),  # not in the mesh, not captured
    }
    for name, pod in pods.items():
        pod.spawn_server("http", port=8080)
        if pod.namespace == "srv":
            pod.spawn_server("echo", port=9000)
        if name != "legacy":
            b.install_capture(pod)
    zts: list[Ztunnel] = []
    try:
        for node in (n0, n1):
            zt = Ztunnel(
                ProxyConfig(node_name=node.name, instance_ip=node.ip),
                SecretManager(fetch),
                admin_addr=("127.0.0.1", 0),
                metrics_addr=None,
                readiness_addr=None,
            )
            await zt.start()
            zts.append(zt)
        mesh = Mesh(topology, zts, pods, authority, held)
        mesh.apply(
            b.service("echo", "srv", SVC_VIP, {80: 8080}),
            *(
                mesh.workload(p, services={SVC: {80: 8080}} if p.namespace == "srv" else None)
                for n, p in pods.items()
                if n != "legacy"
            ),
        )
        mesh.policies()
        for zt, node in zip(zts, (n0, n1), strict=True):
            for pod in node.pods:
                if pod.name == "legacy":
                    continue
                fd = pod.open_netns()
                try:
                    await zt.add_pod(
                        LocalWorkloadInfo(pod.uid, pod.name, pod.namespace, pod.service_account), fd
                    )
                finally:
                    os.close(fd)
        yield mesh
    finally:
        for zt in zts:
            await zt.stop()


async def test_cross_node_hbone_mtls_carries_identity(mesh: Mesh) -> None:
    sleep, srv1 = mesh.pods["sleep"], mesh.pods["srv-1"]
    marker = "x-marker-7f3a9c"
    with mesh.topo.sniff() as cap:
        r, w = await sleep.open_connection(srv1.ip, 8080)
        w.write(f"GET /{marker} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        raw = await asyncio.wait_for(r.read(), 10)
        w.close()
        await asyncio.sleep(0.3)
    body = json.loads(raw.partition(b"\r\n\r\n")[2])
    assert body["pod"] == "srv-1"
    assert body["path"] == f"/{marker}"
    assert (
        body["peer"].split(":")[0] == sleep.ip
    )  # the app sees the client's IP (IP_TRANSPARENT), not the pod's
    text = cap.text
    assert f"{srv1.ip}.15008" in text  # the tunnel went to the destination pod's HBONE port
    assert f"{srv1.ip}.8080" not in text  # and never as plaintext to the app port
    assert marker not in text  # the payload was encrypted on the wire
    # The destination node's proxy saw the client's SPIFFE identity (inbound metrics, reporter=destination).
    metrics = mesh.zts[1].metrics.render().decode()
    inbound = [
        line
        for line in metrics.splitlines()
        if line.startswith("istio_tcp_connections_opened_total{") and 'reporter="destination"' in line
    ]
    assert any('source_principal="spiffe://cluster.local/ns/cli/sa/sleep"' in x for x in inbound), inbound
    assert any(
        'destination_workload="srv"' in x and 'destination_workload_namespace="srv"' in x for x in inbound
    )


async def test_first_connection_waits_for_a_certificate_still_being_issued(mesh: Mesh) -> None:
    """A pod's first inbound connection can arrive before the CA answered its certificate prefetch (the
    source pod started earlier): the handshake waits for the certificate instead of being refused."""
    late = mesh.topo.add_pod("late", "slow", node=mesh.topo.nodes[1], service_account="late")
    late.spawn_server("http", port=8080)
    b.install_capture(late)
    identity = SpiffeId("cluster.local", "slow", "late")
    issued = mesh.held[identity] = asyncio.Event()
    mesh.apply(mesh.workload(late))
    fd = late.open_netns()
    try:
        await mesh.zts[1].add_pod(LocalWorkloadInfo(late.uid, late.name, late.namespace, "late"), fd)
    finally:
        os.close(fd)
    assert mesh.zts[1].secrets.current(identity) is None  # still being issued
    call = asyncio.ensure_future(_http_get(mesh.pods["sleep"], late.ip, 8080))
    await asyncio.sleep(0.5)
    assert not call.done(), call  # neither answered nor refused: waiting for the CA
    issued.set()
    assert (await asyncio.wait_for(call, 10))["pod"] == "late"


@pytest.mark.parametrize("via", ["hbone", "plaintext"])
async def test_connection_to_a_pod_wds_does_not_know_yet_waits_for_its_workload(mesh: Mesh, via: str) -> None:
    """ZDS hands ztunnel a new pod at once; its WDS workload can come a moment later. A connection in that
    gap waits for it on the destination node: over HBONE (the source node already knows the pod) or as
    plaintext (neither knows it yet, so the source passes it through)."""
    fresh = mesh.topo.add_pod("fresh", "srv", node=mesh.topo.nodes[1], service_account="fresh")
    fresh.spawn_server("http", port=8080)
    b.install_capture(fresh)
    fd = fresh.open_netns()
    try:
        await mesh.zts[1].add_pod(LocalWorkloadInfo(fresh.uid, fresh.name, fresh.namespace, "fresh"), fd)
    finally:
        os.close(fd)
    workload = mesh.workload(fresh)
    if via == "hbone":
        mesh.zts[0].state.apply_addresses({b.resource_name(workload): workload})  # type: ignore[arg-type]
    with mesh.topo.sniff() as cap:
        call = asyncio.ensure_future(_http_get(mesh.pods["sleep"], fresh.ip, 8080))
        await asyncio.sleep(0.5)
        assert not call.done(), call  # waiting for WDS, not refused
        mesh.apply(workload)
        assert (await asyncio.wait_for(call, 10))["pod"] == "fresh"
        await asyncio.sleep(0.2)
    assert (f"{fresh.ip}.15008" in cap.text) == (via == "hbone"), cap.text[-2000:]


async def test_service_vip_round_robins_across_three_backends(mesh: Mesh) -> None:
    sleep = mesh.pods["sleep"]
    seen = Counter([(await _http_get(sleep, SVC_VIP, 80))["pod"] for _ in range(6)])
    assert seen == {"srv-1": 2, "srv-2": 2, "srv-3": 2}
    # A pod removed from the service gets no new connections.
    mesh.apply(mesh.workload(mesh.pods["srv-2"]))
    seen = Counter([(await _http_get(sleep, SVC_VIP, 80))["pod"] for _ in range(4)])
    assert seen == {"srv-1": 2, "srv-3": 2}


async def test_l4_policy_allow_and_deny(mesh: Mesh) -> None:
    sleep, other, srv1 = mesh.pods["sleep"], mesh.pods["other"], mesh.pods["srv-1"]
    assert (await _http_get(sleep, srv1.ip, 8080))["pod"] == "srv-1"
    # Allow by principal: only sleep may call the srv namespace.
    mesh.policies(b.policy("only-sleep", "srv", [[[b.match(principals=["cluster.local/ns/cli/sa/sleep"])]]]))
    assert (await _http_get(sleep, srv1.ip, 8080))["pod"] == "srv-1"
    assert await _refused(other, srv1.ip, 8080)
    # DENY beats ALLOW: deny the sleep principal on port 8080.
    mesh.policies(
        b.policy("deny-8080", "srv", [[[b.match(destination_ports=[8080])]]], action="DENY"),
    )
    assert await _refused(sleep, srv1.ip, 8080)
    # spec: {} (no rules) allows nothing.
    mesh.policies(b.policy("nothing", "srv", []), removed=("srv/deny-8080", "srv/only-sleep"))
    assert await _refused(sleep, SVC_VIP, 80)
    mesh.policies(removed=("srv/nothing",))
    assert (await _http_get(sleep, srv1.ip, 8080))["pod"] == "srv-1"


async def test_plaintext_inbound_has_no_identity_and_non_mesh_passes_through(mesh: Mesh) -> None:
    legacy, sleep, srv1 = mesh.pods["legacy"], mesh.pods["sleep"], mesh.pods["srv-1"]
    # A client outside the mesh reaches a mesh pod in plaintext (captured on 15006) while no policy says no.
    body = await _http_get(legacy, srv1.ip, 8080)
    assert body["pod"] == "srv-1"
    assert body["peer"].split(":")[0] == legacy.ip
    mesh.policies(b.policy("mtls-only", "srv", [[[b.match(principals=[b.presence()])]]]))
    assert await _refused(legacy, srv1.ip, 8080)
    assert (await _http_get(sleep, srv1.ip, 8080))["pod"] == "srv-1"
    mesh.policies(removed=("srv/mtls-only",))
    # A mesh client calling a non-mesh destination: plain TCP straight through, source IP is the pod's.
    body = await _http_get(sleep, legacy.ip, 8080)
    assert body["pod"] == "legacy"
    assert body["peer"].split(":")[0] == sleep.ip
    dump = mesh.zts[0].tracker.metrics.render().decode()
    assert 'destination_workload="unknown"' in dump


async def _hbone_from(
    mesh: Mesh, pod: Pod, dst_ip: str, authority: str, bundle: CertBundle
) -> tuple[int | None, str]:
    """Open one CONNECT from inside ``pod`` (marked socket: not captured) with ``bundle``'s identity."""
    pool = HbonePool(connect_timeout=5, response_timeout=5)
    fd = pod.open_netns()

    async def dial(addr: tuple[str, int]) -> socket.socket:
        return await sockets.async_connect_in_netns(fd, addr)

    try:
        stream = await pool.open_stream(
            ("test", dst_ip), (dst_ip, 15008), authority, hbone_headers(("10.0.0.1", 1)),
            client_context(bundle), connect=dial,
        )  # fmt: skip
        stream.reset()
        return 200, ""
    except HboneError as e:
        return e.status, str(e)
    except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as e:
        return None, f"{type(e).__name__}: {e}"
    finally:
        await pool.close()
        os.close(fd)


async def test_bad_hbone_requests_are_refused_and_the_proxy_keeps_serving(mesh: Mesh) -> None:
    sleep, srv1 = mesh.pods["sleep"], mesh.pods["srv-1"]
    good = mesh.authority.issue_workload(SpiffeId("cluster.local", "cli", "sleep"))
    assert (await _hbone_from(mesh, sleep, srv1.ip, f"{srv1.ip}:8080", good))[0] == 200
    # A CONNECT to an address that is not the pod behind this listener (here: outside the mesh) -> 400.
    assert (await _hbone_from(mesh, sleep, srv1.ip, "192.0.2.10:80", good))[0] == 400
    assert (await _hbone_from(mesh, sleep, srv1.ip, f"{mesh.pods['srv-2'].ip}:8080", good))[0] == 400
    # A client certificate from a foreign root never gets past the handshake.
    foreign = CertificateAuthority(CaConfig(), generate_root("cluster.local"))
    status, why = await _hbone_from(
        mesh,
        sleep,
        srv1.ip,
        f"{srv1.ip}:8080",
        foreign.issue_workload(SpiffeId("cluster.local", "cli", "sleep")),
    )
    assert status is None, why
    # Garbage instead of TLS: the connection is dropped.
    fd = sleep.open_netns()
    try:
        s = await sockets.async_connect_in_netns(fd, (srv1.ip, 15008))
    finally:
        os.close(fd)
    r, w = await asyncio.open_connection(sock=s)
    w.write(b"GET / HTTP/1.1\r\n\r\n" + bytes(range(256)) * 8)
    await w.drain()
    assert await asyncio.wait_for(r.read(), 15) == b""
    w.close()
    # The proxy still serves real traffic afterwards.
    assert (await _http_get(sleep, srv1.ip, 8080))["pod"] == "srv-1"


async def test_outbound_connections_share_one_pooled_hbone_connection(mesh: Mesh) -> None:
    sleep, srv1 = mesh.pods["sleep"], mesh.pods["srv-1"]
    for _ in range(5):
        assert (await _http_get(sleep, srv1.ip, 8080))["pod"] == "srv-1"
    assert mesh.zts[0].pool_for(sleep.uid).connection_count() == 1
    assert mesh.zts[1].pods[srv1.uid].hbone.handshake_failures == 0


async def _closed_by_peer(r: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(r.read(100), 10) == b""
    except ConnectionResetError:
        return True


async def test_policy_change_closes_existing_connections_it_no_longer_allows(mesh: Mesh) -> None:
    sleep, legacy, srv1 = mesh.pods["sleep"], mesh.pods["legacy"], mesh.pods["srv-1"]
    r1, w1 = await sleep.open_connection(srv1.ip, 9000)  # HBONE
    r2, w2 = await legacy.open_connection(srv1.ip, 9000)  # captured plaintext
    r3, w3 = await sleep.open_connection(srv1.ip, 8080)  # HBONE, another port: stays allowed
    for r, w in ((r1, w1), (r2, w2)):
        w.write(b"ping")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(4), 10) == b"ping"
    mesh.policies(b.policy("no-echo", "srv", [[[b.match(destination_ports=[9000])]]], action="DENY"))
    assert await _closed_by_peer(r1)
    assert await _closed_by_peer(r2)
    w3.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    await w3.drain()
    assert (await asyncio.wait_for(r3.read(), 10)).startswith(b"HTTP/1.1 200")
    for w in (w1, w2, w3):
        w.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_no_fd_leak_across_allowed_denied_and_failed_connections(mesh: Mesh) -> None:
    sleep, legacy, srv1 = mesh.pods["sleep"], mesh.pods["legacy"], mesh.pods["srv-1"]

    async def round_trip() -> None:
        assert (await _http_get(sleep, srv1.ip, 8080))["pod"] == "srv-1"
        assert (await _http_get(legacy, srv1.ip, 8080))["pod"] == "srv-1"
        assert await _refused(sleep, srv1.ip, 1)  # nothing listens there: the app dial fails (503)

    await round_trip()  # warm up: pooled HBONE connections, certificates, contexts
    await asyncio.sleep(0.2)
    before = _fds()
    for _ in range(10):
        await round_trip()
    mesh.policies(b.policy("deny-all", "srv", []))
    for _ in range(10):
        assert await _refused(sleep, srv1.ip, 8080)
        assert await _refused(legacy, srv1.ip, 8080)
    mesh.policies(removed=("srv/deny-all",))
    await round_trip()
    # Closed connections release their fds a few loop turns later (more on a loaded machine): wait for
    # the count to settle rather than for a fixed time; a real leak never settles and fails at the deadline.
    deadline = asyncio.get_running_loop().time() + 20
    while _fds() > before + 2 and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110 - polls /proc
        await asyncio.sleep(0.1)
    assert _fds() <= before + 2, (before, _fds())
    assert mesh.zts[0].pool_for(sleep.uid).connection_count() == 1


async def test_workload_waypoint_is_enforced_on_inbound(mesh: Mesh) -> None:
    """A destination with a waypoint accepts HBONE only from that waypoint's identity (401 for others)."""
    sleep, srv1 = mesh.pods["sleep"], mesh.pods["srv-1"]
    wp_svc = b.service_key("waypoint", "srv")
    mesh.apply(
        b.service("waypoint", "srv", "10.96.7.99", {15008: 15008}),
        b.workload(
            "waypoint-0", "srv", "10.244.9.9", service_account="waypoint", services={wp_svc: {15008: 15008}}
        ),
        mesh.workload(
            srv1,
            services={SVC: {80: 8080}},
            waypoint=b.gateway(hostname="waypoint.srv.svc.cluster.local", namespace="srv"),
        ),
    )
    as_sleep = mesh.authority.issue_workload(SpiffeId("cluster.local", "cli", "sleep"))
    as_waypoint = mesh.authority.issue_workload(SpiffeId("cluster.local", "srv", "waypoint"))
    status, why = await _hbone_from(mesh, sleep, srv1.ip, f"{srv1.ip}:8080", as_sleep)
    assert status == 401, why
    assert (await _hbone_from(mesh, sleep, srv1.ip, f"{srv1.ip}:8080", as_waypoint))[0] == 200


async def test_half_close_crosses_the_mesh(mesh: Mesh) -> None:
    """The client's FIN reaches the app through both proxies and HBONE; the app's answer still flows back."""
    sleep, srv1 = mesh.pods["sleep"], mesh.pods["srv-1"]
    payload = b"x" * 300_000  # several HBONE DATA frames and TCP segments
    r, w = await sleep.open_connection(srv1.ip, 9000)  # echo: replies, then half-closes on our FIN
    w.write(payload)
    await w.drain()
    w.write_eof()
    got = await asyncio.wait_for(r.read(), 20)  # everything, then EOF (the app's FIN came back)
    assert got == payload
    w.close()
