"""What both HBONE byte paths share: the tunnel's vocabulary, free of HTTP/2 and TLS machinery.

The pure-Python byte path (``hbone``, on h2) and the C one (``fastpath``) answer the same ``on_connect``
with the same :class:`Accept` / :class:`Reject` decisions, key their pools by the same :class:`PoolKey`,
send the same CONNECT headers and move bytes between the same :class:`ByteStream` ends. Those pieces live
here, so ztunnel-py on the C path (its default) never imports ``hbone`` (issue 8: every module a node
proxy loads stays in its RSS). ``hbone`` re-exports every name, so ``hbone.Accept is
tunnel.Accept``.

:func:`relay` is the Python relay between two ``ByteStream`` ends (plain asyncio, no HTTP/2): the Python
path uses it for every tunnel, the C path for the legs it cannot hand to its engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from istiopy.api.identity import SpiffeId

__all__ = [
    "CONN_WINDOW",
    "DEFAULT_MAX_STREAMS",
    "HBONE_PORT",
    "READ_CHUNK",
    "STREAM_WINDOW",
    "Accept",
    "ByteStream",
    "ConnectRequest",
    "Decision",
    "HboneError",
    "OnConnect",
    "PoolKey",
    "Reject",
    "RelayResult",
    "TcpStream",
    "build_baggage",
    "hbone_headers",
    "new_traceparent",
    "parse_authority",
    "relay",
]

HBONE_PORT = 15008
DEFAULT_MAX_STREAMS = 100
STREAM_WINDOW = 4 * 1024 * 1024
CONN_WINDOW = 16 * 1024 * 1024
READ_CHUNK = 64 * 1024


class HboneError(Exception):
    """Opening a tunnel failed; ``status`` is the HTTP status the server answered (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@runtime_checkable
class ByteStream(Protocol):
    """One end of a byte pipe that can half-close and reset: what ``relay`` moves bytes between."""

    async def read(self, n: int = READ_CHUNK) -> bytes:
        """Up to ``n`` bytes; ``b""`` once the peer half-closed; raises ConnectionResetError on reset."""
        ...

    async def write(self, data: bytes) -> None:
        """Send all of ``data``, waiting for flow control / socket buffers."""
        ...

    async def close_write(self) -> None:
        """Half-close: no more writes (FIN / END_STREAM); reading continues."""
        ...

    def reset(self) -> None:
        """Abort both directions (RST / RST_STREAM). Idempotent."""
        ...

    async def aclose(self) -> None:
        """Release resources; a stream not cleanly finished both ways is reset."""
        ...


# ---------------------------------------------------------------------------------------------------------
# TCP side and relay


class TcpStream:
    """``ByteStream`` over an asyncio TCP connection (app side of a tunnel)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._closed = False

    @classmethod
    async def from_socket(cls, sock: socket.socket) -> TcpStream:
        """Wrap a connected socket (e.g. from ``sockets.async_connect_in_netns``)."""
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_CHUNK)
        return cls(reader, writer)

    @property
    def peername(self) -> tuple[str, int] | None:
        """The remote address of the TCP connection."""
        return self.writer.get_extra_info("peername")  # type: ignore[no-any-return]

    async def read(self, n: int = READ_CHUNK) -> bytes:
        return await self.reader.read(n)

    async def write(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("connection closed")
        self.writer.write(data)
        await self.writer.drain()

    async def close_write(self) -> None:
        if not self.writer.is_closing() and self.writer.can_write_eof():
            self.writer.write_eof()

    def reset(self) -> None:
        if self._closed:
            return
        self._closed = True
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@dataclass
class RelayResult:
    """Bytes moved each way and the error that ended the relay (None: both sides finished cleanly)."""

    a_to_b: int = 0
    b_to_a: int = 0
    error: BaseException | None = None


async def relay(a: ByteStream, b: ByteStream, *, chunk: int = READ_CHUNK) -> RelayResult:
    """Copy bytes both ways until both directions ended; propagate half-close and reset; close both.

    A FIN/END_STREAM on one side becomes ``close_write`` on the other (the other direction keeps flowing);
    an error on either side (reset, broken pipe) resets both, which is how RST crosses the tunnel.
    """
    result = RelayResult()

    async def pump(src: ByteStream, dst: ByteStream, forward: bool) -> None:
        while True:
            data = await src.read(chunk)
            if not data:
                await dst.close_write()
                return
            await dst.write(data)
            if forward:
                result.a_to_b += len(data)
            else:
                result.b_to_a += len(data)

    tasks = {asyncio.create_task(pump(a, b, True)), asyncio.create_task(pump(b, a, False))}
    try:
        while tasks:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None and result.error is None:
                    result.error = exc
                    a.reset()
                    b.reset()
                    for p in tasks:
                        p.cancel()
            if result.error is not None and tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
                tasks = set()
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        a.reset()
        b.reset()
        raise
    finally:
        await a.aclose()
        await b.aclose()
    return result


# ---------------------------------------------------------------------------------------------------------
# CONNECT requests and the answers to them


def parse_authority(authority: str | None) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port`` into (host, port); ValueError if it is not a usable target."""
    if not authority:
        raise ValueError("missing :authority")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0 or authority[end + 1 : end + 2] != ":":
            raise ValueError(f"bad authority {authority!r}")
        host, port_s = authority[1:end], authority[end + 2 :]
        ipaddress.IPv6Address(host)
    else:
        host, sep, port_s = authority.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"bad authority {authority!r}")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"bad port in authority {authority!r}")
    if any(c in host for c in " /@?#\\") or len(host) > 253:
        raise ValueError(f"bad host in authority {authority!r}")
    return host, int(port_s)


@dataclass
class ConnectRequest:
    """What the server hands ``on_connect``: who asks (mTLS identity), for what, over which addresses."""

    authority: str
    host: str
    port: int
    headers: dict[str, str]
    peer_identity: SpiffeId | None
    peer_addr: tuple[str, int] | None
    local_addr: tuple[str, int] | None
    stream: ByteStream = field(repr=False)


@dataclass
class Accept:
    """Answer 200 and relay the stream to ``upstream``; ``on_done`` gets the byte counts afterwards."""

    upstream: ByteStream
    on_done: Callable[[RelayResult], None] | None = None


@dataclass
class Reject:
    """Answer ``status`` (401 deny, 400 bad request, 503 unavailable) and end the stream."""

    status: int
    reason: str = ""


Decision = Accept | Reject
OnConnect = Callable[[ConnectRequest], Awaitable[Decision]]


@dataclass(frozen=True)
class PoolKey:
    """Connections are shared only between tunnels with the same source identity, destination identity
    and destination IP (upstream's pooling key), so one workload's streams never ride another's mTLS."""

    src_identity: str
    dst_identity: str
    dst_ip: str


# ---------------------------------------------------------------------------------------------------------
# Headers


def new_traceparent() -> str:
    """A fresh W3C ``traceparent`` (version 00, random trace and span ids, sampled flag off)."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-00"


def build_baggage(
    *,
    cluster: str | None = None,
    namespace: str | None = None,
    workload_type: str = "deployment",
    workload_name: str | None = None,
    service: str | None = None,
    version: str | None = None,
    region: str | None = None,
    zone: str | None = None,
) -> str:
    """The ``baggage`` value describing the source workload, with the keys upstream uses."""
    pairs = [
        ("k8s.cluster.name", cluster),
        ("k8s.namespace.name", namespace),
        (f"k8s.{workload_type}.name", workload_name),
        ("service.name", service),
        ("service.version", version),
        ("cloud.region", region),
        ("cloud.availability_zone", zone),
    ]
    return ",".join(f"{k}={v}" for k, v in pairs if v)


def hbone_headers(
    src_addr: tuple[str, int] | str,
    *,
    baggage: str | None = None,
    traceparent: str | None = None,
    host: str | None = None,
) -> list[tuple[str, str]]:
    """CONNECT request headers: ``forwarded: for="<src>"[;host=<svc>]``, ``baggage``, ``traceparent``."""
    if isinstance(src_addr, tuple):
        ip, port = src_addr
        src = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    else:
        src = src_addr
    fwd = f'for="{src}"' + (f";host={host}" if host else "")
    out = [("forwarded", fwd)]
    if baggage:
        out.append(("baggage", baggage))
    out.append(("traceparent", traceparent or new_traceparent()))
    return out
