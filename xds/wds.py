"""WDS: the ``istio.workload.Address`` generator that tells ztunnel about workloads and services.

Pure and deterministic: the same store gives byte-identical messages (map entries and lists are sorted),
which is what lets the push pipeline hash content and skip unchanged resources. Resource names follow
upstream: a workload is named by its uid (``<cluster>//Pod/<ns>/<name>``), a service by ``<ns>/<hostname>``.

Which pods: every non-terminal pod with an IP, as upstream sends them; enrolled (ambient) pods are HBONE
workloads, the rest are sent with tunnel protocol NONE so ztunnel can still reach them in plaintext and
attribute their traffic. The derivations (enrollment, waypoints, membership) are ``istiopy.mesh.ambient``;
this module only shapes them into protobuf.

Other sources, with upstream's uids: a WorkloadEntry is one workload
(``<cluster>/networking.istio.io/WorkloadEntry/<ns>/<name>``); a ServiceEntry gives one Service per host and
one workload per inline endpoint (``.../ServiceEntry/<ns>/<name>/<address>``), or per host when it is a DNS
entry without endpoints. Each generation pass reads the store through a ``CachedView`` so that the per-pod
lookups stay linear in the size of the mesh.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from istiopy.api.gen import workload_pb2 as wl
from istiopy.mesh.ambient import (
    AMBIENT_REDIRECTION_ANNOTATION,
    GATEWAY_NAME_LABEL,
    HBONE_PORT,
    TUNNEL_LABEL,
    AmbientIndex,
    MeshSettings,
    StoreReader,
    Waypoint,
    canonical_service,
    find_waypoint,
    ip_bytes,
    numeric_target_port,
    pod_is_terminal,
    pod_speaks_hbone,
    pod_waypoint,
    service_entry_uid,
    service_hostname,
    service_resource_name,
    service_waypoint,
    services_for_pod,
    services_selecting,
    typed_list,
    view,
    workload_entry_uid,
    workload_name,
    workload_ports,
    workload_uid,
)
from istiopy.mesh.ambient import node_locality as mesh_node_locality
from istiopy.mesh.authz import workload_policy_names
from istiopy.mesh.meta import Resource
from istiopy.mesh.resources.core import Namespace, Pod, Service, ServicePort
from istiopy.mesh.resources.networking import Resolution, ServiceEntry, WorkloadEntry, WorkloadEntrySpec
from istiopy.mesh.store import Change, selector_matches
from istiopy.xds.registry import Generator, GeneratorRegistry, shared

__all__ = [
    "ADDRESS_TYPE_URL",
    "affected_names",
    "affects",
    "app_protocol",
    "gateway_address",
    "generate_addresses",
    "node_locality",
    "pod_workload",
    "register_ambient_generators",
    "service_address",
    "service_entry_services",
    "service_entry_workloads",
    "workload_entry_workload",
]

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"

# Istio's protocol names (from ``appProtocol`` or the ``<protocol>[-suffix]`` port-name convention).
_APP_PROTOCOLS = {
    "http": wl.HTTP11,
    "http2": wl.HTTP2,
    "h2c": wl.HTTP2,
    "kubernetes.io/h2c": wl.HTTP2,
    "grpc": wl.GRPC,
    "tcp": wl.TCP,
    "tls": wl.TLS,
    "https": wl.TLS,
}
_KINDS = frozenset(
    {"Pod", "Service", "Namespace", "Node", "EndpointSlice", "Gateway", "GatewayClass"}
    | {"AuthorizationPolicy", "PeerAuthentication", "ServiceEntry", "WorkloadEntry"}
)


def app_protocol(port: ServicePort) -> int:
    """The declared application protocol of a service port, UNKNOWN when nothing says."""
    if port.app_protocol:
        return _APP_PROTOCOLS.get(port.app_protocol.lower(), wl.UNKNOWN)
    prefix = port.name.split("-", 1)[0].lower()
    return _APP_PROTOCOLS.get(prefix, wl.UNKNOWN)


def gateway_address(waypoint: Waypoint) -> Any:
    """A waypoint as ztunnel addresses it: the waypoint Service's hostname, HBONE on 15008."""
    return wl.GatewayAddress(
        hostname=wl.NamespacedHostname(namespace=waypoint.namespace, hostname=waypoint.hostname),
        hbone_mtls_port=HBONE_PORT,
    )


def node_locality(store: StoreReader, node_name: str) -> Any | None:
    """A pod's locality is its node's topology labels (what locality load balancing compares)."""
    loc = mesh_node_locality(store, node_name)
    if loc is None:
        return None
    return wl.Locality(region=loc[0], zone=loc[1], subzone=loc[2])


def _is_waypoint_pod(store: StoreReader, pod: Pod) -> bool:
    """A waypoint's own pod terminates HBONE itself (it is not captured: upstream labels it
    ``istio.io/dataplane-mode: none``), so ztunnel must still reach it over HBONE."""
    name = pod.labels.get(GATEWAY_NAME_LABEL)
    return name is not None and find_waypoint(store, pod.namespace, name) is not None


def pod_workload(store: StoreReader, pod: Pod, settings: MeshSettings = MeshSettings()) -> Any | None:
    """The Workload message of a pod, or None when it has no IP or has terminated."""
    if pod_is_terminal(pod) or not pod.ips:
        return None
    try:
        addresses = [ip_bytes(ip) for ip in pod.ips]
    except ValueError:
        return None
    namespace = store.get_typed(Namespace, "", pod.namespace)
    name = workload_name(pod)
    canonical_name, canonical_revision = canonical_service(pod.labels, name)
    w = wl.Workload(
        uid=workload_uid(pod, settings),
        name=pod.name,
        namespace=pod.namespace,
        addresses=addresses,
        network=settings.network,
        tunnel_protocol=wl.HBONE
        if pod_speaks_hbone(pod, namespace) or _is_waypoint_pod(store, pod)
        else wl.NONE,
        # Upstream leaves the default trust domain out; ztunnel fills it in.
        trust_domain="" if settings.trust_domain == "cluster.local" else settings.trust_domain,
        service_account=pod.service_account,
        node=pod.spec.node_name,
        canonical_name=canonical_name,
        canonical_revision=canonical_revision,
        # Upstream always sends POD here "for backwards compatibility"; workload_name carries the owner.
        workload_type=wl.POD,
        workload_name=name,
        status=wl.HEALTHY if pod.ready and pod.metadata.deletion_timestamp is None else wl.UNHEALTHY,
        cluster_id=settings.cluster_id,
        authorization_policies=workload_policy_names(store, pod.namespace, pod.labels, settings),
    )
    if pod.labels.get(TUNNEL_LABEL) == "http":
        w.native_tunnel = True  # speaks HBONE itself: no capture needed
    if pod.spec.host_network:
        w.network_mode = wl.HOST_NETWORK
    if (loc := node_locality(store, pod.spec.node_name)) is not None:
        w.locality.CopyFrom(loc)
    binding = pod_waypoint(store, pod, settings)
    if binding.waypoint is not None:
        w.waypoint.CopyFrom(gateway_address(binding.waypoint))
    for svc in services_for_pod(store, pod):
        key = service_resource_name(svc.namespace, service_hostname(svc, settings))
        ports = w.services[key].ports
        for p in workload_ports(svc, pod):
            ports.add(service_port=p.service_port, target_port=p.target_port)
    for se in _service_entries_selecting(store, pod.namespace, pod.labels):
        for host in _entry_hosts(store, se, settings):
            ports = w.services[service_resource_name(se.namespace, host)].ports
            for sp in se.spec.ports:
                ports.add(service_port=sp.number, target_port=sp.target_port or sp.number)
    return w


# ---------------------------------------------------------------------------------------- ServiceEntry
def _service_entries_selecting(
    store: StoreReader, namespace: str, labels: Mapping[str, str]
) -> list[ServiceEntry]:
    return [
        se
        for se in typed_list(store, ServiceEntry, namespace)
        if se.spec.workload_selector is not None
        and se.spec.workload_selector.labels
        and selector_matches(se.spec.workload_selector.labels, labels)
    ]


def _entry_hosts(store: StoreReader, se: ServiceEntry, settings: MeshSettings) -> list[str]:
    """The SE's hosts that become WDS Services: a Kubernetes Service of the same name in the same
    namespace wins (upstream prefers it), and wildcard hosts address nothing."""
    taken = {service_hostname(s, settings) for s in typed_list(store, Service, se.namespace)}
    return [h for h in se.spec.hosts if "*" not in h and h not in taken]


def _network_address(value: str, network: str) -> Any | None:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None
    addr = wl.NetworkAddress(network=network, address=ipaddress.ip_address(value.split("/", 1)[0]).packed)
    if "/" in value:
        addr.length = net.prefixlen
    return addr


def service_entry_services(
    store: StoreReader, se: ServiceEntry, settings: MeshSettings = MeshSettings()
) -> list[Any]:
    """One Service message per host of a ServiceEntry (named ``<ns>/<host>``)."""
    binding = service_waypoint(store, se, settings)
    out = []
    for host in _entry_hosts(store, se, settings):
        s = wl.Service(name=se.name, namespace=se.namespace, hostname=host)
        for a in se.spec.addresses:
            if (na := _network_address(a, settings.network)) is not None:
                s.addresses.append(na)
        for sp in se.spec.ports:
            proto = _APP_PROTOCOLS.get(sp.protocol.lower(), wl.UNKNOWN) if sp.protocol else wl.UNKNOWN
            s.ports.add(service_port=sp.number, target_port=sp.target_port or sp.number, app_protocol=proto)
        s.subject_alt_names.extend(se.spec.subject_alt_names)
        if se.spec.resolution == Resolution.NONE:
            # No endpoints to balance over: ztunnel passes traffic through to the address dialled.
            lb = wl.LoadBalancing
            s.load_balancing.CopyFrom(lb(mode=lb.PASSTHROUGH, health_policy=lb.ALLOW_ALL))
        if binding.waypoint is not None:
            s.waypoint.CopyFrom(gateway_address(binding.waypoint))
        out.append(s)
    return out


def _tunnel(labels: Mapping[str, str], annotations: Mapping[str, str]) -> Any:
    """Non-pod workloads are HBONE only when marked captured or native HBONE speakers (as upstream)."""
    if annotations.get(AMBIENT_REDIRECTION_ANNOTATION) == "enabled" or labels.get(TUNNEL_LABEL) == "http":
        return wl.HBONE
    return wl.NONE


def _locality(text: str) -> Any | None:
    if not text:
        return None
    parts = [*text.split("/"), "", ""][:3]
    return wl.Locality(region=parts[0], zone=parts[1], subzone=parts[2])


def _entry_workload(
    store: StoreReader,
    *,
    uid: str,
    name: str,
    namespace: str,
    spec: WorkloadEntrySpec,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    meta_for_waypoint: Resource | None,
    settings: MeshSettings,
) -> Any:
    w = wl.Workload(
        uid=uid,
        name=name,
        namespace=namespace,
        network=spec.network or settings.network,
        tunnel_protocol=_tunnel(labels, annotations),
        trust_domain="" if settings.trust_domain == "cluster.local" else settings.trust_domain,
        service_account=spec.service_account,
        workload_type=wl.POD,  # upstream impersonates a pod here too
        workload_name=name,
        status=wl.HEALTHY,
        cluster_id=settings.cluster_id,
        authorization_policies=workload_policy_names(store, namespace, labels, settings),
    )
    w.canonical_name, w.canonical_revision = canonical_service(labels, name)
    try:
        w.addresses.append(ip_bytes(spec.address))
    except ValueError:
        w.hostname = spec.address
    if labels.get(TUNNEL_LABEL) == "http":
        w.native_tunnel = True
    if spec.weight > 0:
        w.capacity.value = spec.weight
    if (loc := _locality(spec.locality)) is not None:
        w.locality.CopyFrom(loc)
    if meta_for_waypoint is not None:
        binding = pod_waypoint(store, meta_for_waypoint, settings)
        if binding.waypoint is not None:
            w.waypoint.CopyFrom(gateway_address(binding.waypoint))
    return w


def service_entry_workloads(
    store: StoreReader, se: ServiceEntry, settings: MeshSettings = MeshSettings()
) -> list[Any]:
    """Workloads of a ServiceEntry's inline endpoints; a DNS entry without endpoints gets one per host."""
    endpoints = list(se.spec.endpoints)
    implicit = (
        not endpoints
        and se.spec.workload_selector is None
        and se.spec.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN)
    )
    hosts = _entry_hosts(store, se, settings)
    if implicit:
        endpoints = [WorkloadEntrySpec(address=h) for h in hosts]
    out = []
    for i, ep in enumerate(endpoints):
        if not ep.address or ep.is_uds:
            continue
        w = _entry_workload(
            store,
            uid=service_entry_uid(se.namespace, se.name, ep.address, settings),
            name=se.name,
            namespace=se.namespace,
            spec=ep,
            labels=se.labels,
            annotations=se.metadata.annotations,
            # Endpoint labels decide the waypoint, as if the endpoint were a workload of its own.
            meta_for_waypoint=None if implicit else _with_labels(se, ep.labels),
            settings=settings,
        )
        for host in [hosts[i]] if implicit else hosts:
            ports = w.services[service_resource_name(se.namespace, host)].ports
            for sp in se.spec.ports:
                target = ep.ports.get(sp.name) or sp.target_port or sp.number
                ports.add(service_port=sp.number, target_port=target)
        out.append(w)
    return out


def _with_labels(res: Resource, labels: Mapping[str, str]) -> Resource:
    """A copy of ``res`` whose labels are ``labels`` (for waypoint resolution of inline endpoints)."""
    meta = res.metadata.model_copy(update={"labels": dict(labels)})
    return res.model_copy(update={"metadata": meta})


def workload_entry_workload(
    store: StoreReader, we: WorkloadEntry, settings: MeshSettings = MeshSettings()
) -> Any | None:
    """The Workload of a WorkloadEntry (a VM or other non-Kubernetes endpoint)."""
    if not we.spec.address or we.spec.is_uds:
        return None
    labels = {**we.labels, **we.spec.labels}
    w = _entry_workload(
        store,
        uid=workload_entry_uid(we.namespace, we.name, settings),
        name=we.name,
        namespace=we.namespace,
        spec=we.spec,
        labels=labels,
        annotations=we.metadata.annotations,
        meta_for_waypoint=we,
        settings=settings,
    )
    for svc in services_selecting(store, we.namespace, labels):
        ports = w.services[service_resource_name(svc.namespace, service_hostname(svc, settings))].ports
        for port in svc.spec.ports:
            target = port.effective_target_port
            if isinstance(target, str) and not target.isdigit():
                if target not in we.spec.ports:
                    continue  # a named port this entry does not expose
                target = we.spec.ports[target]
            ports.add(service_port=port.port, target_port=int(target))
    for se in _service_entries_selecting(store, we.namespace, labels):
        for host in _entry_hosts(store, se, settings):
            ports = w.services[service_resource_name(se.namespace, host)].ports
            for sp in se.spec.ports:
                target = we.spec.ports.get(sp.name) or sp.target_port or sp.number
                ports.add(service_port=sp.number, target_port=target)
    return w


def service_address(store: StoreReader, svc: Service, settings: MeshSettings = MeshSettings()) -> Any | None:
    """The Service message, or None for ExternalName services (ambient leaves those to DNS)."""
    if svc.spec.type == "ExternalName":
        return None
    s = wl.Service(
        name=svc.name,
        namespace=svc.namespace,
        hostname=service_hostname(svc, settings),
    )
    for vip in svc.vips:
        s.addresses.add(network=settings.network, address=ip_bytes(vip))
    for port in svc.spec.ports:
        s.ports.add(
            service_port=port.port, target_port=numeric_target_port(port), app_protocol=app_protocol(port)
        )
    binding = service_waypoint(store, svc, settings)
    if binding.waypoint is not None:
        s.waypoint.CopyFrom(gateway_address(binding.waypoint))
    namespace = store.get_typed(Namespace, "", svc.namespace)
    lb = _traffic_distribution(
        svc.spec.traffic_distribution,
        svc.metadata.annotations,
        namespace.metadata.annotations if namespace else {},
    )
    if lb is not None:
        s.load_balancing.CopyFrom(lb)
    families = {ipaddress.ip_address(v).version for v in svc.vips}
    if families == {4, 6}:
        s.ip_families = wl.DUAL
    elif families:
        s.ip_families = wl.IPV4_ONLY if families == {4} else wl.IPV6_ONLY
    # A Kubernetes Service is always canonical for its hostname (upstream): other definitions of the same
    # host only apply inside their own namespace.
    s.canonical = True
    return s


TRAFFIC_DISTRIBUTION_ANNOTATION = "networking.istio.io/traffic-distribution"


def _traffic_distribution(
    spec_value: str | None, annotations: Mapping[str, str], namespace_annotations: Mapping[str, str]
) -> Any | None:
    """Locality preference from ``spec.trafficDistribution``, else the Service's or its namespace's
    annotation: PreferClose/PreferSameZone keeps traffic in the zone, PreferSameNode on the node,
    each failing over outward as upstream does."""
    value = (
        spec_value
        or annotations.get(TRAFFIC_DISTRIBUTION_ANNOTATION)
        or namespace_annotations.get(TRAFFIC_DISTRIBUTION_ANNOTATION)
    )
    scope = wl.LoadBalancing
    if value in ("PreferClose", "PreferSameZone"):
        prefs = [scope.NETWORK, scope.REGION, scope.ZONE]
    elif value == "PreferSameNode":
        prefs = [scope.NETWORK, scope.REGION, scope.ZONE, scope.SUBZONE, scope.NODE]
    else:
        return None
    return wl.LoadBalancing(routing_preference=prefs, mode=scope.FAILOVER)


def generate_addresses(store: StoreReader, settings: MeshSettings = MeshSettings()) -> list[tuple[str, Any]]:
    """Every Address resource as (name, message), sorted by name."""
    store = view(store)
    out: list[tuple[str, Any]] = []
    for pod in typed_list(store, Pod):
        w = pod_workload(store, pod, settings)
        if w is not None:
            out.append((w.uid, wl.Address(workload=w)))
    for svc in typed_list(store, Service):
        s = service_address(store, svc, settings)
        if s is not None:
            out.append((f"{s.namespace}/{s.hostname}", wl.Address(service=s)))
    for we in typed_list(store, WorkloadEntry):
        w = workload_entry_workload(store, we, settings)
        if w is not None:
            out.append((w.uid, wl.Address(workload=w)))
    for se in typed_list(store, ServiceEntry):
        for s in service_entry_services(store, se, settings):
            out.append((f"{s.namespace}/{s.hostname}", wl.Address(service=s)))
        for w in service_entry_workloads(store, se, settings):
            out.append((w.uid, wl.Address(workload=w)))
    out.sort(key=lambda pair: pair[0])
    return out


def affects(change: Change) -> bool:
    """Cheap filter: could this change alter any Address resource?"""
    return change.key.kind in _KINDS


def affected_names(
    change: Change, store: StoreReader, settings: MeshSettings = MeshSettings()
) -> dict[str, set[str]]:
    """{ADDRESS_TYPE_URL: names that may have changed} for an applied change; ``{"*"}`` means all."""
    if not affects(change):
        return {}
    found = AmbientIndex(store, settings).affected(change)
    if found.everything:
        return {ADDRESS_TYPE_URL: {"*"}}
    names = found.workloads | found.services
    return {ADDRESS_TYPE_URL: names} if names else {}


def register_ambient_generators(
    registry: GeneratorRegistry,
    settings: MeshSettings = MeshSettings(),
    proxy_kinds: Iterable[str] = ("ztunnel",),
) -> None:
    """Register the WDS (Address) and WADS (Authorization) generators for ztunnel proxies.

    Output does not depend on the proxy (every ztunnel gets every workload, service and policy), so both
    share one scope: the push pipeline generates once per change and fans the result out.
    """
    from istiopy.xds import wads

    kinds = frozenset(proxy_kinds)
    registry.register(
        Generator(
            type_url=ADDRESS_TYPE_URL,
            generate=lambda store, proxy: generate_addresses(store, settings),
            affects=lambda change, proxy: affects(change),
            scope=shared,
            proxy_kinds=kinds,
            name="wds",
        )
    )
    registry.register(
        Generator(
            type_url=wads.AUTHORIZATION_TYPE_URL,
            generate=lambda store, proxy: wads.generate_authorizations(store, settings),
            affects=lambda change, proxy: wads.affects(change),
            scope=shared,
            proxy_kinds=kinds,
            name="wads",
        )
    )
