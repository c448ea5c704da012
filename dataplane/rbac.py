"""L4 authorization for inbound connections, with upstream ztunnel's evaluation semantics exactly.

Why exactness matters: istiod converts AuthorizationPolicy for ztunnel and relies on ztunnel's evaluation to
produce Istio's documented results (``spec: {}`` denies all, ``rules: [{}]`` allows all, DENY beats ALLOW, an
ALLOW with an HTTP-only rule fails closed). Any deviation here silently changes what a user's policy means.

The rules (``shared/reference/ambient.md`` 1.3):

* a policy whose ``rules`` list is empty never matches;
* rules are ORed; within a rule the clauses are ANDed (a rule without clauses therefore always matches);
* within a clause the matches are ORed, and an *empty* Match (no field set) is skipped — it matches nothing;
* within one Match, different field kinds are ANDed, the values of one kind are ORed, ``not_*`` kinds negate;
* principals are compared without the ``spiffe://`` scheme, with exact/prefix/suffix/presence string matching;
* when the source identity is unknown (plaintext), identity-based positive fields cannot match and
  identity-based negative fields cannot exclude;
* decision: any matching DENY -> deny; no ALLOW policy -> allow; any matching ALLOW -> allow; otherwise deny.
  Dry-run policies are evaluated and logged but never change the decision.

On top of policy, :func:`check_inbound` applies the waypoint rule: a destination with a waypoint accepts
traffic only from that waypoint's identity.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from istiopy.api.gen import authorization_pb2
from istiopy.dataplane.state import (
    Identity,
    IPAddress,
    IPNetwork,
    ProxyState,
    ValidationError,
    Workload,
    principal,
)

log = logging.getLogger("istiopy.ztunnel.rbac")

SCOPES = {0: "Global", 1: "Namespace", 2: "WorkloadSelector"}
ACTIONS = {0: "Allow", 1: "Deny"}


@dataclass(frozen=True)
class StringMatch:
    """One of exact / prefix / suffix / presence (upstream's oneof)."""

    kind: str  # "Exact" | "Prefix" | "Suffix" | "Presence"
    value: str = ""

    def matches(self, s: str) -> bool:
        if self.kind == "Exact":
            return s == self.value
        if self.kind == "Prefix":
            return s.startswith(self.value)
        if self.kind == "Suffix":
            return s.endswith(self.value)
        return s != ""  # Presence: any non-empty value

    @classmethod
    def from_proto(cls, msg: authorization_pb2.StringMatch, what: str) -> StringMatch:
        kind = msg.WhichOneof("match_type")
        if kind == "exact":
            return cls("Exact", msg.exact)
        if kind == "prefix":
            return cls("Prefix", msg.prefix)
        if kind == "suffix":
            return cls("Suffix", msg.suffix)
        if kind == "presence":
            return cls("Presence")
        raise ValidationError(f"{what}: string match has no match_type")

    def to_json(self) -> dict[str, object]:
        return {self.kind: {} if self.kind == "Presence" else self.value}


@dataclass(frozen=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str

    def matches(self, ident: Identity) -> bool:
        return ident.namespace == self.namespace and ident.service_account == self.service_account


@dataclass(frozen=True)
class Connection:
    """What a policy can see about one inbound connection."""

    src_identity: Identity | None
    src_ip: IPAddress
    dst_ip: IPAddress
    dst_port: int


def _cidr(msg: authorization_pb2.Address, what: str) -> IPNetwork:
    if len(msg.address) not in (4, 16):
        raise ValidationError(f"{what}: address must be 4 or 16 bytes, got {len(msg.address)}")
    ip = ipaddress.ip_address(msg.address)
    if msg.length > ip.max_prefixlen:
        raise ValidationError(f"{what}: prefix length {msg.length} too long for {ip}")
    return ipaddress.ip_network((ip, msg.length), strict=False)


def _ports(values: Iterable[int], what: str) -> tuple[int, ...]:
    out = tuple(values)
    for p in out:
        if p > 65535:
            raise ValidationError(f"{what}: invalid port {p}")
    return out


@dataclass(frozen=True)
class Match:
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f) for f in self.__dataclass_fields__)

    def matches(self, c: Connection) -> bool:
        ident = c.src_identity
        ok = True
        # Identity fields: a positive kind needs an identity; a negative kind only excludes a known identity.
        if self.namespaces:
            ok &= ident is not None and any(m.matches(ident.namespace) for m in self.namespaces)
        if self.not_namespaces:
            ok &= not (ident is not None and any(m.matches(ident.namespace) for m in self.not_namespaces))
        if self.service_accounts:
            ok &= ident is not None and any(m.matches(ident) for m in self.service_accounts)
        if self.not_service_accounts:
            ok &= not (ident is not None and any(m.matches(ident) for m in self.not_service_accounts))
        if self.principals:
            ok &= ident is not None and any(m.matches(principal(ident)) for m in self.principals)
        if self.not_principals:
            ok &= not (ident is not None and any(m.matches(principal(ident)) for m in self.not_principals))
        if self.source_ips:
            ok &= any(c.src_ip in n for n in self.source_ips)
        if self.not_source_ips:
            ok &= not any(c.src_ip in n for n in self.not_source_ips)
        if self.destination_ips:
            ok &= any(c.dst_ip in n for n in self.destination_ips)
        if self.not_destination_ips:
            ok &= not any(c.dst_ip in n for n in self.not_destination_ips)
        if self.destination_ports:
            ok &= c.dst_port in self.destination_ports
        if self.not_destination_ports:
            ok &= c.dst_port not in self.not_destination_ports
        return ok

    @classmethod
    def from_proto(cls, m: authorization_pb2.Match, what: str) -> Match:
        def sm(xs: Iterable[authorization_pb2.StringMatch]) -> tuple[StringMatch, ...]:
            return tuple(StringMatch.from_proto(x, what) for x in xs)

        def sa(xs: Iterable[authorization_pb2.ServiceAccountMatch]) -> tuple[ServiceAccountMatch, ...]:
            return tuple(ServiceAccountMatch(x.namespace, x.serviceAccount) for x in xs)

        def ips(xs: Iterable[authorization_pb2.Address]) -> tuple[IPNetwork, ...]:
            return tuple(_cidr(x, what) for x in xs)

        return cls(
            namespaces=sm(m.namespaces),
            not_namespaces=sm(m.not_namespaces),
            service_accounts=sa(m.service_accounts),
            not_service_accounts=sa(m.not_service_accounts),
            principals=sm(m.principals),
            not_principals=sm(m.not_principals),
            source_ips=ips(m.source_ips),
            not_source_ips=ips(m.not_source_ips),
            destination_ips=ips(m.destination_ips),
            not_destination_ips=ips(m.not_destination_ips),
            destination_ports=_ports(m.destination_ports, what),
            not_destination_ports=_ports(m.not_destination_ports, what),
        )

    def to_json(self) -> dict[str, object]:
        """The camelCase shape ``istioctl ztunnel-config policies -o json`` prints (empty kinds omitted)."""
        out: dict[str, object] = {}

        def put(key: str, value: Sequence[object]) -> None:
            if value:
                out[key] = list(value)

        put("namespaces", [m.to_json() for m in self.namespaces])
        put("notNamespaces", [m.to_json() for m in self.not_namespaces])
        put("principals", [m.to_json() for m in self.principals])
        put("notPrincipals", [m.to_json() for m in self.not_principals])
        put("sourceIps", [str(n) for n in self.source_ips])
        put("notSourceIps", [str(n) for n in self.not_source_ips])
        put("destinationIps", [str(n) for n in self.destination_ips])
        put("notDestinationIps", [str(n) for n in self.not_destination_ips])
        put("destinationPorts", list(self.destination_ports))
        put("notDestinationPorts", list(self.not_destination_ports))
        put(
            "serviceAccounts",
            [{"namespace": s.namespace, "serviceAccount": s.service_account} for s in self.service_accounts],
        )
        put(
            "notServiceAccounts",
            [
                {"namespace": s.namespace, "serviceAccount": s.service_account}
                for s in self.not_service_accounts
            ],
        )
        return out


# A rule is a list of clauses; a clause is a list of matches (the ``[[[match]]]`` nesting upstream dumps).
Clause = tuple[Match, ...]
Rule = tuple[Clause, ...]


@dataclass(frozen=True)
class Authorization:
    name: str
    namespace: str
    scope: str  # "Global" | "Namespace" | "WorkloadSelector"
    action: str  # "Allow" | "Deny"
    rules: tuple[Rule, ...]
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def scope_key(self) -> str:
        """Scope index key: the namespace for NAMESPACE scope, ``""`` for GLOBAL, else a marker."""
        if self.scope == "Global":
            return ""
        if self.scope == "Namespace":
            return self.namespace
        return "\x00selector"  # selector policies are found through Workload.authorization_policies only

    def matches(self, c: Connection) -> bool:
        if not self.rules:
            return False
        for rule in self.rules:
            if all(any(m.matches(c) for m in clause if not m.empty) for clause in rule):
                return True
        return False

    @classmethod
    def from_proto(cls, msg: authorization_pb2.Authorization) -> Authorization:
        if not msg.name:
            raise ValidationError("authorization name is empty")
        what = f"authorization {msg.namespace}/{msg.name}"
        if msg.scope not in SCOPES:
            raise ValidationError(f"{what}: unknown scope {msg.scope}")
        if msg.action not in ACTIONS:
            raise ValidationError(f"{what}: unknown action {msg.action}")
        if msg.scope != authorization_pb2.GLOBAL and not msg.namespace:
            raise ValidationError(f"{what}: namespace is required for {SCOPES[msg.scope]} scope")
        rules = tuple(
            tuple(tuple(Match.from_proto(m, what) for m in clause.matches) for clause in rule.clauses)
            for rule in msg.rules
        )
        return cls(msg.name, msg.namespace, SCOPES[msg.scope], ACTIONS[msg.action], rules, msg.dry_run)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name,
            "namespace": self.namespace,
            "scope": self.scope,
            "action": self.action,
            "rules": [[[m.to_json() for m in clause] for clause in rule] for rule in self.rules],
        }
        if self.dry_run:
            out["dryRun"] = True
        return out


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    policy: str = ""

    def __bool__(self) -> bool:
        return self.allowed


def evaluate(policies: Iterable[Authorization], conn: Connection) -> Decision:
    """Upstream's decision order over the given policies (already selected for the destination)."""
    allows: list[Authorization] = []
    for pol in policies:
        if pol.dry_run:
            log.info("dry-run policy %s would %s: %s", pol.key, pol.action.lower(), pol.matches(conn))
            continue
        if pol.action == "Deny":
            if pol.matches(conn):
                return Decision(False, "explicitly denied", pol.key)
        else:
            allows.append(pol)
    if not allows:
        return Decision(True, "no allow policies")
    for pol in allows:
        if pol.matches(conn):
            return Decision(True, "allowed", pol.key)
    return Decision(False, "not allowed")


def check_inbound(state: ProxyState, dst: Workload, conn: Connection) -> Decision:
    """Full inbound authorization: waypoint enforcement, then the policies that apply to ``dst``."""
    if dst.waypoint is not None:
        allowed = state.gateway_identities(dst.waypoint)
        if conn.src_identity is None or conn.src_identity not in allowed:
            return Decision(
                False, f"destination has a waypoint ({dst.waypoint.destination}); source is not it"
            )
    return evaluate(state.policies_for(dst), conn)
