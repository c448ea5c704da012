"""WDS: the ``istio.workload.Address`` generator that tells ztunnel about workloads and services.

Pure and deterministic: the same store gives byte-identical messages (map entries and lists are sorted),
which is what lets the push pipeline hash content and skip unchanged resources. Resource names follow
upstream: a workload is named by its uid (``<cluster>//Pod/<ns>/<name>``), a service by ``<ns>/<hostname>``.

Which pods: every non-terminal pod with an IP, as upstream sends them; enrolled (ambient) pods are HBONE
workloads, the rest are sent with tunnel protocol NONE so ztunnel can still reach them in plaintext and
attribute their traffic. The derivations (enrollment, waypoints, membership) are ``istiopy.mesh.ambient``;
this module only shapes them into protobuf.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from istiopy.api.gen import workload_pb2 as wl
from istiopy.mesh.ambient import (
    HBONE_PORT,
    TUNNEL_LABEL,
    AmbientIndex,
    MeshSettings,
    Waypoint,
    canonical_service,
    ip_bytes,
    numeric_target_port,
    pod_is_terminal,
    pod_speaks_hbone,
    pod_waypoint,
    service_hostname,
    service_resource_name,
    service_waypoint,
    services_for_pod,
    typed_list,
    workload_name,
    workload_ports,
    workload_uid,
)
from istiopy.mesh.authz import workload_policy_names
from istiopy.mesh.resources.core import Namespace, Pod, Service, ServicePort
from istiopy.mesh.store import Change, ConfigStore
from istiopy.xds.registry import Generator, GeneratorRegistry, shared

__all__ = [
    "ADDRESS_TYPE_URL",
    "affected_names",
    "affects",
    "app_protocol",
    "gateway_address",
    "generate_addresses",
    "pod_workload",
    "register_ambient_generators",
    "service_address",
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
    {"Pod", "Service", "Namespace", "EndpointSlice", "Gateway", "GatewayClass"}
    | {"AuthorizationPolicy", "PeerAuthentication"}
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


def pod_workload(store: ConfigStore, pod: Pod, settings: MeshSettings = MeshSettings()) -> Any | None:
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
        tunnel_protocol=wl.HBONE if pod_speaks_hbone(pod, namespace) else wl.NONE,
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
    binding = pod_waypoint(store, pod, settings)
    if binding.waypoint is not None:
        w.waypoint.CopyFrom(gateway_address(binding.waypoint))
    for svc in services_for_pod(store, pod):
        key = service_resource_name(svc.namespace, service_hostname(svc, settings))
        ports = w.services[key].ports
        for p in workload_ports(svc, pod):
            ports.add(service_port=p.service_port, target_port=p.target_port)
    return w


def service_address(store: ConfigStore, svc: Service, settings: MeshSettings = MeshSettings()) -> Any | None:
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
    distribution = svc.spec.traffic_distribution or svc.metadata.annotations.get(
        "networking.istio.io/traffic-distribution"
    )
    if distribution == "PreferClose":
        lb = wl.LoadBalancing
        s.load_balancing.routing_preference.extend([lb.NETWORK, lb.REGION, lb.ZONE, lb.SUBZONE])
        s.load_balancing.mode = lb.FAILOVER
    return s


def generate_addresses(store: ConfigStore, settings: MeshSettings = MeshSettings()) -> list[tuple[str, Any]]:
    """Every Address resource as (name, message), sorted by name."""
    out: list[tuple[str, Any]] = []
    for pod in typed_list(store, Pod):
        w = pod_workload(store, pod, settings)
        if w is not None:
            out.append((w.uid, wl.Address(workload=w)))
    for svc in typed_list(store, Service):
        s = service_address(store, svc, settings)
        if s is not None:
            out.append((f"{s.namespace}/{s.hostname}", wl.Address(service=s)))
    out.sort(key=lambda pair: pair[0])
    return out


def affects(change: Change) -> bool:
    """Cheap filter: could this change alter any Address resource?"""
    return change.key.kind in _KINDS


def affected_names(
    change: Change, store: ConfigStore, settings: MeshSettings = MeshSettings()
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
