"""Outbound decisions: where a captured connection goes and how (HBONE, through a waypoint, or plain TCP).

Why a pure resolver apart from the byte path: the routing rules (service VIP vs pod IP, waypoints, round robin
over healthy endpoints, non-mesh passthrough) are the part that must match upstream, and they are easiest to
get right — and to test exhaustively — without sockets. :mod:`istiopy.dataplane.proxy` turns a
:class:`OutboundPlan` into connections.

Rules (``shared/reference/ambient.md`` 3.1, 3.3):

* The traffic type is decided by the *original* destination: a service VIP picks the service's waypoint (if
  any) or one of its endpoints; a pod IP picks that workload's own waypoint (if any) or the pod itself.
* Through a waypoint: HBONE to ``<waypoint ip>:15008`` with ``:authority`` = the original ``VIP:port`` (or
  ``podIP:port`` for a workload waypoint), expecting the waypoint's identity.
* Direct: HBONE to ``<pod ip>:15008`` with ``:authority`` = ``podIP:targetPort``, expecting the pod's
  identity.
* Destinations that are not HBONE workloads (or unknown to the mesh) pass through as plain TCP.
* Endpoints are chosen round robin per service among healthy ones (unless the service's health policy is
  ALLOW_ALL) that expose the requested port; with a load-balancing routing preference (``PreferClose``)
  only the endpoints closest to the source (network, region, zone, subzone, node, cluster, in the
  service's order) take part: FAILOVER keeps the closest group present, STRICT requires a full match.
"""

from __future__ import annotations

import ipaddress
import itertools
import threading
from dataclasses import dataclass, field

from istiopy.api.identity import SpiffeId
from istiopy.dataplane.state import (
    HBONE_PORT,
    Endpoint,
    GatewayAddress,
    IPAddress,
    ProxyState,
    Service,
    Workload,
)


class NoHealthyUpstream(LookupError):
    """A mesh service was addressed but nothing can serve it (upstream answers with a connection failure)."""


@dataclass(frozen=True)
class OutboundPlan:
    """How to carry one outbound connection."""

    protocol: str  # "HBONE" | "TCP"
    dial: tuple[str, int]  # where to connect (pod/waypoint ip:15008, or the original destination)
    authority: str  # CONNECT :authority ("" for TCP)
    original_dst: tuple[str, int]
    dst_workload: Workload | None = None  # final destination workload (None when via waypoint or unknown)
    service: Service | None = None
    via_waypoint: Workload | None = None
    expected_identities: frozenset[SpiffeId] = field(default_factory=frozenset)

    @property
    def hbone(self) -> bool:
        return self.protocol == "HBONE"

    @property
    def peer_identity(self) -> SpiffeId | None:
        """The identity recorded as destination principal in metrics."""
        ids = sorted(self.expected_identities)
        return ids[0] if ids else None


def _fmt(ip: IPAddress | str, port: int) -> str:
    ip = ipaddress.ip_address(ip)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class OutboundResolver:
    """Maps an original destination to an :class:`OutboundPlan` using the current :class:`ProxyState`."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self._rr: dict[str, itertools.count[int]] = {}
        self._lock = threading.Lock()

    def _next(self, key: str, n: int) -> int:
        with self._lock:
            counter = self._rr.setdefault(key, itertools.count())
            return next(counter) % n

    # ---- waypoints ----------------------------------------------------------------------------

    def _waypoint_workload(self, gw: GatewayAddress, network: str) -> Workload | None:
        """Pick one waypoint instance (round robin over its service's healthy endpoints)."""
        target = self.state.resolve_gateway(gw)
        if isinstance(target, Workload):
            return target
        if isinstance(target, Service):
            eps = [wl for wl, _ in self.state.endpoints(target.key) if wl.healthy and wl.addresses]
            if not eps:
                return None
            return eps[self._next("waypoint:" + target.key, len(eps))]
        return None

    def _via_waypoint(
        self,
        gw: GatewayAddress,
        authority: str,
        original: tuple[str, int],
        service: Service | None,
        network: str,
    ) -> OutboundPlan:
        wp = self._waypoint_workload(gw, network)
        if wp is None:
            raise NoHealthyUpstream(f"waypoint {gw.destination} has no healthy instance")
        ids = self.state.gateway_identities(gw) or {wp.identity}
        return OutboundPlan(
            "HBONE",
            (str(wp.addresses[0]), gw.hbone_mtls_port or HBONE_PORT),
            authority,
            original,
            None,
            service,
            wp,
            frozenset(ids),
        )

    # ---- the decision -------------------------------------------------------------------------

    def plan(
        self, dst: tuple[str, int], *, source: Workload | None = None, network: str = ""
    ) -> OutboundPlan:
        """Decide for a connection captured toward ``dst`` (the original destination)."""
        ip = ipaddress.ip_address(dst[0])
        port = dst[1]
        original = (str(ip), port)
        svc = self.state.service_by_vip(ip, network)
        if svc is not None:
            if svc.waypoint is not None and not self._is_waypoint(source, svc.waypoint):
                return self._via_waypoint(svc.waypoint, _fmt(ip, port), original, svc, network)
            wl, ep = self._pick_endpoint(svc, port, source)
            target = ep.ports.get(port) or svc.ports.get(port) or port
            return self._direct(wl, target, original, svc)
        dst_wl = self.state.workload_by_ip(ip, network)
        if dst_wl is not None:
            if dst_wl.waypoint is not None and not self._is_waypoint(source, dst_wl.waypoint):
                return self._via_waypoint(dst_wl.waypoint, _fmt(ip, port), original, None, network)
            return self._direct(dst_wl, port, original, None, ip)
        return OutboundPlan("TCP", original, "", original)

    def _is_waypoint(self, source: Workload | None, gw: GatewayAddress) -> bool:
        """Traffic from the waypoint itself must not loop back into it."""
        return source is not None and source.identity in self.state.gateway_identities(gw)

    def _direct(
        self,
        wl: Workload,
        port: int,
        original: tuple[str, int],
        svc: Service | None,
        ip: IPAddress | None = None,
    ) -> OutboundPlan:
        addr = ip if ip is not None else wl.addresses[0]
        if wl.hbone:
            return OutboundPlan(
                "HBONE",
                (str(addr), HBONE_PORT),
                _fmt(addr, port),
                original,
                wl,
                svc,
                None,
                frozenset({wl.identity}),
            )
        return OutboundPlan("TCP", (str(addr), port), "", original, wl, svc)

    def _pick_endpoint(
        self, svc: Service, port: int, source: Workload | None = None
    ) -> tuple[Workload, Endpoint]:
        allow_unhealthy = svc.lb_health_policy == "ALLOW_ALL"
        candidates = [
            (wl, ep)
            for wl, ep in self.state.endpoints(svc.key)
            if wl.addresses and (wl.healthy or allow_unhealthy) and (port in ep.ports or not ep.ports)
        ]
        if candidates and svc.lb_routing_preference and source is not None:
            candidates = _closest(candidates, svc, source)
        if not candidates:
            raise NoHealthyUpstream(f"service {svc.key} has no healthy endpoint for port {port}")
        return candidates[self._next(svc.key, len(candidates))]


def _scope_matches(scope: str, src: Workload, dst: Workload) -> bool:
    if scope == "NETWORK":
        return src.network == dst.network
    if scope == "REGION":
        return src.locality.region == dst.locality.region
    if scope == "ZONE":
        return src.locality.zone == dst.locality.zone
    if scope == "SUBZONE":
        return src.locality.subzone == dst.locality.subzone
    if scope == "NODE":
        return src.node == dst.node
    if scope == "CLUSTER":
        return src.cluster_id == dst.cluster_id
    return True


def _closest(
    candidates: list[tuple[Workload, Endpoint]], svc: Service, source: Workload
) -> list[tuple[Workload, Endpoint]]:
    """Locality-aware selection as upstream: rank = how many leading routing preferences an endpoint shares
    with the source; FAILOVER keeps the best rank present, STRICT only endpoints that share all of them."""
    prefs = svc.lb_routing_preference

    def rank(wl: Workload) -> int:
        n = 0
        for scope in prefs:
            if not _scope_matches(scope, source, wl):
                break
            n += 1
        return n

    ranked = [(rank(wl), (wl, ep)) for wl, ep in candidates]
    if svc.lb_mode == "STRICT":
        return [c for r, c in ranked if r == len(prefs)]
    best = max(r for r, _ in ranked)
    return [c for r, c in ranked if r == best]
