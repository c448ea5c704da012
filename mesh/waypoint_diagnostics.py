"""What a waypoint would refuse, found in the model: the checks the waypoint generator and the analyzer share.

Why here: a resource that would make Envoy NACK must never reach a waypoint (a NACK freezes *every* update
of that type for the proxy, so one bad VirtualService would stall all routing changes). The waypoint
generator (``istiopy.xds.waypoint``) calls these checks and leaves the offending part out; the analyzer and
the operator call :func:`waypoint_diagnostics` to report the same findings on the resource, so what is
reported is exactly what was left out.

Checks (each returns a human message, empty when fine):

* :func:`regex_problem` - RE2 (Envoy's regex engine) syntax Python's ``re`` accepts but RE2 rejects:
  atomic groups, possessive quantifiers, conditionals, ``\\Z``, repetition counts above 1000.
* :func:`jwks_problem` - an inline JWKS that is not a JSON key set (Envoy rejects the whole filter).
* :func:`virtual_service_problems` - routes naming a subset no DestinationRule defines, or a regex above.
* CUSTOM AuthorizationPolicies at a waypoint: there is no ext_authz provider here, so the policy is
  rejected with a clear message and enforced fail-closed (its matching requests are denied).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from istiopy.mesh.ambient import StoreReader, typed_list
from istiopy.mesh.meta import ResourceKey
from istiopy.mesh.resources.common import StringMatch
from istiopy.mesh.resources.networking import Destination, DestinationRule, VirtualService
from istiopy.mesh.resources.security import Action, AuthorizationPolicy, RequestAuthentication

__all__ = [
    "DestinationRuleIndex",
    "WaypointDiagnostic",
    "destination_rule_for",
    "destination_rule_index",
    "jwks_problem",
    "regex_problem",
    "resolve_host",
    "subset_names",
    "virtual_service_problems",
    "waypoint_diagnostics",
]

DOMAIN = "cluster.local"
# Envoy refuses regexes whose RE2 program exceeds this (Istio's bootstrap value, which the waypoint
# launcher sets too; Envoy's own default is 100).
RE2_MAX_PROGRAM_SIZE = 32768

# Constructs Python's ``re`` compiles that RE2 refuses (look-around and back-references are already
# refused by the model's own validation).
_RE2_REFUSED = [
    (re.compile(r"\(\?>"), "atomic groups (?>...) are not RE2 syntax"),
    (re.compile(r"(?<!\\)(?:[*+?}])\+"), "possessive quantifiers are not RE2 syntax"),
    (re.compile(r"\(\?\("), "conditional groups are not RE2 syntax"),
    (re.compile(r"\\Z"), "\\Z is not RE2 syntax (use \\z or $)"),
    (re.compile(r"\(\?<?[=!]"), "look-around is not RE2 syntax"),
    (re.compile(r"\\[1-9]|\(\?P="), "back-references are not RE2 syntax"),
]
_REPEAT = re.compile(r"(?<!\\)\{(\d+)(?:,(\d*))?\}")


@dataclass(frozen=True)
class WaypointDiagnostic:
    """One finding: the resource, a field path, a reason and a message (the analyzer wraps it)."""

    resource: ResourceKey
    field: str
    reason: str
    message: str


def regex_problem(pattern: str) -> str:
    """Why Envoy (RE2) would reject ``pattern`` ("" when it would not)."""
    if not pattern:
        return "empty regex"
    for rx, why in _RE2_REFUSED:
        if rx.search(pattern):
            return f"regex {pattern!r}: {why}"
    size = program_size(pattern)
    if size > RE2_MAX_PROGRAM_SIZE:
        return f"regex {pattern!r}: RE2 program of about {size} instructions exceeds {RE2_MAX_PROGRAM_SIZE}"
    for m in _REPEAT.finditer(pattern):
        counts = [int(g) for g in m.groups() if g]
        if any(c > 1000 for c in counts):
            return f"regex {pattern!r}: repetition count above 1000 (RE2's limit)"
    try:
        re.compile(pattern)
    except re.error as e:
        if not re.search(r"\\[pPCz]|\[\[:", pattern):
            return f"regex {pattern!r} does not compile: {e}"
    return ""


def program_size(pattern: str) -> int:
    """An over-estimate of RE2's compiled program size (Envoy refuses programs above a threshold).

    Counted repetition is what makes programs big (``x{1,200}`` compiles ``x`` 200 times), so this walks
    the pattern, sizes each atom (literal, escape, class, group) and multiplies by the repetition bound;
    it errs on the large side, so a pattern it accepts is within Envoy's limit."""
    pos = 0

    def seq() -> int:
        nonlocal pos
        total = 0
        last = 0
        while pos < len(pattern):
            c = pattern[pos]
            if c == ")":
                break
            if c == "|":
                pos += 1
                total += 2
                last = 0
                continue
            if c in "*+?":
                pos += 1
                total += 2
                continue
            if c == "{":
                m = _REPEAT.match(pattern, pos)
                if m is not None:
                    counts = [int(g) for g in m.groups() if g]
                    rep = max(counts) if counts else 1
                    total += last * max(rep - 1, 0) + rep
                    pos = m.end()
                    continue
            if c == "(":
                pos += 1
                if pattern.startswith("?", pos):
                    close = pattern.find(":", pos)
                    named = pattern.find(">", pos)
                    ends = [e for e in (close, named) if e != -1]
                    pos = (min(ends) + 1) if ends else pos + 1
                last = seq() + 2
                pos += 1
            elif c == "[":
                end = pos + 1
                if end < len(pattern) and pattern[end] == "^":
                    end += 1
                if end < len(pattern) and pattern[end] == "]":
                    end += 1
                while end < len(pattern) and pattern[end] != "]":
                    end += 2 if pattern[end] == "\\" else 1
                last = 2 + pattern.count("-", pos, end)
                pos = end + 1
            elif c == "\\":
                last = 2
                pos += 2
            else:
                last = 1
                pos += 1
            total += last
        return total

    size = 0
    while pos < len(pattern):
        size += seq() + 1
        pos += 1  # an unbalanced ')' (Python's re rejects it anyway)
    return size + 3


def jwks_problem(text: str) -> str:
    """Why an inline JWKS would be refused ("" when it is a JSON key set)."""
    try:
        doc = json.loads(text)
    except ValueError as e:
        return f"jwks is not JSON: {e}"
    if not isinstance(doc, dict):
        return "jwks must be a JSON object"
    keys = doc.get("keys")
    if not isinstance(keys, list) or not keys:
        return "jwks must have a non-empty `keys` list"
    for i, key in enumerate(keys):
        if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
            return f"jwks key {i} has no `kty`"
        why = _key_problem(key)
        if why:
            return f"jwks key {i}: {why}"
    return ""


def _b64url(value: object) -> bytes | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, binascii.Error):
        return None


def _key_problem(key: dict[str, object]) -> str:
    """What Envoy's JWKS loader would refuse in one key (it parses every key when the config loads)."""
    kty = key["kty"]
    if kty == "RSA":
        n, e = _b64url(key.get("n")), _b64url(key.get("e"))
        if n is None or e is None:
            return "RSA key needs base64url `n` and `e`"
        if not n[-1] & 1:
            return "RSA modulus `n` is even (not a valid key)"
    elif kty == "EC":
        if key.get("crv") not in ("P-256", "P-384", "P-521"):
            return "EC key needs `crv` P-256, P-384 or P-521"
        if _b64url(key.get("x")) is None or _b64url(key.get("y")) is None:
            return "EC key needs base64url `x` and `y`"
    elif kty == "oct":
        if _b64url(key.get("k")) is None:
            return "oct key needs base64url `k`"
    elif kty == "OKP":
        if key.get("crv") != "Ed25519" or _b64url(key.get("x")) is None:
            return "OKP key needs `crv` Ed25519 and base64url `x`"
    else:
        return f"unsupported key type {kty!r}"
    return ""


def resolve_host(host: str, namespace: str, domain: str = DOMAIN) -> str:
    """A VirtualService/DestinationRule host as istiod reads it: a short name (no dot) is relative to the
    resource's namespace (``reviews`` -> ``reviews.<ns>.svc.<domain>``); anything with a dot is taken as
    written (``api.example.com`` is an external host, not a namespace)."""
    if "." in host or host == "*" or host.startswith("*"):
        return host
    return f"{host}.{namespace}.svc.{domain}"


DestinationRuleIndex = dict[str, list[DestinationRule]]


def destination_rule_index(store: StoreReader) -> DestinationRuleIndex:
    """DestinationRules by resolved host, best first: build once per generation, look up per service
    (a scan per lookup is quadratic in the number of services)."""
    index: DestinationRuleIndex = {}
    for dr in typed_list(store, DestinationRule):
        index.setdefault(resolve_host(dr.spec.host, dr.namespace), []).append(dr)
    return index


def destination_rule_for(
    store: StoreReader, hostname: str, prefer_namespace: str, index: DestinationRuleIndex | None = None
) -> DestinationRule | None:
    """The DestinationRule for ``hostname``: one in ``prefer_namespace`` (the service's) wins, then the
    first by (namespace, name) elsewhere (deterministic), as istiod picks the rule closest to the service."""
    found = list((index if index is not None else destination_rule_index(store)).get(hostname, ()))
    if not found:
        return None
    found.sort(key=lambda d: (d.namespace != prefer_namespace, d.namespace, d.name))
    return found[0]


def subset_names(
    store: StoreReader, hostname: str, namespace: str, index: DestinationRuleIndex | None = None
) -> set[str]:
    dr = destination_rule_for(store, hostname, namespace, index)
    return {s.name for s in dr.spec.subsets} if dr is not None else set()


def _match_regexes(m: StringMatch | None) -> Iterable[str]:
    if m is not None and m.regex is not None:
        yield m.regex


def virtual_service_problems(
    store: StoreReader, vs: VirtualService, index: DestinationRuleIndex | None = None
) -> dict[int, list[tuple[str, str]]]:
    """Per HTTP route index: (field path, message) of what makes that route unusable at a waypoint."""
    out: dict[int, list[tuple[str, str]]] = {}
    if index is None:
        index = destination_rule_index(store)
    for i, route in enumerate(vs.spec.http):
        problems: list[tuple[str, str]] = []
        for j, match in enumerate(route.match):
            base = f"spec.http[{i}].match[{j}]"
            fields: list[tuple[str, StringMatch | None]] = [
                ("uri", match.uri),
                ("method", match.method),
                ("authority", match.authority),
            ]
            fields += [(f"headers.{k}", v) for k, v in match.headers.items()]
            fields += [(f"queryParams.{k}", v) for k, v in match.query_params.items()]
            fields += [(f"withoutHeaders.{k}", v) for k, v in match.without_headers.items()]
            for name, sm in fields:
                for rx in _match_regexes(sm):
                    why = regex_problem(rx)
                    if why:
                        problems.append((f"{base}.{name}.regex", why))
        if route.rewrite is not None and route.rewrite.uri_regex_rewrite is not None:
            why = regex_problem(route.rewrite.uri_regex_rewrite.match)
            if why:
                problems.append((f"spec.http[{i}].rewrite.uriRegexRewrite.match", why))
        dests: list[tuple[str, Destination]] = [
            (f"spec.http[{i}].route[{k}].destination", d.destination) for k, d in enumerate(route.route)
        ]
        if route.mirror is not None:
            dests.append((f"spec.http[{i}].mirror", route.mirror))
        dests += [
            (f"spec.http[{i}].mirrors[{k}].destination", m.destination) for k, m in enumerate(route.mirrors)
        ]
        for path, dest in dests:
            if not dest.subset:
                continue
            host = resolve_host(dest.host, vs.namespace)
            svc_ns = host.split(".")[1] if host.endswith(".svc." + DOMAIN) else vs.namespace
            if dest.subset not in subset_names(store, host, svc_ns, index):
                problems.append(
                    (
                        f"{path}.subset",
                        f"subset {dest.subset!r} of host {host} is not defined by any DestinationRule; "
                        "the route is left out of the waypoint configuration",
                    )
                )
        if problems:
            out[i] = problems
    return out


def waypoint_diagnostics(store: StoreReader) -> list[WaypointDiagnostic]:
    """Everything the waypoint generator leaves out or rejects, reported on the resource."""
    out: list[WaypointDiagnostic] = []
    index = destination_rule_index(store)
    for vs in typed_list(store, VirtualService):
        for _, problems in sorted(virtual_service_problems(store, vs, index).items()):
            for path, msg in problems:
                reason = "ReferencedResourceNotFound" if path.endswith(".subset") else "InvalidRegex"
                out.append(WaypointDiagnostic(vs.key, path, reason, msg))
    for ra in typed_list(store, RequestAuthentication):
        for i, rule in enumerate(ra.spec.jwt_rules):
            if rule.jwks:
                why = jwks_problem(rule.jwks)
                if why:
                    out.append(
                        WaypointDiagnostic(
                            ra.key,
                            f"spec.jwtRules[{i}].jwks",
                            "InvalidJwks",
                            f"{why}; tokens from issuer {rule.issuer!r} are rejected until it is fixed",
                        )
                    )
    for dr in typed_list(store, DestinationRule):
        out += _locality_problems(dr)
    for ap in typed_list(store, AuthorizationPolicy):
        if ap.spec.action == Action.CUSTOM and ap.target_refs:
            out.append(
                WaypointDiagnostic(
                    ap.key,
                    "spec.action",
                    "UnsupportedValue",
                    "CUSTOM authorization is not supported by istiopy waypoints (no ext_authz provider); "
                    "the policy is enforced fail-closed: requests it matches are denied",
                )
            )
    return out


def _locality_problems(dr: DestinationRule) -> list[WaypointDiagnostic]:
    """Locality settings waypoints do not apply: weighted ``distribute`` and ``failoverPriority`` (failover
    by proximity and by ``failover`` regions is applied, with outlier detection, as Istio does)."""
    out = []
    policies = [("spec.trafficPolicy", dr.spec.traffic_policy)]
    policies += [
        (f"spec.subsets[{i}].trafficPolicy", s.traffic_policy) for i, s in enumerate(dr.spec.subsets)
    ]
    for path, policy in policies:
        lb = policy.load_balancer if policy is not None else None
        setting = lb.locality_lb_setting if lb is not None else None
        if setting is None:
            continue
        for name, present in (
            ("distribute", setting.distribute),
            ("failoverPriority", setting.failover_priority),
        ):
            if present:
                out.append(
                    WaypointDiagnostic(
                        dr.key,
                        f"{path}.loadBalancer.localityLbSetting.{name}",
                        "UnsupportedValue",
                        f"localityLbSetting.{name} is not applied by istiopy waypoints: endpoints are "
                        "balanced without it",
                    )
                )
    return out
