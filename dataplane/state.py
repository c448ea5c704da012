"""ztunnel-py's view of the mesh: workloads, services and L4 policies received over WDS/WADS.

Why a separate typed model instead of keeping the protobufs: every connection consults this state (outbound
resolution, inbound policy), so the wire messages are validated and converted exactly once, when they arrive;
the hot path then works on small frozen dataclasses with parsed IP addresses and precomputed indexes.

Why the model is built lean: a node proxy holds every workload of the mesh (the RSS target: <= 40 MB with
1000 of them). So the dataclasses have ``__slots__`` (no per-object ``__dict__``), values repeated across
workloads (namespaces, service accounts, trust domains, nodes, clusters, service keys, enum names) are
interned, equal small values (ports, port maps, localities, identities) are shared objects, and the xDS
resource name of an address is not stored twice (it is the workload uid or the service key, as validated).

Validation is the NACK boundary. ``ProxyState.apply_addresses`` / ``apply_authorizations`` are the per-type
xDS handlers: they convert every incoming resource first, apply the ones that are valid and keep the
*last good* version of any that is not, then raise :class:`RejectedResources` so the xDS client NACKs.
A bad resource therefore never corrupts or removes what the proxy already serves with.

Indexes kept (all rebuilt incrementally on each change):

* workloads by uid and by ``(network, ip)``;
* services by ``namespace/hostname`` and by ``(network, vip)``;
* service endpoints by service key (derived from each workload's ``services`` map, as upstream does);
* policies by ``namespace/name`` and by scope key (namespace name, or ``""`` for the global scope).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError

from istiopy.api.gen import authorization_pb2, workload_pb2
from istiopy.api.identity import InvalidSpiffeId, SpiffeId

if TYPE_CHECKING:  # rbac imports this module at run time
    from istiopy.dataplane.rbac import Authorization

log = logging.getLogger("istiopy.ztunnel.state")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"
HBONE_PORT = 15008


class ValidationError(ValueError):
    """One resource is malformed; the message says which field and why."""


class RejectedResources(ValueError):
    """Raised by a handler after applying the valid part of an update: the xDS client turns it into a NACK.

    ``errors`` maps resource name -> reason. The state still holds the last good version of each.
    """

    def __init__(self, type_url: str, errors: Mapping[str, str]) -> None:
        self.type_url = type_url
        self.errors = dict(errors)
        detail = "; ".join(f"{name}: {why}" for name, why in sorted(self.errors.items()))
        super().__init__(f"rejected {len(self.errors)} {short_type(type_url)} resource(s): {detail}")


def short_type(type_url: str) -> str:
    """Upstream's log names for the two ambient types."""
    if type_url == ADDRESS_TYPE:
        return "WDS"
    if type_url == AUTHORIZATION_TYPE:
        return "WADS"
    return type_url.rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------------
# Identity


# The wire layer's SPIFFE id is the one identity type of the mesh (the CA, TLS helpers and we all agree).
Identity = SpiffeId


def principal(ident: SpiffeId) -> str:
    """The identity without the ``spiffe://`` scheme: what policy ``principals`` match against."""
    return f"{ident.trust_domain}/ns/{ident.namespace}/sa/{ident.service_account}"


# --------------------------------------------------------------------------------------------------
# The model


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    """An IP on a named network (``""`` is the default network); rendered ``network/ip`` like upstream."""

    network: str
    address: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"


@dataclass(frozen=True, slots=True)
class NamespacedHostname:
    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """Where a waypoint or network gateway is: a service hostname or an address, plus its HBONE port."""

    hostname: NamespacedHostname | None
    address: NetworkAddress | None
    hbone_mtls_port: int = HBONE_PORT

    @property
    def destination(self) -> str:
        return str(self.hostname if self.hostname is not None else self.address)


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True, slots=True)
class Port:
    service_port: int
    target_port: int
    app_protocol: str = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class Workload:
    uid: str
    name: str
    namespace: str
    addresses: tuple[IPAddress, ...]
    hostname: str = ""
    network: str = ""
    protocol: str = "TCP"  # TCP | HBONE | LegacyIstioMtls: the names upstream's config dump uses
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    service_account: str = DEFAULT_SERVICE_ACCOUNT
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    node: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: str = "deployment"
    workload_name: str = ""
    native_tunnel: bool = False
    application_tunnel_protocol: str = "NONE"
    application_tunnel_port: int = 0
    services: Mapping[str, tuple[Port, ...]] = field(default_factory=dict)
    authorization_policies: tuple[str, ...] = ()
    healthy: bool = True
    cluster_id: str = ""
    locality: Locality = field(default_factory=Locality)
    network_mode: str = "STANDARD"
    capacity: int = 1
    # Derived once (a slotted class has no room for a cached_property); workloads of one service account
    # share the object. Raises InvalidSpiffeId at construction: such a workload could never be named.
    identity: SpiffeId = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "identity", _identity(self.trust_domain, self.namespace, self.service_account)
        )

    @property
    def hbone(self) -> bool:
        return self.protocol == "HBONE"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...]
    ports: Mapping[int, int]  # service port -> target port (0 = same as the workload's mapping)
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    lb_mode: str = "UNSPECIFIED_MODE"
    lb_routing_preference: tuple[str, ...] = ()
    lb_health_policy: str = "ONLY_HEALTHY"
    has_load_balancing: bool = False
    ip_families: str = "AUTOMATIC"
    # ``namespace/hostname``, built once: the same string object keys every index the service is in.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", sys.intern(f"{self.namespace}/{self.hostname}"))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One workload backing a service, with its port map for that service."""

    workload_uid: str
    service: str
    ports: Mapping[int, int]


# --------------------------------------------------------------------------------------------------
# Conversion (the validation boundary)


# Sharing. Interned strings and these small caches make equal values one object across all workloads; the
# caches are bounded, so a control plane sending endless distinct values costs misses, never unbounded memory.
_intern = sys.intern


@functools.lru_cache(maxsize=4096)
def _identity(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    return SpiffeId(trust_domain, namespace, service_account)


@functools.lru_cache(maxsize=4096)
def _shared_port(service_port: int, target_port: int, app_protocol: str) -> Port:
    return Port(service_port, target_port, app_protocol)


@functools.lru_cache(maxsize=4096)
def _shared_port_map(pairs: tuple[tuple[int, int], ...]) -> Mapping[int, int]:
    """One read-only port map per distinct mapping (every endpoint of a service usually has the same)."""
    return MappingProxyType(dict(pairs))


@functools.lru_cache(maxsize=1024)
def _shared_locality(region: str, zone: str, subzone: str) -> Locality:
    return Locality(region, zone, subzone)


def _ip(raw: bytes, what: str) -> IPAddress:
    if len(raw) not in (4, 16):
        raise ValidationError(f"{what}: address must be 4 or 16 bytes, got {len(raw)}")
    return ipaddress.ip_address(raw)


def _port(value: int, what: str, *, allow_zero: bool = True) -> int:
    if value > 65535 or (value == 0 and not allow_zero):
        raise ValidationError(f"{what}: invalid port {value}")
    return value


def _enum_name(enum: Any, value: int, what: str) -> str:
    try:
        return _enum_value_name(enum, value)
    except ValueError:
        raise ValidationError(f"{what}: unknown enum value {value}") from None


@functools.lru_cache(maxsize=1024)
def _enum_value_name(enum: Any, value: int) -> str:
    """protobuf builds a new string per ``Name()`` call; one per enum value is enough."""
    return _intern(str(enum.Name(value)))


def _network_address(msg: workload_pb2.NetworkAddress, what: str) -> NetworkAddress:
    return NetworkAddress(_intern(msg.network), _ip(msg.address, what))


def _gateway(msg: workload_pb2.GatewayAddress, what: str) -> GatewayAddress:
    port = _port(msg.hbone_mtls_port, f"{what}.hbone_mtls_port") or HBONE_PORT
    kind = msg.WhichOneof("destination")
    if kind == "hostname":
        if not msg.hostname.hostname:
            raise ValidationError(f"{what}: hostname is empty")
        host = NamespacedHostname(_intern(msg.hostname.namespace), _intern(msg.hostname.hostname))
        return GatewayAddress(host, None, port)
    if kind == "address":
        return GatewayAddress(None, _network_address(msg.address, what), port)
    raise ValidationError(f"{what}: neither hostname nor address is set")


_PROTOCOL_NAMES = {0: "TCP", 1: "HBONE", 2: "LegacyIstioMtls"}
_WORKLOAD_TYPES = {0: "deployment", 1: "cronjob", 2: "pod", 3: "job"}


def workload_from_proto(msg: workload_pb2.Workload) -> Workload:
    """Validate and convert one Workload message."""
    if not msg.uid:
        raise ValidationError("workload uid is empty")
    if not msg.name:
        raise ValidationError("workload name is empty")
    if not msg.namespace:
        raise ValidationError("workload namespace is empty")
    addresses = tuple(_ip(a, f"workload {msg.uid} addresses") for a in msg.addresses)
    if not addresses and not msg.hostname:
        raise ValidationError(f"workload {msg.uid}: needs addresses or a hostname")
    if msg.tunnel_protocol not in _PROTOCOL_NAMES:
        raise ValidationError(f"workload {msg.uid}: unknown tunnel_protocol {msg.tunnel_protocol}")
    services: dict[str, tuple[Port, ...]] = {}
    for key, plist in msg.services.items():
        if key.count("/") != 1 or not all(key.split("/")):
            raise ValidationError(f"workload {msg.uid}: service key {key!r} is not namespace/hostname")
        services[_intern(key)] = tuple(
            _shared_port(
                _port(p.service_port, f"workload {msg.uid} services[{key}]", allow_zero=False),
                _port(p.target_port, f"workload {msg.uid} services[{key}]"),
                _enum_name(workload_pb2.AppProtocol, p.app_protocol, "app_protocol"),
            )
            for p in plist.ports
        )
    loc = msg.locality
    try:
        return Workload(
            uid=msg.uid,
            name=msg.name,
            namespace=_intern(msg.namespace),
            addresses=addresses,
            hostname=msg.hostname,
            network=_intern(msg.network),
            protocol=_PROTOCOL_NAMES[msg.tunnel_protocol],
            trust_domain=_intern(msg.trust_domain) or DEFAULT_TRUST_DOMAIN,
            service_account=_intern(msg.service_account) or DEFAULT_SERVICE_ACCOUNT,
            waypoint=_gateway(msg.waypoint, f"workload {msg.uid} waypoint")
            if msg.HasField("waypoint")
            else None,
            network_gateway=(
                _gateway(msg.network_gateway, f"workload {msg.uid} network_gateway")
                if msg.HasField("network_gateway")
                else None
            ),
            node=_intern(msg.node),
            canonical_name=_intern(msg.canonical_name),
            canonical_revision=_intern(msg.canonical_revision),
            workload_type=_WORKLOAD_TYPES.get(msg.workload_type, "deployment"),
            workload_name=_intern(msg.workload_name),
            native_tunnel=msg.native_tunnel,
            application_tunnel_protocol=(
                _enum_name(workload_pb2.ApplicationTunnel.Protocol, msg.application_tunnel.protocol, "tunnel")
                if msg.HasField("application_tunnel")
                else "NONE"
            ),
            application_tunnel_port=(
                _port(msg.application_tunnel.port, "application_tunnel.port")
                if msg.HasField("application_tunnel")
                else 0
            ),
            services=services,
            authorization_policies=tuple(_intern(p) for p in msg.authorization_policies),
            healthy=msg.status == workload_pb2.HEALTHY,
            cluster_id=_intern(msg.cluster_id),
            locality=_shared_locality(loc.region, loc.zone, loc.subzone),
            network_mode=_enum_name(workload_pb2.NetworkMode, msg.network_mode, "network_mode"),
            capacity=msg.capacity.value if msg.HasField("capacity") else 1,
        )
    except InvalidSpiffeId as e:  # a workload we could never name in a certificate or a policy is refused
        raise ValidationError(f"workload {msg.uid}: {e}") from None


def service_from_proto(msg: workload_pb2.Service) -> Service:
    """Validate and convert one Service message."""
    if not msg.namespace or not msg.hostname:
        raise ValidationError("service needs a namespace and a hostname")
    key = f"{msg.namespace}/{msg.hostname}"
    ports: dict[int, int] = {}
    for p in msg.ports:
        ports[_port(p.service_port, f"service {key} port", allow_zero=False)] = _port(
            p.target_port, f"service {key} target port"
        )
    lb = msg.load_balancing
    return Service(
        name=_intern(msg.name),
        namespace=_intern(msg.namespace),
        hostname=_intern(msg.hostname),
        vips=tuple(_network_address(a, f"service {key} addresses") for a in msg.addresses),
        ports=_shared_port_map(tuple(ports.items())),
        subject_alt_names=tuple(_intern(san) for san in msg.subject_alt_names),
        waypoint=_gateway(msg.waypoint, f"service {key} waypoint") if msg.HasField("waypoint") else None,
        lb_mode=_enum_name(workload_pb2.LoadBalancing.Mode, lb.mode, "load_balancing.mode"),
        lb_routing_preference=tuple(
            _enum_name(workload_pb2.LoadBalancing.Scope, s, "routing_preference")
            for s in lb.routing_preference
        ),
        lb_health_policy=_enum_name(
            workload_pb2.LoadBalancing.HealthPolicy, lb.health_policy, "health_policy"
        ),
        has_load_balancing=msg.HasField("load_balancing"),
        ip_families=_enum_name(workload_pb2.IPFamilies, msg.ip_families, "ip_families"),
    )


def _decode(raw: Any, cls: Any, name: str) -> Any:
    """Accept a decoded message, a ``google.protobuf.Any`` or raw bytes (whatever the xDS client hands us)."""
    if isinstance(raw, cls):
        return raw
    if hasattr(raw, "Unpack") and hasattr(raw, "type_url"):
        out = cls()
        if not raw.Unpack(out):
            raise ValidationError(
                f"{name}: resource has type {raw.type_url}, want {cls.DESCRIPTOR.full_name}"
            )
        return out
    if isinstance(raw, bytes | bytearray | memoryview):
        out = cls()
        try:
            out.ParseFromString(bytes(raw))
        except DecodeError as e:
            raise ValidationError(f"{name}: cannot decode: {e}") from None
        return out
    raise ValidationError(f"{name}: unexpected resource payload {type(raw).__name__}")


# --------------------------------------------------------------------------------------------------
# The state


def _index_add(index: dict[str, tuple[str, ...]], key: str, value: str) -> None:
    """A one-to-few index kept as tuples: a hostname almost always has one entry, and a 1-tuple is a quarter
    of an empty set's size."""
    held = index.get(key, ())
    if value not in held:
        index[key] = (*held, value)


def _index_discard(index: dict[str, tuple[str, ...]], key: str, value: str) -> None:
    rest = tuple(v for v in index.get(key, ()) if v != value)
    if rest:
        index[key] = rest
    else:
        index.pop(key, None)


Listener = Callable[[str], None]


class ProxyState:
    """Everything ztunnel-py knows from the control plane, with the lookups the proxy needs.

    Mutated only through the two handlers (or :meth:`clear`); read from the proxy's event loop and from the
    admin server. A lock guards the indexes so a reader on another thread never sees a half-applied update.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.workloads: dict[str, Workload] = {}
        self.services: dict[str, Service] = {}
        self.policies: dict[str, Authorization] = {}
        self._wl_by_addr: dict[tuple[str, IPAddress], str] = {}
        self._wl_by_hostname: dict[str, tuple[str, ...]] = {}
        self._svc_by_vip: dict[tuple[str, IPAddress], str] = {}
        self._svc_by_hostname: dict[str, tuple[str, ...]] = {}
        self._endpoints: dict[str, dict[str, Endpoint]] = {}
        self._policies_by_scope: dict[str, set[str]] = {}
        # xDS resource name -> True for a workload (the name is its uid), False for a service (its key)
        self._address_names: dict[str, bool] = {}
        self._listeners: list[Listener] = []
        self.synced: set[str] = set()
        self.version = 0  # bumped on every change; lets callers cache derived views cheaply

    # ---- subscription -------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(type_url)`` after every applied change (from the applying thread/loop)."""
        self._listeners.append(listener)

    def _notify(self, type_url: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(type_url)
            except Exception:  # a listener bug must not turn into a NACK of good config
                log.exception("state listener failed")

    # ---- WDS ----------------------------------------------------------------------------------

    def apply_addresses(self, updated: Mapping[str, Any], removed: Iterable[str] = ()) -> None:
        """The ``istio.workload.Address`` handler: upsert ``updated`` (name -> message), drop ``removed``.

        Raises :class:`RejectedResources` (after applying everything valid) if any resource is malformed.
        """
        errors: dict[str, str] = {}
        good: dict[str, Workload | Service] = {}
        for name, raw in updated.items():
            try:
                msg = _decode(raw, workload_pb2.Address, name)
                kind = msg.WhichOneof("type")
                if kind == "workload":
                    wl = workload_from_proto(msg.workload)
                    if name != wl.uid:
                        raise ValidationError(f"resource name must equal the workload uid {wl.uid!r}")
                    good[name] = wl
                elif kind == "service":
                    svc = service_from_proto(msg.service)
                    if name != svc.key:
                        raise ValidationError(f"resource name must equal namespace/hostname {svc.key!r}")
                    good[name] = svc
                else:
                    raise ValidationError("address has neither a workload nor a service")
            except ValidationError as e:
                errors[name] = str(e)
        with self._lock:
            for name in removed:
                self._remove_address(name)
            for name, obj in good.items():
                self._remove_address(name)
                if isinstance(obj, Workload):
                    self._insert_workload(obj)
                    self._address_names[obj.uid] = True
                else:
                    self._insert_service(obj)
                    self._address_names[obj.key] = False
            self.synced.add(ADDRESS_TYPE)
            self.version += 1
        self._notify(ADDRESS_TYPE)
        if errors:
            raise RejectedResources(ADDRESS_TYPE, errors)

    def _remove_address(self, name: str) -> None:
        is_workload = self._address_names.pop(name, None)
        if is_workload is None:
            # Tolerate removals addressed by the natural key even if we never saw the resource name.
            is_workload = True if name in self.workloads else False if name in self.services else None
        if is_workload is None:
            return
        if is_workload:
            self._drop_workload(name)
        else:
            self._drop_service(name)

    def _insert_workload(self, wl: Workload) -> None:
        self.workloads[wl.uid] = wl
        for ip in wl.addresses:
            self._wl_by_addr[(wl.network, ip)] = wl.uid
        if wl.hostname:
            _index_add(self._wl_by_hostname, wl.hostname, wl.uid)
        for svc_key, ports in wl.services.items():
            self._endpoints.setdefault(svc_key, {})[wl.uid] = Endpoint(
                wl.uid, svc_key, _shared_port_map(tuple((p.service_port, p.target_port) for p in ports))
            )

    def _drop_workload(self, uid: str) -> None:
        wl = self.workloads.pop(uid, None)
        if wl is None:
            return
        for ip in wl.addresses:
            if self._wl_by_addr.get((wl.network, ip)) == uid:
                del self._wl_by_addr[(wl.network, ip)]
        if wl.hostname:
            _index_discard(self._wl_by_hostname, wl.hostname, uid)
        for svc_key in wl.services:
            eps = self._endpoints.get(svc_key)
            if eps is not None:
                eps.pop(uid, None)
                if not eps:
                    del self._endpoints[svc_key]

    def _insert_service(self, svc: Service) -> None:
        self.services[svc.key] = svc
        for vip in svc.vips:
            self._svc_by_vip[(vip.network, vip.address)] = svc.key
        _index_add(self._svc_by_hostname, svc.hostname, svc.key)

    def _drop_service(self, key: str) -> None:
        svc = self.services.pop(key, None)
        if svc is None:
            return
        for vip in svc.vips:
            if self._svc_by_vip.get((vip.network, vip.address)) == key:
                del self._svc_by_vip[(vip.network, vip.address)]
        _index_discard(self._svc_by_hostname, svc.hostname, key)

    # ---- WADS ---------------------------------------------------------------------------------

    def apply_authorizations(self, updated: Mapping[str, Any], removed: Iterable[str] = ()) -> None:
        """The ``istio.security.Authorization`` handler; same contract as :meth:`apply_addresses`."""
        from istiopy.dataplane import rbac  # rbac imports this module for Identity

        errors: dict[str, str] = {}
        good: dict[str, rbac.Authorization] = {}
        for name, raw in updated.items():
            try:
                msg = _decode(raw, authorization_pb2.Authorization, name)
                pol = rbac.Authorization.from_proto(msg)
                if name != pol.key:
                    raise ValidationError(f"resource name must equal namespace/name {pol.key!r}")
                good[name] = pol
            except ValidationError as e:
                errors[name] = str(e)
        with self._lock:
            for name in removed:
                self._drop_policy(name)
            for name, pol in good.items():
                self._drop_policy(name)
                self.policies[name] = pol
                self._policies_by_scope.setdefault(pol.scope_key, set()).add(name)
            self.synced.add(AUTHORIZATION_TYPE)
            self.version += 1
        self._notify(AUTHORIZATION_TYPE)
        if errors:
            raise RejectedResources(AUTHORIZATION_TYPE, errors)

    def _drop_policy(self, name: str) -> None:
        pol = self.policies.pop(name, None)
        if pol is not None:
            self._policies_by_scope.get(pol.scope_key, set()).discard(name)

    def names(self, type_url: str) -> set[str]:
        """The xDS resource names currently held for a type."""
        with self._lock:
            if type_url == ADDRESS_TYPE:
                return set(self._address_names)
            return set(self.policies)

    def retain(self, type_url: str, keep: Iterable[str]) -> list[str]:
        """Drop every resource of ``type_url`` not named in ``keep``; returns the dropped names.

        Used after a reconnect: resources applied from a partly rejected update are unknown to the xDS
        client (it keeps its state as of the last ACK), so the server cannot tell us if they were deleted
        meanwhile; what neither the client holds nor the server just sent is stale.
        """
        wanted = set(keep)
        with self._lock:
            stale = sorted(self.names(type_url) - wanted)
            if not stale:
                return []
            for name in stale:
                if type_url == ADDRESS_TYPE:
                    self._remove_address(name)
                else:
                    self._drop_policy(name)
            self.version += 1
        self._notify(type_url)
        return stale

    def clear(self) -> None:
        """Forget everything (tests; never called on control-plane loss: the last config keeps serving)."""
        with self._lock:
            listeners = self._listeners
            self.__init__()  # type: ignore[misc]
            self._listeners = listeners

    # ---- lookups ------------------------------------------------------------------------------

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self.workloads.get(uid)

    def workload_by_ip(self, ip: IPAddress | str, network: str = "") -> Workload | None:
        uid = self._wl_by_addr.get((network, ipaddress.ip_address(ip)))
        return self.workloads.get(uid) if uid else None

    def service_by_key(self, key: str) -> Service | None:
        return self.services.get(key)

    def service_by_vip(self, ip: IPAddress | str, network: str = "") -> Service | None:
        key = self._svc_by_vip.get((network, ipaddress.ip_address(ip)))
        return self.services.get(key) if key else None

    def services_by_hostname(self, hostname: str) -> list[Service]:
        with self._lock:
            return [
                self.services[k]
                for k in sorted(self._svc_by_hostname.get(hostname, ()))
                if k in self.services
            ]

    def service_by_namespaced_host(self, nh: NamespacedHostname) -> Service | None:
        return self.services.get(str(nh))

    def endpoints(self, service_key: str) -> list[tuple[Workload, Endpoint]]:
        """Backends of a service in a stable order (by uid), skipping endpoints whose workload is unknown."""
        with self._lock:
            eps = self._endpoints.get(service_key, {})
            out = []
            for uid in sorted(eps):
                wl = self.workloads.get(uid)
                if wl is not None:
                    out.append((wl, eps[uid]))
            return out

    def services_of(self, wl: Workload) -> list[Service]:
        return [s for k in wl.services if (s := self.services.get(k)) is not None]

    def policies_for(self, wl: Workload) -> list[Authorization]:
        """Policies that apply to a destination workload: its namespace's, the global and its selector ones.

        Upstream's lookup exactly: namespace scope by the destination's namespace, global scope under key
        ``""``, plus the names the workload itself lists (WORKLOAD_SELECTOR policies); unknown names are
        skipped.
        """
        with self._lock:
            names = set(self._policies_by_scope.get(wl.namespace, ()))
            names |= self._policies_by_scope.get("", set())
            names |= {n for n in wl.authorization_policies if n in self.policies}
            return [self.policies[n] for n in sorted(names) if n in self.policies]

    def resolve_gateway(self, gw: GatewayAddress) -> Service | Workload | None:
        """Find the service (or bare workload) a waypoint/gateway reference points at."""
        if gw.hostname is not None:
            return self.service_by_namespaced_host(gw.hostname)
        assert gw.address is not None
        return self.service_by_vip(gw.address.address, gw.address.network) or self.workload_by_ip(
            gw.address.address, gw.address.network
        )

    def gateway_identities(self, gw: GatewayAddress) -> set[Identity]:
        """The identities a waypoint may present: its backing workloads' (and its SANs)."""
        target = self.resolve_gateway(gw)
        if isinstance(target, Workload):
            return {target.identity}
        if isinstance(target, Service):
            ids = {wl.identity for wl, _ in self.endpoints(target.key)}
            for san in target.subject_alt_names:
                try:
                    ids.add(Identity.parse(san))
                except ValueError:
                    continue
            return ids
        return set()

    def local_workloads(self, node: str) -> list[Workload]:
        with self._lock:
            return sorted((w for w in self.workloads.values() if w.node == node), key=lambda w: w.uid)

    def snapshot(self) -> tuple[list[Workload], list[Service], list[Authorization]]:
        """A consistent copy for dumping (admin) without holding the lock while serialising."""
        with self._lock:
            return list(self.workloads.values()), list(self.services.values()), list(self.policies.values())

    @property
    def ready(self) -> bool:
        """True once both resource types have been received at least once (readiness gate)."""
        return ADDRESS_TYPE in self.synced and AUTHORIZATION_TYPE in self.synced
