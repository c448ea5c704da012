"""The Kubernetes core subset the mesh reads: Namespace, Pod, Service, ServiceAccount, Node, EndpointSlice.

Only the fields the mesh uses are modelled, under their upstream names; everything else in a real object
is ignored (``LenientModel``), so objects straight from the API server or ``kubectl get -o yaml`` load
unchanged. The few enums checked here are the ones a typo would silently break (Service type, protocol).
"""

from __future__ import annotations

import ipaddress
from typing import ClassVar, Literal

from pydantic import Field

from istiopy.mesh.errors import FieldError
from istiopy.mesh.kinds import register
from istiopy.mesh.meta import LenientModel, LenientResource

__all__ = [
    "SERVICE_NAME_LABEL",
    "Container",
    "ContainerPort",
    "Endpoint",
    "EndpointConditions",
    "EndpointPort",
    "EndpointSlice",
    "Namespace",
    "Node",
    "NodeAddress",
    "NodeStatus",
    "ObjectReference",
    "Pod",
    "PodCondition",
    "PodIP",
    "PodSpec",
    "PodStatus",
    "Service",
    "ServiceAccount",
    "ServicePort",
    "ServiceSpec",
]

Protocol = Literal["TCP", "UDP", "SCTP"]

# The label an EndpointSlice carries to name the Service it belongs to.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _ip_errors(path: str, values: list[str], indexed: bool = True) -> list[FieldError]:
    """IP literals are keys of the pod-ip and service-vip indexes: a bad one would index garbage."""
    errors = []
    for i, value in enumerate(values):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            errors.append(FieldError(f"{path}[{i}]" if indexed else path, f"{value!r} is not an IP address"))
    return errors


# -------------------------------------------------------------------------------------------- Namespace
@register
class Namespace(LenientResource):
    """Labels such as ``istio.io/dataplane-mode`` and ``istio.io/use-waypoint`` are all the mesh reads."""

    KIND: ClassVar[str] = "Namespace"
    GROUP: ClassVar[str] = ""
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = False
    PLURAL: ClassVar[str] = "namespaces"


# ------------------------------------------------------------------------------------------ ServiceAccount
@register
class ServiceAccount(LenientResource):
    """Identities are ``spiffe://<td>/ns/<ns>/sa/<name>``; the object itself only has to exist."""

    KIND: ClassVar[str] = "ServiceAccount"
    GROUP: ClassVar[str] = ""
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = True
    PLURAL: ClassVar[str] = "serviceaccounts"


# ------------------------------------------------------------------------------------------------- Pod
class ContainerPort(LenientModel):
    container_port: int = Field(ge=1, le=65535)
    name: str = ""
    protocol: Protocol = "TCP"


class Container(LenientModel):
    name: str = ""
    ports: list[ContainerPort] = Field(default_factory=list)


class PodSpec(LenientModel):
    node_name: str = ""
    service_account_name: str = ""
    host_network: bool = False
    containers: list[Container] = Field(default_factory=list)


class PodIP(LenientModel):
    ip: str


class PodCondition(LenientModel):
    type: str
    status: Literal["True", "False", "Unknown"] = "Unknown"


class PodStatus(LenientModel):
    phase: str = ""
    pod_ip: str = Field(default="", alias="podIP")
    pod_ips: list[PodIP] = Field(default_factory=list, alias="podIPs")
    conditions: list[PodCondition] = Field(default_factory=list)


@register
class Pod(LenientResource):
    """A workload: its IPs, node and service account are what ztunnel and the WDS generator need."""

    KIND: ClassVar[str] = "Pod"
    GROUP: ClassVar[str] = ""
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = True
    PLURAL: ClassVar[str] = "pods"

    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)

    @property
    def ips(self) -> list[str]:
        """Every pod IP, primary first, without duplicates (``podIP`` is repeated in ``podIPs`` upstream)."""
        out: list[str] = []
        for ip in [self.status.pod_ip, *(p.ip for p in self.status.pod_ips)]:
            if ip and ip not in out:
                out.append(ip)
        return out

    @property
    def service_account(self) -> str:
        """Kubernetes fills ``default`` when unset; files in standalone mode often omit it."""
        return self.spec.service_account_name or "default"

    @property
    def ready(self) -> bool:
        """Running with a Ready=True condition; a pod without conditions counts as ready once Running
        (hand-written standalone pods seldom carry conditions)."""
        if self.status.phase != "Running":
            return False
        ready = [c for c in self.status.conditions if c.type == "Ready"]
        return not ready or ready[0].status == "True"

    def semantic_errors(self) -> list[FieldError]:
        errors = []
        if self.status.pod_ip:
            errors += _ip_errors("status.podIP", [self.status.pod_ip], indexed=False)
        errors += [
            FieldError(f"{e.path}.ip", e.reason)
            for e in _ip_errors("status.podIPs", [p.ip for p in self.status.pod_ips])
        ]
        return errors


# --------------------------------------------------------------------------------------------- Service
class ServicePort(LenientModel):
    name: str = ""
    port: int = Field(ge=1, le=65535)
    target_port: int | str | None = None
    protocol: Protocol = "TCP"
    app_protocol: str | None = None
    node_port: int | None = None

    @property
    def effective_target_port(self) -> int | str:
        """Kubernetes defaults ``targetPort`` to ``port``; a string names a container port."""
        return self.target_port if self.target_port is not None else self.port


class ServiceSpec(LenientModel):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str = Field(default="", alias="clusterIP")
    cluster_ips: list[str] = Field(default_factory=list, alias="clusterIPs")
    ports: list[ServicePort] = Field(default_factory=list)
    selector: dict[str, str] | None = None
    external_name: str = ""
    traffic_distribution: str | None = None


@register
class Service(LenientResource):
    """A service: hostname ``<name>.<ns>.svc.<domain>``, VIPs from ``clusterIP(s)``, endpoints by selector."""

    KIND: ClassVar[str] = "Service"
    GROUP: ClassVar[str] = ""
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = True
    PLURAL: ClassVar[str] = "services"

    spec: ServiceSpec = Field(default_factory=ServiceSpec)

    def hostname(self, domain: str = "cluster.local") -> str:
        return f"{self.metadata.name}.{self.metadata.namespace}.svc.{domain}"

    @property
    def vips(self) -> list[str]:
        """Cluster IPs, primary first; ``None`` (headless) is not an address."""
        out: list[str] = []
        for ip in [self.spec.cluster_ip, *self.spec.cluster_ips]:
            if ip and ip != "None" and ip not in out:
                out.append(ip)
        return out

    @property
    def headless(self) -> bool:
        return self.spec.cluster_ip == "None"

    def semantic_errors(self) -> list[FieldError]:
        errors = []
        if self.spec.cluster_ip and self.spec.cluster_ip != "None":
            errors += _ip_errors("spec.clusterIP", [self.spec.cluster_ip], indexed=False)
        errors += _ip_errors("spec.clusterIPs", [ip for ip in self.spec.cluster_ips if ip != "None"])
        names = [p.name for p in self.spec.ports]
        if len(self.spec.ports) > 1:
            for i, name in enumerate(names):
                if not name:
                    errors.append(
                        FieldError(f"spec.ports[{i}].name", "required when a Service has several ports")
                    )
                elif name in names[:i]:
                    errors.append(FieldError(f"spec.ports[{i}].name", f"duplicate port name {name!r}"))
        for i, port in enumerate(self.spec.ports):
            tp = port.target_port
            if isinstance(tp, int) and not 1 <= tp <= 65535:
                errors.append(FieldError(f"spec.ports[{i}].targetPort", f"{tp} is not in 1-65535"))
        return errors


# ------------------------------------------------------------------------------------------------ Node
class NodeAddress(LenientModel):
    type: str
    address: str


class NodeStatus(LenientModel):
    addresses: list[NodeAddress] = Field(default_factory=list)


@register
class Node(LenientResource):
    """Nodes carry topology labels (locality) and the address ztunnel is reached at."""

    KIND: ClassVar[str] = "Node"
    GROUP: ClassVar[str] = ""
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = False
    PLURAL: ClassVar[str] = "nodes"

    status: NodeStatus = Field(default_factory=NodeStatus)

    @property
    def internal_ip(self) -> str:
        """The first InternalIP, else the first address of any type, else ''."""
        for a in self.status.addresses:
            if a.type == "InternalIP":
                return a.address
        return self.status.addresses[0].address if self.status.addresses else ""


# --------------------------------------------------------------------------------------- EndpointSlice
class EndpointConditions(LenientModel):
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ObjectReference(LenientModel):
    kind: str = ""
    namespace: str = ""
    name: str = ""
    uid: str = ""


class Endpoint(LenientModel):
    addresses: list[str] = Field(min_length=1)
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    hostname: str | None = None
    node_name: str | None = None
    zone: str | None = None
    target_ref: ObjectReference | None = None


class EndpointPort(LenientModel):
    name: str | None = None
    port: int | None = None
    protocol: Protocol = "TCP"
    app_protocol: str | None = None


@register
class EndpointSlice(LenientResource):
    """Endpoints of a Service (label ``kubernetes.io/service-name``): used for non-pod backends."""

    KIND: ClassVar[str] = "EndpointSlice"
    GROUP: ClassVar[str] = "discovery.k8s.io"
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = True
    PLURAL: ClassVar[str] = "endpointslices"

    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: list[Endpoint] = Field(default_factory=list)
    ports: list[EndpointPort] = Field(default_factory=list)

    @property
    def service_name(self) -> str:
        return self.metadata.labels.get(SERVICE_NAME_LABEL, "")

    def semantic_errors(self) -> list[FieldError]:
        if self.address_type == "FQDN":
            return []
        errors = []
        for i, ep in enumerate(self.endpoints):
            errors += _ip_errors(f"endpoints[{i}].addresses", ep.addresses)
        return errors
