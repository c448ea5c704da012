"""Gateway API kinds the mesh reads (``gateway.networking.k8s.io`` v1 and v1beta1): GatewayClass, Gateway,
HTTPRoute, ReferenceGrant.

Gateways are how ambient mode declares waypoints (class ``istio-waypoint``, an HBONE listener on 15008);
HTTPRoutes attached to a waypoint or a Service are its L7 routing. The models are strict (unknown fields are
refused) and carry the upstream defaults, so a generator never has to re-derive e.g. the default
``PathPrefix /`` match. Schema limits (port ranges, list lengths, enums, patterns) live on the fields, so
they also reach the generated CRDs; the rules upstream writes as CEL live in ``semantic_errors``.
"""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field

from istiopy.mesh.errors import FieldError
from istiopy.mesh.kinds import register
from istiopy.mesh.meta import Model, Resource

__all__ = [
    "GATEWAY_GROUP",
    "WAYPOINT_CLASS",
    "WAYPOINT_FOR_LABEL",
    "AllowedRoutes",
    "BackendObjectReference",
    "Fraction",
    "Gateway",
    "GatewayAddress",
    "GatewayClass",
    "GatewayClassSpec",
    "GatewayInfrastructure",
    "GatewayLabelSelector",
    "GatewaySpec",
    "GatewayTLSConfig",
    "HTTPBackendRef",
    "HTTPHeader",
    "HTTPHeaderFilter",
    "HTTPHeaderMatch",
    "HTTPPathMatch",
    "HTTPPathModifier",
    "HTTPQueryParamMatch",
    "HTTPRequestMirrorFilter",
    "HTTPRequestRedirectFilter",
    "HTTPRoute",
    "HTTPRouteFilter",
    "HTTPRouteMatch",
    "HTTPRouteRule",
    "HTTPRouteSpec",
    "HTTPRouteTimeouts",
    "HTTPURLRewriteFilter",
    "LabelSelectorRequirement",
    "Listener",
    "LocalObjectReference",
    "ParametersReference",
    "ParentReference",
    "ReferenceGrant",
    "ReferenceGrantFrom",
    "ReferenceGrantSpec",
    "ReferenceGrantTo",
    "RouteGroupKind",
    "RouteNamespaces",
    "SecretObjectReference",
    "gateway_duration_seconds",
]

GATEWAY_GROUP = "gateway.networking.k8s.io"
WAYPOINT_CLASS = "istio-waypoint"
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"

_GROUP = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_KIND = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
_SECTION = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_HOSTNAME = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"
_PROTOCOL = (
    r"^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
    r"|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]+$"
)
_DURATION = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def gateway_duration_seconds(value: str) -> float:
    """A Gateway API duration (``1h30m``, ``500ms``; GEP-2257) in seconds."""
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value))


# ------------------------------------------------------------------------------------------ references
class ParentReference(Model):
    """What a route attaches to: a Gateway (default), or a Service for mesh routing (GAMMA)."""

    group: str = Field(default=GATEWAY_GROUP, max_length=253, pattern=_GROUP)
    kind: str = Field(default="Gateway", min_length=1, max_length=63, pattern=_KIND)
    namespace: str | None = Field(default=None, min_length=1, max_length=63)
    name: str = Field(min_length=1, max_length=253)
    section_name: str | None = Field(default=None, min_length=1, max_length=253, pattern=_SECTION)
    port: int | None = Field(default=None, ge=1, le=65535)


class BackendObjectReference(Model):
    """A backend: a Service by default (group ``""``), in the route's namespace unless given."""

    group: str = Field(default="", max_length=253, pattern=_GROUP)
    kind: str = Field(default="Service", min_length=1, max_length=63, pattern=_KIND)
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, min_length=1, max_length=63)
    port: int | None = Field(default=None, ge=1, le=65535)


class LocalObjectReference(Model):
    group: str = Field(max_length=253, pattern=_GROUP)
    kind: str = Field(min_length=1, max_length=63, pattern=_KIND)
    name: str = Field(min_length=1, max_length=253)


class SecretObjectReference(Model):
    group: str = Field(default="", max_length=253, pattern=_GROUP)
    kind: str = Field(default="Secret", min_length=1, max_length=63, pattern=_KIND)
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, min_length=1, max_length=63)


class ParametersReference(Model):
    group: str = Field(max_length=253, pattern=_GROUP)
    kind: str = Field(min_length=1, max_length=63, pattern=_KIND)
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, min_length=1, max_length=63)


# --------------------------------------------------------------------------------------- GatewayClass
class GatewayClassSpec(Model):
    controller_name: str = Field(min_length=1, max_length=253)
    parameters_ref: ParametersReference | None = None
    description: str | None = Field(default=None, max_length=64)


@register
class GatewayClass(Resource):
    """Cluster-scoped; ``istio-waypoint`` is served by controller ``istio.io/mesh-controller``."""

    KIND: ClassVar[str] = "GatewayClass"
    GROUP: ClassVar[str] = GATEWAY_GROUP
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1", "v1beta1")
    NAMESPACED: ClassVar[bool] = False
    PLURAL: ClassVar[str] = "gatewayclasses"

    spec: GatewayClassSpec


# -------------------------------------------------------------------------------------------- Gateway
class LabelSelectorRequirement(Model):
    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class GatewayLabelSelector(Model):
    """A Kubernetes label selector (matchLabels and matchExpressions), as used by allowedRoutes."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)


class RouteNamespaces(Model):
    from_: Literal["All", "Same", "Selector"] = Field(default="Same", alias="from")
    selector: GatewayLabelSelector | None = None


class RouteGroupKind(Model):
    group: str = Field(default=GATEWAY_GROUP, max_length=253, pattern=_GROUP)
    kind: str = Field(min_length=1, max_length=63, pattern=_KIND)


class AllowedRoutes(Model):
    namespaces: RouteNamespaces = Field(default_factory=RouteNamespaces)
    kinds: list[RouteGroupKind] = Field(default_factory=list, max_length=8)


class GatewayTLSConfig(Model):
    mode: Literal["Terminate", "Passthrough"] = "Terminate"
    certificate_refs: list[SecretObjectReference] = Field(default_factory=list, max_length=64)
    options: dict[str, str] = Field(default_factory=dict)


class Listener(Model):
    """One port of a Gateway; a waypoint has ``mesh`` on 15008 with protocol ``HBONE``."""

    name: str = Field(min_length=1, max_length=253, pattern=_SECTION)
    hostname: str | None = Field(default=None, min_length=1, max_length=253, pattern=_HOSTNAME)
    port: int = Field(ge=1, le=65535)
    protocol: str = Field(min_length=1, max_length=255, pattern=_PROTOCOL)
    tls: GatewayTLSConfig | None = None
    allowed_routes: AllowedRoutes = Field(default_factory=AllowedRoutes)


class GatewayAddress(Model):
    type: str = Field(default="IPAddress", min_length=1, max_length=253)
    value: str = Field(min_length=1, max_length=253)


class GatewayInfrastructure(Model):
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    parameters_ref: LocalObjectReference | None = None


class GatewaySpec(Model):
    gateway_class_name: str = Field(min_length=1, max_length=253)
    listeners: list[Listener] = Field(min_length=1, max_length=64)
    addresses: list[GatewayAddress] = Field(default_factory=list, max_length=16)
    infrastructure: GatewayInfrastructure | None = None


@register
class Gateway(Resource):
    """A Gateway; class ``istio-waypoint`` makes it an ambient waypoint (label ``istio.io/waypoint-for``)."""

    KIND: ClassVar[str] = "Gateway"
    GROUP: ClassVar[str] = GATEWAY_GROUP
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1", "v1beta1")
    NAMESPACED: ClassVar[bool] = True
    PLURAL: ClassVar[str] = "gateways"

    spec: GatewaySpec

    @property
    def is_waypoint(self) -> bool:
        return self.spec.gateway_class_name == WAYPOINT_CLASS

    @property
    def waypoint_for(self) -> str:
        """``service`` (the default), ``workload``, ``all`` or ``none``: which traffic the waypoint serves."""
        return self.metadata.labels.get(WAYPOINT_FOR_LABEL, "service")

    def semantic_errors(self) -> list[FieldError]:
        errors: list[FieldError] = []
        names: set[str] = set()
        combos: set[tuple[int, str, str]] = set()
        for i, lst in enumerate(self.spec.listeners):
            path = f"spec.listeners[{i}]"
            if lst.name in names:
                errors.append(FieldError(f"{path}.name", f"duplicate listener name {lst.name!r}"))
            names.add(lst.name)
            combo = (lst.port, lst.protocol, lst.hostname or "")
            if combo in combos:
                errors.append(FieldError(path, "port, protocol and hostname must be unique among listeners"))
            combos.add(combo)
            if lst.protocol in ("HTTP", "TCP", "UDP") and lst.tls is not None:
                errors.append(FieldError(f"{path}.tls", f"must not be set for protocol {lst.protocol}"))
            if lst.protocol in ("HTTPS", "TLS") and lst.tls is None:
                errors.append(FieldError(f"{path}.tls", f"required for protocol {lst.protocol}"))
            if lst.protocol in ("TCP", "UDP") and lst.hostname:
                errors.append(FieldError(f"{path}.hostname", f"must not be set for protocol {lst.protocol}"))
            sel = lst.allowed_routes.namespaces
            if sel.from_ == "Selector" and sel.selector is None:
                errors.append(
                    FieldError(f"{path}.allowedRoutes.namespaces.selector", "required when from is Selector")
                )
        return errors


# ------------------------------------------------------------------------------------------ HTTPRoute
class HTTPPathMatch(Model):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = Field(default="/", max_length=1024)


class HTTPHeaderMatch(Model):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1, max_length=256, pattern=_HEADER_NAME)
    value: str = Field(max_length=4096)


class HTTPQueryParamMatch(Model):
    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str = Field(min_length=1, max_length=256)
    value: str = Field(min_length=1, max_length=1024)


HTTPMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]


class HTTPRouteMatch(Model):
    """All conditions must hold; an empty match (or none at all) is ``PathPrefix /``."""

    path: HTTPPathMatch | None = Field(default_factory=HTTPPathMatch)
    headers: list[HTTPHeaderMatch] = Field(default_factory=list, max_length=16)
    query_params: list[HTTPQueryParamMatch] = Field(default_factory=list, max_length=16)
    method: HTTPMethod | None = None


class HTTPHeader(Model):
    name: str = Field(min_length=1, max_length=256, pattern=_HEADER_NAME)
    value: str = Field(max_length=4096)


class HTTPHeaderFilter(Model):
    set: list[HTTPHeader] = Field(default_factory=list, max_length=16)
    add: list[HTTPHeader] = Field(default_factory=list, max_length=16)
    remove: list[str] = Field(default_factory=list, max_length=16)


class HTTPPathModifier(Model):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: str | None = Field(default=None, max_length=1024)
    replace_prefix_match: str | None = Field(default=None, max_length=1024)


class Fraction(Model):
    numerator: int = Field(ge=0)
    denominator: int = Field(default=100, ge=1)


class HTTPRequestMirrorFilter(Model):
    backend_ref: BackendObjectReference
    percent: int | None = Field(default=None, ge=0, le=100)
    fraction: Fraction | None = None


class HTTPRequestRedirectFilter(Model):
    scheme: Literal["http", "https"] | None = None
    hostname: str | None = Field(default=None, min_length=1, max_length=253, pattern=_HOSTNAME)
    path: HTTPPathModifier | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    status_code: Literal[301, 302, 303, 307, 308] = 302


class HTTPURLRewriteFilter(Model):
    hostname: str | None = Field(default=None, min_length=1, max_length=253, pattern=_HOSTNAME)
    path: HTTPPathModifier | None = None


FilterType = Literal[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "RequestRedirect",
    "URLRewrite",
    "ExtensionRef",
]
# filter type -> the attribute that must be set for it (and the only one).
_FILTER_FIELDS: dict[str, str] = {
    "RequestHeaderModifier": "request_header_modifier",
    "ResponseHeaderModifier": "response_header_modifier",
    "RequestMirror": "request_mirror",
    "RequestRedirect": "request_redirect",
    "URLRewrite": "url_rewrite",
    "ExtensionRef": "extension_ref",
}
_FILTER_ALIASES: dict[str, str] = {
    "request_header_modifier": "requestHeaderModifier",
    "response_header_modifier": "responseHeaderModifier",
    "request_mirror": "requestMirror",
    "request_redirect": "requestRedirect",
    "url_rewrite": "urlRewrite",
    "extension_ref": "extensionRef",
}


class HTTPRouteFilter(Model):
    """A tagged union in upstream's style: ``type`` says which one of the other fields is set."""

    type: FilterType
    request_header_modifier: HTTPHeaderFilter | None = None
    response_header_modifier: HTTPHeaderFilter | None = None
    request_mirror: HTTPRequestMirrorFilter | None = None
    request_redirect: HTTPRequestRedirectFilter | None = None
    url_rewrite: HTTPURLRewriteFilter | None = Field(default=None, alias="urlRewrite")
    extension_ref: LocalObjectReference | None = None

    def errors(self, path: str) -> list[FieldError]:
        wanted = _FILTER_FIELDS[self.type]
        errors: list[FieldError] = []
        if getattr(self, wanted) is None:
            errors.append(
                FieldError(f"{path}.{_FILTER_ALIASES[wanted]}", f"required for filter type {self.type}")
            )
        for attr, alias in _FILTER_ALIASES.items():
            if attr != wanted and getattr(self, attr) is not None:
                errors.append(FieldError(f"{path}.{alias}", f"must not be set for filter type {self.type}"))
        return errors


class HTTPBackendRef(BackendObjectReference):
    """A weighted backend: traffic splits in proportion to ``weight`` (default 1; 0 means none)."""

    weight: int = Field(default=1, ge=0, le=1_000_000)
    filters: list[HTTPRouteFilter] = Field(default_factory=list, max_length=16)


class HTTPRouteTimeouts(Model):
    request: str | None = Field(default=None, pattern=_DURATION)
    backend_request: str | None = Field(default=None, pattern=_DURATION)


def _default_matches() -> list[HTTPRouteMatch]:
    return [HTTPRouteMatch()]


class HTTPRouteRule(Model):
    name: str | None = Field(default=None, min_length=1, max_length=253, pattern=_SECTION)
    matches: list[HTTPRouteMatch] = Field(default_factory=_default_matches, max_length=64)
    filters: list[HTTPRouteFilter] = Field(default_factory=list, max_length=16)
    backend_refs: list[HTTPBackendRef] = Field(default_factory=list, max_length=16)
    timeouts: HTTPRouteTimeouts | None = None


def _default_rules() -> list[HTTPRouteRule]:
    return [HTTPRouteRule()]


class HTTPRouteSpec(Model):
    parent_refs: list[ParentReference] = Field(default_factory=list, max_length=32)
    hostnames: list[str] = Field(default_factory=list, max_length=16)
    rules: list[HTTPRouteRule] = Field(default_factory=_default_rules, max_length=16)


def _path_value_errors(path: str, match: HTTPPathMatch) -> list[FieldError]:
    if match.type == "RegularExpression":
        try:
            re.compile(match.value)
        except re.error as err:
            return [FieldError(f"{path}.value", f"invalid regular expression: {err}")]
        return []
    value = match.value
    if not value.startswith("/"):
        return [FieldError(f"{path}.value", "must be an absolute path starting with '/'")]
    for bad in ("//", "/./", "/../", "%2f", "%2F", "#"):
        if bad in value:
            return [FieldError(f"{path}.value", f"must not contain {bad!r}")]
    if value.endswith(("/..", "/.")):
        return [FieldError(f"{path}.value", "must not end with '/..' or '/.'")]
    return []


def _modifier_errors(path: str, mod: HTTPPathModifier | None) -> list[FieldError]:
    if mod is None:
        return []
    if mod.type == "ReplaceFullPath" and (
        mod.replace_full_path is None or mod.replace_prefix_match is not None
    ):
        return [FieldError(path, "type ReplaceFullPath needs replaceFullPath and only it")]
    if mod.type == "ReplacePrefixMatch" and (
        mod.replace_prefix_match is None or mod.replace_full_path is not None
    ):
        return [FieldError(path, "type ReplacePrefixMatch needs replacePrefixMatch and only it")]
    return []


def _filters_errors(
    path: str, filters: list[HTTPRouteFilter], rule: HTTPRouteRule | None
) -> list[FieldError]:
    errors: list[FieldError] = []
    seen: set[str] = set()
    for j, flt in enumerate(filters):
        fpath = f"{path}[{j}]"
        errors += flt.errors(fpath)
        if flt.type in seen and flt.type not in ("RequestMirror", "ExtensionRef"):
            errors.append(FieldError(f"{fpath}.type", f"filter {flt.type} must not be repeated"))
        seen.add(flt.type)
        if flt.request_redirect is not None:
            errors += _modifier_errors(f"{fpath}.requestRedirect.path", flt.request_redirect.path)
        if flt.url_rewrite is not None:
            mod = flt.url_rewrite.path
            errors += _modifier_errors(f"{fpath}.urlRewrite.path", mod)
            prefix_matches = [
                m for m in (rule.matches if rule else []) if m.path and m.path.type == "PathPrefix"
            ]
            if (
                mod is not None
                and mod.type == "ReplacePrefixMatch"
                and rule is not None
                and len(prefix_matches) != 1
            ):
                errors.append(
                    FieldError(
                        f"{fpath}.urlRewrite.path",
                        "replacePrefixMatch needs exactly one PathPrefix match in the rule",
                    )
                )
        if flt.request_mirror is not None and None not in (
            flt.request_mirror.percent,
            flt.request_mirror.fraction,
        ):
            errors.append(FieldError(f"{fpath}.requestMirror", "only one of percent and fraction may be set"))
        if flt.request_mirror is not None and flt.request_mirror.fraction is not None:
            frac = flt.request_mirror.fraction
            if frac.numerator > frac.denominator:
                errors.append(
                    FieldError(f"{fpath}.requestMirror.fraction", "numerator must not exceed denominator")
                )
    if {"RequestRedirect", "URLRewrite"} <= seen:
        errors.append(FieldError(path, "RequestRedirect and URLRewrite must not be used together"))
    return errors


@register
class HTTPRoute(Resource):
    """L7 routing: attached to a Gateway (or a waypoint) or, for mesh traffic, to a Service."""

    KIND: ClassVar[str] = "HTTPRoute"
    GROUP: ClassVar[str] = GATEWAY_GROUP
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1", "v1beta1")
    NAMESPACED: ClassVar[bool] = True
    PLURAL: ClassVar[str] = "httproutes"

    spec: HTTPRouteSpec = Field(default_factory=HTTPRouteSpec)

    def semantic_errors(self) -> list[FieldError]:
        errors: list[FieldError] = []
        parents: set[tuple[object, ...]] = set()
        for i, parent in enumerate(self.spec.parent_refs):
            ident = (
                parent.group,
                parent.kind,
                parent.namespace or self.namespace,
                parent.name,
                parent.section_name,
                parent.port,
            )
            if ident in parents:
                errors.append(FieldError(f"spec.parentRefs[{i}]", "duplicate parent reference"))
            parents.add(ident)
        for i, host in enumerate(self.spec.hostnames):
            if not re.fullmatch(_HOSTNAME, host):
                errors.append(FieldError(f"spec.hostnames[{i}]", f"{host!r} is not a valid hostname"))
        for i, rule in enumerate(self.spec.rules):
            rpath = f"spec.rules[{i}]"
            for j, match in enumerate(rule.matches):
                mpath = f"{rpath}.matches[{j}]"
                if match.path is not None:
                    errors += _path_value_errors(f"{mpath}.path", match.path)
                named: list[tuple[str, list[str]]] = [
                    ("headers", [h.name.lower() for h in match.headers]),
                    ("queryParams", [q.name for q in match.query_params]),
                ]
                for what, names in named:
                    seen: set[str] = set()
                    for k, name in enumerate(names):
                        if name in seen:
                            errors.append(FieldError(f"{mpath}.{what}[{k}].name", f"duplicate name {name!r}"))
                        seen.add(name)
            errors += _filters_errors(f"{rpath}.filters", rule.filters, rule)
            for j, ref in enumerate(rule.backend_refs):
                bpath = f"{rpath}.backendRefs[{j}]"
                if ref.kind == "Service" and ref.group == "" and ref.port is None:
                    errors.append(FieldError(f"{bpath}.port", "required when the backend is a Service"))
                errors += _filters_errors(f"{bpath}.filters", ref.filters, None)
            t = rule.timeouts
            if t is not None and t.request and t.backend_request:
                request = gateway_duration_seconds(t.request)
                if request != 0 and gateway_duration_seconds(t.backend_request) > request:
                    errors.append(
                        FieldError(
                            f"{rpath}.timeouts.backendRequest", "must not be greater than timeouts.request"
                        )
                    )
        return errors


# ------------------------------------------------------------------------------------- ReferenceGrant
def _core(group: str) -> str:
    return "" if group == "core" else group


class ReferenceGrantFrom(Model):
    """Who may refer: objects of ``group``/``kind`` in ``namespace``."""

    group: str = Field(max_length=253, pattern=_GROUP)
    kind: str = Field(min_length=1, max_length=63, pattern=_KIND)
    namespace: str = Field(min_length=1, max_length=63)


class ReferenceGrantTo(Model):
    """What they may refer to in the grant's namespace: every ``group``/``kind`` object, or the one named."""

    group: str = Field(max_length=253, pattern=_GROUP)
    kind: str = Field(min_length=1, max_length=63, pattern=_KIND)
    name: str | None = Field(default=None, min_length=1, max_length=253)


class ReferenceGrantSpec(Model):
    from_: list[ReferenceGrantFrom] = Field(alias="from", min_length=1, max_length=16)
    to: list[ReferenceGrantTo] = Field(min_length=1, max_length=16)


@register
class ReferenceGrant(Resource):
    """Consent, in the referred-to namespace, to references from another namespace.

    Gateway API makes every cross-namespace reference (an HTTPRoute's backendRef to a Service in another
    namespace, say) need one in the target's namespace, so a team cannot send its traffic into another
    team's Service, or mirror to it, without that team's say. Deleting the grant revokes the reference.
    """

    KIND: ClassVar[str] = "ReferenceGrant"
    GROUP: ClassVar[str] = GATEWAY_GROUP
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1beta1", "v1")
    NAMESPACED: ClassVar[bool] = True
    PLURAL: ClassVar[str] = "referencegrants"

    spec: ReferenceGrantSpec

    def permits(
        self, from_group: str, from_kind: str, from_ns: str, to_group: str, to_kind: str, name: str
    ) -> bool:
        """Whether this grant lets a ``from_kind`` in ``from_ns`` refer to ``to_kind`` ``name`` here."""
        return any(
            _core(f.group) == _core(from_group) and f.kind == from_kind and f.namespace == from_ns
            for f in self.spec.from_
        ) and any(
            _core(t.group) == _core(to_group) and t.kind == to_kind and t.name in (None, name)
            for t in self.spec.to
        )
