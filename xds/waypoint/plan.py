"""What one waypoint serves, computed once per store version: bound service ports, clusters and endpoints.

A waypoint proxy is recognised by its node (kind ``waypoint``) and names its Gateway through the label
``gateway.networking.k8s.io/gateway-name`` in node metadata ``LABELS`` (as istiod's waypoint pods carry it),
or ``WAYPOINT_NAME`` for a hand-started one; its namespace is the node's. It serves exactly the Services
``istio.io/use-waypoint`` binds to that Gateway (``mesh.ambient.service_waypoint``: ``waypoint-for``
service/all), one filter chain per (VIP, port); ServiceEntries bound the same way (egress, by their
``addresses``); and, for workload/all waypoints, the IPs of pods bound to it (``pod_waypoint``).

Clusters: ``inbound-vip|<port>|http|<hostname>`` per served port, plus
``inbound-vip|<port>|<subset>|<hostname>`` per DestinationRule subset, plus whatever routes name elsewhere
(other services, mirrors). Endpoints are
the selected ready pods' ``ip:targetPort``, addressed as internal endpoints of ``connect_originate`` so the
HBONE hop is one shared tunnel cluster while load balancing, outlier detection and circuit breaking
happen per pod at the service cluster (upstream's layout).
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from istiopy.mesh.ambient import (
    GATEWAY_NAME_LABEL,
    StoreReader,
    canonical_service,
    pod_waypoint,
    service_waypoint,
    spiffe_id,
    typed_list,
    view,
    workload_name,
)
from istiopy.mesh.resources.core import Pod, Service, ServicePort
from istiopy.mesh.resources.networking import DestinationRule, Resolution, ServiceEntry, TrafficPolicy
from istiopy.mesh.resources.networking import ServicePort as EntryPort
from istiopy.mesh.store import ConfigStore, selector_matches
from istiopy.mesh.waypoint_diagnostics import (
    DestinationRuleIndex,
    destination_rule_for,
    destination_rule_index,
    resolve_host,
)
from istiopy.xds.proxy import Proxy

DOMAIN = "cluster.local"
DEFAULT_TRUST_DOMAIN = "cluster.local"


def cluster_name(port: int, hostname: str, subset: str = "") -> str:
    return f"inbound-vip|{port}|{subset or 'http'}|{hostname}"


def tcp_cluster_name(port: int, hostname: str) -> str:
    return f"inbound-vip|{port}|tcp|{hostname}"


@dataclass(frozen=True)
class WaypointId:
    namespace: str
    name: str
    listen_address: str
    trust_domain: str


def waypoint_id(proxy: Proxy) -> WaypointId | None:
    """Which waypoint this proxy is (None: not a waypoint, or one that does not say its Gateway)."""
    if proxy.kind != "waypoint":
        return None
    labels = proxy.metadata.get("LABELS")
    name = ""
    if isinstance(labels, Mapping):
        name = str(labels.get(GATEWAY_NAME_LABEL, ""))
    name = name or proxy.meta("WAYPOINT_NAME")
    if not name or not proxy.namespace:
        return None
    return WaypointId(
        proxy.namespace,
        name,
        proxy.meta("ISTIOPY_LISTEN_ADDRESS", "0.0.0.0"),
        proxy.meta("TRUST_DOMAIN", DEFAULT_TRUST_DOMAIN),
    )


def scope(proxy: Proxy) -> Hashable:
    """Proxies of one waypoint (replicas) get the same config: generated once per push."""
    return ("waypoint", waypoint_id(proxy))


@dataclass(frozen=True)
class ServedPort:
    """One (Service or ServiceEntry host, port) the waypoint serves: a filter chain and a route config.

    ``kind`` is ``Service`` (``service``/``port`` set) or ``ServiceEntry`` (``entry``/``entry_port`` set:
    an egress waypoint, the destination is outside the mesh and reached directly, not over HBONE)."""

    kind: str
    name: str
    namespace: str
    hostname: str
    number: int
    port_name: str
    app_protocol: str
    vips: tuple[str, ...]
    service: Service | None = None
    port: ServicePort | None = None
    entry: ServiceEntry | None = None
    entry_port: EntryPort | None = None

    @classmethod
    def of_service(cls, svc: Service, port: ServicePort) -> ServedPort:
        return cls(
            "Service",
            svc.name,
            svc.namespace,
            svc.hostname(DOMAIN),
            port.port,
            port.name,
            port.app_protocol or "",
            tuple(svc.vips),
            service=svc,
            port=port,
        )

    @property
    def http(self) -> bool:
        """HTTP unless the port says otherwise (appProtocol / protocol / name prefix, as Istio's protocol
        selection by name). Waypoints exist for L7, so unknown means HTTP here."""
        proto = (self.app_protocol or self.port_name.split("-", 1)[0]).lower()
        return proto not in ("tcp", "tls", "https", "mongo", "mysql", "redis")

    @property
    def cluster(self) -> str:
        return (
            cluster_name(self.number, self.hostname)
            if self.http
            else tcp_cluster_name(self.number, self.hostname)
        )

    @property
    def route_name(self) -> str:
        return cluster_name(self.number, self.hostname)


@dataclass(frozen=True)
class ClusterTarget:
    """A cluster to build: the service port it reaches, the subset (labels) and its traffic policy."""

    name: str
    service: Service
    port: ServicePort
    subset: str = ""
    subset_labels: tuple[tuple[str, str], ...] = ()
    policy: TrafficPolicy | None = None


@dataclass
class WaypointPlan:
    wid: WaypointId
    served: list[ServedPort] = field(default_factory=list)
    # pods whose own IP is bound to this waypoint (``istio.io/waypoint-for`` workload/all)
    workloads: list[Pod] = field(default_factory=list)
    clusters: dict[str, ClusterTarget] = field(default_factory=dict)
    store: StoreReader | None = None
    # per-plan indexes: each lookup would otherwise scan the whole store (quadratic in services)
    dr_index: DestinationRuleIndex = field(default_factory=dict)
    entry_clusters: dict[str, EntryCluster] = field(default_factory=dict)
    pod_index: PodIndex | None = None
    # filled by the route builder: clusters routes refer to (so CDS includes them)
    extra: dict[str, Any] = field(default_factory=dict)


def _is_routable(svc: Service) -> bool:
    return svc.spec.type != "ExternalName" and not svc.headless and bool(svc.spec.ports)


def served_ports(store: StoreReader, wid: WaypointId) -> list[ServedPort]:
    out: list[ServedPort] = []
    for svc in typed_list(store, Service):
        if not _is_routable(svc):
            continue
        wp = service_waypoint(store, svc).waypoint
        if wp is None or (wp.namespace, wp.name) != (wid.namespace, wid.name):
            continue
        for port in svc.spec.ports:
            if port.protocol == "TCP":
                out.append(ServedPort.of_service(svc, port))
    for se in typed_list(store, ServiceEntry):
        if se.spec.resolution not in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN, Resolution.STATIC):
            continue  # NONE is passthrough: nothing to route to by name
        if se.spec.workload_selector is not None or not se.spec.addresses:
            continue  # mesh workloads are reached through their own entries; no VIP, no tunnel target
        wp = service_waypoint(store, se).waypoint
        if wp is None or (wp.namespace, wp.name) != (wid.namespace, wid.name):
            continue
        vips = tuple(a for a in se.spec.addresses if "/" not in a)
        for host in se.spec.hosts:
            if host.startswith("*"):
                continue
            for eport in se.spec.ports:
                proto = (eport.protocol or eport.name.split("-", 1)[0]).lower()
                out.append(
                    ServedPort(
                        "ServiceEntry",
                        se.name,
                        se.namespace,
                        host,
                        eport.number,
                        eport.name,
                        proto,
                        vips,
                        entry=se,
                        entry_port=eport,
                    )
                )
    return out


def served_workloads(store: StoreReader, wid: WaypointId) -> list[Pod]:
    """Ready pods whose pod-addressed traffic this waypoint serves (a workload or all waypoint)."""
    out: list[Pod] = []
    for p in typed_list(store, Pod):
        if not p.ready or not p.ips:
            continue
        wp = pod_waypoint(store, p).waypoint
        if wp is not None and (wp.namespace, wp.name) == (wid.namespace, wid.name):
            out.append(p)
    return out


def find_service(store: StoreReader, hostname: str) -> Service | None:
    """The Service whose FQDN is ``hostname`` (``<name>.<ns>.svc.<domain>``)."""
    if not hostname.endswith(".svc." + DOMAIN):
        return None
    name, ns = hostname.split(".")[:2]
    svc = store.get_typed(Service, ns, name)
    return svc if svc is not None and _is_routable(svc) else None


def merged_policy(dr: DestinationRule | None, subset: str, port: int) -> TrafficPolicy | None:
    """The traffic policy for (subset, port): the subset's policy overrides the top-level one field by
    field, and a matching ``portLevelSettings`` entry overrides both (Istio's merge order)."""
    if dr is None:
        return None
    base = dr.spec.traffic_policy
    fields: dict[str, Any] = {}
    layers: list[TrafficPolicy | None] = [base]
    if subset:
        for s in dr.spec.subsets:
            if s.name == subset:
                layers.append(s.traffic_policy)
    for layer in layers:
        if layer is None:
            continue
        for name in ("load_balancer", "connection_pool", "outlier_detection", "tls"):
            v = getattr(layer, name)
            if v is not None:
                fields[name] = v
        for pls in layer.port_level_settings:
            if pls.port is not None and pls.port.number == port:
                for name in ("load_balancer", "connection_pool", "outlier_detection", "tls"):
                    v = getattr(pls, name)
                    if v is not None:
                        fields[name] = v
    if not fields:
        return None
    return TrafficPolicy.model_validate(fields)


def add_cluster(plan: WaypointPlan, svc: Service, port: ServicePort, subset: str = "") -> str | None:
    """Register the cluster for (service, port, subset); returns its name (None: unknown subset)."""
    hostname = svc.hostname(DOMAIN)
    name = cluster_name(port.port, hostname, subset)
    if name in plan.clusters:
        return name
    assert plan.store is not None
    dr = destination_rule_for(plan.store, hostname, svc.namespace, plan.dr_index)
    labels: tuple[tuple[str, str], ...] = ()
    if subset:
        match = [s for s in (dr.spec.subsets if dr else []) if s.name == subset]
        if not match:
            return None
        labels = tuple(sorted(match[0].labels.items()))
    plan.clusters[name] = ClusterTarget(name, svc, port, subset, labels, merged_policy(dr, subset, port.port))
    return name


@dataclass(frozen=True)
class EntryCluster:
    """A cluster for a ServiceEntry host and port: external endpoints, reached directly (not HBONE)."""

    name: str
    entry: ServiceEntry
    host: str
    port: EntryPort
    policy: TrafficPolicy | None

    @property
    def dns(self) -> bool:
        return self.entry.spec.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN)

    def targets(self) -> list[tuple[str, int]]:
        out = [
            (ep.address, ep.ports.get(self.port.name) or self.port.target_port or self.port.number)
            for ep in self.entry.spec.endpoints
            if ep.address and not ep.is_uds
        ]
        if self.dns and not out:
            out = [(self.host, self.port.target_port or self.port.number)]
        return sorted(set(out))


def add_entry_cluster(plan: WaypointPlan, se: ServiceEntry, host: str, port: EntryPort, name: str) -> str:
    if name not in plan.entry_clusters:
        dr = destination_rule_for(plan.store, host, se.namespace, plan.dr_index)  # type: ignore[arg-type]
        plan.entry_clusters[name] = EntryCluster(name, se, host, port, merged_policy(dr, "", port.number))
    return name


def entry_cluster_for(plan: WaypointPlan, host: str, wanted: int | None, incoming: int | None) -> str | None:
    """The cluster of a served ServiceEntry host (a route destination naming it), or None."""
    ports = [sp for sp in plan.served if sp.kind == "ServiceEntry" and sp.hostname == host]
    if not ports:
        return None
    pick = next((sp for sp in ports if sp.number == wanted), None) if wanted else None
    if pick is None and not wanted:
        pick = next((sp for sp in ports if sp.number == incoming), None) or ports[0]
    return pick.cluster if pick is not None else None


def resolve_destination_port(svc: Service, wanted: int | None, incoming: int | None) -> ServicePort | None:
    """Destination port: the one asked for; else the incoming port if the service has it; else its
    only (or first) port."""
    ports = [p for p in svc.spec.ports if p.protocol == "TCP"]
    if wanted:
        return next((p for p in ports if p.port == wanted), None)
    if incoming is not None:
        hit = next((p for p in ports if p.port == incoming), None)
        if hit is not None:
            return hit
    return ports[0] if ports else None


class PodIndex:
    """Ready pods with IPs by (namespace, label, value): a selector intersects its smallest group."""

    def __init__(self, store: StoreReader) -> None:
        self.groups: dict[tuple[str, str, str], list[Pod]] = {}
        for p in typed_list(store, Pod):
            if p.ready and p.ips:
                for k, v in p.labels.items():
                    self.groups.setdefault((p.namespace, k, v), []).append(p)

    def select(self, namespace: str, selector: Mapping[str, str]) -> list[Pod]:
        groups = [self.groups.get((namespace, k, v), []) for k, v in sorted(selector.items())]
        if not groups:
            return []
        return [p for p in min(groups, key=len) if selector_matches(selector, p.labels)]


def endpoints(
    store: StoreReader, target: ClusterTarget, index: PodIndex | None = None
) -> list[tuple[str, int]]:
    """(pod ip, target port) of ready pods the service (and subset) selects, sorted."""
    return [(ip, port) for ip, port, _ in endpoint_pods(store, target, index)]


def workload_meta(pod: Pod, trust_domain: str) -> dict[str, str]:
    """What the waypoint's metrics report about a destination pod (endpoint metadata ``istio``)."""
    app, version = canonical_service(pod.labels, workload_name(pod))
    return {
        "workload": workload_name(pod),
        "namespace": pod.namespace,
        "principal": spiffe_id(pod.namespace, pod.spec.service_account_name or "default", trust_domain),
        "app": app,
        "version": version,
    }


def endpoint_pods(
    store: StoreReader, target: ClusterTarget, index: PodIndex | None = None
) -> list[tuple[str, int, Pod]]:
    """(pod ip, target port, pod) of ready pods the service (and subset) selects, sorted by address."""
    svc = target.service
    if not svc.spec.selector:
        return []
    found: dict[tuple[str, int], Pod] = {}
    subset = dict(target.subset_labels)
    wanted = target.port.effective_target_port
    for res in (index or PodIndex(store)).select(svc.namespace, svc.spec.selector):
        if subset and not selector_matches(subset, res.labels):
            continue
        if isinstance(wanted, int):
            tp: int | None = wanted
        elif wanted.isdigit():
            tp = int(wanted)
        else:
            tp = next(
                (cp.container_port for c in res.spec.containers for cp in c.ports if cp.name == wanted), None
            )
        if tp is not None:
            for ip in res.ips:
                found.setdefault((ip, tp), res)
    return [(ip, port, found[(ip, port)]) for ip, port in sorted(found)]


# ------------------------------------------------------------------------------------------ memo per store
_LOCK = threading.Lock()
_PLANS: dict[tuple[int, int, WaypointId], WaypointPlan] = {}


def plan_for(store: ConfigStore, proxy: Proxy) -> WaypointPlan | None:
    """The waypoint's plan, memoized per (store, version, waypoint): the four generators of one push
    share it instead of each walking the store. Routes are part of it (built by ``routes.build``)."""
    wid = waypoint_id(proxy)
    if wid is None:
        return None
    key = (id(store), store.version, wid)
    with _LOCK:
        hit = _PLANS.get(key)
    if hit is not None:
        return hit
    from istiopy.xds.waypoint import routes  # routes builds on this module

    reader = view(store)
    plan = WaypointPlan(
        wid,
        served_ports(reader, wid),
        served_workloads(reader, wid),
        store=reader,
        dr_index=destination_rule_index(reader),
        pod_index=PodIndex(reader),
    )
    for sp in plan.served:
        if sp.entry is not None and sp.entry_port is not None:
            add_entry_cluster(plan, sp.entry, sp.hostname, sp.entry_port, sp.cluster)
        elif sp.service is None or sp.port is None:
            continue
        elif sp.http:
            add_cluster(plan, sp.service, sp.port)
        else:
            plan.clusters.setdefault(sp.cluster, ClusterTarget(sp.cluster, sp.service, sp.port, "", (), None))
    routes.build(plan)
    with _LOCK:
        if len(_PLANS) > 64:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def resolve(host: str, namespace: str) -> str:
    return resolve_host(host, namespace, DOMAIN)
