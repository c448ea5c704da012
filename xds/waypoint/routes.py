"""VirtualService and HTTPRoute (GAMMA: parentRef = Service) -> one RouteConfiguration per served port.

Semantics (Istio's, ambient.md 7.3):
* a VirtualService applies when one of its ``hosts`` is the service (short names relative to its
  namespace) and its ``gateways`` are empty or include ``mesh``; several apply in (namespace, name) order;
* each ``match`` entry becomes its own Envoy route with the rule's action; a match for another port is
  dropped; with any VirtualService or HTTPRoute the unmatched request gets 404 (no implicit default);
* no VirtualService/HTTPRoute: one route ``/`` to ``inbound-vip|<port>|http|<host>``;
* weights are relative (Envoy sums them); mirror percentage defaults to 100; timeout defaults to none
  (Istio's ``0s``); retries only when asked for (``attempts: 0`` disables), numeric ``retryOn`` entries
  become retriable status codes;
* a rule :func:`istiopy.mesh.waypoint_diagnostics.virtual_service_problems` flags (missing subset, regex
  RE2 refuses) is left out, so Envoy never NACKs; the other rules keep working;
* an HTTPRoute backendRef names a Service or a ServiceEntry (its hosts); one that is invalid (no such
  backend, a kind the mesh cannot route to, or another namespace's backend without a ReferenceGrant there)
  gets its share of requests answered 500, as Gateway API asks; a mirror to another namespace without a
  grant is dropped.
"""

from __future__ import annotations

import logging
from typing import Any

from envoy.config.route.v3 import route_components_pb2, route_pb2

from istiopy.mesh.ambient import reference_permitted, typed_list
from istiopy.mesh.resources.common import StringMatch, duration_seconds
from istiopy.mesh.resources.gateway import HTTPHeaderFilter, HTTPRouteFilter
from istiopy.mesh.resources.gateway import HTTPRoute as GatewayHTTPRoute
from istiopy.mesh.resources.networking import (
    CorsPolicy,
    Destination,
    HeaderOperations,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRetry,
    ServiceEntry,
    VirtualService,
)
from istiopy.mesh.resources.networking import HTTPRoute as VsRoute
from istiopy.mesh.waypoint_diagnostics import regex_problem, virtual_service_problems
from istiopy.xds.waypoint import envoy as ev
from istiopy.xds.waypoint import policy
from istiopy.xds.waypoint.plan import (
    DOMAIN,
    ServedPort,
    WaypointPlan,
    add_cluster,
    entry_cluster_for,
    find_service,
    resolve,
    resolve_destination_port,
)

T = ev.T
log = logging.getLogger(__name__)
_REDIRECT_CODES = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}
INVALID_BACKEND = "invalid-backend|"  # cluster-name prefix no cluster has: Envoy answers 500 for it
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


def build(plan: WaypointPlan) -> None:
    """Fill ``plan.extra``: ``routes`` (name -> RouteConfiguration), ``filters`` (name -> HTTP filters)
    and ``clusters`` (extra clusters such as JWKS fetchers); registers referenced service clusters."""
    routes: dict[str, Any] = {}
    filters: dict[str, list[dict[str, Any]]] = {}
    plan.extra.setdefault("clusters", {})
    for sp in plan.served:
        if not sp.http:
            continue
        vhost_routes = []
        for route in _routes_for(plan, sp):
            try:  # a rule we cannot express is left out, never the whole configuration
                ev.parse(route, route_components_pb2.Route())
            except Exception as e:
                log.warning("waypoint: leaving out route %s of %s: %s", route.get("name"), sp.route_name, e)
                continue
            vhost_routes.append(route)
        routes[sp.route_name] = ev.parse(
            {
                "name": sp.route_name,
                "validate_clusters": False,
                "virtual_hosts": [{"name": sp.route_name, "domains": ["*"], "routes": vhost_routes}],
            },
            route_pb2.RouteConfiguration(),
        )
        filters[sp.route_name] = policy.http_filters(plan, sp)
    plan.extra["routes"] = routes
    plan.extra["filters"] = filters


def _routes_for(plan: WaypointPlan, sp: ServedPort) -> list[dict[str, Any]]:
    assert plan.store is not None
    gw_routes = [
        r
        for r in _http_routes(plan).get((sp.namespace, sp.name), [])
        if any(
            p.kind == sp.kind
            and p.group in (("", "core") if sp.kind == "Service" else ("networking.istio.io",))
            and p.name == sp.name
            and (p.namespace or r.namespace) == sp.namespace
            and (p.port is None or p.port == sp.number)
            for p in r.spec.parent_refs
        )
    ]
    if gw_routes:
        out: list[dict[str, Any]] = []
        for r in sorted(gw_routes, key=lambda r: (r.namespace, r.name)):
            out += _gateway_api_routes(plan, sp, r)
        return sorted(out, key=_gateway_precedence)
    services = _virtual_services(plan).get(sp.hostname, [])
    if not services:
        return [_default_route(sp)]
    out = []
    for vs in sorted(services, key=lambda v: (v.namespace, v.name)):
        bad = virtual_service_problems(plan.store, vs, plan.dr_index)
        for i, rule in enumerate(vs.spec.http):
            if i in bad or rule.delegate is not None:
                continue
            action = _vs_action(plan, sp, vs, rule)
            if action is None:
                continue
            matches: list[HTTPMatchRequest | None] = list(rule.match) or [None]
            for j, m in enumerate(matches):
                if m is not None and m.port and m.port != sp.number:
                    continue
                route = {"name": f"{vs.namespace}.{vs.name}.{rule.name or i}.{j}", "match": _vs_match(m)}
                route.update(action)
                out.append(route)
    return out


def _http_routes(plan: WaypointPlan) -> dict[tuple[str, str], list[GatewayHTTPRoute]]:
    """HTTPRoutes by the (namespace, name) of the Services they attach to, built once per plan."""
    index: dict[tuple[str, str], list[GatewayHTTPRoute]] | None = plan.extra.get("route_index")
    if index is None:
        assert plan.store is not None
        index = {}
        for r in typed_list(plan.store, GatewayHTTPRoute):
            parents = {
                (p.namespace or r.namespace, p.name)
                for p in r.spec.parent_refs
                if p.kind in ("Service", "ServiceEntry")
            }
            for key in parents:
                index.setdefault(key, []).append(r)
        plan.extra["route_index"] = index
    return index


def _virtual_services(plan: WaypointPlan) -> dict[str, list[VirtualService]]:
    """Mesh VirtualServices by resolved host, built once per plan."""
    index: dict[str, list[VirtualService]] | None = plan.extra.get("vs_index")
    if index is None:
        assert plan.store is not None
        index = {}
        for vs in typed_list(plan.store, VirtualService):
            if vs.spec.gateways and "mesh" not in vs.spec.gateways:
                continue
            for host in {resolve(h, vs.namespace) for h in vs.spec.hosts}:
                index.setdefault(host, []).append(vs)
        plan.extra["vs_index"] = index
    return index


def _default_route(sp: ServedPort) -> dict[str, Any]:
    return {
        "name": "default",
        "match": {"prefix": "/"},
        "route": {"cluster": sp.cluster, "timeout": "0s"},
    }


# ----------------------------------------------------------------------------------- VirtualService
def _string_matcher(m: StringMatch, ignore_case: bool = False) -> dict[str, Any] | None:
    out: dict[str, Any]
    if m.exact is not None:
        out = {"exact": m.exact}
    elif m.prefix is not None:
        out = {"prefix": m.prefix}
    elif m.regex is not None:
        out = {"safe_regex": {"regex": m.regex}}
    else:
        return None
    if ignore_case and "safe_regex" not in out:
        out["ignore_case"] = True
    return out


def _header(name: str, m: StringMatch, invert: bool = False) -> dict[str, Any]:
    sm = _string_matcher(m)
    out: dict[str, Any] = {"name": name}
    if sm is None:
        out["present_match"] = True
    else:
        out["string_match"] = sm
    if invert:
        out["invert_match"] = True
    return out


def _vs_match(m: HTTPMatchRequest | None) -> dict[str, Any]:
    if m is None:
        return {"prefix": "/"}
    out: dict[str, Any] = {}
    uri = m.uri
    if uri is None or uri.is_empty:
        out["prefix"] = "/"
    elif uri.exact is not None:
        out["path"] = uri.exact
    elif uri.prefix is not None:
        out["prefix"] = uri.prefix
    else:
        out["safe_regex"] = {"regex": uri.regex}
    if m.ignore_uri_case:
        out["case_sensitive"] = False
    headers = [_header(k, v) for k, v in sorted(m.headers.items())]
    headers += [_header(k, v, invert=True) for k, v in sorted(m.without_headers.items())]
    for pseudo, sm in ((":method", m.method), (":authority", m.authority), (":scheme", m.scheme)):
        if sm is not None:
            headers.append(_header(pseudo, sm))
    if headers:
        out["headers"] = headers
    qps: list[dict[str, Any]] = []
    for k, v in sorted(m.query_params.items()):
        qsm = _string_matcher(v)
        qps.append(
            {"name": k, "string_match": qsm} if qsm is not None else {"name": k, "present_match": True}
        )
    if qps:
        out["query_parameters"] = qps
    return out


def header_ops(ops: HeaderOperations | None, prefix: str) -> dict[str, Any]:
    """``set``/``add``/``remove`` -> ``<prefix>_headers_to_add`` / ``_to_remove`` (request/response)."""
    if ops is None:
        return {}
    add = [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in sorted(ops.set.items())
    ]
    add += [
        {"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
        for k, v in sorted(ops.add.items())
    ]
    out: dict[str, Any] = {}
    if add:
        out[f"{prefix}_headers_to_add"] = add
    if ops.remove:
        out[f"{prefix}_headers_to_remove"] = list(ops.remove)
    return out


def _backend_permitted(plan: WaypointPlan, r: GatewayHTTPRoute, ref: Any) -> bool:
    """A backendRef in the route's namespace, or in another whose ReferenceGrant lets HTTPRoutes in."""
    ns = ref.namespace or r.namespace
    if plan.store is None:
        return ns == r.namespace
    return reference_permitted(plan.store, "HTTPRoute", r.namespace, ref.group, ref.kind, ns, ref.name)


def _backend_hosts(plan: WaypointPlan, r: GatewayHTTPRoute, ref: Any) -> list[str]:
    """The hostnames a backendRef stands for: a Service's FQDN, or a ServiceEntry's hosts."""
    ns = ref.namespace or r.namespace
    if ref.kind == "Service" and ref.group in ("", "core"):
        return [f"{ref.name}.{ns}.svc.{DOMAIN}"]
    if (ref.group, ref.kind) == ("networking.istio.io", "ServiceEntry") and plan.store is not None:
        se = plan.store.get_typed(ServiceEntry, ns, ref.name)
        return list(se.spec.hosts) if se is not None else []
    return []


def _percent(value: float | None, default: float = 100.0) -> dict[str, Any]:
    pct = default if value is None else value
    return {"numerator": round(pct * 10_000), "denominator": "MILLION"}


def _mirror_policies(
    plan: WaypointPlan, mirrors: list[tuple[Destination, float | None]], namespace: str, port: int | None
) -> list[dict[str, Any]]:
    """Envoy ``request_mirror_policies`` for the mirrors that resolve to a cluster (others are dropped)."""
    policies = []
    for dest, pct in mirrors:
        hit = _cluster_for(plan, dest, namespace, port)
        if hit is not None:
            policies.append({"cluster": hit[0], "runtime_fraction": {"default_value": _percent(pct)}})
    return policies


def _cluster_for(
    plan: WaypointPlan, dest: Destination, namespace: str, incoming: int | None
) -> tuple[str, Any] | None:
    """(cluster name, its traffic policy) for a destination; None when the host is no known Service."""
    host = resolve(dest.host, namespace)
    svc = find_service(plan.store, host)  # type: ignore[arg-type]
    if svc is None:
        if dest.subset:
            return None
        name = entry_cluster_for(plan, host, dest.port.number if dest.port else None, incoming)
        return None if name is None else (name, plan.entry_clusters[name].policy)
    port = resolve_destination_port(svc, dest.port.number if dest.port else None, incoming)
    if port is None:
        return None
    name = add_cluster(plan, svc, port, dest.subset)
    if name is None:
        return None
    return name, plan.clusters[name].policy


def _hash_policy(policy: Any) -> list[dict[str, Any]]:
    lb = getattr(policy, "load_balancer", None)
    ch = getattr(lb, "consistent_hash", None)
    if ch is None:
        return []
    if ch.http_header_name:
        return [{"header": {"header_name": ch.http_header_name}}]
    if ch.http_cookie is not None:
        cookie: dict[str, Any] = {"name": ch.http_cookie.name}
        if ch.http_cookie.path:
            cookie["path"] = ch.http_cookie.path
        if ch.http_cookie.ttl:
            cookie["ttl"] = ev.dur(duration_seconds(ch.http_cookie.ttl))
        return [{"cookie": cookie}]
    if ch.use_source_ip:
        return [{"connection_properties": {"source_ip": True}}]
    if ch.http_query_parameter_name:
        return [{"query_parameter": {"name": ch.http_query_parameter_name}}]
    return []


def _retry(retries: HTTPRetry | None) -> dict[str, Any] | None:
    if retries is None or retries.attempts <= 0:
        return None
    codes: list[int] = []
    on: list[str] = []
    for part in (retries.retry_on or DEFAULT_RETRY_ON).split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit():
            codes.append(int(part))
        elif part not in on:
            on.append(part)
    if codes and "retriable-status-codes" not in on:
        on.append("retriable-status-codes")
    if not codes and "retriable-status-codes" in on:
        codes = [503]
    out: dict[str, Any] = {
        "retry_on": ",".join(on),
        "num_retries": retries.attempts,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": T + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                },
            }
        ],
        "host_selection_retry_max_attempts": "5",
    }
    if codes:
        out["retriable_status_codes"] = codes
    if retries.per_try_timeout:
        out["per_try_timeout"] = ev.dur(duration_seconds(retries.per_try_timeout))
    if retries.backoff:
        out["retry_back_off"] = {"base_interval": ev.dur(duration_seconds(retries.backoff))}
    return out


def _fault(fault: HTTPFaultInjection | None) -> dict[str, Any] | None:
    if fault is None:
        return None
    out: dict[str, Any] = {"@type": T + "envoy.extensions.filters.http.fault.v3.HTTPFault"}
    d = fault.delay
    if d is not None and d.fixed_delay:
        pct = d.percentage.value if d.percentage else (float(d.percent) if d.percent is not None else None)
        out["delay"] = {"fixed_delay": ev.dur(duration_seconds(d.fixed_delay)), "percentage": _percent(pct)}
    a = fault.abort
    if a is not None and (a.http_status or a.grpc_status):
        abort: dict[str, Any] = {"percentage": _percent(a.percentage.value if a.percentage else None)}
        if a.http_status:
            abort["http_status"] = a.http_status
        else:
            abort["grpc_status"] = _GRPC_CODES.get(str(a.grpc_status).upper(), 14)
        out["abort"] = abort
    return out if len(out) > 1 else None


_GRPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip


def _cors(cors: CorsPolicy | None) -> dict[str, Any] | None:
    if cors is None:
        return None
    origins = [sm for o in cors.allow_origins if (sm := _string_matcher(o)) is not None]
    origins += [{"exact": o} for o in cors.allow_origin]
    out: dict[str, Any] = {
        "@type": T + "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": origins,
    }
    if cors.allow_methods:
        out["allow_methods"] = ",".join(cors.allow_methods)
    if cors.allow_headers:
        out["allow_headers"] = ",".join(cors.allow_headers)
    if cors.expose_headers:
        out["expose_headers"] = ",".join(cors.expose_headers)
    if cors.max_age:
        out["max_age"] = str(int(duration_seconds(cors.max_age)))
    if cors.allow_credentials is not None:
        out["allow_credentials"] = cors.allow_credentials
    return out


def _vs_action(
    plan: WaypointPlan, sp: ServedPort, vs: VirtualService, rule: VsRoute
) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    per_filter: dict[str, Any] = {}
    if (f := _fault(rule.fault)) is not None:
        per_filter["envoy.filters.http.fault"] = f
    if (c := _cors(rule.cors_policy)) is not None:
        per_filter["envoy.filters.http.cors"] = c
    if per_filter:
        out["typed_per_filter_config"] = per_filter
    if rule.headers is not None:
        out.update(header_ops(rule.headers.request, "request"))
        out.update(header_ops(rule.headers.response, "response"))
    if rule.redirect is not None:
        r = rule.redirect
        red: dict[str, Any] = {
            "response_code": _REDIRECT_CODES.get(r.redirect_code or 301, "MOVED_PERMANENTLY")
        }
        if r.uri:
            red["path_redirect"] = r.uri
        if r.authority:
            red["host_redirect"] = r.authority
        if r.port:
            red["port_redirect"] = r.port
        if r.scheme:
            red["scheme_redirect"] = r.scheme
        out["redirect"] = red
        return out
    if rule.direct_response is not None:
        dr: dict[str, Any] = {"status": rule.direct_response.status}
        body = rule.direct_response.body
        if body is not None and body.string is not None:
            dr["body"] = {"inline_string": body.string}
        elif body is not None and body.bytes is not None:
            dr["body"] = {"inline_bytes": body.bytes}
        out["direct_response"] = dr
        return out
    if not rule.route:
        return None
    dests = [d for d in rule.route if d.weight > 0] or rule.route[:1]
    targets = []
    for d in dests:
        hit = _cluster_for(plan, d.destination, vs.namespace, sp.number)
        if hit is None:
            return None  # a destination we cannot reach: leave the whole rule out (never half a split)
        targets.append((hit, d))
    action: dict[str, Any] = {"timeout": ev.dur(duration_seconds(rule.timeout)) if rule.timeout else "0s"}
    if len(targets) == 1:
        (name, _), d = targets[0]
        action["cluster"] = name
        if d.headers is not None:
            for k, v in header_ops(d.headers.request, "request").items():
                out[k] = out.get(k, []) + v
            for k, v in header_ops(d.headers.response, "response").items():
                out[k] = out.get(k, []) + v
    else:
        wc = []
        for (name, _), d in targets:
            entry: dict[str, Any] = {"name": name, "weight": d.weight or 1}
            if d.headers is not None:
                entry.update(header_ops(d.headers.request, "request"))
                entry.update(header_ops(d.headers.response, "response"))
            wc.append(entry)
        action["weighted_clusters"] = {"clusters": wc}
    hp = _hash_policy(targets[0][0][1])
    if hp:
        action["hash_policy"] = hp
    if (rp := _retry(rule.retries)) is not None:
        action["retry_policy"] = rp
    if rule.rewrite is not None:
        if rule.rewrite.uri:
            action["prefix_rewrite"] = rule.rewrite.uri
        elif rule.rewrite.uri_regex_rewrite is not None:
            action["regex_rewrite"] = {
                "pattern": {"regex": rule.rewrite.uri_regex_rewrite.match},
                "substitution": rule.rewrite.uri_regex_rewrite.rewrite,
            }
        if rule.rewrite.authority:
            action["host_rewrite_literal"] = rule.rewrite.authority
    mirrors: list[tuple[Destination, float | None]] = []
    if rule.mirror is not None:
        pct = (
            rule.mirror_percentage.value
            if rule.mirror_percentage
            else (float(rule.mirror_percent) if rule.mirror_percent is not None else None)
        )
        mirrors.append((rule.mirror, pct))
    mirrors += [(m.destination, m.percentage.value if m.percentage else None) for m in rule.mirrors]
    if policies := _mirror_policies(plan, mirrors, vs.namespace, sp.number):
        action["request_mirror_policies"] = policies
    out["route"] = action
    return out


# ----------------------------------------------------------------------------------- Gateway API HTTPRoute
def _gateway_precedence(route: dict[str, Any]) -> tuple[int, int, int, int]:
    m = route["match"]
    if "path" in m:
        kind, length = 0, len(m["path"])
    elif "safe_regex" in m:
        kind, length = 1, len(m["safe_regex"]["regex"])
    else:
        kind, length = 2, len(m.get("path_separated_prefix") or m.get("prefix") or "")
    return (kind, -length, -len(m.get("headers", [])), -len(m.get("query_parameters", [])))


def _gw_header_ops(f: HTTPHeaderFilter | None, prefix: str) -> dict[str, Any]:
    if f is None:
        return {}
    return header_ops(
        HeaderOperations(
            set={h.name: h.value for h in f.set}, add={h.name: h.value for h in f.add}, remove=f.remove
        ),
        prefix,
    )


def _gateway_api_routes(plan: WaypointPlan, sp: ServedPort, r: GatewayHTTPRoute) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, rule in enumerate(r.spec.rules):
        action = _gw_action(plan, sp, r, rule.filters, rule.backend_refs, rule.timeouts)
        if action is None:
            continue
        for j, m in enumerate(rule.matches):
            match: dict[str, Any] = {}
            path = m.path
            if path is None or (path.type == "PathPrefix" and path.value in ("", "/")):
                match["prefix"] = "/"
            elif path.type == "Exact":
                match["path"] = path.value
            elif path.type == "PathPrefix":
                match["path_separated_prefix"] = path.value.rstrip("/")
            else:
                if regex_problem(path.value):
                    continue
                match["safe_regex"] = {"regex": path.value}
            headers: list[dict[str, Any]] = []
            for h in m.headers:
                sm: dict[str, Any] = (
                    {"exact": h.value} if h.type == "Exact" else {"safe_regex": {"regex": h.value}}
                )
                headers.append({"name": h.name, "string_match": sm})
            if m.method:
                headers.append({"name": ":method", "string_match": {"exact": m.method}})
            if headers:
                match["headers"] = headers
            qps: list[dict[str, Any]] = []
            for q in m.query_params:
                sm = {"exact": q.value} if q.type == "Exact" else {"safe_regex": {"regex": q.value}}
                qps.append({"name": q.name, "string_match": sm})
            if qps:
                match["query_parameters"] = qps
            if any(
                regex_problem(x["string_match"]["safe_regex"]["regex"])
                for x in headers + qps
                if "safe_regex" in x.get("string_match", {})
            ):
                continue
            route = {"name": f"{r.namespace}.{r.name}.{rule.name or i}.{j}", "match": match}
            route.update(action)
            out.append(route)
    return out


def _gw_action(
    plan: WaypointPlan,
    sp: ServedPort,
    r: GatewayHTTPRoute,
    filters: list[HTTPRouteFilter],
    backends: list[Any],
    timeouts: Any,
) -> dict[str, Any] | None:
    out: dict[str, Any] = {}
    action: dict[str, Any] = {"timeout": "0s"}
    mirrors = []
    for f in filters:
        if f.type == "RequestHeaderModifier":
            out.update(_gw_header_ops(f.request_header_modifier, "request"))
        elif f.type == "ResponseHeaderModifier":
            out.update(_gw_header_ops(f.response_header_modifier, "response"))
        elif f.type == "RequestRedirect" and f.request_redirect is not None:
            rr = f.request_redirect
            red: dict[str, Any] = {"response_code": _REDIRECT_CODES.get(rr.status_code, "FOUND")}
            if rr.scheme:
                red["scheme_redirect"] = rr.scheme
            if rr.hostname:
                red["host_redirect"] = rr.hostname
            if rr.port:
                red["port_redirect"] = rr.port
            if rr.path is not None:
                if rr.path.type == "ReplaceFullPath":
                    red["path_redirect"] = rr.path.replace_full_path or "/"
                else:
                    red["prefix_rewrite"] = rr.path.replace_prefix_match or "/"
            out["redirect"] = red
            return out
        elif f.type == "URLRewrite" and f.url_rewrite is not None:
            uw = f.url_rewrite
            if uw.hostname:
                action["host_rewrite_literal"] = uw.hostname
            if uw.path is not None:
                if uw.path.type == "ReplaceFullPath":
                    action["regex_rewrite"] = {
                        "pattern": {"regex": "^/.*$"},
                        "substitution": uw.path.replace_full_path or "/",
                    }
                else:
                    action["prefix_rewrite"] = uw.path.replace_prefix_match or "/"
        elif f.type == "RequestMirror" and f.request_mirror is not None:
            rm = f.request_mirror
            if not _backend_permitted(plan, r, rm.backend_ref):
                continue  # a mirror into another namespace needs its ReferenceGrant like any backend
            pct = (
                float(rm.percent)
                if rm.percent is not None
                else (100.0 * rm.fraction.numerator / rm.fraction.denominator if rm.fraction else None)
            )
            dest = Destination(
                host=f"{rm.backend_ref.name}.{rm.backend_ref.namespace or r.namespace}.svc.{DOMAIN}",
                port={"number": rm.backend_ref.port} if rm.backend_ref.port else None,
            )
            mirrors.append((dest, pct))
    if not backends:
        out["direct_response"] = {"status": 500}
        return out
    targets = []
    for b in backends:
        if b.weight == 0 and len(backends) > 1:
            continue
        hit = None
        if _backend_permitted(plan, r, b):
            for host in _backend_hosts(plan, r, b):
                dest = Destination(host=host, port={"number": b.port} if b.port else None)
                if (hit := _cluster_for(plan, dest, r.namespace, sp.number)) is not None:
                    break
        if hit is None:
            # Gateway API: the share of requests an invalid backend (unknown, of a kind the mesh cannot
            # route to, or in another namespace without a ReferenceGrant) would get is answered 500.
            action["cluster_not_found_response_code"] = "INTERNAL_SERVER_ERROR"
            hit = (f"{INVALID_BACKEND}{b.namespace or r.namespace}/{b.name}", None)
        entry: dict[str, Any] = {"name": hit[0], "weight": b.weight or 1}
        for bf in b.filters:
            if bf.type == "RequestHeaderModifier":
                entry.update(_gw_header_ops(bf.request_header_modifier, "request"))
            elif bf.type == "ResponseHeaderModifier":
                entry.update(_gw_header_ops(bf.response_header_modifier, "response"))
        targets.append(entry)
    if not targets:
        out["direct_response"] = {"status": 500}
        return out
    if len(targets) == 1 and len(targets[0]) == 2:
        action["cluster"] = targets[0]["name"]
    else:
        action["weighted_clusters"] = {"clusters": targets}
    if timeouts is not None:
        if timeouts.request:
            action["timeout"] = ev.dur(duration_seconds(timeouts.request))
        if timeouts.backend_request:
            action["retry_policy"] = {"per_try_timeout": ev.dur(duration_seconds(timeouts.backend_request))}
    if policies := _mirror_policies(plan, mirrors, r.namespace, sp.number):
        action["request_mirror_policies"] = policies
    out["route"] = action
    return out
