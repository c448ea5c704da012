"""A minimal Envoy configuration for the Services in the model: enough for a plain Envoy to route HTTP.

Layout chosen (and why):

- **One HTTP listener, virtual hosts by Host header.** A listener per service port would make every proxy
  bind every service port, which collides on one machine and is not what routes by name anyway. The
  listener ``http`` binds ``ISTIOPY_LISTENER_ADDRESS``:``ISTIOPY_LISTENER_PORT`` from the proxy's node
  metadata (default ``0.0.0.0:15001``) and takes its routes from RDS ``http``.
- **One virtual host per service port**, named ``<hostname>:<port>``, matching ``<host>:<port>`` for the
  FQDN, ``<name>.<ns>.svc``, ``<name>.<ns>``, the cluster IPs, and ``<name>`` when the proxy is in the
  service's namespace (the short name is ambiguous across namespaces: Envoy refuses duplicate domains).
  The bare forms without ``:<port>`` go to the service's first port.
- **One EDS cluster per service port**, named as Istio does: ``outbound|<port>||<hostname>``. Endpoints come
  from the Service's EndpointSlices when it has any (Kubernetes), otherwise from ready Pods matched by the
  selector (standalone files), with named target ports resolved against the pod's container ports.
- **ServiceEntry**: one cluster per (host, port), ``STATIC`` with the inline endpoints for
  ``resolution: STATIC``, ``STRICT_DNS`` for ``DNS``/``DNS_ROUND_ROBIN`` (endpoints, else the host itself);
  ``NONE`` and wildcard hosts get no cluster (they mean passthrough, which this minimal config lacks).
  Virtual hosts as for Services, by host and by the entry's addresses.
- A domain already claimed by an earlier virtual host is left out of later ones (Envoy refuses duplicates).

Generators here are pure functions of (store, proxy); their ``affects`` predicates are what keeps a Pod
change from re-sending listeners or routes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2, duration_pb2

from istiopy.mesh.meta import Resource
from istiopy.mesh.resources.core import EndpointSlice, Pod, Service, ServicePort
from istiopy.mesh.resources.networking import Resolution, ServiceEntry
from istiopy.mesh.store import Change, ConfigStore, selector_matches
from istiopy.xds import types
from istiopy.xds.cache import CachedResource
from istiopy.xds.proxy import Proxy
from istiopy.xds.registry import Generator, GeneratorRegistry, shared

ROUTE_NAME = "http"
LISTENER_NAME = "http"
DEFAULT_LISTENER_PORT = 15001
DOMAIN = "cluster.local"

_ENDPOINT_KINDS = frozenset({Service.KIND, Pod.KIND, EndpointSlice.KIND})


def cluster_name(service: Service, port: ServicePort) -> str:
    return f"outbound|{port.port}||{service.hostname(DOMAIN)}"


def _services(store: ConfigStore) -> list[Service]:
    """Services Envoy can route to: not ExternalName, not headless (no VIP to name them by)."""
    out = []
    for res in store.list(Service.KIND):
        if (
            isinstance(res, Service)
            and res.spec.type != "ExternalName"
            and not res.headless
            and res.spec.ports
        ):
            out.append(res)
    return out


def _ads() -> Any:
    return config_source_pb2.ConfigSource(ads={}, resource_api_version=config_source_pb2.V3)


def _pack(msg: Any) -> Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


class _Memo:
    """Content-keyed resources: an equal key gives the same ``CachedResource`` object back.

    Why: a push regenerates a whole type (e.g. 1000 endpoint sets for one changed pod); building,
    serializing and hashing the 999 unchanged ones again would dominate. The key holds every input of the
    resource, so a hit is exactly what a rebuild would produce (generators stay pure functions). Bounded:
    two generations are kept (what the last pass used and what this one uses); anything older is dropped
    when a pass ends, so superseded endpoint sets do not pile up.
    """

    def __init__(self) -> None:
        self._old: dict[Hashable, Any] = {}
        self._new: dict[Hashable, Any] = {}

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        hit = self._new.get(key)
        if hit is None:
            hit = self._old.get(key)
            if hit is None:
                hit = build()
            self._new[key] = hit
        return hit

    def end_pass(self) -> None:
        """Called when a generator finished: keep this pass's entries (and the last one's, for other
        scopes generated in between), drop the rest."""
        self._old, self._new = self._new, {}


_CLUSTERS = _Memo()
_ENDPOINTS = _Memo()
_VHOSTS = _Memo()
_POD_FACTS: dict[Any, tuple[Pod, _PodFacts]] = {}


@dataclass(frozen=True)
class _PodFacts:
    ready: bool
    ips: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]
    ports: dict[str, int]


def _facts(pod: Pod) -> _PodFacts:
    """What endpoint generation reads of a pod, computed once per pod object (pods are immutable)."""
    key = (pod.metadata.namespace, pod.metadata.name)
    hit = _POD_FACTS.get(key)
    if hit is not None and hit[0] is pod:
        return hit[1]
    facts = _PodFacts(
        pod.ready,
        tuple(pod.ips),
        tuple(pod.labels.items()),
        {cp.name: cp.container_port for c in pod.spec.containers for cp in c.ports if cp.name},
    )
    _POD_FACTS[key] = (pod, facts)
    return facts


# ---------------------------------------------------------------------------------------------- clusters
def _eds_cluster(name: str) -> CachedResource:
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=duration_pb2.Duration(seconds=5),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads(), service_name=name),
    )
    return CachedResource(name, cluster, types.CLUSTER)


def generate_clusters(store: ConfigStore, proxy: Proxy) -> Iterable[CachedResource]:
    for svc in _services(store):
        for port in svc.spec.ports:
            if port.protocol != "TCP":
                continue
            name = cluster_name(svc, port)
            yield _CLUSTERS.get(("eds", name), partial(_eds_cluster, name))
    for se, host, port in _entry_ports(store):
        name = f"outbound|{port.number}||{host}"
        dns = se.spec.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN)
        targets = [
            (ep.address, ep.ports.get(port.name) or port.target_port or port.number)
            for ep in se.spec.endpoints
            if ep.address and not ep.is_uds
        ]
        if dns and not targets:
            targets = [(host, port.target_port or port.number)]
        ordered = tuple(sorted(set(targets)))

        def build(name: str = name, dns: bool = dns, ordered: tuple[tuple[str, int], ...] = ordered) -> Any:
            cluster = cluster_pb2.Cluster(
                name=name,
                type=cluster_pb2.Cluster.STRICT_DNS if dns else cluster_pb2.Cluster.STATIC,
                connect_timeout=duration_pb2.Duration(seconds=5),
                load_assignment=_load_assignment(name, list(ordered)),
            )
            return CachedResource(name, cluster, types.CLUSTER)

        yield _CLUSTERS.get(("entry", name, dns, ordered), build)
    _CLUSTERS.end_pass()


def _entry_ports(store: ConfigStore) -> Iterable[tuple[ServiceEntry, str, Any]]:
    """(entry, host, port) for ServiceEntries a cluster can be built for."""
    for res in store.list(ServiceEntry.KIND):
        if not isinstance(res, ServiceEntry) or res.spec.resolution == Resolution.NONE:
            continue
        if res.spec.resolution == Resolution.STATIC and not res.spec.endpoints:
            continue
        for host in res.spec.hosts:
            if host.startswith("*"):
                continue
            for port in res.spec.ports:
                yield res, host, port


def _load_assignment(name: str, targets: list[tuple[str, int]]) -> Any:
    lb = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=ip, port_value=p)
                )
            )
        )
        for ip, p in targets
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb)] if lb else [],
    )


# --------------------------------------------------------------------------------------------- endpoints
class EndpointIndex:
    """Pods by (namespace, label pair) and EndpointSlices by (namespace, service), built once per generation.

    Why: matching every Service's selector against every Pod is O(services x pods); intersecting the
    per-label sets is proportional to the matches instead (1000 services: milliseconds, not seconds).
    """

    def __init__(self, store: ConfigStore) -> None:
        self.pods: dict[tuple[str, str, str], list[_PodFacts]] = {}
        pods = store.list(Pod.KIND)
        if len(_POD_FACTS) > 2 * len(pods) + 1024:  # deleted pods: forget their facts
            live = {(p.metadata.namespace, p.metadata.name) for p in pods}
            for key in [k for k in _POD_FACTS if k not in live]:
                del _POD_FACTS[key]
        for res in pods:
            if not isinstance(res, Pod):
                continue
            facts = _facts(res)
            if facts.ready and facts.ips:
                ns = res.metadata.namespace
                for k, v in facts.labels:
                    self.pods.setdefault((ns, k, v), []).append(facts)
        self.slices: dict[tuple[str, str], list[EndpointSlice]] = {}
        for res in store.list(EndpointSlice.KIND):
            if isinstance(res, EndpointSlice) and res.address_type != "FQDN" and res.service_name:
                self.slices.setdefault((res.namespace, res.service_name), []).append(res)

    def selected_pods(self, namespace: str, selector: dict[str, str]) -> list[_PodFacts]:
        groups = [self.pods.get((namespace, k, v), []) for k, v in sorted(selector.items())]
        if not groups:
            return []
        smallest = min(groups, key=len)
        return [p for p in smallest if selector_matches(selector, dict(p.labels))]

    def endpoints(self, svc: Service, port: ServicePort) -> list[tuple[str, int]]:
        """(ip, port) backends of one service port, sorted, without duplicates."""
        found: set[tuple[str, int]] = set()
        slices = self.slices.get((svc.namespace, svc.name), [])
        if slices:
            for sl in slices:
                slice_ports = [p for p in sl.ports if (p.name or "") == port.name or len(svc.spec.ports) == 1]
                for sp in slice_ports:
                    if sp.port is None:
                        continue
                    for ep in sl.endpoints:
                        if ep.conditions.ready is not False:
                            found.update((addr, sp.port) for addr in ep.addresses)
        elif svc.spec.selector:
            wanted = port.effective_target_port
            for p in self.selected_pods(svc.namespace, svc.spec.selector):
                target = wanted if isinstance(wanted, int) else p.ports.get(wanted)
                if target is not None:
                    found.update((ip, target) for ip in p.ips)
        return sorted(found)


def service_endpoints(store: ConfigStore, svc: Service, port: ServicePort) -> list[tuple[str, int]]:
    """(ip, port) backends of one service port (builds an index: use ``EndpointIndex`` for many)."""
    return EndpointIndex(store).endpoints(svc, port)


def _cla_resource(name: str, eps: tuple[tuple[str, int], ...]) -> CachedResource:
    return CachedResource(name, _load_assignment(name, list(eps)), types.ENDPOINT)


def generate_endpoints(store: ConfigStore, proxy: Proxy) -> Iterable[CachedResource]:
    index = EndpointIndex(store)
    for svc in _services(store):
        for port in svc.spec.ports:
            if port.protocol != "TCP":
                continue
            name = cluster_name(svc, port)
            eps = tuple(index.endpoints(svc, port))
            yield _ENDPOINTS.get((name, eps), partial(_cla_resource, name, eps))
    _ENDPOINTS.end_pass()


# --------------------------------------------------------------------------------------------- listeners
def listener_address(proxy: Proxy) -> tuple[str, int]:
    addr = proxy.meta("ISTIOPY_LISTENER_ADDRESS", "0.0.0.0")
    port = proxy.meta("ISTIOPY_LISTENER_PORT", str(DEFAULT_LISTENER_PORT))
    try:
        return addr, int(float(port))
    except ValueError:
        return addr, DEFAULT_LISTENER_PORT


def generate_listeners(store: ConfigStore, proxy: Proxy) -> Iterable[tuple[str, Any]]:
    addr, port = listener_address(proxy)
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=LISTENER_NAME,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=ROUTE_NAME),
        http_filters=[
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router()))
        ],
    )
    listener = listener_pb2.Listener(
        name=LISTENER_NAME,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=addr, port_value=port)),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=_pack(hcm)
                    )
                ]
            )
        ],
    )
    yield LISTENER_NAME, listener


# ------------------------------------------------------------------------------------------------ routes
def service_domains(svc: Service, port: ServicePort, proxy: Proxy, first: bool) -> list[str]:
    hosts = [
        svc.hostname(DOMAIN),
        f"{svc.name}.{svc.namespace}.svc",
        f"{svc.name}.{svc.namespace}",
        *svc.vips,
    ]
    if proxy.namespace == svc.namespace:
        hosts.append(svc.name)
    out = [_with_port(h, port.port) for h in hosts]
    if first:
        out += hosts
    return out


def _with_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def virtual_host_specs(store: ConfigStore, proxy: Proxy) -> list[tuple[str, tuple[str, ...], str]]:
    """(virtual host name, domains, cluster) in route order, duplicates already dropped."""
    entries: list[tuple[str, list[str], str]] = []
    for svc in _services(store):
        tcp_ports = [p for p in svc.spec.ports if p.protocol == "TCP"]
        for i, port in enumerate(tcp_ports):
            entries.append(
                (
                    f"{svc.hostname(DOMAIN)}:{port.port}",
                    service_domains(svc, port, proxy, first=i == 0),
                    cluster_name(svc, port),
                )
            )
    first_port: set[str] = set()
    for se, host, port in _entry_ports(store):
        hosts = [host, *se.spec.addresses]
        domains = [_with_port(h, port.number) for h in hosts]
        if host not in first_port:
            first_port.add(host)
            domains += hosts
        entries.append((f"{host}:{port.number}", domains, f"outbound|{port.number}||{host}"))
    specs = []
    claimed: set[str] = set()
    names: set[str] = set()
    for name, domains, cluster in entries:
        fresh = tuple(d for d in domains if d not in claimed)
        if name in names or not fresh:
            continue
        names.add(name)
        claimed.update(fresh)
        specs.append((name, fresh, cluster))
    return specs


def _virtual_host(name: str, domains: tuple[str, ...], cluster: str) -> Any:
    return route_components_pb2.VirtualHost(
        name=name,
        domains=list(domains),
        routes=[
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(cluster=cluster),
            )
        ],
    )


def virtual_hosts(store: ConfigStore, proxy: Proxy) -> list[Any]:
    """The virtual host messages of the route configuration (for generators building on this one)."""
    return [_virtual_host(*spec) for spec in virtual_host_specs(store, proxy)]


def _vhost_entry(spec: tuple[str, tuple[str, ...], str]) -> bytes:
    """The encoding of field ``virtual_hosts`` of a RouteConfiguration holding just this virtual host."""
    data: bytes = route_pb2.RouteConfiguration(virtual_hosts=[_virtual_host(*spec)]).SerializeToString(
        deterministic=True
    )
    return data


def generate_routes(store: ConfigStore, proxy: Proxy) -> Iterable[CachedResource]:
    """One RouteConfiguration, assembled from cached per-virtual-host encodings: a message is its fields
    concatenated, so this is byte for byte what serializing the whole message would give."""
    head: bytes = route_pb2.RouteConfiguration(name=ROUTE_NAME).SerializeToString(deterministic=True)
    parts = [head] + [
        _VHOSTS.get(spec, partial(_vhost_entry, spec)) for spec in virtual_host_specs(store, proxy)
    ]
    yield CachedResource.from_serialized(ROUTE_NAME, route_pb2.RouteConfiguration, b"".join(parts))
    _VHOSTS.end_pass()


# -------------------------------------------------------------------------------------------- predicates
def _service_changed(change: Change, proxy: Proxy) -> bool:
    if change.key.kind == ServiceEntry.KIND:
        return True
    return change.key.kind == Service.KIND and _routing_view(change.old) != _routing_view(change.new)


def _routing_view(res: Resource | None) -> Any:
    """The parts of a Service that clusters and routes depend on (labels and annotations are not)."""
    if not isinstance(res, Service):
        return None
    return (
        res.name,
        res.namespace,
        res.spec.type,
        res.spec.cluster_ip,
        tuple(res.spec.cluster_ips),
        tuple((p.name, p.port, p.protocol) for p in res.spec.ports),
    )


def _endpoints_changed(change: Change, proxy: Proxy) -> bool:
    return change.key.kind in _ENDPOINT_KINDS


def _never(change: Change, proxy: Proxy) -> bool:
    return False


def _by_namespace(proxy: Proxy) -> Hashable:
    return ("namespace", proxy.namespace)


def _by_listener(proxy: Proxy) -> Hashable:
    return ("listener", listener_address(proxy))


def envoy_generators() -> list[Generator]:
    return [
        Generator(types.CLUSTER, generate_clusters, _service_changed, shared, name="envoy-clusters"),
        Generator(types.ENDPOINT, generate_endpoints, _endpoints_changed, shared, name="envoy-endpoints"),
        Generator(types.LISTENER, generate_listeners, _never, _by_listener, name="envoy-listeners"),
        Generator(types.ROUTE, generate_routes, _service_changed, _by_namespace, name="envoy-routes"),
    ]


def register_envoy_generators(registry: GeneratorRegistry, proxy_kinds: Iterable[str] = ()) -> None:
    """Register the four generators for every proxy kind (or only ``proxy_kinds``)."""
    kinds = frozenset(proxy_kinds)
    for gen in envoy_generators():
        registry.register(Generator(gen.type_url, gen.generate, gen.affects, gen.scope, kinds, gen.name))
