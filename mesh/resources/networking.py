"""``networking.istio.io``: VirtualService, DestinationRule, ServiceEntry and WorkloadEntry.

Field names, defaults and enum values follow Istio's protos (``networking/v1alpha3/*.proto``); v1,
v1beta1 and v1alpha3 share one schema upstream, so one class serves every version. ``semantic_errors``
mirrors Istio's validating webhook and CRD rules, each error naming its field path.

``HTTPRoute`` (a VirtualService rule) and ``ServicePort`` (a ServiceEntry port) share names with Gateway
API and core kinds, so they are left out of ``__all__``: import them from this module by name.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, ClassVar

from pydantic import BeforeValidator, Field

from istiopy.mesh.errors import FieldError
from istiopy.mesh.kinds import register
from istiopy.mesh.meta import Model, Resource
from istiopy.mesh.resources.common import (
    AddressStr,
    Delegate,
    Duration,
    NotNull,
    Percent,
    PortSelector,
    PositiveDuration,
    StringMatch,
    WorkloadSelector,
    WorkloadSelectorLabels,
    check_enum,
    export_to_errors,
    is_cidr,
    is_dns1123_label,
    is_fqdn,
    is_ip,
    is_ip_or_cidr,
    port_errors,
    selector_label_errors,
)

__all__ = [
    "ClientTLSSettings",
    "ConnectionPoolSettings",
    "CorsPolicy",
    "Destination",
    "DestinationRule",
    "DestinationRuleSpec",
    "HTTPDirectResponse",
    "HTTPFaultInjection",
    "HTTPMatchRequest",
    "HTTPMirrorPolicy",
    "HTTPRedirect",
    "HTTPRetry",
    "HTTPRewrite",
    "HTTPRouteDestination",
    "HeaderOperations",
    "Headers",
    "L4MatchAttributes",
    "LoadBalancerSettings",
    "LocalityLoadBalancerSetting",
    "OutlierDetection",
    "PortTrafficPolicy",
    "Resolution",
    "RouteDestination",
    "ServiceEntry",
    "ServiceEntryLocation",
    "ServiceEntrySpec",
    "SimpleLB",
    "Subset",
    "TCPRoute",
    "TLSMatchAttributes",
    "TLSMode",
    "TLSRoute",
    "TrafficPolicy",
    "VirtualService",
    "VirtualServiceSpec",
    "WorkloadEntry",
    "WorkloadEntrySpec",
]

_NETWORKING = "networking.istio.io"
_VERSIONS = ("v1", "v1beta1", "v1alpha3")


def _weights_errors(path: str, weights: list[int]) -> list[FieldError]:
    """Weights are relative (istiod normalises them); negative weights and an all-zero split are refused."""
    errors = [
        FieldError(f"{path}[{i}].weight", "weight must not be negative")
        for i, w in enumerate(weights)
        if w < 0
    ]
    if len(weights) > 1 and sum(w for w in weights if w > 0) == 0:
        errors.append(
            FieldError(path, "total destination weight = 0: at least one destination needs a weight")
        )
    return errors


def _host_errors(path: str, host: str, allow_wildcard: bool = True) -> list[FieldError]:
    if not host:
        return [FieldError(path, "Required value")]
    if host == "*":
        return [] if allow_wildcard else [FieldError(path, "hostname cannot be wildcard")]
    if is_ip(host) or is_fqdn(host, allow_wildcard=allow_wildcard):
        return []
    return [FieldError(path, f"invalid host {host!r}")]


# ---------------------------------------------------------------------------------------------------------
# VirtualService
# ---------------------------------------------------------------------------------------------------------


class Destination(Model):
    """A service in the registry by FQDN or short name, optionally a DestinationRule subset and a port."""

    host: str = ""
    subset: str = ""
    port: PortSelector | None = None


class HeaderOperations(Model):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Headers(Model):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPMatchRequest(Model):
    """Conditions on an HTTP request; all set fields must match (AND); a route's match list is OR-ed."""

    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    port: int = 0
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, StringMatch] = Field(default_factory=dict)
    source_namespace: str = ""
    stat_prefix: str = ""


class HTTPRouteDestination(Model):
    destination: Destination
    weight: int = 0
    headers: Headers | None = None


class RedirectPortSelection(enum.StrEnum):
    FROM_PROTOCOL_DEFAULT = "FROM_PROTOCOL_DEFAULT"
    FROM_REQUEST_PORT = "FROM_REQUEST_PORT"


class HTTPRedirect(Model):
    uri: str = ""
    authority: str = ""
    port: int | None = None
    derive_port: (
        Annotated[RedirectPortSelection, BeforeValidator(check_enum(RedirectPortSelection))] | None
    ) = None
    scheme: str = ""
    redirect_code: int = 0


class HTTPBody(Model):
    string: str | None = None
    bytes: str | None = None  # base64 in JSON form


class HTTPDirectResponse(Model):
    status: int = 0
    body: HTTPBody | None = None


class RegexRewrite(Model):
    match: str = ""
    rewrite: str = ""


class HTTPRewrite(Model):
    uri: str = ""
    authority: str = ""
    uri_regex_rewrite: RegexRewrite | None = None


class HTTPRetry(Model):
    """Retries: ``attempts`` extra tries, each bounded by ``perTryTimeout``; ``retryOn`` Envoy conditions."""

    attempts: int = 0
    per_try_timeout: PositiveDuration | None = None
    retry_on: str = ""
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: PositiveDuration | None = None


class FaultDelay(Model):
    fixed_delay: PositiveDuration | None = None
    exponential_delay: PositiveDuration | None = None
    percentage: Percent | None = None
    percent: int | None = None  # deprecated integer form


class FaultAbort(Model):
    http_status: int | None = None
    grpc_status: str | None = None
    http2_error: str | None = None
    percentage: Percent | None = None


class HTTPFaultInjection(Model):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class HTTPMirrorPolicy(Model):
    destination: Destination
    percentage: Percent | None = None


class UnmatchedPreflights(enum.StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    FORWARD = "FORWARD"
    IGNORE = "IGNORE"


class CorsPolicy(Model):
    allow_origins: list[StringMatch] = Field(default_factory=list)
    allow_origin: list[str] = Field(default_factory=list)  # deprecated exact-match form
    allow_methods: list[str] = Field(default_factory=list)
    allow_headers: list[str] = Field(default_factory=list)
    expose_headers: list[str] = Field(default_factory=list)
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: (
        Annotated[UnmatchedPreflights, BeforeValidator(check_enum(UnmatchedPreflights))] | None
    ) = None


class HTTPRoute(Model):
    """One HTTP rule: matches, then route / redirect / directResponse / delegate plus per-route policies."""

    name: str = ""
    match: list[Annotated[HTTPMatchRequest, NotNull]] = Field(default_factory=list)
    route: list[Annotated[HTTPRouteDestination, NotNull]] = Field(default_factory=list)
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: list[HTTPMirrorPolicy] = Field(default_factory=list)
    mirror_percentage: Percent | None = None
    mirror_percent: int | None = None  # deprecated integer form
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None


class L4MatchAttributes(Model):
    destination_subnets: list[AddressStr] = Field(default_factory=list)
    port: int = 0
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: str = ""


class TLSMatchAttributes(Model):
    sni_hosts: list[str] = Field(default_factory=list)
    destination_subnets: list[AddressStr] = Field(default_factory=list)
    port: int = 0
    source_labels: dict[str, str] = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: str = ""


class RouteDestination(Model):
    destination: Destination
    weight: int = 0


class TCPRoute(Model):
    match: list[Annotated[L4MatchAttributes, NotNull]] = Field(default_factory=list)
    route: list[Annotated[RouteDestination, NotNull]] = Field(default_factory=list)


class TLSRoute(Model):
    match: list[Annotated[TLSMatchAttributes, NotNull]] = Field(default_factory=list)
    route: list[Annotated[RouteDestination, NotNull]] = Field(default_factory=list)


class VirtualServiceSpec(Model):
    hosts: list[str] = Field(default_factory=list)
    gateways: list[str] = Field(default_factory=list)
    http: list[Annotated[HTTPRoute, NotNull]] = Field(default_factory=list)
    tls: list[Annotated[TLSRoute, NotNull]] = Field(default_factory=list)
    tcp: list[Annotated[TCPRoute, NotNull]] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)


# Envoy ``x-envoy-retry-on`` / ``x-envoy-retry-grpc-on`` conditions istiod passes through.
_RETRY_ON = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
        "retriable-headers",
        "http3-post-connect-failure",
        "cancelled",
        "deadline-exceeded",
        "internal",
        "resource-exhausted",
        "unavailable",
    }
)
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})


def _destination_errors(path: str, d: Destination) -> list[FieldError]:
    errors = _host_errors(f"{path}.host", d.host)
    if d.subset and not is_dns1123_label(d.subset):
        errors.append(FieldError(f"{path}.subset", f"subset name is invalid: {d.subset!r}"))
    if d.port is not None:
        errors.extend(port_errors(f"{path}.port.number", d.port.number))
    return errors


def _string_match_map_errors(path: str, headers: dict[str, StringMatch]) -> list[FieldError]:
    errors: list[FieldError] = []
    for name in headers:
        if not name:
            errors.append(FieldError(path, "header name must not be empty"))
        elif name != name.lower():
            errors.append(FieldError(f"{path}[{name}]", f"header match {name} must be lowercase"))
    return errors


def _match_errors(path: str, m: HTTPMatchRequest) -> list[FieldError]:
    errors: list[FieldError] = []
    errors.extend(_string_match_map_errors(f"{path}.headers", m.headers))
    errors.extend(_string_match_map_errors(f"{path}.withoutHeaders", m.without_headers))
    if m.port:
        errors.extend(port_errors(f"{path}.port", m.port))
    if m.source_labels:
        errors.extend(selector_label_errors(f"{path}.sourceLabels", m.source_labels))
    if m.uri is not None and m.uri.regex is None and m.uri.exact is None and m.uri.prefix is None:
        errors.append(FieldError(f"{path}.uri", "one of exact, prefix or regex must be set"))
    return errors


def _retry_errors(path: str, r: HTTPRetry) -> list[FieldError]:
    errors: list[FieldError] = []
    if r.attempts < 0:
        errors.append(FieldError(f"{path}.attempts", "attempts cannot be negative"))
    for cond in filter(None, (c.strip() for c in r.retry_on.split(","))):
        if cond not in _RETRY_ON and not (cond.isdigit() and 100 <= int(cond) <= 599):
            errors.append(FieldError(f"{path}.retryOn", f"{cond!r} is not a valid retryOn value"))
    return errors


def _fault_errors(path: str, f: HTTPFaultInjection) -> list[FieldError]:
    errors: list[FieldError] = []
    if f.delay is None and f.abort is None:
        errors.append(FieldError(path, "fault must have at least one of delay or abort"))
    if f.delay is not None:
        if (f.delay.fixed_delay is None) == (f.delay.exponential_delay is None):
            errors.append(
                FieldError(f"{path}.delay", "exactly one of fixedDelay or exponentialDelay must be set")
            )
        if f.delay.percent is not None and not 0 <= f.delay.percent <= 100:
            errors.append(FieldError(f"{path}.delay.percent", "percentage must be in range 0..100"))
    if f.abort is not None:
        kinds = [k for k in ("http_status", "grpc_status", "http2_error") if getattr(f.abort, k) is not None]
        if len(kinds) != 1:
            errors.append(
                FieldError(f"{path}.abort", "exactly one of httpStatus, grpcStatus or http2Error must be set")
            )
        if f.abort.http_status is not None and not 200 <= f.abort.http_status <= 599:
            errors.append(FieldError(f"{path}.abort.httpStatus", "httpStatus must be in range 200..599"))
    return errors


def _http_route_errors(path: str, r: HTTPRoute, delegate_vs: bool) -> list[FieldError]:
    errors: list[FieldError] = []
    actions = [
        n
        for n, v in (("route", r.route), ("redirect", r.redirect), ("directResponse", r.direct_response))
        if v
    ]
    if r.delegate is not None:
        if delegate_vs:
            errors.append(FieldError(f"{path}.delegate", "delegate VirtualService cannot itself delegate"))
        if actions:
            errors.append(
                FieldError(
                    f"{path}.delegate", f"delegate must be the only action (found {', '.join(actions)})"
                )
            )
        if not r.delegate.name:
            errors.append(FieldError(f"{path}.delegate.name", "Required value"))
        elif not is_dns1123_label(r.delegate.name) and not is_fqdn(r.delegate.name):
            errors.append(FieldError(f"{path}.delegate.name", f"invalid name {r.delegate.name!r}"))
    elif not actions:
        errors.append(FieldError(path, "HTTP route, redirect, direct response or delegate is required"))
    elif len(actions) > 1:
        errors.append(
            FieldError(
                path, f"only one of route, redirect or directResponse may be set ({', '.join(actions)})"
            )
        )
    if r.rewrite is not None and r.redirect is not None:
        errors.append(FieldError(f"{path}.rewrite", "rewrite may not be used with redirect"))
    if r.rewrite is not None and r.rewrite.uri and r.rewrite.uri_regex_rewrite is not None:
        errors.append(FieldError(f"{path}.rewrite", "only one of uri or uriRegexRewrite may be set"))
    if r.rewrite is not None and r.rewrite.uri_regex_rewrite is not None:
        try:
            re.compile(r.rewrite.uri_regex_rewrite.match)
        except re.error as err:
            errors.append(FieldError(f"{path}.rewrite.uriRegexRewrite.match", f"invalid regex: {err}"))
    for i, m in enumerate(r.match):
        errors.extend(_match_errors(f"{path}.match[{i}]", m))
    for i, d in enumerate(r.route):
        errors.extend(_destination_errors(f"{path}.route[{i}].destination", d.destination))
    errors.extend(_weights_errors(f"{path}.route", [d.weight for d in r.route]))
    if r.redirect is not None:
        rd = r.redirect
        if rd.redirect_code and rd.redirect_code not in _REDIRECT_CODES:
            errors.append(
                FieldError(
                    f"{path}.redirect.redirectCode", f"{rd.redirect_code} is not a valid redirect code"
                )
            )
        if rd.port is not None and rd.derive_port is not None:
            errors.append(FieldError(f"{path}.redirect", "only one of port or derivePort may be set"))
        if rd.port is not None:
            errors.extend(port_errors(f"{path}.redirect.port", rd.port))
    if r.direct_response is not None:
        dr = r.direct_response
        if not 200 <= dr.status <= 599:
            errors.append(
                FieldError(f"{path}.directResponse.status", "status must be in the range 200 - 599")
            )
        if dr.body is not None and dr.body.string is not None and dr.body.bytes is not None:
            errors.append(FieldError(f"{path}.directResponse.body", "only one of string or bytes may be set"))
    if r.retries is not None:
        errors.extend(_retry_errors(f"{path}.retries", r.retries))
    if r.fault is not None:
        errors.extend(_fault_errors(f"{path}.fault", r.fault))
    if r.mirror is not None:
        errors.extend(_destination_errors(f"{path}.mirror", r.mirror))
        if r.mirrors:
            errors.append(FieldError(f"{path}.mirrors", "only one of mirror or mirrors may be set"))
    for i, mp in enumerate(r.mirrors):
        errors.extend(_destination_errors(f"{path}.mirrors[{i}].destination", mp.destination))
    if r.mirror_percent is not None and not 0 <= r.mirror_percent <= 100:
        errors.append(FieldError(f"{path}.mirrorPercent", "percentage must be in range 0..100"))
    return errors


def _l4_routes_errors(path: str, route: list[RouteDestination]) -> list[FieldError]:
    errors: list[FieldError] = []
    if not route:
        errors.append(FieldError(f"{path}.route", "Required value: at least one route destination"))
    for i, d in enumerate(route):
        errors.extend(_destination_errors(f"{path}.route[{i}].destination", d.destination))
    errors.extend(_weights_errors(f"{path}.route", [d.weight for d in route]))
    return errors


def _subnet_errors(path: str, subnets: list[str]) -> list[FieldError]:
    return [
        FieldError(f"{path}[{i}]", f"invalid IP address or CIDR block: {s!r}")
        for i, s in enumerate(subnets)
        if not is_ip_or_cidr(s)
    ]


@register
class VirtualService(Resource):
    """HTTP/TLS/TCP routing rules for hosts; without ``hosts`` it is a delegate used by another VS."""

    KIND: ClassVar[str] = "VirtualService"
    GROUP: ClassVar[str] = _NETWORKING
    VERSIONS: ClassVar[tuple[str, ...]] = _VERSIONS
    PLURAL: ClassVar[str] = "virtualservices"

    spec: VirtualServiceSpec = Field(default_factory=VirtualServiceSpec)

    @property
    def is_delegate(self) -> bool:
        return not self.spec.hosts

    def semantic_errors(self) -> list[FieldError]:
        s = self.spec
        errors: list[FieldError] = []
        delegate = self.is_delegate
        if delegate:
            if s.gateways:
                errors.append(
                    FieldError("spec.gateways", "delegate VirtualService (no hosts) must have no gateways")
                )
            if s.tcp:
                errors.append(
                    FieldError("spec.tcp", "delegate VirtualService (no hosts) must have no tcp routes")
                )
            if s.tls:
                errors.append(
                    FieldError("spec.tls", "delegate VirtualService (no hosts) must have no tls routes")
                )
        mesh_bound = not s.gateways or "mesh" in s.gateways
        for i, h in enumerate(s.hosts):
            if h == "*" and mesh_bound:
                errors.append(
                    FieldError(
                        f"spec.hosts[{i}]",
                        "wildcard host * is not allowed for virtual services bound to the mesh",
                    )
                )
            else:
                errors.extend(_host_errors(f"spec.hosts[{i}]", h))
        if not s.http and not s.tcp and not s.tls:
            errors.append(FieldError("spec", "http, tcp or tls must be provided in virtual service"))
        for i, r in enumerate(s.http):
            errors.extend(_http_route_errors(f"spec.http[{i}]", r, delegate))
        for i, t in enumerate(s.tcp):
            for j, m in enumerate(t.match):
                errors.extend(
                    _subnet_errors(f"spec.tcp[{i}].match[{j}].destinationSubnets", m.destination_subnets)
                )
                if m.port:
                    errors.extend(port_errors(f"spec.tcp[{i}].match[{j}].port", m.port))
            errors.extend(_l4_routes_errors(f"spec.tcp[{i}]", t.route))
        for i, tl in enumerate(s.tls):
            if not tl.match:
                errors.append(
                    FieldError(f"spec.tls[{i}].match", "TLS route must have at least one match condition")
                )
            for j, tm in enumerate(tl.match):
                p = f"spec.tls[{i}].match[{j}]"
                if not tm.sni_hosts:
                    errors.append(
                        FieldError(
                            f"{p}.sniHosts", "Required value: TLS match must have at least one SNI host"
                        )
                    )
                for k, sni in enumerate(tm.sni_hosts):
                    errors.extend(_host_errors(f"{p}.sniHosts[{k}]", sni))
                errors.extend(_subnet_errors(f"{p}.destinationSubnets", tm.destination_subnets))
                if tm.port:
                    errors.extend(port_errors(f"{p}.port", tm.port))
            errors.extend(_l4_routes_errors(f"spec.tls[{i}]", tl.route))
        errors.extend(export_to_errors("spec.exportTo", s.export_to))
        return errors


# ---------------------------------------------------------------------------------------------------------
# DestinationRule
# ---------------------------------------------------------------------------------------------------------


class SimpleLB(enum.StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    LEAST_CONN = "LEAST_CONN"
    RANDOM = "RANDOM"
    PASSTHROUGH = "PASSTHROUGH"
    ROUND_ROBIN = "ROUND_ROBIN"
    LEAST_REQUEST = "LEAST_REQUEST"


class HTTPCookie(Model):
    name: str = ""
    path: str = ""
    ttl: Duration | None = None
    attributes: list[dict[str, str]] = Field(default_factory=list)


class RingHash(Model):
    minimum_ring_size: int = 0


class MagLev(Model):
    table_size: int = 0


class ConsistentHashLB(Model):
    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: MagLev | None = None
    minimum_ring_size: int | None = None  # deprecated


class LocalityDistribute(Model):
    from_: str = Field(default="", alias="from")
    to: dict[str, int] = Field(default_factory=dict)


class LocalityFailover(Model):
    from_: str = Field(default="", alias="from")
    to: str = ""


class LocalityLoadBalancerSetting(Model):
    distribute: list[LocalityDistribute] = Field(default_factory=list)
    failover: list[LocalityFailover] = Field(default_factory=list)
    failover_priority: list[str] = Field(default_factory=list)
    enabled: bool | None = None


class WarmupConfiguration(Model):
    duration: PositiveDuration | None = None
    minimum_percent: float | None = None
    aggression: float | None = None


class LoadBalancerSettings(Model):
    simple: Annotated[SimpleLB, BeforeValidator(check_enum(SimpleLB))] | None = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLoadBalancerSetting | None = None
    warmup_duration_secs: PositiveDuration | None = None
    warmup: WarmupConfiguration | None = None


class TcpKeepalive(Model):
    probes: int | None = None
    time: PositiveDuration | None = None
    interval: PositiveDuration | None = None


class TCPSettings(Model):
    max_connections: int | None = None
    connect_timeout: PositiveDuration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: PositiveDuration | None = None
    idle_timeout: Duration | None = None


class H2UpgradePolicy(enum.StrEnum):
    DEFAULT = "DEFAULT"
    DO_NOT_UPGRADE = "DO_NOT_UPGRADE"
    UPGRADE = "UPGRADE"


class HTTP2KeepAlive(Model):
    interval: PositiveDuration | None = None
    timeout: PositiveDuration | None = None


class HTTPSettings(Model):
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: Duration | None = None
    h2_upgrade_policy: Annotated[H2UpgradePolicy, BeforeValidator(check_enum(H2UpgradePolicy))] | None = None
    use_client_protocol: bool | None = None
    max_concurrent_streams: int | None = None
    http2_keep_alive: HTTP2KeepAlive | None = None


class ConnectionPoolSettings(Model):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class OutlierDetection(Model):
    """Passive health checking; unset fields take Envoy/Istio defaults (interval 10s, ejection 30s...)."""

    consecutive_errors: int | None = None  # deprecated
    split_external_local_origin_errors: bool | None = None
    consecutive_local_origin_failures: int | None = None
    consecutive_gateway_errors: int | None = None
    consecutive_5xx_errors: int | None = Field(default=None, alias="consecutive5xxErrors")
    interval: PositiveDuration | None = None
    base_ejection_time: PositiveDuration | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int | None = None


class TLSMode(enum.StrEnum):
    DISABLE = "DISABLE"
    SIMPLE = "SIMPLE"
    MUTUAL = "MUTUAL"
    ISTIO_MUTUAL = "ISTIO_MUTUAL"


class ClientTLSSettings(Model):
    mode: Annotated[TLSMode, BeforeValidator(check_enum(TLSMode))] = TLSMode.DISABLE
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    subject_alt_names: list[str] = Field(default_factory=list)
    sni: str = ""
    insecure_skip_verify: bool | None = None
    ca_crl: str = ""


class TunnelSettings(Model):
    protocol: str = ""
    target_host: str = ""
    target_port: int = 0


class ProxyProtocolVersion(enum.StrEnum):
    V1 = "V1"
    V2 = "V2"


class ProxyProtocol(Model):
    version: Annotated[ProxyProtocolVersion, BeforeValidator(check_enum(ProxyProtocolVersion))] = (
        ProxyProtocolVersion.V1
    )


class RetryBudget(Model):
    percent: float | None = None
    min_retry_concurrency: int | None = None


class PortTrafficPolicy(Model):
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TrafficPolicy(Model):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: list[PortTrafficPolicy] = Field(default_factory=list)
    tunnel: TunnelSettings | None = None
    proxy_protocol: ProxyProtocol | None = None
    retry_budget: RetryBudget | None = None


class Subset(Model):
    name: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


class DestinationRuleSpec(Model):
    host: str = ""
    traffic_policy: TrafficPolicy | None = None
    subsets: list[Annotated[Subset, NotNull]] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)
    workload_selector: WorkloadSelector | None = None


def _nonneg(path: str, value: int | None) -> list[FieldError]:
    return [FieldError(path, "must not be negative")] if value is not None and value < 0 else []


def _percent(path: str, value: float | None) -> list[FieldError]:
    if value is not None and not 0 <= value <= 100:
        return [FieldError(path, f"Invalid value: {value}: must be in range 0..100")]
    return []


def _lb_errors(path: str, lb: LoadBalancerSettings) -> list[FieldError]:
    errors: list[FieldError] = []
    if lb.simple is not None and lb.consistent_hash is not None:
        errors.append(FieldError(path, "only one of simple or consistentHash may be set"))
    ch = lb.consistent_hash
    if ch is not None:
        keys = [
            n
            for n, v in (
                ("httpHeaderName", ch.http_header_name),
                ("httpCookie", ch.http_cookie),
                ("useSourceIp", ch.use_source_ip),
                ("httpQueryParameterName", ch.http_query_parameter_name),
            )
            if v is not None
        ]
        if len(keys) != 1:
            errors.append(FieldError(f"{path}.consistentHash", "exactly one hash key must be set"))
        if ch.http_cookie is not None and not ch.http_cookie.name:
            errors.append(FieldError(f"{path}.consistentHash.httpCookie.name", "Required value"))
        if ch.ring_hash is not None and ch.maglev is not None:
            errors.append(FieldError(f"{path}.consistentHash", "only one of ringHash or maglev may be set"))
    loc = lb.locality_lb_setting
    if loc is not None:
        if loc.distribute and loc.failover:
            errors.append(FieldError(f"{path}.localityLbSetting", "cannot set both distribute and failover"))
        for i, d in enumerate(loc.distribute):
            total = sum(d.to.values())
            if total != 100:
                errors.append(
                    FieldError(f"{path}.localityLbSetting.distribute[{i}].to", f"total weight {total} != 100")
                )
        for i, f in enumerate(loc.failover):
            if f.from_ == f.to:
                errors.append(
                    FieldError(f"{path}.localityLbSetting.failover[{i}]", "from and to must differ")
                )
    w = lb.warmup
    if w is not None:
        if w.duration is None:
            errors.append(FieldError(f"{path}.warmup.duration", "Required value"))
        errors.extend(_percent(f"{path}.warmup.minimumPercent", w.minimum_percent))
        if w.aggression is not None and w.aggression < 1:
            errors.append(
                FieldError(f"{path}.warmup.aggression", f"Invalid value: {w.aggression}: must be >= 1")
            )
    return errors


def _pool_errors(path: str, cp: ConnectionPoolSettings) -> list[FieldError]:
    errors: list[FieldError] = []
    if cp.tcp is None and cp.http is None:
        errors.append(FieldError(path, "must have at least one field set (tcp or http)"))
    if cp.tcp is not None:
        errors.extend(_nonneg(f"{path}.tcp.maxConnections", cp.tcp.max_connections))
        if cp.tcp.tcp_keepalive is not None:
            errors.extend(_nonneg(f"{path}.tcp.tcpKeepalive.probes", cp.tcp.tcp_keepalive.probes))
    if cp.http is not None:
        h = cp.http
        for name, v in (
            ("http1MaxPendingRequests", h.http1_max_pending_requests),
            ("http2MaxRequests", h.http2_max_requests),
            ("maxRequestsPerConnection", h.max_requests_per_connection),
            ("maxRetries", h.max_retries),
            ("maxConcurrentStreams", h.max_concurrent_streams),
        ):
            errors.extend(_nonneg(f"{path}.http.{name}", v))
    return errors


def _outlier_errors(path: str, od: OutlierDetection) -> list[FieldError]:
    errors: list[FieldError] = []
    for name, v in (
        ("consecutiveErrors", od.consecutive_errors),
        ("consecutiveLocalOriginFailures", od.consecutive_local_origin_failures),
        ("consecutiveGatewayErrors", od.consecutive_gateway_errors),
        ("consecutive5xxErrors", od.consecutive_5xx_errors),
    ):
        errors.extend(_nonneg(f"{path}.{name}", v))
    errors.extend(_percent(f"{path}.maxEjectionPercent", od.max_ejection_percent))
    errors.extend(_percent(f"{path}.minHealthPercent", od.min_health_percent))
    if od.consecutive_local_origin_failures is not None and not od.split_external_local_origin_errors:
        errors.append(
            FieldError(
                f"{path}.consecutiveLocalOriginFailures",
                "consecutiveLocalOriginFailures requires splitExternalLocalOriginErrors: true",
            )
        )
    return errors


def _tls_errors(path: str, tls: ClientTLSSettings) -> list[FieldError]:
    errors: list[FieldError] = []
    if tls.mode is TLSMode.ISTIO_MUTUAL:
        for name, v in (
            ("clientCertificate", tls.client_certificate),
            ("privateKey", tls.private_key),
            ("caCertificates", tls.ca_certificates),
            ("credentialName", tls.credential_name),
            ("caCrl", tls.ca_crl),
        ):
            if v:
                errors.append(FieldError(f"{path}.{name}", "cannot be set when mode is ISTIO_MUTUAL"))
    elif tls.mode is TLSMode.MUTUAL and not tls.credential_name:
        if not tls.client_certificate:
            errors.append(
                FieldError(f"{path}.clientCertificate", "client certificate required for mutual tls")
            )
        if not tls.private_key:
            errors.append(FieldError(f"{path}.privateKey", "private key required for mutual tls"))
    return errors


def _policy_part_errors(
    path: str,
    lb: LoadBalancerSettings | None,
    cp: ConnectionPoolSettings | None,
    od: OutlierDetection | None,
    tls: ClientTLSSettings | None,
) -> list[FieldError]:
    errors: list[FieldError] = []
    if lb is not None:
        errors.extend(_lb_errors(f"{path}.loadBalancer", lb))
    if cp is not None:
        errors.extend(_pool_errors(f"{path}.connectionPool", cp))
    if od is not None:
        errors.extend(_outlier_errors(f"{path}.outlierDetection", od))
    if tls is not None:
        errors.extend(_tls_errors(f"{path}.tls", tls))
    return errors


def _traffic_policy_errors(path: str, tp: TrafficPolicy) -> list[FieldError]:
    errors: list[FieldError] = []
    parts = (tp.load_balancer, tp.connection_pool, tp.outlier_detection, tp.tls, tp.tunnel, tp.proxy_protocol)
    if all(p is None for p in parts) and tp.retry_budget is None and not tp.port_level_settings:
        errors.append(FieldError(path, "traffic policy must have at least one field"))
    errors.extend(
        _policy_part_errors(path, tp.load_balancer, tp.connection_pool, tp.outlier_detection, tp.tls)
    )
    seen: set[int] = set()
    for i, pl in enumerate(tp.port_level_settings):
        p = f"{path}.portLevelSettings[{i}]"
        if pl.port is None or not pl.port.number:
            errors.append(FieldError(f"{p}.port", "port must be specified"))
        else:
            errors.extend(port_errors(f"{p}.port.number", pl.port.number))
            if pl.port.number in seen:
                errors.append(
                    FieldError(f"{p}.port.number", f"port number {pl.port.number} cannot be duplicated")
                )
            seen.add(pl.port.number)
        errors.extend(
            _policy_part_errors(p, pl.load_balancer, pl.connection_pool, pl.outlier_detection, pl.tls)
        )
    if tp.tunnel is not None:
        if tp.tunnel.protocol not in ("", "CONNECT", "POST"):
            errors.append(FieldError(f"{path}.tunnel.protocol", "tunnel protocol must be CONNECT or POST"))
        if not tp.tunnel.target_host:
            errors.append(FieldError(f"{path}.tunnel.targetHost", "Required value"))
        errors.extend(port_errors(f"{path}.tunnel.targetPort", tp.tunnel.target_port))
    if tp.retry_budget is not None:
        errors.extend(_percent(f"{path}.retryBudget.percent", tp.retry_budget.percent))
    return errors


@register
class DestinationRule(Resource):
    """Policies applied after routing: load balancing, connection pools, outlier detection, TLS, subsets."""

    KIND: ClassVar[str] = "DestinationRule"
    GROUP: ClassVar[str] = _NETWORKING
    VERSIONS: ClassVar[tuple[str, ...]] = _VERSIONS
    PLURAL: ClassVar[str] = "destinationrules"

    spec: DestinationRuleSpec = Field(default_factory=DestinationRuleSpec)

    def semantic_errors(self) -> list[FieldError]:
        s = self.spec
        errors = _host_errors("spec.host", s.host)
        if s.traffic_policy is not None:
            errors.extend(_traffic_policy_errors("spec.trafficPolicy", s.traffic_policy))
        names: set[str] = set()
        for i, sub in enumerate(s.subsets):
            p = f"spec.subsets[{i}]"
            if not sub.name:
                errors.append(FieldError(f"{p}.name", "Required value"))
            elif not is_dns1123_label(sub.name):
                errors.append(FieldError(f"{p}.name", f"subset name is invalid: {sub.name!r}"))
            elif sub.name in names:
                errors.append(FieldError(f"{p}.name", f'Duplicate value: "{sub.name}"'))
            names.add(sub.name)
            errors.extend(selector_label_errors(f"{p}.labels", sub.labels))
            if sub.traffic_policy is not None:
                errors.extend(_traffic_policy_errors(f"{p}.trafficPolicy", sub.traffic_policy))
        if s.workload_selector is not None:
            errors.extend(
                selector_label_errors("spec.workloadSelector.matchLabels", s.workload_selector.match_labels)
            )
        errors.extend(export_to_errors("spec.exportTo", s.export_to))
        return errors

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.spec.subsets if s.name == name), None)


# ---------------------------------------------------------------------------------------------------------
# WorkloadEntry (also the endpoint form inside ServiceEntry)
# ---------------------------------------------------------------------------------------------------------

_PORT_NAME = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9_.]*[a-zA-Z0-9])?$")


class WorkloadEntrySpec(Model):
    """A non-Kubernetes workload (VM, external endpoint): its address, named ports, labels and identity."""

    address: str = ""
    ports: dict[str, int] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    network: str = ""
    locality: str = ""
    weight: int = 0
    service_account: str = ""

    @property
    def is_uds(self) -> bool:
        return self.address.startswith("unix://")


def workload_entry_errors(path: str, we: WorkloadEntrySpec, fqdn_ok: bool = True) -> list[FieldError]:
    """Address forms: IP, DNS name, ``unix:///abs/path`` or ``unix://@abstract``; empty needs a network."""
    errors: list[FieldError] = []
    addr = we.address
    if not addr:
        if not we.network:
            errors.append(FieldError(f"{path}.address", "Address is required (unless network is set)"))
    elif addr.startswith("unix://"):
        sock = addr[len("unix://") :]
        if not sock.startswith("/") and not sock.startswith("@"):
            errors.append(FieldError(f"{path}.address", "UDS must be an absolute path or abstract socket"))
        elif sock.endswith("/"):
            errors.append(FieldError(f"{path}.address", "UDS may not be a dir"))
        if we.ports:
            errors.append(FieldError(f"{path}.ports", "UDS may not include ports"))
    elif not is_ip(addr) and not (fqdn_ok and is_fqdn(addr)):
        what = "IP address or DNS name" if fqdn_ok else "IP address"
        errors.append(FieldError(f"{path}.address", f"invalid address {addr!r}: must be an {what}"))
    for name, number in we.ports.items():
        if not _PORT_NAME.match(name) or len(name) > 63:
            errors.append(
                FieldError(f"{path}.ports", f"Invalid value: port name {name!r} is not a valid name")
            )
        errors.extend(port_errors(f"{path}.ports[{name}]", number))
    if we.weight < 0:
        errors.append(FieldError(f"{path}.weight", "must not be negative"))
    if we.locality and we.locality.count("/") > 2:
        errors.append(FieldError(f"{path}.locality", "locality is region/zone/subzone"))
    if we.service_account and not is_dns1123_label(we.service_account) and not is_fqdn(we.service_account):
        errors.append(
            FieldError(f"{path}.serviceAccount", f"invalid service account name {we.service_account!r}")
        )
    return errors


@register
class WorkloadEntry(Resource):
    KIND: ClassVar[str] = "WorkloadEntry"
    GROUP: ClassVar[str] = _NETWORKING
    VERSIONS: ClassVar[tuple[str, ...]] = _VERSIONS
    PLURAL: ClassVar[str] = "workloadentries"

    spec: WorkloadEntrySpec

    def semantic_errors(self) -> list[FieldError]:
        return workload_entry_errors("spec", self.spec)


# ---------------------------------------------------------------------------------------------------------
# ServiceEntry
# ---------------------------------------------------------------------------------------------------------


class ServiceEntryLocation(enum.StrEnum):
    MESH_EXTERNAL = "MESH_EXTERNAL"
    MESH_INTERNAL = "MESH_INTERNAL"


class Resolution(enum.StrEnum):
    NONE = "NONE"
    STATIC = "STATIC"
    DNS = "DNS"
    DNS_ROUND_ROBIN = "DNS_ROUND_ROBIN"


class ServicePort(Model):
    number: int
    protocol: str = ""
    name: str
    target_port: int = 0


# Protocols istiod recognises in a port's ``protocol`` (case-insensitive), ``protocol.Parse``.
_PROTOCOLS = frozenset(
    {
        "grpc",
        "grpc-web",
        "http",
        "http_proxy",
        "http2",
        "https",
        "tcp",
        "tls",
        "udp",
        "mongo",
        "redis",
        "mysql",
    }
)


class ServiceEntrySpec(Model):
    hosts: list[str] = Field(default_factory=list)
    addresses: list[AddressStr] = Field(default_factory=list)
    ports: list[Annotated[ServicePort, NotNull]] = Field(default_factory=list)
    location: Annotated[ServiceEntryLocation, BeforeValidator(check_enum(ServiceEntryLocation))] = (
        ServiceEntryLocation.MESH_EXTERNAL
    )
    resolution: Annotated[Resolution, BeforeValidator(check_enum(Resolution))] = Resolution.NONE
    endpoints: list[Annotated[WorkloadEntrySpec, NotNull]] = Field(default_factory=list)
    workload_selector: WorkloadSelectorLabels | None = None
    export_to: list[str] = Field(default_factory=list)
    subject_alt_names: list[str] = Field(default_factory=list)


@register
class ServiceEntry(Resource):
    """A service added to the mesh registry: external APIs, VMs (via workloadSelector) or static endpoints."""

    KIND: ClassVar[str] = "ServiceEntry"
    GROUP: ClassVar[str] = _NETWORKING
    VERSIONS: ClassVar[tuple[str, ...]] = _VERSIONS
    PLURAL: ClassVar[str] = "serviceentries"

    spec: ServiceEntrySpec

    def semantic_errors(self) -> list[FieldError]:
        s = self.spec
        errors: list[FieldError] = []
        if not s.hosts:
            errors.append(FieldError("spec.hosts", "Required value"))
        seen_hosts: set[str] = set()
        for i, h in enumerate(s.hosts):
            errors.extend(_host_errors(f"spec.hosts[{i}]", h, allow_wildcard=h != "*"))
            if h in seen_hosts:
                errors.append(FieldError(f"spec.hosts[{i}]", f'Duplicate value: "{h}"'))
            seen_hosts.add(h)
        for i, a in enumerate(s.addresses):
            if not is_ip_or_cidr(a):
                errors.append(
                    FieldError(f"spec.addresses[{i}]", f"invalid address {a!r}: must be an IP or CIDR")
                )
            elif is_cidr(a) and s.resolution not in (Resolution.NONE, Resolution.STATIC):
                errors.append(
                    FieldError(
                        f"spec.addresses[{i}]",
                        "CIDR addresses are allowed only for NONE/STATIC resolution types",
                    )
                )
        names: set[str] = set()
        numbers: set[int] = set()
        for i, port in enumerate(s.ports):
            p = f"spec.ports[{i}]"
            if port.name in names:
                errors.append(FieldError(f"{p}.name", f'Duplicate value: "{port.name}"'))
            names.add(port.name)
            if not port.name or not _PORT_NAME.match(port.name):
                errors.append(FieldError(f"{p}.name", f"invalid port name {port.name!r}"))
            if port.number in numbers:
                errors.append(FieldError(f"{p}.number", f"port number cannot be duplicated: {port.number}"))
            numbers.add(port.number)
            errors.extend(port_errors(f"{p}.number", port.number))
            if port.target_port:
                errors.extend(port_errors(f"{p}.targetPort", port.target_port))
            if port.protocol and port.protocol.lower() not in _PROTOCOLS:
                errors.append(FieldError(f"{p}.protocol", f"unrecognized protocol {port.protocol!r}"))
        if s.workload_selector is not None:
            errors.extend(selector_label_errors("spec.workloadSelector.labels", s.workload_selector.labels))
            if s.endpoints:
                errors.append(
                    FieldError("spec.endpoints", "only one of WorkloadSelector or Endpoints can be set")
                )
        if s.resolution is Resolution.NONE and s.endpoints:
            errors.append(FieldError("spec.endpoints", "NONE mode cannot set endpoints"))
        if s.resolution is Resolution.DNS_ROUND_ROBIN and len(s.endpoints) > 1:
            errors.append(FieldError("spec.endpoints", "DNS_ROUND_ROBIN mode cannot have multiple endpoints"))
        if s.resolution in (Resolution.DNS, Resolution.DNS_ROUND_ROBIN) and not s.endpoints:
            for i, h in enumerate(s.hosts):
                if h.startswith("*"):
                    errors.append(
                        FieldError(
                            f"spec.hosts[{i}]", f"wildcard host {h!r} cannot be resolved with {s.resolution}"
                        )
                    )
        for i, ep in enumerate(s.endpoints):
            p = f"spec.endpoints[{i}]"
            errors.extend(workload_entry_errors(p, ep, fqdn_ok=s.resolution is not Resolution.STATIC))
            for name in ep.ports:
                if s.ports and name not in names:
                    errors.append(
                        FieldError(
                            f"{p}.ports[{name}]",
                            f"endpoint port {name!r} is not defined by the service entry",
                        )
                    )
        errors.extend(export_to_errors("spec.exportTo", s.export_to))
        return errors
