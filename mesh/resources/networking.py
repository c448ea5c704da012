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
    is_dns1123_label,
    is_fqdn,
    is_ip,
    is_ip_or_cidr,
    label_errors,
    parse_duration,
    port_errors,
    regex_errors,
    selector_label_errors,
    string_match_errors,
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
    max_age: PositiveDuration | None = None
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
    timeout: PositiveDuration | None = None
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


# Envoy ``retry_on`` conditions istiod accepts (plus any HTTP status code).
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
_GRPC_STATUS = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
_CORS_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "CONNECT", "TRACE"})
_HTTP_STATUS_CODES = frozenset(
    {100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 307}
    | {308, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 418}
    | {
        421,
        422,
        423,
        424,
        425,
        426,
        428,
        429,
        431,
        451,
        500,
        501,
        502,
        503,
        504,
        505,
        506,
        507,
        508,
        510,
        511,
    }
)
_HEADER_NAME = re.compile(r"^[-_A-Za-z0-9]+$")
_JWT_CLAIM_ROUTE = "@request.auth.claims."
_MAX_DIRECT_RESPONSE = 1024 * 1024


def _gateway_name_errors(path: str, names: list[str]) -> list[FieldError]:
    """``mesh``, ``name``, ``name.namespace`` (legacy) or ``namespace/name``."""
    errors: list[FieldError] = []
    for i, name in enumerate(names):
        ns, slash, gw = name.partition("/")
        if not slash:
            if not is_fqdn(name):
                errors.append(FieldError(f"{path}[{i}]", f"invalid gateway name {name!r}"))
        elif not ns or not gw:
            errors.append(FieldError(f"{path}[{i}]", "config namespace and gateway name cannot be empty"))
        elif not is_dns1123_label(ns):
            errors.append(FieldError(f"{path}[{i}]", f"invalid value for namespace: {ns!r}"))
        elif not is_dns1123_label(gw):
            errors.append(FieldError(f"{path}[{i}]", f"invalid value for gateway name: {gw!r}"))
    return errors


def _destination_errors(path: str, d: Destination) -> list[FieldError]:
    if d.host == "*":
        errors = [FieldError(f"{path}.host", "invalid destination host *")]
    else:
        errors = _host_errors(f"{path}.host", d.host)
    if d.subset and not is_dns1123_label(d.subset):
        errors.append(FieldError(f"{path}.subset", f"subset name is invalid: {d.subset!r}"))
    if d.port is not None:
        errors.extend(port_errors(f"{path}.port.number", d.port.number))
    return errors


def _weights_errors(path: str, weights: list[int]) -> list[FieldError]:
    """Weights are relative (istiod normalises them); negative weights and an all-zero split are refused."""
    errors = [
        FieldError(f"{path}[{i}].weight", f"weight {w} must not be negative")
        for i, w in enumerate(weights)
        if w < 0
    ]
    if len(weights) > 1 and sum(weights) == 0:
        errors.append(
            FieldError(path, "total destination weight = 0: at least one destination needs a weight")
        )
    return errors


def _header_name_ok(name: str) -> bool:
    return bool(_HEADER_NAME.match(name))


def _header_ops_errors(path: str, headers: Headers | None) -> list[FieldError]:
    """Header names must be tokens; pseudo-headers and Host may not be changed, except that the request's
    authority may be set (``:authority`` / ``host``) in one place only."""
    if headers is None:
        return []
    errors: list[FieldError] = []
    for side, ops in (("request", headers.request), ("response", headers.response)):
        if ops is None:
            continue
        for verb, names in (("set", list(ops.set)), ("add", list(ops.add)), ("remove", ops.remove)):
            for name in names:
                p = f"{path}.{side}.{verb}[{name}]" if verb != "remove" else f"{path}.{side}.remove"
                authority = name.lower() in (":authority", "host")
                if authority and side == "request" and verb in ("set", "add"):
                    continue
                if not name:
                    errors.append(FieldError(p, "header name cannot be empty"))
                elif name.startswith(":") or name.lower() == "host":
                    errors.append(
                        FieldError(p, f"invalid header {name!r}: pseudo-headers and host cannot be changed")
                    )
                elif not _header_name_ok(name):
                    errors.append(FieldError(p, f"header name {name!r} is not a valid header name"))
        for name, value in (*ops.set.items(), *ops.add.items()):
            if "\r" in value or "\n" in value or "\x00" in value:
                errors.append(FieldError(f"{path}.{side}", f"invalid value for header {name!r}"))
    return errors


def _authority_rewrite_errors(path: str, r: HTTPRoute) -> list[FieldError]:
    current = r.rewrite.authority if r.rewrite is not None else ""
    req = r.headers.request if r.headers is not None else None
    if req is None:
        return []
    for name, value in (*req.set.items(), *req.add.items()):
        if name.lower() not in (":authority", "host"):
            continue
        if current:
            return [
                FieldError(
                    f"{path}.headers.request", f"authority header cannot be set multiple times: {value!r}"
                )
            ]
        current = value
    return []


def _match_errors(path: str, m: HTTPMatchRequest, gateway_bound: bool) -> list[FieldError]:
    errors: list[FieldError] = []
    for field, headers in (("headers", m.headers), ("withoutHeaders", m.without_headers)):
        for name, sm in headers.items():
            p = f"{path}.{field}[{name}]"
            if name.startswith(_JWT_CLAIM_ROUTE):
                if not gateway_bound:
                    errors.append(FieldError(p, "JWT claim based routing is only supported for gateways"))
            elif not _header_name_ok(name):
                errors.append(FieldError(p, f"header name {name!r} is not a valid header name"))
            if field == "withoutHeaders" and sm.regex == "*":
                continue  # "*" means "absent", not a regex
            errors.extend(string_match_errors(p, sm))
    errors.extend(string_match_errors(f"{path}.uri", m.uri, allow_empty_prefix=True))
    errors.extend(string_match_errors(f"{path}.scheme", m.scheme))
    errors.extend(string_match_errors(f"{path}.method", m.method))
    errors.extend(string_match_errors(f"{path}.authority", m.authority))
    for name, sm in m.query_params.items():
        errors.extend(string_match_errors(f"{path}.queryParams[{name}]", sm))
    if m.port:
        errors.extend(port_errors(f"{path}.port", m.port))
    errors.extend(label_errors(f"{path}.sourceLabels", m.source_labels))
    errors.extend(_gateway_name_errors(f"{path}.gateways", m.gateways))
    if m.source_namespace and not is_dns1123_label(m.source_namespace):
        errors.append(
            FieldError(f"{path}.sourceNamespace", f"sourceNamespace match {m.source_namespace} is invalid")
        )
    return errors


def _retry_errors(path: str, r: HTTPRetry) -> list[FieldError]:
    errors: list[FieldError] = []
    if r.attempts < 0:
        errors.append(FieldError(f"{path}.attempts", "attempts cannot be negative"))
    if r.attempts == 0 and (
        r.per_try_timeout is not None or r.retry_on or r.retry_remote_localities is not None
    ):
        errors.append(FieldError(path, "http retry policy configured when attempts are set to 0 (disabled)"))
    for cond in r.retry_on.split(",") if r.retry_on else []:
        if cond not in _RETRY_ON and not (cond.isdigit() and int(cond) in _HTTP_STATUS_CODES):
            errors.append(FieldError(f"{path}.retryOn", f"{cond!r} is not a valid retryOn policy"))
    return errors


def _fault_errors(path: str, f: HTTPFaultInjection) -> list[FieldError]:
    errors: list[FieldError] = []
    if f.delay is None and f.abort is None:
        errors.append(FieldError(path, "HTTP fault injection must have an abort and/or a delay"))
    if f.delay is not None:
        if f.delay.exponential_delay is not None:
            errors.append(FieldError(f"{path}.delay.exponentialDelay", "exponentialDelay not supported yet"))
        if f.delay.percent is not None and not 0 <= f.delay.percent <= 100:
            errors.append(FieldError(f"{path}.delay.percent", "percentage must be in range 0..100"))
    if f.abort is not None:
        a = f.abort
        kinds = [k for k in ("http_status", "grpc_status", "http2_error") if getattr(a, k) is not None]
        if len(kinds) > 1:
            errors.append(
                FieldError(f"{path}.abort", "only one of httpStatus, grpcStatus or http2Error may be set")
            )
        if a.http_status is not None and not 200 <= a.http_status <= 600:
            errors.append(
                FieldError(f"{path}.abort.httpStatus", f"HTTP status {a.http_status} is not in range 200-599")
            )
        if a.grpc_status is not None and a.grpc_status not in _GRPC_STATUS:
            errors.append(
                FieldError(f"{path}.abort.grpcStatus", f"gRPC status {a.grpc_status!r} is not supported")
            )
        if a.http2_error is not None:
            errors.append(
                FieldError(f"{path}.abort.http2Error", "HTTP/2 abort fault injection not supported yet")
            )
    return errors


def _redirect_errors(path: str, rd: HTTPRedirect) -> list[FieldError]:
    errors: list[FieldError] = []
    if not rd.uri and not rd.authority and rd.port is None and rd.derive_port is None and not rd.scheme:
        errors.append(FieldError(path, "redirect must specify URI, authority, scheme, or port"))
    if rd.redirect_code and not 300 <= rd.redirect_code <= 399:
        errors.append(
            FieldError(
                f"{path}.redirectCode", f"{rd.redirect_code} is not a valid redirect code, must be 3xx"
            )
        )
    if rd.scheme and rd.scheme not in ("http", "https"):
        errors.append(FieldError(f"{path}.scheme", 'invalid redirect scheme, must be "http" or "https"'))
    if rd.port is not None and rd.derive_port is not None:
        errors.append(FieldError(path, "only one of port or derivePort may be set"))
    if rd.port:
        errors.extend(port_errors(f"{path}.port", rd.port))
    return errors


def _rewrite_errors(path: str, rw: HTTPRewrite) -> list[FieldError]:
    errors: list[FieldError] = []
    if rw.uri and rw.uri_regex_rewrite is not None:
        errors.append(FieldError(path, "rewrite may only contain one of URI or UriRegexRewrite"))
    if not rw.uri and rw.uri_regex_rewrite is None and not rw.authority:
        errors.append(
            FieldError(path, "rewrite must specify at least one of URI, UriRegexRewrite, or authority")
        )
    rr = rw.uri_regex_rewrite
    if rr is not None:
        if not rr.match or not rr.rewrite:
            errors.append(
                FieldError(f"{path}.uriRegexRewrite", "UriRegexRewrite requires both Rewrite and Match")
            )
        else:
            errors.extend(regex_errors(f"{path}.uriRegexRewrite.match", rr.match))
    return errors


def _cors_errors(path: str, c: CorsPolicy) -> list[FieldError]:
    errors: list[FieldError] = []
    for i, origin in enumerate(c.allow_origins):
        if origin.is_empty or (origin.exact or origin.prefix or origin.regex) == "":
            errors.append(
                FieldError(f"{path}.allowOrigins[{i}]", "'' is not a valid match type for CORS allow origins")
            )
        elif origin.regex is not None:
            errors.extend(regex_errors(f"{path}.allowOrigins[{i}].regex", origin.regex))
    for i, method in enumerate(c.allow_methods):
        if method not in _CORS_METHODS:
            errors.append(
                FieldError(f"{path}.allowMethods[{i}]", f"{method!r} is not a supported HTTP method")
            )
    for field, names in (("allowHeaders", c.allow_headers), ("exposeHeaders", c.expose_headers)):
        for i, name in enumerate(names):
            if name != "*" and not _header_name_ok(name):
                errors.append(
                    FieldError(f"{path}.{field}[{i}]", f"header name {name!r} is not a valid header name")
                )
    if c.max_age is not None and parse_duration(c.max_age) != int(parse_duration(c.max_age)):
        errors.append(FieldError(f"{path}.maxAge", "max_age duration is accurate only to seconds precision"))
    return errors


def _http_route_errors(path: str, r: HTTPRoute, delegate_vs: bool, gateway_bound: bool) -> list[FieldError]:
    errors: list[FieldError] = []
    if r.delegate is not None and not delegate_vs:
        # A root route only hands over: the delegate VirtualService does the routing.
        if r.redirect is not None:
            errors.append(FieldError(f"{path}.redirect", "root HTTP route must not specify redirect"))
        if r.route:
            errors.append(FieldError(f"{path}.route", "root HTTP route must not specify route"))
        if not r.delegate.name:
            errors.append(FieldError(f"{path}.delegate.name", "Required value"))
        elif not is_dns1123_label(r.delegate.name):
            errors.append(FieldError(f"{path}.delegate.name", f"invalid name {r.delegate.name!r}"))
        if r.delegate.namespace and not is_dns1123_label(r.delegate.namespace):
            errors.append(
                FieldError(f"{path}.delegate.namespace", f"invalid namespace {r.delegate.namespace!r}")
            )
    else:
        if r.delegate is not None:
            errors.append(FieldError(f"{path}.delegate", "delegate HTTP route cannot contain delegate"))
        if r.redirect is not None:
            for name, present in (
                ("route", bool(r.route)),
                ("fault", r.fault is not None),
                ("rewrite", r.rewrite is not None),
                ("directResponse", r.direct_response is not None),
            ):
                if present:
                    errors.append(
                        FieldError(f"{path}.{name}", f"HTTP route cannot contain both {name} and redirect")
                    )
        elif r.direct_response is not None:
            for name, present in (
                ("route", bool(r.route)),
                ("fault", r.fault is not None),
                ("rewrite", r.rewrite is not None),
            ):
                if present:
                    errors.append(
                        FieldError(
                            f"{path}.{name}", f"HTTP route cannot contain both {name} and directResponse"
                        )
                    )
        elif not r.route:
            errors.append(FieldError(path, "HTTP route, redirect or direct_response is required"))
    if r.mirror is not None and r.mirrors:
        errors.append(FieldError(f"{path}.mirrors", "HTTP route cannot contain both mirror and mirrors"))
    for i, m in enumerate(r.match):
        errors.extend(_match_errors(f"{path}.match[{i}]", m, gateway_bound))
    errors.extend(_header_ops_errors(f"{path}.headers", r.headers))
    if r.cors_policy is not None:
        errors.extend(_cors_errors(f"{path}.corsPolicy", r.cors_policy))
    if r.fault is not None:
        errors.extend(_fault_errors(f"{path}.fault", r.fault))
    if r.mirror_percent is not None and not 0 <= r.mirror_percent <= 100:
        errors.append(
            FieldError(
                f"{path}.mirrorPercent", f"mirror_percent must have a max value of 100 ({r.mirror_percent})"
            )
        )
    if r.mirror is not None:
        errors.extend(_destination_errors(f"{path}.mirror", r.mirror))
    for i, mp in enumerate(r.mirrors):
        errors.extend(_destination_errors(f"{path}.mirrors[{i}].destination", mp.destination))
    if r.redirect is not None:
        errors.extend(_redirect_errors(f"{path}.redirect", r.redirect))
    if r.direct_response is not None:
        dr = r.direct_response
        if not 200 <= dr.status <= 600:
            errors.append(
                FieldError(
                    f"{path}.directResponse.status", f"HTTP status {dr.status} is not in range 200-599"
                )
            )
        if dr.body is not None:
            if dr.body.string is not None and dr.body.bytes is not None:
                errors.append(
                    FieldError(f"{path}.directResponse.body", "only one of string or bytes may be set")
                )
            size = len(dr.body.string or "") + len(dr.body.bytes or "") * 3 // 4
            if size > _MAX_DIRECT_RESPONSE:
                errors.append(
                    FieldError(f"{path}.directResponse.body", "direct response body must be less than 1MB")
                )
    if r.retries is not None:
        errors.extend(_retry_errors(f"{path}.retries", r.retries))
    if r.rewrite is not None:
        errors.extend(_rewrite_errors(f"{path}.rewrite", r.rewrite))
        errors.extend(_authority_rewrite_errors(path, r))
    for i, d in enumerate(r.route):
        errors.extend(_destination_errors(f"{path}.route[{i}].destination", d.destination))
        errors.extend(_header_ops_errors(f"{path}.route[{i}].headers", d.headers))
    errors.extend(_weights_errors(f"{path}.route", [d.weight for d in r.route]))
    return errors


def _l4_routes_errors(path: str, route: list[RouteDestination], what: str) -> list[FieldError]:
    errors: list[FieldError] = []
    if not route:
        errors.append(FieldError(f"{path}.route", f"{what} route is required"))
    for i, d in enumerate(route):
        errors.extend(_destination_errors(f"{path}.route[{i}].destination", d.destination))
    errors.extend(_weights_errors(f"{path}.route", [d.weight for d in route]))
    return errors


def _l4_match_errors(path: str, m: L4MatchAttributes | TLSMatchAttributes) -> list[FieldError]:
    errors = [
        FieldError(f"{path}.destinationSubnets[{i}]", f"invalid IP address or CIDR block: {s!r}")
        for i, s in enumerate(m.destination_subnets)
        if not is_ip_or_cidr(s)
    ]
    if m.port:
        errors.extend(port_errors(f"{path}.port", m.port))
    errors.extend(label_errors(f"{path}.sourceLabels", m.source_labels))
    errors.extend(_gateway_name_errors(f"{path}.gateways", m.gateways))
    return errors


def host_matches(a: str, b: str) -> bool:
    """Whether two hostnames overlap, wildcards included (``*.foo.com`` and ``bar.foo.com``)."""
    if a == b:
        return True
    for x, y in ((a, b), (b, a)):
        if x.startswith("*") and (y.endswith(x[1:]) or (y.startswith("*") and y[1:].endswith(x[1:]))):
            return True
    return False


def host_subset_of(a: str, b: str) -> bool:
    """Whether every name ``a`` matches is matched by ``b`` (``x.foo.com`` is a subset of ``*.foo.com``)."""
    if a == b or b == "*":
        return True
    if b.startswith("*"):
        suffix = b[1:]
        return (a[1:] if a.startswith("*") else a).endswith(suffix) and len(a) >= len(b)
    return False


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

    @property
    def applies_to_mesh(self) -> bool:
        """Bound to sidecars/waypoints: no ``gateways``, or ``mesh`` among them."""
        return not self.spec.gateways or "mesh" in self.spec.gateways

    def semantic_errors(self) -> list[FieldError]:
        s = self.spec
        errors: list[FieldError] = []
        delegate = self.is_delegate
        mesh_bound = self.applies_to_mesh
        if delegate:
            if s.gateways:
                errors.append(
                    FieldError("spec.gateways", "delegate VirtualService (no hosts) must have no gateways")
                )
            if s.tls:
                errors.append(
                    FieldError("spec.tls", "delegate VirtualService (no hosts) must have no tls routes")
                )
            if s.tcp:
                errors.append(
                    FieldError("spec.tcp", "delegate VirtualService (no hosts) must have no tcp routes")
                )
        errors.extend(_gateway_name_errors("spec.gateways", s.gateways))
        valid_hosts = True
        for i, h in enumerate(s.hosts):
            if h == "*" and mesh_bound:
                errors.append(
                    FieldError(
                        f"spec.hosts[{i}]",
                        "wildcard host * is not allowed for virtual services bound to the mesh",
                    )
                )
                valid_hosts = False
            elif h != "*":
                host_errs = _host_errors(f"spec.hosts[{i}]", h)
                errors.extend(host_errs)
                valid_hosts = valid_hosts and not host_errs
        if valid_hosts:
            for i, a in enumerate(s.hosts):
                for b in s.hosts[i + 1 :]:
                    if host_matches(a, b):
                        errors.append(
                            FieldError(f"spec.hosts[{i}]", f"duplicate hosts in virtual service: {a} & {b}")
                        )
        if not s.http and not s.tcp and not s.tls:
            errors.append(FieldError("spec", "http, tcp or tls must be provided in virtual service"))
        for i, r in enumerate(s.http):
            errors.extend(_http_route_errors(f"spec.http[{i}]", r, delegate, gateway_bound=not mesh_bound))
        for i, tl in enumerate(s.tls):
            if not tl.match:
                errors.append(
                    FieldError(f"spec.tls[{i}].match", "TLS route must have at least one match condition")
                )
            for j, tm in enumerate(tl.match):
                p = f"spec.tls[{i}].match[{j}]"
                if not tm.sni_hosts:
                    errors.append(FieldError(f"{p}.sniHosts", "TLS match must have at least one SNI host"))
                for k, sni in enumerate(tm.sni_hosts):
                    if is_ip(sni):
                        continue  # allowed (with a warning upstream)
                    sni_errs = _host_errors(f"{p}.sniHosts[{k}]", sni)
                    errors.extend(sni_errs)
                    if not sni_errs and not any(host_subset_of(sni, h) for h in s.hosts):
                        errors.append(
                            FieldError(
                                f"{p}.sniHosts[{k}]",
                                f"SNI host {sni!r} is not a compatible subset of any virtual service host",
                            )
                        )
                errors.extend(_l4_match_errors(p, tm))
            errors.extend(_l4_routes_errors(f"spec.tls[{i}]", tl.route, "TLS"))
        for i, t in enumerate(s.tcp):
            for j, m in enumerate(t.match):
                errors.extend(_l4_match_errors(f"spec.tcp[{i}].match[{j}]", m))
            errors.extend(_l4_routes_errors(f"spec.tcp[{i}]", t.route, "TCP"))
        errors.extend(export_to_errors("spec.exportTo", s.export_to, self.metadata.namespace))
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
    idle_timeout: PositiveDuration | None = None
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


def _nonneg(path: str, value: int | None, what: str) -> list[FieldError]:
    return [FieldError(path, f"{what} must be non-negative")] if value is not None and value < 0 else []


def _percent(path: str, value: float | None) -> list[FieldError]:
    if value is not None and not 0 <= value <= 100:
        return [FieldError(path, f"Invalid value: {value}: must be in range 0..100")]
    return []


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n < 4:
        return True
    if n % 2 == 0:
        return False
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _locality_errors(path: str, loc: LocalityLoadBalancerSetting) -> list[FieldError]:
    errors: list[FieldError] = []
    if loc.distribute and loc.failover:
        errors.append(FieldError(path, "can not simultaneously set 'distribute' and 'failover'"))
    srcs: set[str] = set()
    for i, d in enumerate(loc.distribute):
        p = f"{path}.distribute[{i}]"
        if d.from_ in srcs:
            errors.append(FieldError(f"{p}.from", f"locality {d.from_} set twice"))
        srcs.add(d.from_)
        for loc_name in (d.from_, *d.to):
            if "*" in loc_name.rstrip("*"):
                errors.append(FieldError(p, f"locality {loc_name!r}: wildcard may only end a locality"))
        total = sum(d.to.values())
        if total != 100:
            errors.append(FieldError(f"{p}.to", f"total weight across 'to' must be 100, got {total}"))
    for i, f in enumerate(loc.failover):
        p = f"{path}.failover[{i}]"
        if f.from_ == f.to:
            errors.append(FieldError(p, "locality lb failover settings must specify different regions"))
        if "/" in f.from_ or "*" in f.from_ or "/" in f.to or "*" in f.to:
            errors.append(FieldError(p, "locality lb failover only supports region (no zone, no wildcard)"))
    return errors


def _lb_errors(path: str, lb: LoadBalancerSettings) -> list[FieldError]:
    errors: list[FieldError] = []
    if lb.simple is not None and lb.consistent_hash is not None:
        errors.append(FieldError(path, "only one of simple or consistentHash may be set"))
    ch = lb.consistent_hash
    if ch is not None:
        p = f"{path}.consistentHash"
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
        if len(keys) > 1:
            errors.append(FieldError(p, f"only one hash key may be set (found {', '.join(keys)})"))
        if ch.http_cookie is not None and not ch.http_cookie.name:
            errors.append(FieldError(f"{p}.httpCookie.name", "name required for HttpCookie"))
        if ch.ring_hash is not None and ch.maglev is not None:
            errors.append(FieldError(p, "only one of ringHash or maglev may be set"))
        if ch.minimum_ring_size and (ch.ring_hash is not None or ch.maglev is not None):
            errors.append(
                FieldError(
                    f"{p}.minimumRingSize", "only one of MinimumRingSize or Maglev/Ringhash can be specified"
                )
            )
        if ch.maglev is not None:
            size = ch.maglev.table_size
            if size == 0:
                errors.append(FieldError(f"{p}.maglev.tableSize", "tableSize must be set for maglev"))
            elif size >= 5000011:
                errors.append(
                    FieldError(f"{p}.maglev.tableSize", "tableSize must be less than 5000011 for maglev")
                )
            elif not _is_prime(size):
                errors.append(
                    FieldError(f"{p}.maglev.tableSize", "tableSize must be a prime number for maglev")
                )
    if lb.locality_lb_setting is not None:
        errors.extend(_locality_errors(f"{path}.localityLbSetting", lb.locality_lb_setting))
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
        errors.append(FieldError(path, "connection pool must have at least one field"))
    if cp.tcp is not None:
        errors.extend(_nonneg(f"{path}.tcp.maxConnections", cp.tcp.max_connections, "max connections"))
        if cp.tcp.idle_timeout is not None and parse_duration(cp.tcp.idle_timeout) != 0:
            # 0s disables the idle timeout; anything else has the usual >= 1ms rule.
            errors.extend(_positive_duration_errors(f"{path}.tcp.idleTimeout", cp.tcp.idle_timeout))
    if cp.http is not None:
        h = cp.http
        for name, what, v in (
            ("http1MaxPendingRequests", "http1 max pending requests", h.http1_max_pending_requests),
            ("http2MaxRequests", "http2 max requests", h.http2_max_requests),
            ("maxRequestsPerConnection", "max requests per connection", h.max_requests_per_connection),
            ("maxRetries", "max retries", h.max_retries),
            ("maxConcurrentStreams", "max concurrent streams", h.max_concurrent_streams),
        ):
            errors.extend(_nonneg(f"{path}.http.{name}", v, what))
        if h.h2_upgrade_policy is H2UpgradePolicy.UPGRADE and h.use_client_protocol:
            errors.append(
                FieldError(
                    f"{path}.http.useClientProtocol",
                    "use client protocol must not be true when H2UpgradePolicy is UPGRADE",
                )
            )
    return errors


def _positive_duration_errors(path: str, value: str) -> list[FieldError]:
    seconds = parse_duration(value)
    if seconds < 1e-3:
        return [FieldError(path, f"must be a valid duration greater than 1ms, got {value!r}")]
    return []


def _outlier_errors(path: str, od: OutlierDetection) -> list[FieldError]:
    errors: list[FieldError] = []
    for name, v in (
        ("consecutiveErrors", od.consecutive_errors),
        ("consecutiveLocalOriginFailures", od.consecutive_local_origin_failures),
        ("consecutiveGatewayErrors", od.consecutive_gateway_errors),
        ("consecutive5xxErrors", od.consecutive_5xx_errors),
    ):
        errors.extend(_nonneg(f"{path}.{name}", v, name))
    errors.extend(_percent(f"{path}.maxEjectionPercent", od.max_ejection_percent))
    errors.extend(_percent(f"{path}.minHealthPercent", od.min_health_percent))
    if (od.consecutive_local_origin_failures or 0) > 0 and not od.split_external_local_origin_errors:
        errors.append(
            FieldError(
                f"{path}.consecutiveLocalOriginFailures",
                "outlier detection consecutive local origin failures is specified, "
                "but split external local origin errors is set to false",
            )
        )
    return errors


def _tls_errors(path: str, tls: ClientTLSSettings) -> list[FieldError]:
    errors: list[FieldError] = []
    if tls.insecure_skip_verify and tls.mode is TLSMode.ISTIO_MUTUAL:
        errors.append(
            FieldError(
                f"{path}.insecureSkipVerify", "cannot set InsecureSkipVerify to true for ISTIO_MUTUAL mode"
            )
        )
    if tls.mode in (TLSMode.SIMPLE, TLSMode.MUTUAL) and tls.credential_name:
        if tls.client_certificate or tls.private_key or tls.ca_certificates or tls.ca_crl:
            errors.append(
                FieldError(
                    f"{path}.credentialName",
                    "cannot specify client certificates or CA certificate or CA CRL if credentialName is set",
                )
            )
    elif tls.mode is TLSMode.MUTUAL:
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
    if od is not None:
        errors.extend(_outlier_errors(f"{path}.outlierDetection", od))
    if cp is not None:
        errors.extend(_pool_errors(f"{path}.connectionPool", cp))
    if lb is not None:
        errors.extend(_lb_errors(f"{path}.loadBalancer", lb))
    if tls is not None:
        errors.extend(_tls_errors(f"{path}.tls", tls))
    return errors


def _traffic_policy_errors(path: str, tp: TrafficPolicy) -> list[FieldError]:
    parts = (tp.load_balancer, tp.connection_pool, tp.outlier_detection, tp.tls, tp.tunnel, tp.proxy_protocol)
    if all(p is None for p in parts) and tp.retry_budget is None and not tp.port_level_settings:
        return [FieldError(path, "traffic policy must have at least one field")]
    if tp.tunnel is not None and tp.proxy_protocol is not None:
        return [FieldError(path, "tunnel and proxyProtocol must not be set together")]
    errors = _policy_part_errors(path, tp.load_balancer, tp.connection_pool, tp.outlier_detection, tp.tls)
    for i, pl in enumerate(tp.port_level_settings):
        p = f"{path}.portLevelSettings[{i}]"
        if pl.port is None:
            errors.append(FieldError(f"{p}.port", "portTrafficPolicy must have valid port"))
        elif pl.port.number:
            errors.extend(port_errors(f"{p}.port.number", pl.port.number))
        if (
            pl.load_balancer is None
            and pl.connection_pool is None
            and pl.outlier_detection is None
            and pl.tls is None
        ):
            errors.append(FieldError(p, "port traffic policy must have at least one field"))
        else:
            errors.extend(
                _policy_part_errors(p, pl.load_balancer, pl.connection_pool, pl.outlier_detection, pl.tls)
            )
    if tp.tunnel is not None:
        t = tp.tunnel
        if t.protocol not in ("", "CONNECT", "POST"):
            errors.append(
                FieldError(f"{path}.tunnel.protocol", 'tunnel protocol must be "CONNECT" or "POST"')
            )
        if not (is_ip(t.target_host) or is_fqdn(t.target_host)):
            errors.append(
                FieldError(f"{path}.tunnel.targetHost", "tunnel target host must be valid FQDN or IP address")
            )
        errors.extend(port_errors(f"{path}.tunnel.targetPort", t.target_port))
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
        ns = self.metadata.namespace
        errors = _host_errors("spec.host", s.host)
        if s.traffic_policy is not None:
            errors.extend(_traffic_policy_errors("spec.trafficPolicy", s.traffic_policy))
        names: set[str] = set()
        for i, sub in enumerate(s.subsets):
            p = f"spec.subsets[{i}]"
            if not sub.name:
                errors.append(FieldError(f"{p}.name", "Required value: subset name cannot be empty"))
            elif not is_dns1123_label(sub.name):
                errors.append(FieldError(f"{p}.name", f"subset name is invalid: {sub.name!r}"))
            elif sub.name in names:
                errors.append(
                    FieldError(f"{p}.name", f'Duplicate value: "{sub.name}" (duplicate subset names)')
                )
            names.add(sub.name)
            errors.extend(label_errors(f"{p}.labels", sub.labels))
            if sub.traffic_policy is not None:
                errors.extend(_traffic_policy_errors(f"{p}.trafficPolicy", sub.traffic_policy))
        errors.extend(export_to_errors("spec.exportTo", s.export_to, ns))
        if s.workload_selector is not None:
            errors.extend(
                selector_label_errors("spec.workloadSelector.matchLabels", s.workload_selector.match_labels)
            )
            exported = {ns if e == "." else e for e in s.export_to}
            if exported and exported != {ns}:
                errors.append(
                    FieldError(
                        "spec.exportTo",
                        "destination rule with workload selector cannot have exportTo beyond current "
                        "namespace",
                    )
                )
        return errors

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.spec.subsets if s.name == name), None)


# ---------------------------------------------------------------------------------------------------------
# WorkloadEntry (also the endpoint form inside ServiceEntry)
# ---------------------------------------------------------------------------------------------------------


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


def _uds_errors(path: str, sock: str) -> list[FieldError]:
    if not sock.startswith("/") and not sock.startswith("@"):
        return [FieldError(path, "UDS must be an absolute path or abstract socket")]
    if sock.endswith("/"):
        return [FieldError(path, "UDS may not be a dir")]
    return []


def workload_entry_errors(
    path: str, we: WorkloadEntrySpec, fqdn_ok: bool = True, service_ports: set[str] | None = None
) -> list[FieldError]:
    """Address forms: IP, DNS name, ``unix:///abs/path`` or ``unix://@abstract``; empty needs a network.
    Inside a ServiceEntry, ``service_ports`` are the port names endpoints may map."""
    errors: list[FieldError] = []
    addr = we.address
    if not addr:
        if not we.network:
            errors.append(FieldError(f"{path}.address", "Address is required (unless network is set)"))
    elif addr.startswith("unix://"):
        errors.extend(_uds_errors(f"{path}.address", addr[len("unix://") :]))
        if we.ports:
            errors.append(FieldError(f"{path}.ports", "UDS may not include ports"))
        if service_ports is not None and len(service_ports) != 1:
            errors.append(FieldError(f"{path}.address", "exactly 1 service port required for unix endpoints"))
    elif not is_ip(addr):
        if not fqdn_ok:
            errors.append(
                FieldError(f"{path}.address", f"endpoint address {addr!r} is not a valid IP address")
            )
        elif not is_fqdn(addr):
            errors.append(
                FieldError(
                    f"{path}.address", f"endpoint address {addr!r} is not a valid FQDN or an IP address"
                )
            )
    for name, number in we.ports.items():
        if service_ports is not None and name not in service_ports:
            errors.append(
                FieldError(
                    f"{path}.ports[{name}]", f"endpoint port {name!r} is not defined by the service entry"
                )
            )
        if not is_dns1123_label(name):
            errors.append(FieldError(f"{path}.ports", f"Invalid value: invalid port name {name!r}"))
        errors.extend(port_errors(f"{path}.ports[{name}]", number))
    errors.extend(label_errors(f"{path}.labels", we.labels))
    if we.weight < 0:
        errors.append(FieldError(f"{path}.weight", "weight must not be negative"))
    return errors


@register
class WorkloadEntry(Resource):
    """A non-Kubernetes workload (VM, external endpoint) as a mesh member with labels and identity."""

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


# Protocols istiod recognises in a port's ``protocol`` (case-insensitive; ``protocol.Parse``).
_HTTP_PROTOCOLS = frozenset({"http", "http2", "grpc", "grpc-web", "http_proxy"})
_TLS_PROTOCOLS = frozenset({"https", "tls"})
_PROTOCOLS = _HTTP_PROTOCOLS | _TLS_PROTOCOLS | {"tcp", "udp", "mongo", "redis", "mysql"}


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
        if s.workload_selector is not None:
            errors.extend(selector_label_errors("spec.workloadSelector.labels", s.workload_selector.labels))
            if s.endpoints:
                errors.append(
                    FieldError("spec.endpoints", "only one of WorkloadSelector or Endpoints can be set")
                )
        if not s.hosts:
            errors.append(
                FieldError("spec.hosts", "Required value: service entry must have at least one host")
            )
        for i, h in enumerate(s.hosts):
            errors.extend(_host_errors(f"spec.hosts[{i}]", h, allow_wildcard=h != "*"))
        cidr = False
        for i, a in enumerate(s.addresses):
            if not is_ip_or_cidr(a):
                errors.append(
                    FieldError(f"spec.addresses[{i}]", f"invalid address {a!r}: must be an IP or CIDR")
                )
            cidr = cidr or "/" in a
        if cidr and s.resolution not in (Resolution.NONE, Resolution.STATIC):
            errors.append(
                FieldError(
                    "spec.addresses", "CIDR addresses are allowed only for NONE/STATIC resolution types"
                )
            )
        names: set[str] = set()
        numbers: set[int] = set()
        for i, port in enumerate(s.ports):
            p = f"spec.ports[{i}]"
            if port.name in names:
                errors.append(FieldError(f"{p}.name", f'Duplicate value: "{port.name}"'))
            names.add(port.name)
            if port.number in numbers:
                errors.append(FieldError(f"{p}.number", f"port number cannot be duplicated: {port.number}"))
            numbers.add(port.number)
            if not is_dns1123_label(port.name):
                errors.append(FieldError(f"{p}.name", f"invalid port name: {port.name!r}"))
            errors.extend(port_errors(f"{p}.number", port.number))
            if port.target_port:
                errors.extend(port_errors(f"{p}.targetPort", port.target_port))
            if port.protocol and port.protocol.lower() not in _PROTOCOLS:
                errors.append(FieldError(f"{p}.protocol", f"unsupported protocol: {port.protocol}"))
        if s.resolution is Resolution.NONE:
            if s.endpoints:
                errors.append(FieldError("spec.endpoints", "NONE mode cannot set endpoints"))
        elif s.resolution is Resolution.STATIC:
            for i, ep in enumerate(s.endpoints):
                errors.extend(
                    workload_entry_errors(f"spec.endpoints[{i}]", ep, fqdn_ok=False, service_ports=names)
                )
        else:
            if not s.endpoints:
                for i, h in enumerate(s.hosts):
                    if h.startswith("*"):
                        errors.append(
                            FieldError(
                                f"spec.hosts[{i}]",
                                f"hosts must be FQDN if no endpoints are provided for resolution mode "
                                f"{s.resolution}",
                            )
                        )
            if s.resolution is Resolution.DNS_ROUND_ROBIN and len(s.endpoints) > 1:
                errors.append(
                    FieldError("spec.endpoints", "DNS_ROUND_ROBIN mode cannot have multiple endpoints")
                )
            for i, ep in enumerate(s.endpoints):
                p = f"spec.endpoints[{i}]"
                if not is_ip(ep.address) and not is_fqdn(ep.address):
                    errors.append(
                        FieldError(
                            f"{p}.address",
                            f"endpoint address {ep.address!r} is not a valid FQDN or an IP address",
                        )
                    )
                errors.extend(label_errors(f"{p}.labels", ep.labels))
                for name, number in ep.ports.items():
                    if name not in names:
                        errors.append(
                            FieldError(
                                f"{p}.ports[{name}]",
                                f"endpoint port {name!r} is not defined by the service entry",
                            )
                        )
                    if not is_dns1123_label(name):
                        errors.append(FieldError(f"{p}.ports", f"Invalid value: invalid port name {name!r}"))
                    errors.extend(port_errors(f"{p}.ports[{name}]", number))
        if s.resolution is not Resolution.NONE and len(s.hosts) > 1:
            for i, port in enumerate(s.ports):
                proto = port.protocol.lower()
                if proto not in _HTTP_PROTOCOLS and proto not in _TLS_PROTOCOLS:
                    errors.append(
                        FieldError(
                            f"spec.ports[{i}].protocol",
                            "multiple hosts provided with non-HTTP, non-TLS ports",
                        )
                    )
                    break
        errors.extend(export_to_errors("spec.exportTo", s.export_to, self.metadata.namespace))
        return errors
