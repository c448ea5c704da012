"""Inbound decisions for HBONE (15008) and captured plaintext (15006): validate, authorize, pick the app port.

Why separate from the byte path: the HBONE server (:mod:`istiopy.dataplane.hbone`) calls a decision callback
with the verified peer identity and the CONNECT ``:authority``; everything it needs to answer (400 bad
request, 401 denied, or the local address to dial) is decided here from :class:`ProxyState` alone, so the
answers are unit-testable and identical for every transport.

Status codes as upstream (``ambient.md`` 3.1): bad authority or a destination that is not the pod we
serve -> 400; RBAC or waypoint-rule deny -> 401; (the caller answers 503 when dialing the app fails).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass

from istiopy.api.identity import SpiffeId
from istiopy.dataplane.rbac import Connection, Decision, check_inbound
from istiopy.dataplane.state import IPAddress, ProxyState, Workload


class InboundRefused(Exception):
    """The request is refused with an HTTP status (400/401) before any byte reaches the app."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class InboundTarget:
    workload: Workload
    dial: tuple[str, int]
    connection: Connection
    decision: Decision


def parse_authority(authority: str) -> tuple[IPAddress, int]:
    """``ip:port`` or ``[v6]:port`` -> (ip, port); anything else raises ValueError."""
    host, sep, port_s = authority.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError(f"authority {authority!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ip = ipaddress.ip_address(host)
    port = int(port_s)
    if not 0 < port < 65536:
        raise ValueError(f"authority {authority!r} has an invalid port")
    return ip, port


class InboundAuthorizer:
    """Decides inbound connections for the pods this proxy serves."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state

    def _destination(self, ip: IPAddress, local_ips: Collection[IPAddress] | None) -> Workload:
        if local_ips is not None and ip not in local_ips:
            raise InboundRefused(400, f"destination {ip} is not served here")
        wl = self.state.workload_by_ip(ip)
        if wl is None:
            raise InboundRefused(400, f"unknown destination {ip}")
        return wl

    def hbone(
        self,
        peer_identity: SpiffeId | None,
        authority: str,
        peer_ip: IPAddress | str,
        *,
        local_ips: Collection[IPAddress] | None = None,
    ) -> InboundTarget:
        """Decide one HBONE CONNECT; raises :class:`InboundRefused` with 400 or 401."""
        try:
            ip, port = parse_authority(authority)
        except ValueError as e:
            raise InboundRefused(400, str(e)) from None
        wl = self._destination(ip, local_ips)
        conn = Connection(peer_identity, ipaddress.ip_address(peer_ip), ip, port)
        decision = check_inbound(self.state, wl, conn)
        if not decision:
            raise InboundRefused(
                401, f"RBAC: {decision.reason}" + (f" ({decision.policy})" if decision.policy else "")
            )
        return InboundTarget(wl, (str(ip), port), conn, decision)

    def plaintext(
        self, src: tuple[str, int], dst: tuple[str, int], *, local_ips: Collection[IPAddress] | None = None
    ) -> InboundTarget:
        """Decide a captured plaintext connection (no identity); :class:`InboundRefused` (401) on deny."""
        ip = ipaddress.ip_address(dst[0])
        wl = self._destination(ip, local_ips)
        conn = Connection(None, ipaddress.ip_address(src[0]), ip, dst[1])
        decision = check_inbound(self.state, wl, conn)
        if not decision:
            raise InboundRefused(
                401, f"RBAC: {decision.reason}" + (f" ({decision.policy})" if decision.policy else "")
            )
        return InboundTarget(wl, (str(ip), dst[1]), conn, decision)
