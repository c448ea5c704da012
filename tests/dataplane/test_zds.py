"""ZDS between the node agent and the proxy side: real unix SOCK_SEQPACKET, real netns fds, real iptables."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from istiopy.api.gen import zds_pb2
from istiopy.dataplane.capture import capture_installed
from istiopy.dataplane.inpod import InpodListeners
from istiopy.dataplane.nodeagent import NodeAgent, PodSpec, ZdsError
from istiopy.dataplane.zds import ZdsClient, ZdsSocket, ZdsWorkload
from istiopy.testing.netns import Pod, Topology

pytestmark = pytest.mark.netns


class Recorder:
    """A proxy stand-in that does what the real one does with a pod: open its listeners in the pod netns."""

    def __init__(self, refuse: set[str] | None = None) -> None:
        self.events: list[tuple[str, str]] = []
        self.listeners: dict[str, InpodListeners] = {}
        self.refuse = refuse or set()

    async def add_workload(self, wl: ZdsWorkload) -> None:
        if wl.name in self.refuse:
            raise RuntimeError(f"no certificate for {wl.service_account}")
        self.events.append(("add", wl.uid))
        self.listeners[wl.uid] = wl.netns.open_listeners(outbound_port=0, inbound_port=0, hbone_port=0)

    async def del_workload(self, uid: str) -> None:
        self.events.append(("del", uid))
        self.listeners.pop(uid).close()

    async def snapshot_done(self, uids: set[str]) -> None:
        self.events.append(("snapshot", ",".join(sorted(uids))))

    def close(self) -> None:
        for ls in self.listeners.values():
            ls.close()


def spec(p: Pod) -> PodSpec:
    return PodSpec(p.uid, p.name, p.namespace, p.service_account, p.netns_path)


def listening_ports(pod: Pod) -> set[int]:
    out = pod.run(["ss", "-Hltn"]).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


async def eventually(pred: object, within: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not pred():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[NodeAgent]:
    a = NodeAgent(str(tmp_path / "ztunnel.sock"), ack_timeout=30)
    await a.start()
    try:
        yield a
    finally:
        await a.stop(remove_capture_rules=True)


async def start_client(path: str, handler: Recorder) -> tuple[ZdsClient, asyncio.Task[None]]:
    client = ZdsClient(handler, path)
    task = asyncio.create_task(client.run())
    await asyncio.wait_for(client.snapshot_received.wait(), 30)
    return client, task


async def stop_client(client: ZdsClient, task: asyncio.Task[None], **kw: bool) -> None:
    await client.stop(**kw)
    await asyncio.wait_for(task, 30)


async def test_snapshot_add_del_with_real_netns_fds(topology: Topology, agent: NodeAgent) -> None:
    a, b = topology.add_pod("a"), topology.add_pod("b")
    await agent.add_pod(spec(a))  # before the proxy connects: goes out with the snapshot
    assert capture_installed_in(a)
    fds_before = _fds()
    rec = Recorder()
    client, task = await start_client(agent.path, rec)
    try:
        assert rec.events == [("add", a.uid), ("snapshot", a.uid)]
        assert client.workloads[a.uid].name == "a"
        assert client.workloads[a.uid].namespace == "default"
        # the proxy side opened listeners *inside* a's netns through the fd it received
        ports = {s.getsockname()[1] for s in vars(rec.listeners[a.uid]).values()}
        assert ports <= listening_ports(a)
        assert not ports & listening_ports(b)
        await agent.wait_for_proxy()
        await agent.add_pod(spec(b))  # live add, acked before add_pod returns
        assert rec.events[-1] == ("add", b.uid)
        await agent.remove_pod(a.uid)
        assert rec.events[-1] == ("del", a.uid)
        assert a.uid not in client.workloads
        assert not capture_installed_in(a)  # the agent removed a's rules
        assert capture_installed_in(b)
    finally:
        await stop_client(client, task)
        rec.close()
    # every received netns fd was closed (the agent now holds b's fd instead of a's), connections too
    await eventually(lambda: len(_fds()) <= len(fds_before))


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def capture_installed_in(p: Pod) -> bool:
    fd = p.open_netns()
    try:
        return capture_installed(fd)
    finally:
        os.close(fd)


async def test_refused_pod_is_reported_to_the_agent(topology: Topology, agent: NodeAgent) -> None:
    a = topology.add_pod("a")
    rec = Recorder(refuse={"a"})
    client, task = await start_client(agent.path, rec)
    try:
        await agent.wait_for_proxy()
        with pytest.raises(ZdsError, match="no certificate"):
            await agent.add_pod(spec(a))
        assert a.uid not in client.workloads
    finally:
        await stop_client(client, task)
        rec.close()


async def test_proxy_restart_gets_the_snapshot_again(topology: Topology, agent: NodeAgent) -> None:
    a, b = topology.add_pod("a"), topology.add_pod("b")
    await agent.add_pod(spec(a))
    await agent.add_pod(spec(b))
    rec1 = Recorder()
    client1, task1 = await start_client(agent.path, rec1)
    assert {u for k, u in rec1.events if k == "add"} == {a.uid, b.uid}
    await stop_client(client1, task1)  # the proxy goes away (its listeners close)...
    rec1.close()
    await agent.remove_pod(b.uid)  # ...and a pod is deleted meanwhile
    rec2 = Recorder()
    client2, task2 = await start_client(agent.path, rec2)  # a new proxy process connects
    try:
        assert rec2.events == [("add", a.uid), ("snapshot", a.uid)]
        await agent.wait_for_proxy(min_snapshots=2)
    finally:
        await stop_client(client2, task2)
        rec2.close()


async def test_agent_restart_reconciles_and_keeps_serving(topology: Topology, tmp_path: Path) -> None:
    a, b = topology.add_pod("a"), topology.add_pod("b")
    path = str(tmp_path / "zds.sock")
    agent1 = NodeAgent(path)
    await agent1.start()
    await agent1.add_pod(spec(a))
    await agent1.add_pod(spec(b))
    rec = Recorder()
    client = ZdsClient(rec, path, backoff_initial=0.02, backoff_max=0.1)
    task = asyncio.create_task(client.run())
    try:
        await asyncio.wait_for(client.snapshot_received.wait(), 30)
        served_a = rec.listeners[a.uid]
        await agent1.stop()  # the agent restarts; pods keep being served meanwhile
        await eventually(lambda: not client.connected.is_set())
        assert set(client.workloads) == {a.uid, b.uid}
        agent2 = NodeAgent(path)  # came back knowing only a (b was deleted while it was down)
        try:
            await agent2.add_pod(spec(a))  # the cache is rebuilt before listening: the snapshot is complete
            await agent2.start()
            await agent2.wait_for_proxy()
            await eventually(lambda: client.snapshot_received.is_set() and client.connections == 2)
            assert set(client.workloads) == {a.uid}
            assert ("del", b.uid) in rec.events
            # a was re-sent with the same netns: it was not restarted (same listeners, no del)
            assert rec.listeners[a.uid] is served_a
            assert ("del", a.uid) not in rec.events
        finally:
            await agent2.stop(remove_capture_rules=True)
    finally:
        await stop_client(client, task)
        rec.close()


async def test_proxy_side_rejects_bad_requests(tmp_path: Path) -> None:
    """A hostile or buggy agent: garbage, an add without fd, unknown kinds; every one gets an error ack."""
    path = str(tmp_path / "raw.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(path)
    lsock.listen(1)
    lsock.setblocking(False)
    rec = Recorder()
    client = ZdsClient(rec, path)
    task = asyncio.create_task(client.run())
    try:
        conn, _ = await asyncio.wait_for(asyncio.get_running_loop().sock_accept(lsock), 30)
        zs = ZdsSocket(conn)
        hello_raw, _ = await zs.recv()
        hello = zds_pb2.ZdsHello()
        hello.ParseFromString(hello_raw)
        assert hello.version == zds_pb2.V1

        async def ask(data: bytes, fds: tuple[int, ...] = ()) -> str:
            await zs.send(data, fds)
            raw, _ = await asyncio.wait_for(zs.recv(), 30)
            resp = zds_pb2.WorkloadResponse()
            resp.ParseFromString(raw)
            return resp.ack.error

        assert "malformed" in await ask(b"\xff\xff\xff")
        add = zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload(uid="u1"))
        assert "exactly one netns fd" in await ask(add.SerializeToString())
        fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            assert "exactly one netns fd" in await ask(add.SerializeToString(), (fd, fd))
            no_uid = zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload())
            assert "without uid" in await ask(no_uid.SerializeToString(), (fd,))
        finally:
            os.close(fd)
        assert (
            await ask(zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid="x")).SerializeToString()) == ""
        )
        assert await ask(zds_pb2.WorkloadRequest(snapshot_sent={}).SerializeToString()) == ""
        assert client.workloads == {}
        zs.close()
    finally:
        await stop_client(client, task)
        lsock.close()


def test_wire_numbers_match_upstream() -> None:
    """zds.proto field numbers are the wire contract with upstream agents (ambient.md 1.4)."""
    from istiopy.dataplane.nodeagent import _add_request, _del_request

    assert _del_request("u").SerializeToString() == b"\x12\x03\x12\x01u"  # del=2 { uid=2 }
    keep = zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid="u"))
    assert keep.SerializeToString() == b"\x2a\x03\x0a\x01u"  # keep=5 { uid=1 }
    assert zds_pb2.WorkloadRequest(snapshot_sent={}).SerializeToString() == b"\x1a\x00"  # snapshot_sent=3
    add = _add_request(PodSpec("u", "n", "s", "a", "/x")).SerializeToString()
    assert add == b"\x0a\x0e\x0a\x01u\x12\x09\x0a\x01n\x12\x01s\x1a\x01a"  # add=1 { uid=1, info=2 {1,2,3} }
    assert zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString() == b"\x08\x01"
    assert zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error="e")).SerializeToString() == b"\x0a\x03\x0a\x01e"


async def test_nodeagent_command_serves_static_pods(topology: Topology, tmp_path: Path) -> None:
    a = topology.add_pod("a", service_account="sleep")
    path = str(tmp_path / "agent.sock")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "istiopy.dataplane.nodeagent", "--socket", path,
        "--pod", f"{a.uid},{a.name},{a.namespace},{a.service_account},{a.netns_path}",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    rec = Recorder()
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.decode().strip() == f"ready {path}"
        assert capture_installed_in(a)
        client, task = await start_client(path, rec)
        assert client.workloads[a.uid].service_account == "sleep"
        await stop_client(client, task)
    finally:
        rec.close()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
