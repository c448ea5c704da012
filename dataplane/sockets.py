"""Low-level socket helpers for the node proxy: network namespaces, original destination, transparency.

Public API (stable; the ztunnel core imports these):

* ``PROXY_MARK`` -- the SO_MARK (0x539) every socket the proxy opens *toward* an app or peer carries, so the
  pod's capture rules let it through instead of redirecting it back to the proxy.
* ``setns(fd)`` / ``in_netns(fd)`` -- switch the *calling thread* into a network namespace (and back).
* ``run_in_netns(fd, fn, *args)`` -- run ``fn`` in a short-lived thread that entered the namespace; the
  thread dies afterwards, so a failed switch-back can never leak a wrong namespace into a pool thread.
* ``netns_socket(fd, family, type, ...)`` / ``netns_listener(fd, port, ...)`` -- sockets created inside a
  namespace; a socket stays in the namespace it was created in, whichever thread uses it later.
* ``async_connect_in_netns(fd, addr, ...)`` -- a non-blocking TCP connect from inside a namespace (with mark,
  optional transparent source), returning a connected socket for ``asyncio.open_connection(sock=...)``.
* ``original_dst(sock)`` -- the pre-REDIRECT destination of an accepted connection (SO_ORIGINAL_DST,
  IPv4 and IPv6).
* ``set_mark``, ``set_transparent``, ``set_freebind``, ``set_reuseaddr``, ``abort(sock)`` (close with RST).

Why a separate module: these are the only places the data plane talks to the kernel in a Linux-specific way,
and the later C byte path needs the same operations; keeping them together keeps the two paths honest.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

__all__ = [
    "CLONE_NEWNET",
    "PROXY_MARK",
    "abort",
    "async_connect_in_netns",
    "current_netns_fd",
    "in_netns",
    "netns_listener",
    "netns_socket",
    "open_netns",
    "original_dst",
    "run_in_netns",
    "set_freebind",
    "set_mark",
    "set_reuseaddr",
    "set_transparent",
    "setns",
]

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
PROXY_MARK = 0x539

# Linux constants the socket module does not export on every Python build.
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_ORIGINAL_DST = 80  # netfilter: IPv4 getsockopt at SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # netfilter: IPv6 getsockopt at SOL_IPV6
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78

_libc = ctypes.CDLL(None, use_errno=True)  # the libc already mapped (find_library would spawn ldconfig)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    """Move the calling thread into the namespace ``fd`` refers to (``os.setns`` needs Python 3.12)."""
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def open_netns(path: str) -> int:
    """Open a namespace file (``/run/netns/<name>``, ``/proc/<pid>/ns/net``) and return its fd."""
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def current_netns_fd() -> int:
    """An fd for the calling thread's current network namespace (the caller closes it)."""
    return open_netns("/proc/thread-self/ns/net")


@contextlib.contextmanager
def in_netns(fd: int) -> Iterator[None]:
    """Run the body with the calling thread inside namespace ``fd``, then switch back.

    Only safe in a thread that does nothing else meanwhile (never the event loop thread across an await).
    """
    orig = current_netns_fd()
    try:
        setns(fd)
        try:
            yield
        finally:
            setns(orig)
    finally:
        os.close(orig)


def run_in_netns(fd: int, fn: Callable[..., T], *args: object) -> T:
    """Call ``fn(*args)`` in a fresh thread that entered namespace ``fd``; return its result or raise.

    A fresh thread per call: the upstream trick (enter, create sockets, leave) without any risk that a
    pooled thread is left in a pod's namespace after an error.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            setns(fd)
            result.append(fn(*args))
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=target, name="netns", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def set_mark(sock: socket.socket, mark: int = PROXY_MARK) -> None:
    """Tag the socket's packets so capture rules (``-m mark``) skip the proxy's own traffic."""
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)


def set_transparent(sock: socket.socket) -> None:
    """Allow binding to a non-local address (source IP spoofing toward the app, TPROXY listeners)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def set_freebind(sock: socket.socket) -> None:
    """Allow binding to an address not (yet) configured on any interface."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)


def set_reuseaddr(sock: socket.socket) -> None:
    """Restarted proxies must rebind their ports while old connections sit in TIME_WAIT."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def abort(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): how a stream reset on one side is mirrored onto TCP."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """The destination the client dialed before iptables REDIRECT rewrote it (SO_ORIGINAL_DST).

    Raises OSError (ENOENT) for a connection that was not redirected.
    """
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        ip6 = ipaddress.IPv6Address(raw[8:24])
        mapped = ip6.ipv4_mapped
        return (str(mapped) if mapped else str(ip6)), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


def netns_socket(
    fd: int | None,
    family: socket.AddressFamily = socket.AF_INET,
    type: socket.SocketKind = socket.SOCK_STREAM,
    *,
    mark: int | None = None,
    transparent: bool = False,
) -> socket.socket:
    """A socket created inside namespace ``fd`` (``None``: the current one), optionally marked/transparent."""

    def make() -> socket.socket:
        s = socket.socket(family, type)
        try:
            if mark is not None:
                set_mark(s, mark)
            if transparent:
                set_transparent(s)
        except BaseException:
            s.close()
            raise
        return s

    return make() if fd is None else run_in_netns(fd, make)


def netns_listener(
    fd: int | None,
    port: int,
    host: str = "0.0.0.0",
    *,
    backlog: int = 1024,
    transparent: bool = False,
    mark: int | None = None,
) -> socket.socket:
    """A non-blocking listening TCP socket bound inside namespace ``fd`` (for asyncio ``start_server``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET

    def make() -> socket.socket:
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            set_reuseaddr(s)
            if transparent:
                set_transparent(s)
            if mark is not None:
                set_mark(s, mark)
            s.bind((host, port))
            s.listen(backlog)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    return make() if fd is None else run_in_netns(fd, make)


async def async_connect_in_netns(
    fd: int | None,
    addr: tuple[str, int],
    *,
    mark: int | None = PROXY_MARK,
    source: tuple[str, int] | None = None,
    transparent: bool = False,
    connect_timeout: float | None = 10.0,
) -> socket.socket:
    """Connect to ``addr`` from inside namespace ``fd`` with a marked socket; return the connected socket.

    ``source`` binds the local end first (with ``transparent`` it may be a non-local address: the original
    client's IP, so the app sees who really called). The socket is created in a helper thread but the connect
    itself runs on the event loop, so slow peers never hold a thread.
    """
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    sock = netns_socket(fd, family, socket.SOCK_STREAM, mark=mark, transparent=transparent)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.bind(source)
        loop = asyncio.get_running_loop()
        if connect_timeout is None:
            await loop.sock_connect(sock, addr)
        else:
            await asyncio.wait_for(loop.sock_connect(sock, addr), connect_timeout)
    except BaseException:
        sock.close()
        raise
    return sock
