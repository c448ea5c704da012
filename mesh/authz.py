"""What ztunnel enforces of AuthorizationPolicy and PeerAuthentication, decided from the model.

ztunnel is an L4 proxy: it sees identities, namespaces, IPs and ports, never HTTP. Upstream istiod therefore
converts each policy before sending it (reference: ambient.md 7.1), and reports what it could not convert.
The decisions live here, in the model layer, because three consumers need the same answer: the WADS
generator (what to send), the operator (the status condition on the policy) and ``istioctl analyze``.
The protobuf building itself is ``istiopy.xds.wads``.

The rules, in short:
* ``targetRef(s)`` policies belong to waypoints and are not sent; CUSTOM and AUDIT are not sent (reported);
* scope: ``selector`` -> WORKLOAD_SELECTOR, none -> NAMESPACE, none in the root namespace -> GLOBAL;
* an ALLOW rule that uses any HTTP-only field is dropped whole (fail closed: it can never match), a DENY
  rule keeps its L4 parts (more restrictive than asked), and the policy carries a status message;
* PeerAuthentication STRICT becomes a reference to the static DENY-plaintext policy
  ``<root>/istio_converted_static_strict``; port-level exceptions become a per-workload converted DENY.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from istiopy.mesh.ambient import (
    PEER_AUTHN_PREFIX,
    STATIC_STRICT_POLICY,
    MeshSettings,
    StoreReader,
    typed_list,
)
from istiopy.mesh.resources.security import (
    Action,
    AuthorizationPolicy,
    MtlsMode,
    MutualTLS,
    Operation,
    PeerAuthentication,
    Rule,
    Source,
)
from istiopy.mesh.store import selector_matches

__all__ = [
    "DRY_RUN_ANNOTATION",
    "HTTP_RULES_MESSAGE",
    "L4_CONDITION_KEYS",
    "PeerAuthnPortPolicy",
    "PolicyCondition",
    "ZtunnelPolicy",
    "converted_peer_authentication",
    "converted_peer_authentications",
    "peer_authentication_policy_names",
    "rule_http_fields",
    "rule_is_effective",
    "workload_policy_names",
    "ztunnel_condition",
    "ztunnel_policy",
]

DRY_RUN_ANNOTATION = "istio.io/dry-run"
# The first sentence is the interface fact users search for; the second tells them what to do.
HTTP_RULES_MESSAGE = (
    "ztunnel does not support HTTP attributes (found: {found}). "
    "In ambient mode you must use a waypoint proxy to enforce HTTP rules."
)
_ALLOW_DROPPED = (
    "Rules of this ALLOW policy that match HTTP attributes are left out, "
    "which is more restrictive than requested."
)
_DENY_PARTIAL = (
    "This DENY policy is enforced on its L4 parts only, without the HTTP attributes, "
    "which is more restrictive than requested."
)
_DENY_NO_EFFECT = (
    "Without its HTTP attributes this DENY policy has nothing ztunnel can enforce and has no effect; "
    "bind it to a waypoint with targetRefs to enforce it."
)

# ``when`` keys ztunnel can evaluate; any other key is an HTTP (waypoint-only) attribute.
L4_CONDITION_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
# (attribute, upstream field name) of fields ztunnel cannot see.
_HTTP_OPERATION_FIELDS = (
    ("hosts", "hosts"),
    ("not_hosts", "notHosts"),
    ("methods", "methods"),
    ("not_methods", "notMethods"),
    ("paths", "paths"),
    ("not_paths", "notPaths"),
)
_HTTP_SOURCE_FIELDS = (
    ("remote_ip_blocks", "remoteIpBlocks"),
    ("not_remote_ip_blocks", "notRemoteIpBlocks"),
    ("request_principals", "requestPrincipals"),
    ("not_request_principals", "notRequestPrincipals"),
    # A Match has no trust-domain field and folding it into principals would widen the source.
    ("trust_domains", "trustDomains"),
    ("not_trust_domains", "notTrustDomains"),
)
_L4_SOURCE_FIELDS = (
    "principals",
    "not_principals",
    "namespaces",
    "not_namespaces",
    "service_accounts",
    "not_service_accounts",
    "ip_blocks",
    "not_ip_blocks",
)

Scope = Literal["GLOBAL", "NAMESPACE", "WORKLOAD_SELECTOR"]


def rule_http_fields(rule: Rule) -> list[str]:
    """Upstream names of the HTTP-only fields (and ``when`` keys) a rule uses, sorted, no duplicates."""
    found: set[str] = set()
    for to in rule.to:
        op = to.operation or Operation()
        found |= {name for attr, name in _HTTP_OPERATION_FIELDS if getattr(op, attr)}
    for frm in rule.from_:
        src = frm.source or Source()
        found |= {name for attr, name in _HTTP_SOURCE_FIELDS if getattr(src, attr)}
    found |= {c.key for c in rule.when if c.key not in L4_CONDITION_KEYS}
    return sorted(found)


def _valid_ports(values: list[str]) -> list[int]:
    return [int(v) for v in values if v.isdigit() and int(v) <= 65535]


def rule_is_effective(rule: Rule) -> bool:
    """Whether the rule, reduced to its L4 parts, can still match at ztunnel.

    Each of ``to``, ``from`` and every ``when`` becomes one clause (AND); a clause whose matches are all
    empty never matches (ztunnel skips empty matches), so one such clause disables the rule. A rule with
    no clauses at all (``{}``) matches everything.
    """
    if rule.to and not any(
        _valid_ports((t.operation or Operation()).ports)
        or _valid_ports((t.operation or Operation()).not_ports)
        for t in rule.to
    ):
        return False
    if rule.from_ and not any(
        any(getattr(f.source or Source(), a) for a in _L4_SOURCE_FIELDS) for f in rule.from_
    ):
        return False
    return all(c.key in L4_CONDITION_KEYS and (c.values or c.not_values) for c in rule.when)


@dataclass(frozen=True)
class ZtunnelPolicy:
    """The ztunnel view of one AuthorizationPolicy.

    ``sent`` says whether WADS carries it; ``rules`` are the rules to convert (their HTTP parts are
    ignored by the converter); ``reason``/``message`` are the status to report (None when clean).
    """

    policy: AuthorizationPolicy
    sent: bool
    scope: Scope = "WORKLOAD_SELECTOR"
    action: Literal["ALLOW", "DENY"] = "ALLOW"
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False
    http_fields: tuple[str, ...] = ()
    reason: str | None = None
    message: str | None = None
    field_path: str = ""

    @property
    def resource_name(self) -> str:
        return f"{self.policy.namespace}/{self.policy.name}"


def ztunnel_policy(
    policy: AuthorizationPolicy, settings: MeshSettings = MeshSettings(), dry_run_enabled: bool = False
) -> ZtunnelPolicy:
    """Decide what ztunnel gets of ``policy`` and what to report about it."""
    dry_run = policy.metadata.annotations.get(DRY_RUN_ANNOTATION, "").lower() in ("true", "1", "t")
    if dry_run and not dry_run_enabled:
        return ZtunnelPolicy(
            policy,
            sent=False,
            reason="UnsupportedValue",
            message=f'policy "{policy.namespace}/{policy.name}" uses the {DRY_RUN_ANNOTATION} annotation, '
            "but dry-run authorization policies are not enabled for ambient",
            field_path=f"metadata.annotations[{DRY_RUN_ANNOTATION}]",
        )
    if policy.uses_target_refs:
        return ZtunnelPolicy(policy, sent=False)  # a waypoint policy; nothing for ztunnel to say
    spec = policy.spec
    if spec.action not in (Action.ALLOW, Action.DENY):
        return ZtunnelPolicy(
            policy,
            sent=False,
            reason="UnsupportedValue",
            message=f"ztunnel does not support the {spec.action.value} action",
            field_path="spec.action",
        )
    scope: Scope = "WORKLOAD_SELECTOR"
    if spec.selector is None:
        scope = "GLOBAL" if policy.namespace == settings.root_namespace else "NAMESPACE"
    action: Literal["ALLOW", "DENY"] = "ALLOW" if spec.action == Action.ALLOW else "DENY"
    kept: list[Rule] = []
    http: set[str] = set()
    paths: list[str] = []
    for i, rule in enumerate(spec.rules):
        found = rule_http_fields(rule)
        if found:
            http.update(found)
            paths.append(f"spec.rules[{i}]")
            if action == "ALLOW":
                continue  # an ALLOW rule that cannot be checked must never match
        kept.append(rule)
    if not http:
        return ZtunnelPolicy(policy, True, scope, action, tuple(kept), dry_run)
    if action == "ALLOW":
        tail = _ALLOW_DROPPED
    elif any(rule_is_effective(r) for r in kept):
        tail = _DENY_PARTIAL
    else:
        tail = _DENY_NO_EFFECT
    return ZtunnelPolicy(
        policy,
        True,
        scope,
        action,
        tuple(kept),
        dry_run,
        http_fields=tuple(sorted(http)),
        reason="UnsupportedValue",
        message=HTTP_RULES_MESSAGE.format(found=", ".join(sorted(http))) + " " + tail,
        field_path=paths[0] if len(paths) == 1 else "spec.rules",
    )


@dataclass(frozen=True)
class PolicyCondition:
    """A status condition in upstream's ambient shape (``ZtunnelAccepted`` on AuthorizationPolicy)."""

    type: str
    status: Literal["True", "False"]
    reason: str
    message: str


def ztunnel_condition(zp: ZtunnelPolicy) -> PolicyCondition | None:
    """The ``ZtunnelAccepted`` condition the operator writes on a policy, or None for waypoint policies
    (``targetRefs``), which ztunnel never sees. Accepted-with-warning (HTTP fields) is still ``True``:
    ztunnel enforces the policy, more strictly than written."""
    if zp.policy.uses_target_refs:
        return None
    if not zp.sent:
        return PolicyCondition("ZtunnelAccepted", "False", zp.reason or "UnsupportedValue", zp.message or "")
    if zp.message:
        return PolicyCondition("ZtunnelAccepted", "True", zp.reason or "UnsupportedValue", zp.message)
    return PolicyCondition("ZtunnelAccepted", "True", "Accepted", "attached to ztunnel")


def workload_policy_names(
    store: StoreReader,
    namespace: str,
    labels: Mapping[str, str],
    settings: MeshSettings = MeshSettings(),
) -> list[str]:
    """``Workload.authorization_policies``: only selector policies that ztunnel receives, from the
    workload's namespace and the root namespace, sorted; then the PeerAuthentication-derived ones.
    Namespace and global policies are not listed: ztunnel finds them by scope."""
    names: set[str] = set()
    for ns in {namespace, settings.root_namespace}:
        for pol in typed_list(store, AuthorizationPolicy, ns):
            sel = pol.spec.selector
            if sel is None or not selector_matches(sel.match_labels, labels):
                continue
            if ztunnel_policy(pol, settings).sent:
                names.add(f"{pol.namespace}/{pol.name}")
    return sorted(names) + peer_authentication_policy_names(store, namespace, labels, settings)


# --------------------------------------------------------------------------------- PeerAuthentication
def _mode(mtls: MutualTLS | None) -> MtlsMode:
    return mtls.mode if mtls is not None else MtlsMode.UNSET


def _oldest(policies: list[PeerAuthentication]) -> PeerAuthentication | None:
    """Conflicts resolve to the oldest policy, as upstream; name breaks ties so the choice is stable."""
    if not policies:
        return None
    return min(policies, key=lambda p: (p.metadata.creation_timestamp or "", p.namespace, p.name))


def _is_namespace_wide(pa: PeerAuthentication) -> bool:
    return pa.spec.selector is None or not pa.spec.selector.match_labels


def _parents(
    store: StoreReader, namespace: str, settings: MeshSettings
) -> tuple[PeerAuthentication | None, PeerAuthentication | None]:
    """(namespace-wide policy of ``namespace``, mesh-wide policy of the root namespace)."""
    root = _oldest(
        [p for p in typed_list(store, PeerAuthentication, settings.root_namespace) if _is_namespace_wide(p)]
    )
    if namespace == settings.root_namespace:
        return None, root
    ns = _oldest([p for p in typed_list(store, PeerAuthentication, namespace) if _is_namespace_wide(p)])
    return ns, root


def _parent_strict(ns: PeerAuthentication | None, root: PeerAuthentication | None) -> bool:
    """The inherited mode is STRICT: the namespace says so, or it is silent and the mesh says so."""
    ns_mode = _mode(ns.spec.mtls) if ns is not None else MtlsMode.UNSET
    if ns_mode != MtlsMode.UNSET:
        return ns_mode == MtlsMode.STRICT
    return root is not None and _mode(root.spec.mtls) == MtlsMode.STRICT


def peer_authentication_policy_names(
    store: StoreReader, namespace: str, labels: Mapping[str, str], settings: MeshSettings = MeshSettings()
) -> list[str]:
    """The PeerAuthentication-derived Authorization names a workload references: the static STRICT policy
    when its effective mode is STRICT everywhere, and/or its converted port-level policy."""
    ns_pa, root_pa = _parents(store, namespace, settings)
    strict = _parent_strict(ns_pa, root_pa)
    port_policy = ""
    workload_pa = None
    if namespace != settings.root_namespace:
        workload_pa = _oldest(
            [
                p
                for p in typed_list(store, PeerAuthentication, namespace)
                if not _is_namespace_wide(p)
                and p.spec.selector is not None
                and selector_matches(p.spec.selector.match_labels, labels)
            ]
        )
    if workload_pa is not None:
        mode = _mode(workload_pa.spec.mtls)
        port_modes = [_mode(m) for m in (workload_pa.spec.port_level_mtls or {}).values()]
        lax_port = any(m in (MtlsMode.PERMISSIVE, MtlsMode.DISABLE) for m in port_modes)
        strict_port = MtlsMode.STRICT in port_modes
        converted = f"{workload_pa.namespace}/{PEER_AUTHN_PREFIX}{workload_pa.name}"
        if mode == MtlsMode.STRICT or (mode == MtlsMode.UNSET and strict):
            strict = True
            if lax_port:
                # The converted policy carries the STRICT default with the port exceptions.
                port_policy, strict = converted, False
        else:
            strict = False
            if strict_port:
                port_policy = converted
    out = []
    if strict:
        out.append(f"{settings.root_namespace}/{STATIC_STRICT_POLICY}")
    if port_policy:
        out.append(port_policy)
    return out


@dataclass(frozen=True)
class PeerAuthnPortPolicy:
    """A workload PeerAuthentication with port-level modes, as one DENY policy for ztunnel.

    ``strict_ports`` each deny plaintext to that port (one rule per port, OR-ed). ``clauses`` form one
    more rule whose clauses are AND-ed: ``"plaintext"`` = no peer identity, an int = "not this port".
    """

    namespace: str
    name: str
    selector: Mapping[str, str]
    strict_ports: tuple[int, ...] = ()
    clauses: tuple[str | int, ...] = field(default=())

    @property
    def resource_name(self) -> str:
        return f"{self.namespace}/{self.name}"


def converted_peer_authentication(
    pa: PeerAuthentication,
    ns_pa: PeerAuthentication | None,
    root_pa: PeerAuthentication | None,
    settings: MeshSettings = MeshSettings(),
) -> PeerAuthnPortPolicy | None:
    """The converted DENY policy of a workload PeerAuthentication with ``portLevelMtls``, or None when the
    policy needs none (mesh/namespace policies, no port overrides, or overrides equal to the default)."""
    if (
        pa.namespace == settings.root_namespace
        or _is_namespace_wide(pa)
        or not (pa.spec.port_level_mtls or {})
    ):
        return None
    mode = _mode(pa.spec.mtls)
    parent_strict = _parent_strict(ns_pa, root_pa)
    clauses: list[str | int] = []
    strict_ports: list[int] = []
    if mode == MtlsMode.STRICT:
        clauses.append("plaintext")
    found_non_strict = False
    for port_text, mtls in sorted((pa.spec.port_level_mtls or {}).items(), key=lambda kv: int(kv[0])):
        port = int(port_text)
        port_mode = _mode(mtls)
        if port_mode == MtlsMode.STRICT:
            if mode == MtlsMode.STRICT or (mode == MtlsMode.UNSET and parent_strict):
                continue  # the policy-wide default already covers it
            strict_ports.append(port)
        elif port_mode in (MtlsMode.PERMISSIVE, MtlsMode.DISABLE):
            if mode in (MtlsMode.PERMISSIVE, MtlsMode.DISABLE):
                continue
            if mode == MtlsMode.UNSET and not parent_strict:
                continue
            found_non_strict = True
            clauses.append(port)  # deny plaintext only when it is not to this port
    if mode == MtlsMode.STRICT and not found_non_strict:
        return None  # all STRICT: the static policy does the job
    if not clauses and not strict_ports:
        return None
    if parent_strict and found_non_strict and "plaintext" not in clauses:
        clauses.append("plaintext")
    selector = dict(pa.spec.selector.match_labels) if pa.spec.selector is not None else {}
    return PeerAuthnPortPolicy(
        namespace=pa.namespace,
        name=f"{PEER_AUTHN_PREFIX}{pa.name}",
        selector=selector,
        strict_ports=tuple(strict_ports),
        clauses=tuple(clauses),
    )


def converted_peer_authentications(
    store: StoreReader, settings: MeshSettings = MeshSettings()
) -> list[PeerAuthnPortPolicy]:
    """Every converted port-level policy in the store, in key order."""
    out: list[PeerAuthnPortPolicy] = []
    for pa in typed_list(store, PeerAuthentication):
        ns_pa, root_pa = _parents(store, pa.namespace, settings)
        conv = converted_peer_authentication(pa, ns_pa, root_pa, settings)
        if conv is not None:
            out.append(conv)
    return out
