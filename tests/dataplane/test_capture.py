"""In-pod capture on real namespaces and real iptables: apps are redirected without knowing it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from istiopy.api.identity import SpiffeId
from istiopy.dataplane import sockets
from istiopy.dataplane.capture import (
    CaptureConfig,
    capture_installed,
    capture_rules,
    install_capture,
    remove_capture,
)
from istiopy.dataplane.hbone import (
    Accept,
    ConnectRequest,
    Decision,
    HboneError,
    HbonePool,
    HboneServer,
    PoolKey,
    TcpStream,
    hbone_headers,
    relay,
)
from istiopy.dataplane.inpod import InpodListeners, PodNetns
from istiopy.dataplane.nodeagent import NodeAgent, PodSpec
from istiopy.dataplane.zds import ZdsClient, ZdsWorkload
from istiopy.testing.certs import TestCA
from istiopy.testing.netns import Pod, Topology

pytestmark = pytest.mark.netns

APP_CLIENT = """
import json, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"GET /x HTTP/1.1\\r\\nhost: b\\r\\nconnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(json.dumps({"local": s.getsockname()[0], "body": data.split(b"\\r\\n\\r\\n", 1)[1].decode()}))
"""


async def run_app(pod: Pod, host: str, port: int) -> dict[str, str]:
    """A real process in the pod that knows nothing of the mesh: plain connect to host:port."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", pod.netns, sys.executable, "-c", APP_CLIENT, host, str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    result: dict[str, str] = json.loads(out)
    return result


@dataclass
class MiniProxy:
    """The smallest proxy that exercises the kernel side: in-pod listeners, SO_ORIGINAL_DST, marked and
    transparent upstream sockets. (The real proxy is ``istiopy.dataplane.proxy``.)"""

    seen: list[tuple[str, tuple[str, int], tuple[str, int]]] = field(default_factory=list)
    servers: list[asyncio.Server] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def serve(self, pod: Pod, ns: PodNetns, *, transparent: bool) -> None:
        ls = ns.open_listeners()

        async def outbound(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            sock = w.get_extra_info("socket")
            dst = sockets.original_dst(sock)
            self.seen.append(("outbound", w.get_extra_info("peername")[:2], dst))
            up = await ns.connect(dst)  # marked: escapes the capture, source is the pod IP
            await relay(TcpStream(r, w), await TcpStream.from_socket(up))

        async def inbound(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            sock = w.get_extra_info("socket")
            dst = sockets.original_dst(sock)
            peer = w.get_extra_info("peername")[:2]
            self.seen.append(("inbound", peer, dst))
            source = (peer[0], 0) if transparent else None
            up = await ns.connect(dst, source=source, transparent=transparent)
            await relay(TcpStream(r, w), await TcpStream.from_socket(up))

        async def hbone(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.seen.append(("hbone", w.get_extra_info("peername")[:2], w.get_extra_info("sockname")[:2]))
            w.write(b"hbone listener")
            w.close()

        for sock, handler in ((ls.outbound, outbound), (ls.inbound, inbound), (ls.hbone, hbone)):
            self.servers.append(await asyncio.start_server(handler, sock=sock))

    async def close(self) -> None:
        for s in self.servers:
            s.close()
        for s in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 2)


@pytest.fixture
async def proxy() -> AsyncIterator[MiniProxy]:
    p = MiniProxy()
    try:
        yield p
    finally:
        await p.close()


async def test_outbound_and_inbound_capture_with_original_dst_and_source(
    topology: Topology, proxy: MiniProxy
) -> None:
    n0, n1 = topology.add_node("n0"), topology.add_node("n1")
    a, b = topology.add_pod("a", node=n0), topology.add_pod("b", node=n1)
    b.spawn_server("http", port=8080)
    with PodNetns.from_path(a.netns_path) as na, PodNetns.from_path(b.netns_path) as nb:
        install_capture(na.fd)
        install_capture(nb.fd)
        assert capture_installed(na.fd)
        await proxy.serve(a, na, transparent=True)
        await proxy.serve(b, nb, transparent=True)

        result = await run_app(a, b.ip, 8080)

        body = json.loads(result["body"])
        assert result["local"] == a.ip  # the app connected from its own IP, to b's IP: it saw nothing
        assert body["pod"] == "b"
        kinds = [s[0] for s in proxy.seen]
        assert kinds == ["outbound", "inbound"]
        _, out_peer, out_dst = proxy.seen[0]
        assert out_dst == (b.ip, 8080)  # SO_ORIGINAL_DST in a's netns
        assert out_peer[0] == a.ip
        _, in_peer, in_dst = proxy.seen[1]
        assert in_dst == (b.ip, 8080)  # SO_ORIGINAL_DST in b's netns: redirected to 15006
        assert in_peer[0] == a.ip  # a's proxy socket left from a's IP
        # IP_TRANSPARENT delivery: the app in b saw a's IP as its peer, and its replies came back
        assert body["peer"].split(":")[0] == a.ip


async def test_hbone_port_is_not_redirected(topology: Topology, proxy: MiniProxy) -> None:
    a, b = topology.add_pod("a"), topology.add_pod("b")
    with PodNetns.from_path(a.netns_path) as na, PodNetns.from_path(b.netns_path) as nb:
        install_capture(na.fd)
        install_capture(nb.fd)
        await proxy.serve(b, nb, transparent=False)
        sock = await na.connect((b.ip, 15008))  # what a's proxy does: marked, from a's netns
        r, w = await asyncio.open_connection(sock=sock)
        assert await asyncio.wait_for(r.read(), 5) == b"hbone listener"
        w.close()
        assert proxy.seen == [("hbone", (a.ip, proxy.seen[0][1][1]), (b.ip, 15008))]


async def test_remove_capture_leaves_nothing_and_traffic_flows_direct(
    topology: Topology, proxy: MiniProxy
) -> None:
    a, b = topology.add_pod("a"), topology.add_pod("b")
    b.spawn_server("http", port=8080)
    with PodNetns.from_path(a.netns_path) as na:
        install_capture(na.fd)
        install_capture(na.fd)  # idempotent: one set of jumps
        saved = a.run(["iptables-save"]).stdout
        assert saved.count("-A OUTPUT -j ISTIOPY_OUTPUT") == 1
        assert saved.count("-A PREROUTING -j ISTIOPY_PRERT") == 1
        assert "0x111/0xfff lookup 133" in a.run(["ip", "rule"]).stdout
        remove_capture(na.fd)
        assert not capture_installed(na.fd)
        assert "ISTIOPY_" not in a.run(["iptables-save"]).stdout
        assert "lookup 133" not in a.run(["ip", "rule"]).stdout
        assert a.run(["ip", "route", "show", "table", "133"], check=False).stdout.strip() == ""
        # no listener on 15001 and no rules: the app reaches b directly
        result = await run_app(a, b.ip, 8080)
        assert json.loads(result["body"])["peer"].split(":")[0] == a.ip
        remove_capture(na.fd)  # removing twice is harmless


def test_rules_shape() -> None:
    rules = capture_rules(
        CaptureConfig(exclude_inbound_ports=(15021,), exclude_outbound_cidrs=("10.96.0.1/32",))
    )
    assert "-A ISTIOPY_OUTPUT -m mark --mark 0x539/0xfff -j RETURN" in rules
    assert "-A ISTIOPY_OUTPUT -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A ISTIOPY_PRERT -p tcp --dport 15008 -j RETURN" in rules
    assert "-A ISTIOPY_PRERT -p tcp --dport 15021 -j RETURN" in rules
    assert "-A ISTIOPY_PRERT -p tcp -j REDIRECT --to-ports 15006" in rules
    assert "-A ISTIOPY_OUTPUT -d 10.96.0.1/32 -j RETURN" in rules
    assert rules.index("--dport 15008") < rules.index("--to-ports 15006")


def test_no_fd_left_open_by_netns_helpers(topology: Topology) -> None:
    a = topology.add_pod("a")
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with PodNetns.from_path(a.netns_path) as ns:
            ns.open_listeners(outbound_port=0, inbound_port=0, hbone_port=0).close()
    assert len(os.listdir("/proc/self/fd")) == before


# --- the transport half end to end: node agent -> ZDS -> in-pod sockets -> capture -> HBONE -> app ---------


class MiniZtunnel:
    """A node proxy reduced to the transport: HBONE for every captured connection, no policy, no xDS."""

    def __init__(self, ca: TestCA) -> None:
        self.ca = ca
        self.pool = HbonePool()
        self.servers: dict[str, tuple[HboneServer, asyncio.Server, InpodListeners]] = {}
        self.inbound_peers: list[tuple[SpiffeId | None, str]] = []

    async def add_workload(self, wl: ZdsWorkload) -> None:
        ident = f"spiffe://cluster.local/ns/{wl.namespace}/sa/{wl.service_account}"
        cert = self.ca.issue(ident)
        client_ctx = cert.client_context()
        ls = wl.netns.open_listeners()

        async def on_connect(req: ConnectRequest) -> Decision:
            src_ip = req.headers["forwarded"].split('"')[1].rsplit(":", 1)[0]
            self.inbound_peers.append((req.peer_identity, src_ip))
            sock = await wl.netns.connect((req.host, req.port), source=(src_ip, 0), transparent=True)
            return Accept(await TcpStream.from_socket(sock))

        async def outbound(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            down = TcpStream(r, w)
            dst_ip, dst_port = sockets.original_dst(w.get_extra_info("socket"))
            peer = w.get_extra_info("peername")[:2]
            try:
                stream = await self.pool.open_stream(
                    PoolKey(ident, "", dst_ip),
                    (dst_ip, 15008),
                    f"{dst_ip}:{dst_port}",
                    hbone_headers((peer[0], peer[1])),
                    client_ctx,
                    connect=lambda addr: wl.netns.connect(addr),
                )
            except (OSError, HboneError):
                down.reset()
                return
            await relay(down, stream)

        hb = HboneServer(on_connect, cert.server_context())
        await hb.serve(ls.hbone)
        out = await asyncio.start_server(outbound, sock=ls.outbound)
        self.servers[wl.uid] = (hb, out, ls)

    async def del_workload(self, uid: str) -> None:
        hb, out, ls = self.servers.pop(uid)
        await hb.close()
        out.close()
        ls.close()

    async def close(self) -> None:
        for uid in list(self.servers):
            await self.del_workload(uid)
        await self.pool.close()


async def test_hbone_between_nodes_through_capture_and_zds(topology: Topology, tmp_path: Path) -> None:
    ca = TestCA()
    n0, n1 = topology.add_node("n0"), topology.add_node("n1")
    a = topology.add_pod("a", node=n0, service_account="sleep")
    b = topology.add_pod("b", node=n1, service_account="httpbin")
    b.spawn_server("http", port=8080)
    agents, clients, proxies, tasks = [], [], [], []
    try:
        for node, pods in ((n0, [a]), (n1, [b])):
            agent = NodeAgent(str(tmp_path / f"{node.name}.sock"))
            for p in pods:
                await agent.add_pod(PodSpec(p.uid, p.name, p.namespace, p.service_account, p.netns_path))
            await agent.start()
            zt = MiniZtunnel(ca)
            client = ZdsClient(zt, agent.path)
            tasks.append(asyncio.create_task(client.run()))
            await asyncio.wait_for(client.snapshot_received.wait(), 30)
            agents.append(agent)
            clients.append(client)
            proxies.append(zt)

        with topology.sniff("tcp") as cap:
            result = await run_app(a, b.ip, 8080)

        body = json.loads(result["body"])
        assert body["pod"] == "b"
        assert body["path"] == "/x"
        assert body["peer"].split(":")[0] == a.ip  # the app in b saw a's IP, through HBONE
        assert proxies[1].inbound_peers == [
            (SpiffeId.parse("spiffe://cluster.local/ns/default/sa/sleep"), a.ip)
        ]
        assert 15008 in cap.ports()  # the connection crossed the fabric as HBONE...
        assert 8080 not in cap.ports()  # ...and never as plaintext to the app port
        assert "GET /x" not in cap.text  # the payload crossed the wire encrypted
    finally:
        for c in clients:
            await c.stop()
        for t in tasks:
            await asyncio.wait_for(t, 30)
        for zt in proxies:
            await zt.close()
        for ag in agents:
            await ag.stop(remove_capture_rules=True)
