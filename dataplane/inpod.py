"""In-pod mode: the node proxy's sockets live inside each pod's network namespace.

Public API (stable)::

    ns = PodNetns(fd, uid="...")                  # takes ownership of the fd (from ZDS or open_netns)
    ls = ns.open_listeners()                      # InpodListeners(outbound, inbound, hbone) sockets
    sock = await ns.connect(("10.244.1.5", 15008))                 # marked: bypasses the pod's capture
    sock = await ns.connect(("10.244.0.7", 8080), source=("10.244.1.5", 0), transparent=True)
    ns.close()

The upstream trick: a helper thread enters the pod's namespace (``setns``), creates and binds the sockets,
and leaves; a socket keeps the namespace it was created in, so the event loop can then serve every pod of
the node from one process. Listeners: 15001 for redirected outbound (the nat OUTPUT REDIRECT rewrites the
destination to 127.0.0.1, the original target is read with ``SO_ORIGINAL_DST``), 15006 for redirected
plaintext inbound, 15008 for HBONE. Upstream sockets the proxy opens from the pod (toward peers or toward
the app) carry ``PROXY_MARK`` so the pod's capture rules let them through.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass

from istiopy.dataplane.sockets import PROXY_MARK, async_connect_in_netns, netns_listener

__all__ = ["InpodListeners", "PodNetns", "open_inpod_listeners"]


@dataclass
class InpodListeners:
    """The three listening sockets of one pod (non-blocking, ready for asyncio)."""

    outbound: socket.socket
    inbound: socket.socket
    hbone: socket.socket

    def close(self) -> None:
        """Close all three (connections already accepted are not affected)."""
        for s in (self.outbound, self.inbound, self.hbone):
            with contextlib.suppress(OSError):
                s.close()


def open_inpod_listeners(
    netns_fd: int,
    *,
    outbound_port: int = 15001,
    inbound_port: int = 15006,
    hbone_port: int = 15008,
    backlog: int = 1024,
) -> InpodListeners:
    """Bind 15001/15006/15008 inside the pod's namespace; all or nothing.

    All three bind the wildcard address with IP_TRANSPARENT (as upstream), so redirected and TPROXY'd
    connections whatever their original destination are accepted.
    """
    made: list[socket.socket] = []
    try:
        for port in (outbound_port, inbound_port, hbone_port):
            made.append(netns_listener(netns_fd, port, backlog=backlog, transparent=True))
    except BaseException:
        for s in made:
            s.close()
        raise
    return InpodListeners(*made)


class PodNetns:
    """An owned fd of a pod's network namespace plus the operations the proxy needs in it."""

    def __init__(self, fd: int, uid: str = "") -> None:
        self.fd = fd
        self.uid = uid
        self._closed = False

    @classmethod
    def from_path(cls, path: str, uid: str = "") -> PodNetns:
        """Open ``/run/netns/<name>`` or ``/proc/<pid>/ns/net``."""
        return cls(os.open(path, os.O_RDONLY | os.O_CLOEXEC), uid)

    @property
    def inode(self) -> int:
        """The namespace's identity (two fds of the same netns have the same inode)."""
        return os.fstat(self.fd).st_ino

    def open_listeners(self, **ports: int) -> InpodListeners:
        """``open_inpod_listeners`` for this namespace."""
        return open_inpod_listeners(self.fd, **ports)

    def listener(self, port: int, host: str = "0.0.0.0", *, transparent: bool = True) -> socket.socket:
        """One more listening socket inside the pod (e.g. DNS or a test port)."""
        return netns_listener(self.fd, port, host, transparent=transparent)

    async def connect(
        self,
        addr: tuple[str, int],
        *,
        mark: int | None = PROXY_MARK,
        source: tuple[str, int] | None = None,
        transparent: bool = False,
        connect_timeout: float | None = 10.0,
    ) -> socket.socket:
        """A TCP connection from inside the pod, marked so capture lets it pass; optionally from a spoofed
        ``source`` (``transparent=True``), which needs the capture's transparent routing installed."""
        return await async_connect_in_netns(
            self.fd, addr, mark=mark, source=source, transparent=transparent, connect_timeout=connect_timeout
        )

    def close(self) -> None:
        """Close the namespace fd (sockets already created in it stay valid)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                os.close(self.fd)

    def __enter__(self) -> PodNetns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
