"""AuthorizationPolicy and RequestAuthentication with ``targetRefs`` -> Envoy RBAC and jwt_authn filters.

Which policies apply to a served (service, port): those whose ``targetRefs`` name the Service (core group,
kind Service, in the policy's namespace) or this waypoint's Gateway (``gateway.networking.k8s.io`` Gateway).
``selector`` policies are ztunnel's, never a waypoint's (ambient.md 7.1).

Filter order in each service chain (Istio's evaluation order, ambient.md 7.1):
``cors`` -> ``jwt_authn`` -> RBAC(AUDIT, action LOG) -> RBAC(CUSTOM, enforced fail-closed as DENY) ->
RBAC(DENY) -> RBAC(ALLOW, present only when an ALLOW policy applies: none -> allow, some -> one must match)
-> ``fault`` -> router. CORS first so preflights are answered before authorization, as upstream does.

Attribute mapping (Envoy RBAC):
* ``source.principals`` / ``namespaces`` / ``serviceAccounts`` and ``when source.*`` match the filter state
  ``io.istio.peer_principal`` (the HBONE client's SPIFFE id, set on ``connect_terminate``);
* ``requestPrincipals`` (``<iss>/<sub>``) and ``request.auth.claims[...]`` match jwt_authn's payload in
  dynamic metadata ``envoy.filters.http.jwt_authn`` / ``payload``; ``request.auth.audiences``/``presenter``
  are the ``aud``/``azp`` claims;
* ``hosts`` -> ``:authority`` (case-insensitive, with or without ``:port``), ``methods`` -> ``:method``,
  ``paths`` -> the path without query, ``ports`` -> destination port (the service port),
  ``when request.headers[x]`` -> header ``x``;
* string forms: exact, ``prefix*``, ``*suffix``, ``*`` = present.

RequestAuthentication: one provider per JWT rule; the requirement is "any provider, or no token at all"
(``allow_missing``), which is Istio's: an invalid token is 401, a missing one passes without identity. An
inline JWKS that is not JSON is replaced by an empty key set (tokens from that issuer fail, fail-closed)
and reported (``mesh.waypoint_diagnostics``). ``jwksUri`` is fetched by Envoy through a cluster
``jwks|<host>|<port>`` built here.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import urlparse

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config_pb2

from istiopy.mesh.ambient import typed_list
from istiopy.mesh.resources.common import PolicyTargetReference, duration_seconds
from istiopy.mesh.resources.security import (
    AuthorizationPolicy,
    Condition,
    Operation,
    RequestAuthentication,
    Rule,
    Source,
)
from istiopy.mesh.waypoint_diagnostics import jwks_problem
from istiopy.xds.waypoint import envoy as ev
from istiopy.xds.waypoint.plan import ServedPort, WaypointPlan

T = ev.T
log = logging.getLogger(__name__)
JWT_FILTER = "envoy.filters.http.jwt_authn"
PAYLOAD = "payload"
GATEWAY_GROUP = "gateway.networking.k8s.io"
# A valid key set no token can match (an RSA modulus whose private key was never kept): the fail-closed
# stand-in for an unusable JWKS. Envoy checks keys when it loads them, so a made-up modulus would NACK.
_FAKE_N = (
    "0KM0fXvlFhZX1vZ-VE2lqxaA_hwExja3JSEUF35VKaMT8hXh7c_b0XYEXwwlDXgtnLhErhDL4TnBk8i9kYulBkAPku"
    "XU5L9LRf5mEnOSXWei6K2Fv8z3IF8_8pK1SxetIAmjqp2tWjdtP1X5STJN7cuubLq9ZBUTDf5CYgOqTlyZCHqSPGDw"
    "mddNsZcew0vbxygm-fCFYpwvEI-8TzIJEqdVsBz85eZL8RA7J0SwML9IjkQUUAy6zdYWHRfBG0Ry8yhAJ6xVTdC32u"
    "qnartZA9U0jz7nhs8cusvWQ8SPiowDnVWNVYFzCtabURW_7EZZI2KIC5k0tD4R1TJfUGwVow"
)
_FAKE_JWKS = json.dumps(
    {"keys": [{"kty": "RSA", "kid": "istiopy-invalid", "e": "AQAB", "alg": "RS256", "n": _FAKE_N}]}
)


def _targets(refs: list[PolicyTargetReference], ns: str, plan: WaypointPlan, sp: ServedPort) -> bool:
    for ref in refs:
        group, kind = ref.group_kind
        rns = ref.namespace or ns
        if (group, kind) in (("", "Service"), ("networking.istio.io", "ServiceEntry")) and (
            kind,
            rns,
            ref.name,
        ) == (sp.kind, sp.namespace, sp.name):
            return True
        if (
            kind == "Gateway"
            and group == GATEWAY_GROUP
            and (rns, ref.name) == (plan.wid.namespace, plan.wid.name)
        ):
            return True
    return False


def applicable_policies(plan: WaypointPlan, sp: ServedPort) -> list[AuthorizationPolicy]:
    assert plan.store is not None
    return [
        p
        for p in typed_list(plan.store, AuthorizationPolicy)
        if p.target_refs and _targets(p.target_refs, p.namespace, plan, sp)
    ]


def applicable_authn(plan: WaypointPlan, sp: ServedPort) -> list[RequestAuthentication]:
    assert plan.store is not None
    return [
        p
        for p in typed_list(plan.store, RequestAuthentication)
        if p.target_refs and _targets(p.target_refs, p.namespace, plan, sp)
    ]


def http_filters(plan: WaypointPlan, sp: ServedPort) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = [
        {
            "name": "envoy.filters.http.cors",
            "typed_config": {"@type": T + "envoy.extensions.filters.http.cors.v3.Cors"},
        }
    ]
    authn = applicable_authn(plan, sp)
    if authn:
        filters.append(_jwt_filter(plan, authn))
    by_action: dict[str, list[AuthorizationPolicy]] = {}
    for p in applicable_policies(plan, sp):
        by_action.setdefault(p.spec.action.value, []).append(p)
    for action, envoy_action, prefix in (
        ("AUDIT", "LOG", "istio-audit"),
        ("CUSTOM", "DENY", "istio-custom"),
        ("DENY", "DENY", "istio-deny"),
        ("ALLOW", "ALLOW", "istio-allow"),
    ):
        pols = by_action.get(action)
        if not pols:
            continue
        policies: dict[str, Any] = {}
        for p in sorted(pols, key=lambda p: (p.namespace, p.name)):
            for i, rule in enumerate(p.spec.rules):
                try:
                    converted = _rule(rule, sp, deny=envoy_action == "DENY")
                    if converted is not None:  # checked here: a bad rule must not take the listener down
                        ev.parse(converted, rbac_config_pb2.Policy())
                except Exception as e:
                    log.warning(
                        "waypoint: rule %d of %s/%s cannot be enforced: %s", i, p.namespace, p.name, e
                    )
                    # fail closed: an ALLOW rule we cannot express matches nothing; a DENY one denies all
                    converted = (
                        None if envoy_action == "ALLOW" else {"permissions": [_ANY], "principals": [_ANY]}
                    )
                if converted is not None:
                    policies[f"ns[{p.namespace}]-policy[{p.name}]-rule[{i}]"] = converted
        if envoy_action == "DENY" and not policies:
            continue
        filters.append(
            {
                "name": "envoy.filters.http.rbac",
                "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.rbac.v3.RBAC",
                    "rules": {"action": envoy_action, "policies": policies},
                    "rules_stat_prefix": prefix + ".",
                },
            }
        )
    filters.append(
        {
            "name": "envoy.filters.http.fault",
            "typed_config": {"@type": T + "envoy.extensions.filters.http.fault.v3.HTTPFault"},
        }
    )
    return filters


# ------------------------------------------------------------------------------------------------ RBAC
_ANY = {"any": True}


def _sm(value: str, ignore_case: bool = False) -> dict[str, Any]:
    """Istio string form -> Envoy StringMatcher."""
    if value == "*":
        out: dict[str, Any] = {"safe_regex": {"regex": ".+"}}
    elif value.startswith("*"):
        out = {"suffix": value[1:]}
    elif value.endswith("*"):
        out = {"prefix": value[:-1]}
    else:
        out = {"exact": value}
    if ignore_case and "safe_regex" not in out:
        out["ignore_case"] = True
    return out


def _set(key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Principal sets hold ``ids``, permission sets hold ``rules``."""
    return {key: {"ids" if key.endswith("_ids") else "rules": items}}


def _or(items: list[dict[str, Any]], key: str = "or_ids") -> dict[str, Any]:
    return items[0] if len(items) == 1 else _set(key, items)


def _and(items: list[dict[str, Any]], key: str = "and_ids") -> dict[str, Any]:
    if not items:
        return dict(_ANY)
    return items[0] if len(items) == 1 else _set(key, items)


def _not(item: dict[str, Any], key: str = "not_id") -> dict[str, Any]:
    return {key: item}


def _principal_sm(value: str) -> dict[str, Any]:
    """A source principal (``td/ns/x/sa/y`` form, no scheme) against the SPIFFE URI in filter state."""
    if value == "*":
        return {"prefix": "spiffe://"}
    if value.startswith("*"):
        return {"suffix": value[1:]}
    if value.endswith("*"):
        return {"prefix": "spiffe://" + value[:-1]}
    return {"exact": "spiffe://" + value}


def _peer(sm: dict[str, Any]) -> dict[str, Any]:
    return {"filter_state": {"key": ev.PEER_PRINCIPAL, "string_match": sm}}


def _namespace_sm(value: str) -> dict[str, Any]:
    if value == "*":
        return {"safe_regex": {"regex": r"spiffe://[^/]+/ns/[^/]+/sa/[^/]+"}}
    if value.startswith("*"):
        body = "[^/]*" + re.escape(value[1:])
    elif value.endswith("*"):
        body = re.escape(value[:-1]) + "[^/]*"
    else:
        body = re.escape(value)
    return {"safe_regex": {"regex": rf"spiffe://[^/]+/ns/{body}/sa/[^/]+"}}


def _sa_sm(value: str) -> dict[str, Any]:
    ns, _, sa = value.partition("/")
    return {"safe_regex": {"regex": rf"spiffe://[^/]+/ns/{re.escape(ns)}/sa/{re.escape(sa)}"}}


def _payload(path: list[str], value: str) -> dict[str, Any]:
    """A JWT claim (string, or list of strings containing it) from jwt_authn's payload metadata."""
    sm = _sm(value)
    return _or(
        [
            {
                "metadata": {
                    "filter": JWT_FILTER,
                    "path": [{"key": k} for k in [PAYLOAD, *path]],
                    "value": matcher,
                }
            }
            for matcher in ({"string_match": sm}, {"list_match": {"one_of": {"string_match": sm}}})
        ],
        "or_ids",
    )


def _request_principal(value: str) -> dict[str, Any]:
    """``<iss>/<sub>``: the two claims, split at the last slash (issuers are URLs, subjects have none)."""
    if value == "*":
        return _payload(["sub"], "*")
    iss, _, sub = value.rpartition("/")
    if not iss:
        return _payload(["iss"], value)
    parts = [_payload(["iss"], iss)]
    if sub != "*":
        parts.append(_payload(["sub"], sub))
    return _and(parts)


_CLAIM = re.compile(r"^request\.auth\.claims((?:\[[^\]]+\])+)$")
_HEADER = re.compile(r"^request\.headers\[(.+)\]$")


def _condition(c: Condition) -> tuple[str, dict[str, Any]] | None:
    """A ``when`` condition -> ("principal"|"permission", matcher), None when unknown (never matches)."""

    def values(fn: Any, permission: bool = False) -> dict[str, Any] | None:
        o, a, n = ("or_rules", "and_rules", "not_rule") if permission else ("or_ids", "and_ids", "not_id")
        parts: list[dict[str, Any]] = []
        if c.values:
            parts.append(_or([fn(v) for v in c.values], o))
        if c.not_values:
            parts.append(_not(_or([fn(v) for v in c.not_values], o), n))
        return _and(parts, a) if parts else None

    key = c.key
    m: dict[str, Any] | None
    if (h := _HEADER.match(key)) is not None:
        m = values(lambda v: {"header": {"name": h.group(1), "string_match": _sm(v)}})
        return ("principal", m) if m else None
    if (cl := _CLAIM.match(key)) is not None:
        path = re.findall(r"\[([^\]]+)\]", cl.group(1))
        m = values(lambda v: _payload(path, v))
        return ("principal", m) if m else None
    simple = {
        "request.auth.principal": _request_principal,
        "request.auth.audiences": lambda v: _payload(["aud"], v),
        "request.auth.presenter": lambda v: _payload(["azp"], v),
        "source.principal": lambda v: _peer(_principal_sm(v)),
        "source.namespace": lambda v: _peer(_namespace_sm(v)),
        "source.serviceAccount": lambda v: _peer(_sa_sm(v)),
        "source.ip": lambda v: {"direct_remote_ip": _cidr(v)},
        "remote.ip": lambda v: {"remote_ip": _cidr(v)},
    }
    if key in simple:
        m = values(simple[key])
        return ("principal", m) if m else None
    if key == "destination.port":
        m = values(lambda v: {"destination_port": int(v)}, permission=True)
        return ("permission", m) if m else None
    if key == "destination.ip":
        m = values(lambda v: {"destination_ip": _cidr(v)}, permission=True)
        return ("permission", m) if m else None
    return None


def _cidr(v: str) -> dict[str, Any]:
    addr, _, length = v.partition("/")
    return {"address_prefix": addr, "prefix_len": int(length) if length else (128 if ":" in addr else 32)}


def _field(values: list[str], not_values: list[str], fn: Any, neg_key: str) -> list[dict[str, Any]]:
    out = []
    if values:
        out.append(_or([fn(v) for v in values], "or_ids" if neg_key == "not_id" else "or_rules"))
    if not_values:
        out.append(
            _not(_or([fn(v) for v in not_values], "or_ids" if neg_key == "not_id" else "or_rules"), neg_key)
        )
    return out


def _source(s: Source) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    parts += _field(s.principals, s.not_principals, lambda v: _peer(_principal_sm(v)), "not_id")
    parts += _field(s.namespaces, s.not_namespaces, lambda v: _peer(_namespace_sm(v)), "not_id")
    parts += _field(s.service_accounts, s.not_service_accounts, lambda v: _peer(_sa_sm(v)), "not_id")
    parts += _field(s.request_principals, s.not_request_principals, _request_principal, "not_id")
    parts += _field(s.ip_blocks, s.not_ip_blocks, lambda v: {"direct_remote_ip": _cidr(v)}, "not_id")
    parts += _field(s.remote_ip_blocks, s.not_remote_ip_blocks, lambda v: {"remote_ip": _cidr(v)}, "not_id")
    parts += _field(
        s.trust_domains,
        s.not_trust_domains,
        lambda v: _peer({"prefix": f"spiffe://{v}/"}),
        "not_id",
    )
    return _and(parts)


def _host(v: str) -> dict[str, Any]:
    if v == "*" or v.startswith("*") or v.endswith("*") or ":" in v:
        return {"header": {"name": ":authority", "string_match": _sm(v, ignore_case=True)}}
    return {
        "or_rules": {
            "rules": [
                {"header": {"name": ":authority", "string_match": {"exact": v, "ignore_case": True}}},
                {"header": {"name": ":authority", "string_match": {"prefix": v + ":", "ignore_case": True}}},
            ]
        }
    }


def _operation(o: Operation) -> dict[str, Any]:
    parts: list[dict[str, Any]] = []
    parts += _field(o.hosts, o.not_hosts, _host, "not_rule")
    parts += _field(o.ports, o.not_ports, lambda v: {"destination_port": int(v)}, "not_rule")
    parts += _field(
        o.methods,
        o.not_methods,
        lambda v: {"header": {"name": ":method", "string_match": _sm(v)}},
        "not_rule",
    )
    parts += _field(o.paths, o.not_paths, lambda v: {"url_path": {"path": _sm(v)}}, "not_rule")
    return _and(parts, "and_rules")


def _rule(rule: Rule, sp: ServedPort, deny: bool) -> dict[str, Any] | None:
    """One Istio rule -> one Envoy policy (from: OR of sources, to: OR of operations, when: AND)."""
    principals: list[dict[str, Any]] = []
    permissions: list[dict[str, Any]] = []
    froms = [f.source for f in rule.from_ if f.source is not None]
    if froms:
        principals.append(_or([_source(s) for s in froms]))
    tos = [t.operation for t in rule.to if t.operation is not None]
    if tos:
        permissions.append(_or([_operation(o) for o in tos], "or_rules"))
    for c in rule.when:
        got = _condition(c)
        if got is None:
            if deny:
                continue  # an unknown attribute in a DENY: the rest still denies (stricter)
            return None  # in an ALLOW: the rule can never match
        (principals if got[0] == "principal" else permissions).append(got[1])
    return {
        "permissions": [_and(permissions, "and_rules")],
        "principals": [_and(principals)],
    }


# -------------------------------------------------------------------------------------------- JWT
def jwks_cluster_name(uri: str) -> tuple[str, str, int, bool]:
    u = urlparse(uri)
    tls = u.scheme == "https"
    port = u.port or (443 if tls else 80)
    host = u.hostname or ""
    return f"jwks|{host}|{port}", host, port, tls


def _jwks_cluster(uri: str) -> tuple[str, Any]:
    name, host, port, tls = jwks_cluster_name(uri)
    is_ip = bool(re.match(r"^[0-9.]+$", host)) or ":" in host
    data: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if is_ip else "STRICT_DNS",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
                    ]
                }
            ],
        },
    }
    if tls:
        data["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "validation_context": {"trusted_ca": {"filename": "/etc/ssl/certs/ca-certificates.crt"}}
                },
            },
        }
    return name, ev.parse(data, cluster_pb2.Cluster())


def _jwt_filter(plan: WaypointPlan, authn: list[RequestAuthentication]) -> dict[str, Any]:
    providers: dict[str, Any] = {}
    for ra in sorted(authn, key=lambda r: (r.namespace, r.name)):
        for i, rule in enumerate(ra.spec.jwt_rules):
            p: dict[str, Any] = {"payload_in_metadata": PAYLOAD, "forward": rule.forward_original_token}
            if rule.issuer:
                p["issuer"] = rule.issuer
            if rule.audiences:
                p["audiences"] = list(rule.audiences)
            if rule.jwks_uri and not rule.jwks:
                cname, cluster = _jwks_cluster(rule.jwks_uri)
                plan.extra["clusters"][cname] = cluster
                p["remote_jwks"] = {
                    "http_uri": {
                        "uri": rule.jwks_uri,
                        "cluster": cname,
                        "timeout": ev.dur(duration_seconds(rule.timeout, 5.0)),
                    },
                    "cache_duration": "300s",
                    "retry_policy": {"num_retries": 3},
                }
            else:
                jwks = rule.jwks if rule.jwks and not jwks_problem(rule.jwks) else _FAKE_JWKS
                p["local_jwks"] = {"inline_string": jwks}
            if rule.from_headers:
                p["from_headers"] = [
                    {"name": h.name or "", **({"value_prefix": h.prefix} if h.prefix else {})}
                    for h in rule.from_headers
                ]
            if rule.from_params:
                p["from_params"] = list(rule.from_params)
            if rule.from_cookies:
                p["from_cookies"] = list(rule.from_cookies)
            if rule.output_payload_to_header:
                p["forward_payload_header"] = rule.output_payload_to_header
            if rule.output_claim_to_headers:
                p["claim_to_headers"] = [
                    {"header_name": c.header or "", "claim_name": c.claim or ""}
                    for c in rule.output_claim_to_headers
                ]
            providers[f"origins-{ra.namespace}-{ra.name}-{i}"] = p
    requirements: list[dict[str, Any]] = [{"provider_name": name} for name in providers]
    requirements.append({"allow_missing": {}})
    config = {
        "@type": T + "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": providers,
        "rules": [{"match": {"prefix": "/"}, "requires": {"requires_any": {"requirements": requirements}}}],
        "bypass_cors_preflight": True,
    }
    return {"name": JWT_FILTER, "typed_config": config}
