"""ZDS, the node proxy's side: learn the node's ambient pods (and their network namespaces) from the agent.

Public API (stable; the ztunnel core implements ``WorkloadHandler`` to start/stop per-pod proxies)::

    class Handler:                                      # any object with these three coroutines
        async def add_workload(self, wl: ZdsWorkload) -> None: ...   # raise -> Ack{error}
        async def del_workload(self, uid: str) -> None: ...
        async def snapshot_done(self, uids: set[str]) -> None: ... # (optional hook) after reconciliation

    client = ZdsClient(handler, path=DEFAULT_ZDS_PATH)
    task = asyncio.create_task(client.run())            # connects, retries with backoff, forever
    await client.snapshot_received.wait()
    client.workloads -> dict[uid, ZdsWorkload]          # what is currently served
    await client.stop()                                 # closes the connection; keeps nothing open

    ZdsSocket                                            # SOCK_SEQPACKET framing with fd passing (both sides)

The protocol (ambient.md 1.4, upstream's zds.proto): the node agent listens on a unix SOCK_SEQPACKET socket
(``/var/run/ztunnel/ztunnel.sock``); the proxy connects and sends ``ZdsHello{V1}``. The agent then sends one
``WorkloadRequest`` per message -- ``add`` (with the pod's netns fd as SCM_RIGHTS ancillary data), ``keep``,
``del``, and ``snapshot_sent`` once every cached pod was sent -- and waits for each ``WorkloadResponse{ack}``
(empty ``error`` on success). After ``snapshot_sent`` the proxy drops every workload not added or kept since
this connection started: that is how a restarted agent (or a pod deleted while the proxy was disconnected)
is reconciled. A restarted proxy simply connects again and receives the whole snapshot.

Why the proxy keeps serving while disconnected: the agent restarting must not cut traffic of running pods.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import DecodeError

from istiopy.api.gen import zds_pb2
from istiopy.dataplane.inpod import PodNetns

__all__ = [
    "DEFAULT_ZDS_PATH",
    "MAX_MESSAGE",
    "WorkloadHandler",
    "ZdsClient",
    "ZdsSocket",
    "ZdsWorkload",
]

log = logging.getLogger(__name__)

DEFAULT_ZDS_PATH = "/var/run/ztunnel/ztunnel.sock"
MAX_MESSAGE = 64 * 1024
MAX_FDS = 4


class ZdsSocket:
    """One SOCK_SEQPACKET connection: whole messages, optionally carrying fds, awaited on the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._closed = False
        self._waiter: tuple[asyncio.Future[None], int, bool] | None = None

    @classmethod
    async def connect(cls, path: str) -> ZdsSocket:
        """Connect to the agent's socket at ``path``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def _wait(self, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if writable else loop.add_reader)(fd, ready)
        self._waiter = (fut, fd, writable)
        try:
            await fut
        finally:
            if self._waiter is not None and self._waiter[0] is fut:
                self._waiter = None
                (loop.remove_writer if writable else loop.remove_reader)(fd)

    async def recv(self) -> tuple[bytes, list[int]]:
        """The next message and the fds that came with it (the caller owns them). ``b""``: peer closed."""
        fds = array.array("i")
        while True:
            if self._closed:
                raise ConnectionResetError("ZDS socket closed")
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * fds.itemsize)
                )
                break
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=False)
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
        received = list(fds)
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            for fd in received:
                os.close(fd)
            raise ValueError("ZDS message or ancillary data truncated")
        return data, received

    async def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send one message; ``fds`` travel as SCM_RIGHTS (the kernel duplicates them for the peer)."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        while True:
            if self._closed:
                raise ConnectionResetError("ZDS socket closed")
            try:
                self.sock.sendmsg([data], anc)
                return
            except (BlockingIOError, InterruptedError):
                await self._wait(writable=True)

    def close(self) -> None:
        """Close the connection; a pending recv/send raises ConnectionResetError."""
        if self._closed:
            return
        self._closed = True
        if self._waiter is not None:
            fut, fd, writable = self._waiter
            self._waiter = None
            loop = fut.get_loop()
            (loop.remove_writer if writable else loop.remove_reader)(fd)
            if not fut.done():
                fut.set_exception(ConnectionResetError("ZDS socket closed"))
        self.sock.close()


@dataclass
class ZdsWorkload:
    """A pod the agent handed over: identity facts plus its network namespace (owned by the proxy)."""

    uid: str
    name: str
    namespace: str
    service_account: str
    netns: PodNetns = field(repr=False)


class WorkloadHandler(Protocol):
    """What the proxy does when pods come and go (the ztunnel core implements it)."""

    def add_workload(self, wl: ZdsWorkload) -> Awaitable[None]:
        """Start serving ``wl`` (listeners in ``wl.netns``); raise to refuse (the agent sees the error)."""
        ...

    def del_workload(self, uid: str) -> Awaitable[None]:
        """Stop serving the pod: close its listeners and connections; its netns fd is closed afterwards."""
        ...


class ZdsClient:
    """The proxy's ZDS connection: hello, acked requests, reconciliation, reconnection with backoff."""

    def __init__(
        self,
        handler: WorkloadHandler,
        path: str = DEFAULT_ZDS_PATH,
        *,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
    ) -> None:
        self.handler = handler
        self.path = path
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.workloads: dict[str, ZdsWorkload] = {}
        self.connected = asyncio.Event()
        self.snapshot_received = asyncio.Event()
        self.connections = 0  # successful connects so far (tests observe reconnects)
        self._sock: ZdsSocket | None = None
        self._stopping = False
        self._seen: set[str] = set()

    async def run(self) -> None:
        """Connect and serve until ``stop``; on any disconnect keep the workloads and reconnect."""
        delay = self.backoff_initial
        while not self._stopping:
            try:
                self._sock = await ZdsSocket.connect(self.path)
            except OSError as e:
                log.debug("ZDS connect %s: %s", self.path, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            delay = self.backoff_initial
            self.connections += 1
            try:
                await self._serve(self._sock)
            except (OSError, ValueError) as e:
                log.info("ZDS connection lost: %s", e)
            finally:
                self._sock.close()
                self._sock = None
                self.connected.clear()
            if not self._stopping:
                await asyncio.sleep(delay)

    async def stop(self, *, remove_workloads: bool = True) -> None:
        """Stop reconnecting and close the connection; by default also delete every workload (fds closed)."""
        self._stopping = True
        if self._sock is not None:
            self._sock.close()
        if remove_workloads:
            for uid in list(self.workloads):
                await self._delete(uid)

    async def _serve(self, sock: ZdsSocket) -> None:
        self._seen = set()
        self.snapshot_received.clear()
        await sock.send(zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString())
        self.connected.set()
        while True:
            data, fds = await sock.recv()
            if not data and not fds:
                return  # the agent closed the connection
            try:
                error = await self._handle(data, fds)
            except Exception as e:  # the handler failed: tell the agent, keep the connection
                log.warning("ZDS request failed: %s", e)
                error = str(e) or type(e).__name__
            await sock.send(zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=error)).SerializeToString())

    async def _handle(self, data: bytes, fds: list[int]) -> str:
        """Apply one request; return the ack error ('' for success). Every received fd is consumed."""
        try:
            req = zds_pb2.WorkloadRequest()
            req.ParseFromString(data)
        except DecodeError:
            req = None
        kind = req.WhichOneof("payload") if req is not None else None
        if kind != "add":
            for fd in fds:
                os.close(fd)
        if req is None or kind is None:
            return "unknown or malformed WorkloadRequest"
        if kind == "add":
            return await self._add(req.add, fds)
        if kind == "keep":
            self._seen.add(req.keep.uid)
            return ""
        if kind == "del":
            await self._delete(getattr(req, "del").uid)
            return ""
        if kind == "snapshot_sent":
            stale = set(self.workloads) - self._seen
            for uid in stale:
                await self._delete(uid)
            hook = getattr(self.handler, "snapshot_done", None)
            if hook is not None:
                await hook(set(self.workloads))
            self.snapshot_received.set()
            return ""
        return f"unsupported request {kind}"

    async def _add(self, add: zds_pb2.AddWorkload, fds: list[int]) -> str:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return f"AddWorkload needs exactly one netns fd, got {len(fds)}"
        if not add.uid:
            os.close(fds[0])
            return "AddWorkload without uid"
        netns = PodNetns(fds[0], add.uid)
        self._seen.add(add.uid)
        old = self.workloads.get(add.uid)
        if old is not None:
            if old.netns.inode == netns.inode:  # the same pod re-sent (agent reconnect): keep serving it
                netns.close()
                return ""
            await self._delete(add.uid)
        info = add.workload_info
        wl = ZdsWorkload(add.uid, info.name, info.namespace, info.service_account, netns)
        try:
            await self.handler.add_workload(wl)
        except BaseException:
            netns.close()
            raise
        self.workloads[add.uid] = wl
        return ""

    async def _delete(self, uid: str) -> None:
        wl = self.workloads.pop(uid, None)
        self._seen.discard(uid)
        if wl is None:
            return
        try:
            await self.handler.del_workload(uid)
        finally:
            wl.netns.close()
