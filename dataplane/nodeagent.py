"""The node agent (istio-cni's role): capture rules in each ambient pod, and the pod handed to the proxy.

Public API (stable)::

    agent = NodeAgent(path=DEFAULT_ZDS_PATH, capture=CaptureConfig())  # capture=None: no iptables
    await agent.add_pod(PodSpec(uid, name, namespace, service_account, netns_path))  # known pods first...
    await agent.start()                      # ...then listen on the unix SOCK_SEQPACKET socket
    await agent.remove_pod(uid)
    await agent.wait_for_proxy()             # a proxy connected and took the snapshot
    agent.pods -> dict[uid, PodSpec]
    await agent.stop()

    python -m istiopy.dataplane.nodeagent --socket PATH --pod uid,name,ns,sa,/run/netns/x ...

Behaviour as upstream's agent: every proxy that connects (first start or restart) says hello, then gets
every cached pod as ``AddWorkload`` with the netns fd attached, one at a time, each waiting for its ack,
then ``SnapshotSent``; later changes go out as they happen. ``add_pod`` installs the capture rules inside the
pod's namespace first (so no packet escapes between "proxy serves the pod" and "traffic is redirected"),
and raises ``ZdsError`` when a connected proxy refuses the pod. The agent holds one fd per pod so a
namespace stays valid while it is cached. A restarted agent must re-add the pods it knows *before*
``start``: the first snapshot a proxy receives is authoritative, and pods missing from it are dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass

from istiopy.api.gen import zds_pb2
from istiopy.dataplane.capture import CaptureConfig, install_capture, remove_capture
from istiopy.dataplane.zds import DEFAULT_ZDS_PATH, ZdsSocket

__all__ = ["NodeAgent", "PodSpec", "ZdsError"]

log = logging.getLogger(__name__)


class ZdsError(RuntimeError):
    """The proxy answered a request with an error, did not answer in time, or sent something else."""


@dataclass(frozen=True)
class PodSpec:
    """An ambient pod on this node, as the CNI plugin learns it."""

    uid: str
    name: str
    namespace: str
    service_account: str
    netns_path: str


class _Proxy:
    """One connected proxy: requests go out one at a time, each waiting for its ack.

    A single reader task owns the socket's receive side (acks are queued for the request waiting on
    them), so a proxy going away is noticed even while no request is in flight.
    """

    def __init__(self, sock: ZdsSocket, ack_timeout: float) -> None:
        self.sock = sock
        self.lock = asyncio.Lock()
        self.ack_timeout = ack_timeout
        self.ready = False
        self.closed = asyncio.Event()
        self.acks: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def read_acks(self) -> None:
        try:
            while True:
                data, fds = await self.sock.recv()
                for fd in fds:
                    os.close(fd)
                if not data:
                    break
                await self.acks.put(data)
        except (OSError, ValueError):
            pass
        finally:
            self.closed.set()
            self.acks.put_nowait(None)

    async def request(self, req: zds_pb2.WorkloadRequest, fds: tuple[int, ...] = ()) -> str:
        async with self.lock:
            if self.closed.is_set():
                raise ConnectionResetError("proxy closed the ZDS connection")
            await self.sock.send(req.SerializeToString(), fds)
            data = await asyncio.wait_for(self.acks.get(), self.ack_timeout)
        if data is None:
            raise ConnectionResetError("proxy closed the ZDS connection")
        resp = zds_pb2.WorkloadResponse()
        resp.ParseFromString(data)
        if resp.WhichOneof("payload") != "ack":
            raise ZdsError("proxy sent something other than an ack")
        return resp.ack.error


def _add_request(pod: PodSpec) -> zds_pb2.WorkloadRequest:
    info = zds_pb2.WorkloadInfo(name=pod.name, namespace=pod.namespace, service_account=pod.service_account)
    return zds_pb2.WorkloadRequest(add=zds_pb2.AddWorkload(uid=pod.uid, workload_info=info))


def _del_request(uid: str) -> zds_pb2.WorkloadRequest:
    req = zds_pb2.WorkloadRequest()
    getattr(req, "del").uid = uid  # `del` is a Python keyword: the field is reached by name
    return req


class NodeAgent:
    """Serves ZDS on ``path`` and keeps each cached pod's capture rules installed."""

    def __init__(
        self,
        path: str = DEFAULT_ZDS_PATH,
        *,
        capture: CaptureConfig | None = CaptureConfig(),
        ack_timeout: float = 10.0,
    ) -> None:
        self.path = path
        self.capture = capture
        self.ack_timeout = ack_timeout
        self.pods: dict[str, PodSpec] = {}
        self._fds: dict[str, int] = {}
        self._proxies: set[_Proxy] = set()
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._snapshot_done = asyncio.Condition()
        self.snapshots_sent = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen on the ZDS socket (a stale socket file from a previous agent is replaced)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._accept_task = asyncio.create_task(self._accept_loop(sock))

    async def stop(self, *, remove_capture_rules: bool = False) -> None:
        """Close the socket and every proxy connection; pods and their rules stay unless asked.

        The listening socket goes first: while it exists the kernel completes connects into its backlog
        even though nothing accepts any more, so a proxy reconnecting during the teardown of its old
        connection would count a connection to an agent that is gone (and be reset moments later).
        """
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for p in list(self._proxies):
            p.sock.close()
        for t in list(self._conn_tasks):
            t.cancel()
        await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        for uid in list(self.pods):
            if remove_capture_rules and self.capture is not None:
                with contextlib.suppress(Exception):
                    remove_capture(self._fds[uid], self.capture)
            os.close(self._fds.pop(uid))
        self.pods.clear()

    @property
    def proxies(self) -> int:
        """Connected proxies that received the snapshot."""
        return sum(1 for p in self._proxies if p.ready)

    async def wait_for_proxy(self, min_snapshots: int = 1) -> None:
        """Until at least ``min_snapshots`` snapshots were acknowledged (counting reconnects) and a proxy is
        connected."""
        async with self._snapshot_done:
            await self._snapshot_done.wait_for(
                lambda: self.snapshots_sent >= min_snapshots and self.proxies > 0
            )

    # -- pods ------------------------------------------------------------------------------------------
    async def add_pod(self, pod: PodSpec) -> None:
        """Capture the pod's traffic, cache it, and hand it to connected proxies (ZdsError if one refuses)."""
        fd = os.open(pod.netns_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if self.capture is not None:
                await asyncio.to_thread(install_capture, fd, self.capture)
        except BaseException:
            os.close(fd)
            raise
        old = self._fds.pop(pod.uid, None)
        if old is not None:
            os.close(old)
        self._fds[pod.uid] = fd
        self.pods[pod.uid] = pod
        errors = []
        for p in list(self._proxies):
            if not p.ready:
                continue  # it gets the pod with its snapshot
            err = await self._send(p, _add_request(pod), (fd,))
            if err:
                errors.append(err)
        if errors:
            raise ZdsError(f"proxy refused pod {pod.namespace}/{pod.name}: {'; '.join(errors)}")

    async def remove_pod(self, uid: str) -> None:
        """Tell proxies the pod is gone, then remove its rules (if its netns still exists) and forget it."""
        pod = self.pods.pop(uid, None)
        fd = self._fds.pop(uid, None)
        for p in list(self._proxies):
            if p.ready:
                await self._send(p, _del_request(uid))
        if fd is not None:
            try:
                if self.capture is not None and pod is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.to_thread(remove_capture, fd, self.capture)
            finally:
                os.close(fd)

    # -- connections -----------------------------------------------------------------------------------
    async def _send(self, p: _Proxy, req: zds_pb2.WorkloadRequest, fds: tuple[int, ...] = ()) -> str:
        try:
            return await p.request(req, fds)
        except (OSError, TimeoutError, ValueError, ZdsError) as e:
            log.info("ZDS proxy connection failed: %s", e)
            p.sock.close()
            self._proxies.discard(p)
            return ""  # a proxy that went away gets everything again with its next snapshot

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(lsock)
            t = asyncio.create_task(self._serve(ZdsSocket(conn)))
            self._conn_tasks.add(t)
            t.add_done_callback(self._conn_tasks.discard)

    async def _serve(self, sock: ZdsSocket) -> None:
        p = _Proxy(sock, self.ack_timeout)
        reader: asyncio.Task[None] | None = None
        try:
            data, fds = await asyncio.wait_for(sock.recv(), self.ack_timeout)
            for fd in fds:
                os.close(fd)
            hello = zds_pb2.ZdsHello()
            hello.ParseFromString(data)
            if hello.version != zds_pb2.V1:
                raise ZdsError(f"unsupported ZDS version {hello.version}")
            reader = asyncio.create_task(p.read_acks())
            self._proxies.add(p)
            # snapshot: every cached pod, each acked, then SnapshotSent
            for uid, pod in list(self.pods.items()):
                pod_fd = self._fds.get(uid)
                if pod_fd is None:
                    continue
                err = await p.request(_add_request(pod), (pod_fd,))
                if err:
                    log.warning("proxy refused %s/%s during snapshot: %s", pod.namespace, pod.name, err)
            err = await p.request(zds_pb2.WorkloadRequest(snapshot_sent=zds_pb2.SnapshotSent()))
            if err:
                raise ZdsError(f"proxy refused the snapshot: {err}")
            p.ready = True
            async with self._snapshot_done:
                self.snapshots_sent += 1
                self._snapshot_done.notify_all()
            await p.closed.wait()
        except (OSError, TimeoutError, ValueError, ZdsError) as e:
            log.info("ZDS proxy connection ended: %s", e)
        finally:
            self._proxies.discard(p)
            sock.close()
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader


def main(argv: list[str] | None = None) -> None:
    """Run an agent with a static pod list (what a CNI plugin would report), until interrupted."""
    ap = argparse.ArgumentParser(prog="istiopy.dataplane.nodeagent")
    ap.add_argument("--socket", default=DEFAULT_ZDS_PATH)
    ap.add_argument("--pod", action="append", default=[], help="uid,name,namespace,serviceaccount,netns_path")
    ap.add_argument("--no-capture", action="store_true", help="do not install iptables rules")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def run() -> None:
        agent = NodeAgent(a.socket, capture=None if a.no_capture else CaptureConfig())
        for spec in a.pod:
            uid, name, ns, sa, path = spec.split(",", 4)
            await agent.add_pod(PodSpec(uid, name, ns, sa, path))
        await agent.start()
        print(f"ready {a.socket}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await agent.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
