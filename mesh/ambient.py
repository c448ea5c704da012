"""Ambient facts derived from the model: enrollment, identities, service membership and waypoint binding.

The WDS/WADS generators, the operator (status), the analyzer and the ztunnel/waypoint code all ask the
same questions ("is this pod captured?", "which waypoint serves this Service?"); answering them once, here,
keeps the wire output, the status conditions and ``istioctl analyze`` in agreement. Everything is a pure
function of a ``ConfigStore`` snapshot; ``AmbientIndex`` adds the "what does this change affect" logic the
push pipeline needs to send only the resources that may have changed.

Semantics follow upstream istiod's ambient index (reference: ambient.md 1.1-1.3 and 3.3):
* a pod is enrolled when its own ``istio.io/dataplane-mode`` label says ``ambient``, or it has no such label
  and its namespace says ``ambient``; ``none`` opts out; sidecar-injected and host-network pods never are;
* ``istio.io/use-waypoint`` on the object wins over the namespace label, ``none`` opts out, and
  ``istio.io/use-waypoint-namespace`` names the waypoint's namespace;
* a Service binds only to ``service``/``all`` waypoints, a workload only to ``workload``/``all`` ones; a
  workload that merely inherits a service waypoint from its namespace silently gets none.
"""

from __future__ import annotations

import builtins
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from istiopy.mesh.meta import Resource
from istiopy.mesh.resources.core import EndpointSlice, Namespace, Node, Pod, Service, ServicePort
from istiopy.mesh.resources.gateway import (
    WAYPOINT_FOR_LABEL,
    Gateway,
    GatewayClass,
    GatewayLabelSelector,
    ReferenceGrant,
)
from istiopy.mesh.store import Change, selector_matches

__all__ = [
    "AMBIENT_REDIRECTION_ANNOTATION",
    "DATAPLANE_MODE_LABEL",
    "GATEWAY_NAME_LABEL",
    "HBONE_PORT",
    "PEER_AUTHN_PREFIX",
    "REGION_LABEL",
    "SIDECAR_STATUS_ANNOTATION",
    "STATIC_STRICT_POLICY",
    "SUBZONE_LABEL",
    "TUNNEL_LABEL",
    "USE_WAYPOINT_LABEL",
    "USE_WAYPOINT_NAMESPACE_LABEL",
    "WAYPOINT_FOR_LABEL",
    "ZONE_LABEL",
    "Affected",
    "AmbientIndex",
    "CachedView",
    "MeshSettings",
    "ResolvedPort",
    "StoreReader",
    "Waypoint",
    "WaypointBinding",
    "canonical_service",
    "find_waypoint",
    "ip_bytes",
    "is_waypoint_instance",
    "namespace_enrolled",
    "node_locality",
    "numeric_target_port",
    "pod_enrolled",
    "pod_is_terminal",
    "pod_locality",
    "pod_speaks_hbone",
    "pod_waypoint",
    "reference_permitted",
    "service_entry_uid",
    "service_hostname",
    "service_resource_name",
    "service_waypoint",
    "services_for_pod",
    "services_selecting",
    "spiffe_id",
    "typed_list",
    "view",
    "waypoint_allows_namespace",
    "workload_entry_uid",
    "workload_name",
    "workload_ports",
    "workload_uid",
]

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
USE_WAYPOINT_NAMESPACE_LABEL = "istio.io/use-waypoint-namespace"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
# Set by the node agent once it has actually redirected a pod; upstream treats it as proof of capture.
AMBIENT_REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
# A workload that speaks HBONE natively (``http``) needs no capture to be an HBONE endpoint.
TUNNEL_LABEL = "networking.istio.io/tunnel"
# Pods of a Gateway carry its name here; waypoint instances must not be sent to a waypoint themselves.
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
MANAGED_LABEL = "gateway.istio.io/managed"
MANAGED_MESH = "istio.io-mesh-controller"
MANAGED_EAST_WEST = "istio.io-eastwest-controller"
HBONE_PORT = 15008
# Names of the Authorization resources istiod synthesizes from PeerAuthentication ('_' cannot occur in
# Kubernetes names, so they never collide with a user's AuthorizationPolicy).
STATIC_STRICT_POLICY = "istio_converted_static_strict"
PEER_AUTHN_PREFIX = "converted_peer_authentication_"

R = TypeVar("R", bound=Resource)


@dataclass(frozen=True)
class MeshSettings:
    """The mesh-wide knobs the derivations depend on (upstream: MeshConfig and istiod flags)."""

    cluster_id: str = "Kubernetes"
    network: str = ""
    trust_domain: str = "cluster.local"
    domain_suffix: str = "cluster.local"
    root_namespace: str = "istio-system"


class StoreReader(Protocol):
    """The read side of ``ConfigStore`` the derivations use; ``CachedView`` implements it too."""

    def get(self, kind: str, namespace: str, name: str) -> Resource | None: ...

    def get_typed(self, cls: type[R], namespace: str, name: str) -> R | None: ...

    def list(
        self, kind: str, namespace: str | None = None, selector: Mapping[str, str] | None = None
    ) -> builtins.list[Resource]: ...


class CachedView:
    """A read-through cache over a store for one generation pass.

    Generators ask the same questions for every pod ("Services in this namespace", "policies in the root
    namespace"); the store answers each by sorting a whole kind. The view lists each kind once, groups it
    by namespace and answers from that, turning a quadratic pass into a linear one. It reflects the store
    as it was when each kind was first read, so use a fresh view per pass.
    """

    def __init__(self, store: StoreReader) -> None:
        self._store = store
        self._kinds: dict[str, builtins.list[Resource]] = {}
        self._by_ns: dict[str, dict[str, builtins.list[Resource]]] = {}
        self._by_key: dict[str, dict[tuple[str, str], Resource]] = {}

    def _load(self, kind: str) -> builtins.list[Resource]:
        items = self._kinds.get(kind)
        if items is None:
            items = self._store.list(kind)
            self._kinds[kind] = items
            by_ns: dict[str, builtins.list[Resource]] = {}
            for r in items:
                by_ns.setdefault(r.key.namespace, []).append(r)
            self._by_ns[kind] = by_ns
            self._by_key[kind] = {(r.key.namespace, r.key.name): r for r in items}
        return items

    def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        self._load(kind)
        return self._by_key[kind].get((namespace, name))

    def get_typed(self, cls: type[R], namespace: str, name: str) -> R | None:
        res = self.get(cls.KIND, namespace if cls.NAMESPACED else "", name)
        return res if isinstance(res, cls) else None

    def list(
        self, kind: str, namespace: str | None = None, selector: Mapping[str, str] | None = None
    ) -> builtins.list[Resource]:
        items = self._load(kind)
        if namespace is not None:
            items = self._by_ns[kind].get(namespace, [])
        if not selector:
            return builtins.list(items)
        return [r for r in items if selector_matches(selector, r.labels)]


def view(store: StoreReader) -> StoreReader:
    """A ``CachedView`` of ``store`` (a view is returned as is)."""
    return store if isinstance(store, CachedView) else CachedView(store)


def typed_list(
    store: StoreReader, cls: type[R], namespace: str | None = None, selector: Mapping[str, str] | None = None
) -> list[R]:
    """``store.list`` narrowed to one class, for any ``StoreReader`` (a store or a ``CachedView``)."""
    return [r for r in store.list(cls.KIND, namespace, selector) if isinstance(r, cls)]


# ------------------------------------------------------------------------------------------ identities
def workload_uid(pod: Pod, settings: MeshSettings = MeshSettings()) -> str:
    """``<cluster>//Pod/<ns>/<name>``: the WDS resource name of a pod workload (upstream helpers.go)."""
    return f"{settings.cluster_id}//Pod/{pod.namespace}/{pod.name}"


def workload_entry_uid(namespace: str, name: str, settings: MeshSettings = MeshSettings()) -> str:
    """``<cluster>/networking.istio.io/WorkloadEntry/<ns>/<name>``."""
    return f"{settings.cluster_id}/networking.istio.io/WorkloadEntry/{namespace}/{name}"


def service_entry_uid(
    namespace: str, name: str, address: str, settings: MeshSettings = MeshSettings()
) -> str:
    """``<cluster>/networking.istio.io/ServiceEntry/<ns>/<name>/<addr>``: one per inline endpoint."""
    return f"{settings.cluster_id}/networking.istio.io/ServiceEntry/{namespace}/{name}/{address}"


def services_selecting(store: StoreReader, namespace: str, labels: Mapping[str, str]) -> list[Service]:
    """Kubernetes Services in ``namespace`` whose non-empty selector matches ``labels`` (for non-pod
    workloads such as WorkloadEntries, which only join Services by selector)."""
    return [
        s
        for s in typed_list(store, Service, namespace)
        if s.spec.type != "ExternalName" and s.spec.selector and selector_matches(s.spec.selector, labels)
    ]


REGION_LABEL = "topology.kubernetes.io/region"
ZONE_LABEL = "topology.kubernetes.io/zone"
SUBZONE_LABEL = "topology.istio.io/subzone"


def node_locality(store: StoreReader, node_name: str) -> tuple[str, str, str] | None:
    """(region, zone, subzone) from a node's topology labels; None when it has none (or is unknown)."""
    node = store.get_typed(Node, "", node_name) if node_name else None
    if node is None:
        return None
    loc = (
        node.labels.get(REGION_LABEL, ""),
        node.labels.get(ZONE_LABEL, ""),
        node.labels.get(SUBZONE_LABEL, ""),
    )
    return loc if any(loc) else None


def pod_locality(store: StoreReader, pod: Pod) -> tuple[str, str, str] | None:
    """A pod's locality is its node's (what locality load balancing compares)."""
    return node_locality(store, pod.spec.node_name)


def reference_permitted(
    store: StoreReader,
    from_kind: str,
    from_ns: str,
    to_group: str,
    to_kind: str,
    to_ns: str,
    to_name: str,
    from_group: str = "gateway.networking.k8s.io",
) -> bool:
    """Whether a Gateway API object (an HTTPRoute by default) in ``from_ns`` may refer to ``to_name``.

    Within a namespace always; across namespaces only when a ReferenceGrant in ``to_ns`` says so, as
    Gateway API requires of every cross-namespace reference (so removing the grant revokes it).
    """
    if from_ns == to_ns:
        return True
    return any(
        g.permits(from_group, from_kind, from_ns, to_group, to_kind, to_name)
        for g in typed_list(store, ReferenceGrant, to_ns)
    )


def spiffe_id(namespace: str, service_account: str, trust_domain: str = "cluster.local") -> str:
    """``spiffe://<td>/ns/<ns>/sa/<sa>``, the identity ztunnel and the CA agree on."""
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def service_hostname(service: Service, settings: MeshSettings = MeshSettings()) -> str:
    return service.hostname(settings.domain_suffix)


def service_resource_name(namespace: str, hostname: str) -> str:
    """``<ns>/<hostname>``: the WDS resource name of a Service, and the key of ``Workload.services``."""
    return f"{namespace}/{hostname}"


# ------------------------------------------------------------------------------------------ enrollment
def namespace_enrolled(namespace: Namespace | None) -> bool:
    return namespace is not None and namespace.labels.get(DATAPLANE_MODE_LABEL) == "ambient"


def pod_enrolled(pod: Pod, namespace: Namespace | None) -> bool:
    """Whether the node agent captures this pod into ztunnel (so it is an HBONE workload).

    The pod's own label wins over its namespace's; ``none`` opts out; a pod with a sidecar is never
    captured (the sidecar already owns its traffic), nor is a host-network pod (it has no netns of its own),
    nor a waypoint's pod (label ``gateway.istio.io/managed: istio.io-mesh-controller``).
    """
    if SIDECAR_STATUS_ANNOTATION in pod.metadata.annotations or pod.spec.host_network:
        return False
    if pod.labels.get(MANAGED_LABEL) == MANAGED_MESH:
        # A waypoint terminates HBONE itself; upstream's template labels it ``none`` for this reason.
        return False
    mode = pod.labels.get(DATAPLANE_MODE_LABEL)
    if mode is not None:
        return mode == "ambient"
    return namespace_enrolled(namespace)


def pod_is_terminal(pod: Pod) -> bool:
    """Succeeded/Failed pods keep their IP in status but are gone as far as traffic is concerned."""
    return pod.status.phase in ("Succeeded", "Failed")


def pod_speaks_hbone(pod: Pod, namespace: Namespace | None) -> bool:
    """HBONE when enrolled, marked redirected by the node agent, or a native HBONE speaker."""
    return (
        pod_enrolled(pod, namespace)
        or pod.metadata.annotations.get(AMBIENT_REDIRECTION_ANNOTATION) == "enabled"
        or pod.labels.get(TUNNEL_LABEL) == "http"
    )


# ------------------------------------------------------------------------------------- telemetry names
_CRONJOB_SUFFIX = re.compile(r"^(.+)-\d+$")


def workload_name(pod: Pod) -> str:
    """The owning controller's name, as upstream's ``GetWorkloadMetaFromPod`` derives it.

    A ReplicaSet owner becomes its Deployment by dropping the ``pod-template-hash`` suffix; a Job whose
    name ends in a CronJob's numeric schedule suffix becomes the CronJob; other controllers keep their
    name; a bare pod is its own workload.
    """
    owners = [o for o in pod.metadata.owner_references if o.controller] or pod.metadata.owner_references
    if not owners:
        return pod.name
    owner = owners[0]
    if owner.kind == "ReplicaSet":
        template_hash = pod.labels.get("pod-template-hash")
        if template_hash and owner.name.endswith(f"-{template_hash}"):
            return owner.name[: -len(template_hash) - 1]
        return owner.name
    if owner.kind == "Job":
        m = _CRONJOB_SUFFIX.match(owner.name)
        return m.group(1) if m else owner.name
    return owner.name


def canonical_service(labels: Mapping[str, str], name: str) -> tuple[str, str]:
    """(canonical name, canonical revision) from the same labels upstream reads, in its order."""
    cname = (
        labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or name
    )
    crev = (
        labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version")
        or labels.get("version")
        or "latest"
    )
    return cname, crev


# ------------------------------------------------------------------------------------ service membership
def services_for_pod(store: StoreReader, pod: Pod) -> list[Service]:
    """Services whose endpoints include this pod, sorted by name.

    A Service with a non-empty selector selects pods by labels in its namespace; a selector-less Service
    counts a pod only when an EndpointSlice of it targets the pod by reference (never by IP alone).
    """
    found: dict[str, Service] = {}
    for svc in typed_list(store, Service, pod.namespace):
        if svc.spec.type == "ExternalName":
            continue
        if svc.spec.selector and selector_matches(svc.spec.selector, pod.labels):
            found[svc.name] = svc
    for es in typed_list(store, EndpointSlice, pod.namespace):
        name = es.service_name
        if not name or name in found:
            continue
        if not any(
            ep.target_ref is not None and ep.target_ref.kind == "Pod" and ep.target_ref.name == pod.name
            for ep in es.endpoints
        ):
            continue
        other = store.get_typed(Service, pod.namespace, name)
        if other is not None and not other.spec.selector and other.spec.type != "ExternalName":
            found[name] = other
    return [found[k] for k in sorted(found)]


@dataclass(frozen=True)
class ResolvedPort:
    service_port: int
    target_port: int


def _container_port(pod: Pod, name: str) -> int | None:
    for container in pod.spec.containers:
        for port in container.ports:
            if port.name == name:
                return port.container_port
    return None


def workload_ports(service: Service, pod: Pod) -> list[ResolvedPort]:
    """The service's ports as this pod serves them: a named ``targetPort`` is looked up among the pod's
    container ports, and a port the pod does not expose by that name is left out (as upstream does)."""
    out: list[ResolvedPort] = []
    for port in service.spec.ports:
        target = port.effective_target_port
        if isinstance(target, str):
            if target.isdigit():
                target = int(target)
            else:
                resolved = _container_port(pod, target)
                if resolved is None:
                    continue
                target = resolved
        out.append(ResolvedPort(port.port, target))
    return out


def numeric_target_port(port: ServicePort) -> int:
    """The Service-level target port: 0 when it is a name that only each pod can resolve."""
    target = port.effective_target_port
    if isinstance(target, int):
        return target
    return int(target) if target.isdigit() else 0


# -------------------------------------------------------------------------------------------- waypoints
@dataclass(frozen=True)
class Waypoint:
    """A Gateway of class ``istio-waypoint`` seen as a waypoint: where it is reached and what it serves."""

    namespace: str
    name: str
    traffic_type: str
    hostname: str

    @property
    def resource_name(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class WaypointBinding:
    """The outcome of resolving ``istio.io/use-waypoint`` for one Service, Pod or namespace.

    ``waypoint`` is what the data plane gets (None: no waypoint). ``requested`` is the waypoint named by
    a label (``ns/name``), ``source`` says whose label it was, and ``reason``/``message`` explain why a
    requested waypoint was not bound (for status and ``istioctl analyze``).
    """

    waypoint: Waypoint | None = None
    requested: str | None = None
    source: Literal["object", "namespace"] | None = None
    reason: str | None = None
    message: str | None = None


def _gateway_traffic_type(store: StoreReader, gw: Gateway) -> str:
    """The Gateway's ``istio.io/waypoint-for`` label, else its GatewayClass's, else ``service``."""
    if WAYPOINT_FOR_LABEL in gw.labels:
        return gw.labels[WAYPOINT_FOR_LABEL]
    cls = store.get_typed(GatewayClass, "", gw.spec.gateway_class_name)
    if cls is not None and WAYPOINT_FOR_LABEL in cls.labels:
        return cls.labels[WAYPOINT_FOR_LABEL]
    return "service"


def find_waypoint(
    store: StoreReader, namespace: str, name: str, settings: MeshSettings = MeshSettings()
) -> Waypoint | None:
    """The waypoint ``namespace/name``, or None if no such waypoint Gateway exists.

    Its address is the hostname of the Service istiod creates for it (``<name>.<ns>.svc.<domain>``):
    ztunnel resolves that hostname through the same WDS Services, so a waypoint re-scheduled onto new
    IPs needs no push of the workloads and services that use it.
    """
    gw = store.get_typed(Gateway, namespace, name)
    if gw is None or not gw.is_waypoint:
        return None
    return Waypoint(
        namespace=namespace,
        name=name,
        traffic_type=_gateway_traffic_type(store, gw),
        hostname=f"{name}.{namespace}.svc.{settings.domain_suffix}",
    )


def _selector_matches(sel: GatewayLabelSelector, labels: Mapping[str, str]) -> bool:
    if not selector_matches(sel.match_labels, labels) and sel.match_labels:
        return False
    for req in sel.match_expressions:
        present = req.key in labels
        value = labels.get(req.key)
        ok = {
            "In": present and value in req.values,
            "NotIn": not present or value not in req.values,
            "Exists": present,
            "DoesNotExist": not present,
        }[req.operator]
        if not ok:
            return False
    return True


def waypoint_allows_namespace(store: StoreReader, waypoint: Waypoint, namespace: str) -> bool:
    """Cross-namespace use needs the waypoint's HBONE listener to allow routes from that namespace."""
    if namespace == waypoint.namespace:
        return True
    gw = store.get_typed(Gateway, waypoint.namespace, waypoint.name)
    if gw is None:
        return False
    listeners = [lst for lst in gw.spec.listeners if lst.protocol == "HBONE"] or gw.spec.listeners
    ns = store.get_typed(Namespace, "", namespace)
    ns_labels = dict(ns.labels) if ns is not None else {}
    ns_labels.setdefault("kubernetes.io/metadata.name", namespace)
    for lst in listeners:
        sel = lst.allowed_routes.namespaces
        if sel.from_ == "All":
            return True
        if (
            sel.from_ == "Selector"
            and sel.selector is not None
            and _selector_matches(sel.selector, ns_labels)
        ):
            return True
    return False


def _use_waypoint_label(labels: Mapping[str, str], default_namespace: str) -> tuple[str | None, bool]:
    """(``ns/name`` requested, opted out) from an object's labels."""
    value = labels.get(USE_WAYPOINT_LABEL)
    if value is None:
        return None, False
    if value == "none":
        return None, True
    ns = labels.get(USE_WAYPOINT_NAMESPACE_LABEL, default_namespace)
    return f"{ns}/{value}", False


def _resolve_target(
    store: StoreReader, namespace: str, labels: Mapping[str, str], settings: MeshSettings
) -> WaypointBinding:
    requested, opted_out = _use_waypoint_label(labels, namespace)
    source: Literal["object", "namespace"] = "object"
    if opted_out:
        return WaypointBinding(source="object")
    if requested is None:
        ns = store.get_typed(Namespace, "", namespace)
        if ns is None:
            return WaypointBinding()
        requested, _ = _use_waypoint_label(ns.labels, namespace)
        source = "namespace"
        if requested is None:
            return WaypointBinding()
    wp_ns, _, wp_name = requested.partition("/")
    wp = find_waypoint(store, wp_ns, wp_name, settings)
    if wp is None:
        return WaypointBinding(
            requested=requested,
            source=source,
            reason="WaypointNotFound",
            message=f"waypoint {requested} was not found (no Gateway of class istio-waypoint by that name)",
        )
    if not waypoint_allows_namespace(store, wp, namespace):
        return WaypointBinding(
            requested=requested,
            source=source,
            reason="AttachmentDenied",
            message=f"waypoint {requested} does not allow attachment from namespace {namespace} "
            "(its HBONE listener's allowedRoutes.namespaces)",
        )
    return WaypointBinding(waypoint=wp, requested=requested, source=source)


def _is_waypoint_or_gateway_service(labels: Mapping[str, str]) -> bool:
    return labels.get(MANAGED_LABEL) in (MANAGED_MESH, MANAGED_EAST_WEST)


def _fronts_gateway_pods(service: Resource) -> bool:
    """A Service of a Gateway's own pods (labelled or selecting by the gateway-name label): sending its
    traffic to a waypoint would loop, whoever wrote it (upstream only trusts the managed label)."""
    if GATEWAY_NAME_LABEL in service.labels:
        return True
    selector = service.spec.selector if isinstance(service, Service) else None
    return bool(selector) and GATEWAY_NAME_LABEL in (selector or {})


def _unsupported_traffic(binding: WaypointBinding, wp: Waypoint, needs: str) -> WaypointBinding:
    """``binding`` left unbound: its waypoint does not carry the traffic type the target needs."""
    return WaypointBinding(
        requested=binding.requested,
        source=binding.source,
        reason="UnsupportedTrafficType",
        message=f"waypoint {wp.resource_name} is for {wp.traffic_type} traffic "
        f"({WAYPOINT_FOR_LABEL}={wp.traffic_type}); {needs}",
    )


def service_waypoint(
    store: StoreReader, service: Resource, settings: MeshSettings = MeshSettings()
) -> WaypointBinding:
    """The waypoint for traffic addressed to a Service (or ServiceEntry): needs ``service``/``all``."""
    if _is_waypoint_or_gateway_service(service.labels) or _fronts_gateway_pods(service):
        return WaypointBinding()
    binding = _resolve_target(store, service.namespace, service.labels, settings)
    wp = binding.waypoint
    if wp is None or wp.traffic_type in ("service", "all"):
        return binding
    return _unsupported_traffic(binding, wp, "a Service needs one for service or all")


def is_waypoint_instance(obj: Resource) -> bool:
    """A pod of a waypoint (or any Gateway deployment): it is the waypoint, it does not use one."""
    return GATEWAY_NAME_LABEL in obj.labels


def pod_waypoint(
    store: StoreReader, pod: Resource, settings: MeshSettings = MeshSettings()
) -> WaypointBinding:
    """The waypoint for traffic addressed to a workload's own IP: needs ``workload``/``all``.

    A service-only waypoint inherited from the namespace is not an error (it is meant for Services);
    one named on the workload itself is.
    """
    if is_waypoint_instance(pod):
        return WaypointBinding()
    binding = _resolve_target(store, pod.namespace, pod.labels, settings)
    wp = binding.waypoint
    if wp is None or wp.traffic_type in ("workload", "all"):
        return binding
    if binding.source == "namespace":
        return WaypointBinding(requested=binding.requested, source="namespace")
    return _unsupported_traffic(binding, wp, "a workload needs one for workload or all")


def ip_bytes(ip: str) -> bytes:
    """The raw 4- or 16-byte form the protos carry."""
    return ipaddress.ip_address(ip).packed


# ------------------------------------------------------------------------------------- change impact
@dataclass
class Affected:
    """Which derived ambient objects a change may have altered (a superset, never less).

    ``workloads`` are workload uids, ``services`` are ``ns/hostname`` names, ``policies`` are
    ``ns/name`` Authorization names. ``everything`` means "regenerate all" for rare, wide changes.
    """

    workloads: set[str] = field(default_factory=set)
    services: set[str] = field(default_factory=set)
    policies: set[str] = field(default_factory=set)
    everything: bool = False

    def __bool__(self) -> bool:
        return self.everything or bool(self.workloads or self.services or self.policies)


def _selected_pods(
    store: StoreReader, namespace: str | None, selector: Mapping[str, str] | None
) -> list[Pod]:
    """Pods matching a selector; ``None`` selector selects none, an empty one selects all."""
    if selector is None:
        return []
    return typed_list(store, Pod, namespace, selector or None)


class AmbientIndex:
    """Derived ambient facts over one store, plus the map from a store change to what it affects.

    It holds no copies of resources: every question reads the store, whose indexes make the common
    lookups cheap. ``affected`` is deliberately conservative; the push pipeline diffs the regenerated
    resources, so naming a few extra names costs a little work but missing one would lose an update.
    """

    def __init__(self, store: StoreReader, settings: MeshSettings = MeshSettings()) -> None:
        self.store = store
        self.settings = settings

    # Convenience wrappers so callers need only the index.
    def namespace(self, name: str) -> Namespace | None:
        return self.store.get_typed(Namespace, "", name)

    def pod_enrolled(self, pod: Pod) -> bool:
        return pod_enrolled(pod, self.namespace(pod.namespace))

    def pod_waypoint(self, pod: Pod) -> WaypointBinding:
        return pod_waypoint(self.store, pod, self.settings)

    def service_waypoint(self, service: Service) -> WaypointBinding:
        return service_waypoint(self.store, service, self.settings)

    def services_for_pod(self, pod: Pod) -> list[Service]:
        return services_for_pod(self.store, pod)

    def workload_uid(self, pod: Pod) -> str:
        return workload_uid(pod, self.settings)

    def service_name(self, service: Service) -> str:
        return service_resource_name(service.namespace, service_hostname(service, self.settings))

    # ---------------------------------------------------------------------------------------- impact
    def _pods_in(self, namespace: str | None) -> set[str]:
        return {self.workload_uid(p) for p in typed_list(self.store, Pod, namespace)}

    def _services_in(self, namespace: str | None) -> set[str]:
        return {self.service_name(s) for s in typed_list(self.store, Service, namespace)}

    def affected(self, change: Change) -> Affected:
        """What ``change`` (already applied to the store) may have changed in the derived objects."""
        out = Affected()
        kind = change.key.kind
        versions = [r for r in (change.old, change.new) if r is not None]
        if kind == "Pod":
            for pod in versions:
                if isinstance(pod, Pod):
                    out.workloads.add(self.workload_uid(pod))
            # A waypoint pod's service account feeds nothing we send today; its IP is its own workload.
        elif kind == "Service":
            for svc in versions:
                if not isinstance(svc, Service):
                    continue
                out.services.add(self.service_name(svc))
                selected = _selected_pods(self.store, svc.namespace, svc.spec.selector or None)
                out.workloads |= {self.workload_uid(p) for p in selected}
            # Selector-less services reach pods through EndpointSlices; be safe and take the namespace.
            if any(isinstance(s, Service) and not s.spec.selector for s in versions):
                out.workloads |= self._pods_in(change.key.namespace)
        elif kind == "Node":
            # Pods take their locality from their node's topology labels.
            out.workloads |= {
                self.workload_uid(p)
                for p in typed_list(self.store, Pod)
                if p.spec.node_name == change.key.name
            }
        elif kind == "EndpointSlice":
            out.workloads |= self._pods_in(change.key.namespace)
        elif kind == "Namespace":
            name = change.key.name
            out.workloads |= self._pods_in(name)
            # Its labels decide enrollment and waypoints of what is in it, and cross-namespace attachment
            # (allowedRoutes selectors) of what is in it too: the namespace's own objects cover both.
            out.services |= self._services_in(name)
        elif kind in ("Gateway", "GatewayClass"):
            # Waypoints are referenced by label from anywhere; they change rarely.
            out.everything = True
        elif kind in ("AuthorizationPolicy", "PeerAuthentication"):
            out.policies.add(f"{change.key.namespace}/{change.key.name}")
            ns = None if change.key.namespace == self.settings.root_namespace else change.key.namespace
            out.workloads |= self._pods_in(ns)
            if kind == "PeerAuthentication":
                # The static STRICT policy and every converted port-level policy can depend on any
                # PeerAuthentication (mesh and namespace modes are merged into workload ones).
                out.policies.add(f"{self.settings.root_namespace}/{STATIC_STRICT_POLICY}")
                out.policies |= {
                    f"{r.namespace}/{PEER_AUTHN_PREFIX}{r.name}"
                    for r in self.store.list("PeerAuthentication")
                }
                for r in versions:
                    out.policies.add(f"{r.namespace}/{PEER_AUTHN_PREFIX}{r.name}")
        elif kind in ("ServiceEntry", "WorkloadEntry"):
            out.everything = True
        # ServiceEntry/WorkloadEntry workloads depend on the same Services, namespace labels and policies
        # as pods do; they are rare, so any such change near them regenerates everything.
        if kind in ("Service", "Namespace", "AuthorizationPolicy", "PeerAuthentication"):
            ns = change.key.name if kind == "Namespace" else change.key.namespace
            if kind != "Namespace" and ns == self.settings.root_namespace:
                ns = None
            if self._has_entries(ns):
                out.everything = True
        return out

    def _has_entries(self, namespace: str | None) -> bool:
        return bool(self.store.list("WorkloadEntry", namespace) or self.store.list("ServiceEntry", namespace))
