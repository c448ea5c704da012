"""Diagnostics computed from the model: what ``istioctl analyze`` prints and the operator writes to status.

Each check reads one ``ConfigStore`` snapshot and returns ``Diagnostic`` values naming the resource, the
field path, a machine reason, a human message, a severity and, where upstream has one, the IST code. The
ambient-specific messages (ztunnel cannot enforce HTTP rules, a waypoint label that binds nothing) come from
the same functions the generators use (``mesh.authz``, ``mesh.ambient``), so what is reported is exactly
what the data plane got.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from istiopy.mesh.ambient import (
    USE_WAYPOINT_LABEL,
    MeshSettings,
    StoreReader,
    WaypointBinding,
    find_waypoint,
    is_waypoint_instance,
    pod_waypoint,
    reference_permitted,
    service_waypoint,
    typed_list,
    view,
)
from istiopy.mesh.authz import ztunnel_policy
from istiopy.mesh.meta import Resource, ResourceKey
from istiopy.mesh.resources.core import Namespace, Pod, Service
from istiopy.mesh.resources.gateway import BackendObjectReference, Gateway, HTTPRoute
from istiopy.mesh.resources.networking import Destination, DestinationRule, ServiceEntry, VirtualService
from istiopy.mesh.resources.security import AuthorizationPolicy
from istiopy.mesh.store import selector_matches
from istiopy.mesh.waypoint_diagnostics import waypoint_diagnostics as waypoint_diagnostics_of

__all__ = [
    "ANALYZERS",
    "Diagnostic",
    "Severity",
    "analyze",
    "authorization_policy_diagnostics",
    "destination_rule_diagnostics",
    "diagnostics_for",
    "http_route_diagnostics",
    "http_route_ref_problems",
    "virtual_service_diagnostics",
    "waypoint_config_diagnostics",
    "waypoint_diagnostics",
]

Severity = Literal["Error", "Warning", "Info"]
SEVERITY_RANK: dict[str, int] = {"Info": 0, "Warning": 1, "Error": 2}


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One finding about one resource. ``field`` is a dotted path such as ``spec.rules[0]``."""

    resource: ResourceKey
    field: str
    reason: str
    message: str
    severity: Severity = "Warning"
    code: str = ""

    def __str__(self) -> str:
        code = f" [{self.code}]" if self.code else ""
        ns = f" {self.resource.namespace}/" if self.resource.namespace else " "
        return f"{self.severity}{code} ({self.resource.kind}{ns}{self.resource.name}) {self.message}"


# ----------------------------------------------------------------------------------- authorization policy
def authorization_policy_diagnostics(store: StoreReader, settings: MeshSettings) -> list[Diagnostic]:
    """The ztunnel conversion report of every policy, unmatched selectors, and unbound targetRefs."""
    out: list[Diagnostic] = []
    have_pods = bool(store.list("Pod"))
    for pol in typed_list(store, AuthorizationPolicy):
        zp = ztunnel_policy(pol, settings)
        if zp.message:
            out.append(Diagnostic(pol.key, zp.field_path, zp.reason or "UnsupportedValue", zp.message))
        sel = pol.spec.selector
        if have_pods and sel is not None and sel.match_labels:
            namespaces = None if pol.namespace == settings.root_namespace else pol.namespace
            if not store.list("Pod", namespaces, sel.match_labels):
                labels = ",".join(f"{k}={v}" for k, v in sorted(sel.match_labels.items()))
                out.append(
                    Diagnostic(
                        pol.key,
                        "spec.selector",
                        "NoMatchingWorkloadsFound",
                        f"No matching workloads for this resource with the following labels: {labels}",
                        "Warning",
                        "IST0127",
                    )
                )
        out += _target_ref_diagnostics(store, pol, settings)
    return out


def _target_ref_diagnostics(
    store: StoreReader, pol: AuthorizationPolicy, settings: MeshSettings
) -> list[Diagnostic]:
    """A waypoint policy binds through its targets; say when a target is missing or has no waypoint."""
    out: list[Diagnostic] = []
    for i, ref in enumerate(pol.target_refs):
        path = "spec.targetRef" if pol.spec.target_ref is not None and i == 0 else f"spec.targetRefs[{i}]"
        ns = ref.namespace or pol.namespace
        group, kind = ref.group_kind
        if kind == "Service" and group == "":
            svc = store.get_typed(Service, ns, ref.name)
            if svc is None:
                out.append(
                    Diagnostic(pol.key, path, "TargetNotFound", f"Service {ns}/{ref.name} was not found")
                )
            elif service_waypoint(store, svc, settings).waypoint is None:
                out.append(
                    Diagnostic(
                        pol.key,
                        path,
                        "AncestorNotBound",
                        f"Service {ns}/{ref.name} is not bound to a waypoint, so this policy is not enforced",
                        "Warning",
                        "IST0167",
                    )
                )
        elif kind == "ServiceEntry":
            if store.get("ServiceEntry", ns, ref.name) is None:
                out.append(
                    Diagnostic(pol.key, path, "TargetNotFound", f"ServiceEntry {ns}/{ref.name} was not found")
                )
        elif kind == "Gateway" and store.get_typed(Gateway, ns, ref.name) is None:
            out.append(Diagnostic(pol.key, path, "TargetNotFound", f"Gateway {ns}/{ref.name} was not found"))
    return out


# -------------------------------------------------------------------------------------------- waypoints
def _binding_diagnostic(res: Resource, binding: WaypointBinding) -> Diagnostic | None:
    if binding.reason is None or binding.message is None:
        return None
    where = f"metadata.labels[{USE_WAYPOINT_LABEL}]"
    if binding.source == "namespace":
        where = f"(namespace {res.namespace}) " + where
    return Diagnostic(res.key, where, binding.reason, binding.message)


def waypoint_diagnostics(store: StoreReader, settings: MeshSettings) -> list[Diagnostic]:
    """``istio.io/use-waypoint`` labels that bind nothing: unknown waypoint, wrong ``waypoint-for``,
    attachment refused. Reported where the label is (a namespace once, not for each of its objects)."""
    out: list[Diagnostic] = []
    for ns in typed_list(store, Namespace):
        value = ns.labels.get(USE_WAYPOINT_LABEL)
        if value is None or value == "none":
            continue
        wp_ns = ns.labels.get("istio.io/use-waypoint-namespace", ns.name)
        if find_waypoint(store, wp_ns, value, settings) is None:
            out.append(
                Diagnostic(
                    ns.key,
                    f"metadata.labels[{USE_WAYPOINT_LABEL}]",
                    "WaypointNotFound",
                    f"waypoint {wp_ns}/{value} was not found "
                    "(no Gateway of class istio-waypoint by that name)",
                )
            )
    for svc in typed_list(store, Service):
        binding = service_waypoint(store, svc, settings)
        # A namespace label naming a missing waypoint is reported once, on the namespace.
        inherited_missing = binding.source == "namespace" and binding.reason == "WaypointNotFound"
        if not inherited_missing and (d := _binding_diagnostic(svc, binding)) is not None:
            out.append(d)
    for pod in typed_list(store, Pod):
        if is_waypoint_instance(pod) or USE_WAYPOINT_LABEL not in pod.labels:
            continue
        if (d := _binding_diagnostic(pod, pod_waypoint(store, pod, settings))) is not None:
            out.append(d)
    return out


# -------------------------------------------------------------------------------------- virtual services
def _resolve_host(host: str, namespace: str, settings: MeshSettings) -> str:
    """A short name is a Service in the referring namespace; ``a.b`` is ``a.b.svc.<domain>``."""
    if "*" in host or host.endswith(f".svc.{settings.domain_suffix}"):
        return host
    parts = host.split(".")
    if len(parts) == 1:
        return f"{host}.{namespace}.svc.{settings.domain_suffix}"
    if len(parts) == 2:
        return f"{host}.svc.{settings.domain_suffix}"
    return host


def _known_hosts(store: StoreReader, settings: MeshSettings) -> set[str]:
    hosts = {s.hostname(settings.domain_suffix) for s in typed_list(store, Service)}
    for se in typed_list(store, ServiceEntry):
        hosts.update(se.spec.hosts)
    return hosts


def _destinations(vs: VirtualService) -> Iterable[tuple[str, Destination]]:
    for i, http in enumerate(vs.spec.http):
        for j, route in enumerate(http.route):
            yield f"spec.http[{i}].route[{j}].destination", route.destination
        if http.mirror is not None:
            yield f"spec.http[{i}].mirror", http.mirror
        for j, mirror in enumerate(http.mirrors):
            yield f"spec.http[{i}].mirrors[{j}].destination", mirror.destination
    for i, tcp in enumerate(vs.spec.tcp):
        for j, rd in enumerate(tcp.route):
            yield f"spec.tcp[{i}].route[{j}].destination", rd.destination
    for i, tls in enumerate(vs.spec.tls):
        for j, rd in enumerate(tls.route):
            yield f"spec.tls[{i}].route[{j}].destination", rd.destination


def _subsets_by_host(store: StoreReader, settings: MeshSettings) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for dr in typed_list(store, DestinationRule):
        host = _resolve_host(dr.spec.host, dr.namespace, settings)
        out.setdefault(host, set()).update(s.name for s in dr.spec.subsets)
    return out


def virtual_service_diagnostics(store: StoreReader, settings: MeshSettings) -> list[Diagnostic]:
    """Destinations naming an unknown host, or a subset no DestinationRule defines (IST0101)."""
    out: list[Diagnostic] = []
    hosts = _known_hosts(store, settings)
    subsets = _subsets_by_host(store, settings)
    for vs in typed_list(store, VirtualService):
        for path, dest in _destinations(vs):
            if not dest.host or "*" in dest.host:
                continue
            host = _resolve_host(dest.host, vs.namespace, settings)
            if host not in hosts and dest.host not in hosts:
                out.append(
                    Diagnostic(
                        vs.key,
                        f"{path}.host",
                        "ReferencedResourceNotFound",
                        f'Referenced host not found: "{dest.host}"',
                        "Error",
                        "IST0101",
                    )
                )
                continue
            if dest.subset and dest.subset not in subsets.get(host, set()):
                out.append(
                    Diagnostic(
                        vs.key,
                        f"{path}.subset",
                        "ReferencedResourceNotFound",
                        f'Referenced host+subset in destinationrule not found: "{dest.host}+{dest.subset}"',
                        "Error",
                        "IST0101",
                    )
                )
    return out


def destination_rule_diagnostics(store: StoreReader, settings: MeshSettings) -> list[Diagnostic]:
    """Subsets that select no pod of their Service (IST0173), judged only when pods are known."""
    out: list[Diagnostic] = []
    if not store.list("Pod"):
        return out
    services = {s.hostname(settings.domain_suffix): s for s in typed_list(store, Service)}
    for dr in typed_list(store, DestinationRule):
        svc = services.get(_resolve_host(dr.spec.host, dr.namespace, settings))
        if svc is None or not svc.spec.selector:
            continue
        pods = typed_list(store, Pod, svc.namespace, svc.spec.selector)
        for i, subset in enumerate(dr.spec.subsets):
            if not any(selector_matches(subset.labels, p.labels) for p in pods):
                out.append(
                    Diagnostic(
                        dr.key,
                        f"spec.subsets[{i}]",
                        "DestinationRuleSubsetNotSelectPods",
                        f"The subset {subset.name} ({_labels(subset.labels)}) of host {dr.spec.host} "
                        "does not select any pods",
                        "Warning",
                        "IST0173",
                    )
                )
    return out


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "no labels"


_WAYPOINT_SEVERITY: dict[str, Severity] = {"InvalidRegex": "Error", "InvalidJwks": "Error"}


def waypoint_config_diagnostics(store: StoreReader, settings: MeshSettings) -> list[Diagnostic]:
    """What the waypoint generator leaves out or enforces fail-closed (``mesh.waypoint_diagnostics``):
    RE2-incompatible regexes, broken inline JWKS, CUSTOM policies at a waypoint. Unknown subsets are
    reported by ``virtualservice.destinations`` already (with upstream's IST0101 wording)."""
    out: list[Diagnostic] = []
    for d in waypoint_diagnostics_of(store):
        if d.reason == "ReferencedResourceNotFound":
            continue
        out.append(
            Diagnostic(d.resource, d.field, d.reason, d.message, _WAYPOINT_SEVERITY.get(d.reason, "Warning"))
        )
    return out


# ---------------------------------------------------------------------------------------------- HTTPRoute
MESH_BACKEND_KINDS = {("", "Service"), ("core", "Service"), ("networking.istio.io", "ServiceEntry")}
# Gateway API's ResolvedRefs reasons, most telling first (a route's condition carries one).
REF_REASONS = ("InvalidKind", "RefNotPermitted", "BackendNotFound")


def mesh_object_exists(store: StoreReader, group: str, kind: str, namespace: str, name: str) -> bool:
    """Whether a Service or ServiceEntry (what a mesh route may name) is in the store."""
    if (group, kind) in (("", "Service"), ("core", "Service")):
        return store.get_typed(Service, namespace, name) is not None
    if (group, kind) == ("networking.istio.io", "ServiceEntry"):
        return store.get_typed(ServiceEntry, namespace, name) is not None
    return False


def http_route_ref_problems(store: StoreReader, route: HTTPRoute) -> list[tuple[str, str, str]]:
    """(field, reason, what) for each backendRef or mirror the mesh cannot use, reasons from REF_REASONS:
    a kind the mesh cannot route to, another namespace's backend without a ReferenceGrant there, or a
    backend that does not exist. The waypoint answers such a backend's share of requests with 500."""
    out = []
    for i, rule in enumerate(route.spec.rules):
        refs: list[tuple[str, BackendObjectReference]] = [
            (f"spec.rules[{i}].backendRefs[{j}]", ref) for j, ref in enumerate(rule.backend_refs)
        ]
        refs += [
            (f"spec.rules[{i}].filters[{j}].requestMirror.backendRef", f.request_mirror.backend_ref)
            for j, f in enumerate(rule.filters)
            if f.request_mirror is not None
        ]
        for path, ref in refs:
            ns = ref.namespace or route.namespace
            if (ref.group, ref.kind) not in MESH_BACKEND_KINDS:
                out.append((path, "InvalidKind", f"{ref.group or 'core'}/{ref.kind} {ns}/{ref.name}"))
            elif not reference_permitted(
                store, "HTTPRoute", route.namespace, ref.group, ref.kind, ns, ref.name
            ):
                out.append((path, "RefNotPermitted", f"{ref.kind} {ns}/{ref.name}"))
            elif not mesh_object_exists(store, ref.group, ref.kind, ns, ref.name):
                out.append((path, "BackendNotFound", f"{ref.kind} {ns}/{ref.name}"))
    return out


REF_MESSAGES = {
    "InvalidKind": "backendRef of a kind the mesh cannot route to: {}",
    "RefNotPermitted": "no ReferenceGrant in the backend's namespace lets this route use {}",
    "BackendNotFound": "backend not found: {}",
}


def http_route_diagnostics(store: StoreReader, settings: MeshSettings) -> list[Diagnostic]:
    """Backends an HTTPRoute names that the mesh cannot use: their requests get 500 at the waypoint."""
    return [
        Diagnostic(route.key, path, reason, REF_MESSAGES[reason].format(what), "Error")
        for route in typed_list(store, HTTPRoute)
        for path, reason, what in http_route_ref_problems(store, route)
    ]


Analyzer = Callable[[StoreReader, MeshSettings], list[Diagnostic]]
ANALYZERS: dict[str, Analyzer] = {
    "ambient.authorizationpolicy": authorization_policy_diagnostics,
    "ambient.waypoint": waypoint_diagnostics,
    "virtualservice.destinations": virtual_service_diagnostics,
    "destinationrule.subsets": destination_rule_diagnostics,
    "waypoint.config": waypoint_config_diagnostics,
    "httproute.backends": http_route_diagnostics,
}


def diagnostics_for(
    store: StoreReader, key: ResourceKey, settings: MeshSettings = MeshSettings()
) -> list[Diagnostic]:
    """The diagnostics of one resource (what the operator puts in its status)."""
    return [d for d in analyze(store, settings) if d.resource == key]


def analyze(
    store: StoreReader, settings: MeshSettings = MeshSettings(), analyzers: Iterable[str] | None = None
) -> list[Diagnostic]:
    """Every diagnostic of the chosen analyzers (all by default), sorted by resource then field."""
    names = list(ANALYZERS) if analyzers is None else list(analyzers)
    store = view(store)
    out: list[Diagnostic] = []
    for name in names:
        out += ANALYZERS[name](store, settings)
    return sorted(set(out))
