"""WADS: the ``istio.security.Authorization`` generator, ztunnel's L4 policies.

``istiopy.mesh.authz`` decides what ztunnel gets of each AuthorizationPolicy and PeerAuthentication (and
what to report); this module turns those decisions into protobuf with upstream's shape:

* a policy rule becomes one ``Rule``; its ``to``, ``from`` and each ``when`` become ``Clause``s (AND-ed),
  each ``to.operation`` / ``from.source`` becomes one ``Match`` of its clause (OR-ed);
* strings become ``StringMatch``: ``*`` presence, ``*abc`` suffix, ``abc*`` prefix, else exact;
  a leading ``spiffe://`` is dropped from principals since ztunnel compares identities without it;
* IPs and CIDRs become ``Address{bytes, prefix length}``; ports are numbers, unparseable ones dropped;
* ``serviceAccounts`` entries ``ns/name`` or ``name`` (in the policy's namespace).

Names are ``<ns>/<name>``; the synthesized PeerAuthentication policies use names with ``_`` so they never
collide with a Kubernetes object.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from google.protobuf import empty_pb2

from istiopy.api.gen import authorization_pb2 as az
from istiopy.mesh.ambient import (
    STATIC_STRICT_POLICY,
    AmbientIndex,
    MeshSettings,
    StoreReader,
    typed_list,
    view,
)
from istiopy.mesh.authz import (
    L4_CONDITION_KEYS,
    PeerAuthnPortPolicy,
    ZtunnelPolicy,
    converted_peer_authentications,
    ztunnel_policy,
)
from istiopy.mesh.resources.security import (
    AuthorizationPolicy,
    Condition,
    Operation,
    PeerAuthentication,
    Rule,
)
from istiopy.mesh.store import Change

__all__ = [
    "AUTHORIZATION_TYPE_URL",
    "affected_names",
    "affects",
    "authorization",
    "generate_authorizations",
    "peer_authentication_authorization",
    "static_strict_authorization",
    "string_matches",
]

AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"

_SCOPES = {"GLOBAL": az.GLOBAL, "NAMESPACE": az.NAMESPACE, "WORKLOAD_SELECTOR": az.WORKLOAD_SELECTOR}
_ACTIONS = {"ALLOW": az.ALLOW, "DENY": az.DENY}


def _string_match(value: str, principal: bool = False) -> Any:
    if principal:
        value = value.removeprefix("spiffe://")
    if value == "*":
        return az.StringMatch(presence=empty_pb2.Empty())
    if value.startswith("*"):
        return az.StringMatch(suffix=value[1:])
    if value.endswith("*"):
        return az.StringMatch(prefix=value[:-1])
    return az.StringMatch(exact=value)


def string_matches(values: list[str], principal: bool = False) -> list[Any]:
    return [_string_match(v, principal) for v in values]


def _addresses(values: list[str]) -> list[Any]:
    out = []
    for v in values:
        try:
            net = ipaddress.ip_network(v, strict=False)
        except ValueError:
            continue
        # A bare IP is a host network; upstream keeps the address as written, not the masked network.
        addr = ipaddress.ip_address(v.split("/", 1)[0])
        out.append(az.Address(address=addr.packed, length=net.prefixlen))
    return out


def _ports(values: list[str]) -> list[int]:
    return [int(v) for v in values if v.isdigit() and int(v) <= 65535]


def _service_accounts(values: list[str], namespace: str) -> list[Any]:
    out = []
    for v in values:
        ns, sep, sa = v.partition("/")
        out.append(
            az.ServiceAccountMatch(namespace=ns, serviceAccount=sa)
            if sep
            else az.ServiceAccountMatch(namespace=namespace, serviceAccount=v)
        )
    return out


def _condition_match(cond: Condition) -> Any:
    """One ``when`` as one Match; keys ztunnel cannot evaluate give an empty Match (never matches)."""
    m = az.Match()
    key = cond.key
    for values, negate in ((cond.values, False), (cond.not_values, True)):
        if key == "source.namespace":
            (m.not_namespaces if negate else m.namespaces).extend(string_matches(values))
        elif key == "source.principal":
            (m.not_principals if negate else m.principals).extend(string_matches(values, principal=True))
        elif key == "source.ip":
            (m.not_source_ips if negate else m.source_ips).extend(_addresses(values))
        elif key == "destination.ip":
            (m.not_destination_ips if negate else m.destination_ips).extend(_addresses(values))
        elif key == "destination.port":
            (m.not_destination_ports if negate else m.destination_ports).extend(_ports(values))
    return m


def _rule(rule: Rule, namespace: str) -> Any:
    out = az.Rule()
    if rule.to:
        clause = out.clauses.add()
        for to in rule.to:
            op = to.operation or Operation()
            clause.matches.add(destination_ports=_ports(op.ports), not_destination_ports=_ports(op.not_ports))
    if rule.from_:
        clause = out.clauses.add()
        for frm in rule.from_:
            src = frm.source
            if src is None:
                clause.matches.add()
                continue
            clause.matches.add(
                source_ips=_addresses(src.ip_blocks),
                not_source_ips=_addresses(src.not_ip_blocks),
                namespaces=string_matches(src.namespaces),
                not_namespaces=string_matches(src.not_namespaces),
                service_accounts=_service_accounts(src.service_accounts, namespace),
                not_service_accounts=_service_accounts(src.not_service_accounts, namespace),
                principals=string_matches(src.principals, principal=True),
                not_principals=string_matches(src.not_principals, principal=True),
            )
    for cond in rule.when:
        out.clauses.add().matches.append(_condition_match(cond))
    return out


def authorization(zp: ZtunnelPolicy) -> Any:
    """The Authorization message of a policy ztunnel receives (``zp.sent`` must be true)."""
    pol = zp.policy
    return az.Authorization(
        name=pol.name,
        namespace=pol.namespace,
        scope=_SCOPES[zp.scope],
        action=_ACTIONS[zp.action],
        rules=[_rule(r, pol.namespace) for r in zp.rules],
        dry_run=zp.dry_run,
    )


def _deny_plaintext(ports: list[int] | None = None) -> Any:
    return az.Match(
        not_principals=[az.StringMatch(presence=empty_pb2.Empty())], destination_ports=ports or []
    )


def static_strict_authorization(settings: MeshSettings = MeshSettings()) -> Any:
    """The DENY of every connection without a peer identity, referenced by workloads under STRICT mTLS."""
    return az.Authorization(
        name=STATIC_STRICT_POLICY,
        namespace=settings.root_namespace,
        scope=az.WORKLOAD_SELECTOR,
        action=az.DENY,
        rules=[az.Rule(clauses=[az.Clause(matches=[_deny_plaintext()])])],
    )


def peer_authentication_authorization(conv: PeerAuthnPortPolicy) -> Any:
    """A workload PeerAuthentication with port-level modes as one DENY policy."""
    out = az.Authorization(
        name=conv.name, namespace=conv.namespace, scope=az.WORKLOAD_SELECTOR, action=az.DENY
    )
    for port in conv.strict_ports:
        out.rules.add().clauses.add().matches.append(_deny_plaintext([port]))
    if conv.clauses:
        rule = out.rules.add()
        for c in conv.clauses:
            if c == "plaintext":
                rule.clauses.add().matches.append(_deny_plaintext())
            else:
                assert isinstance(c, int)
                rule.clauses.add().matches.add(not_destination_ports=[c])
    return out


def generate_authorizations(
    store: StoreReader, settings: MeshSettings = MeshSettings()
) -> list[tuple[str, Any]]:
    """Every Authorization resource as (name, message), sorted by name."""
    store = view(store)
    out: list[tuple[str, Any]] = []
    for pol in typed_list(store, AuthorizationPolicy):
        zp = ztunnel_policy(pol, settings)
        if zp.sent:
            out.append((zp.resource_name, authorization(zp)))
    if typed_list(store, PeerAuthentication):
        out.append(
            (f"{settings.root_namespace}/{STATIC_STRICT_POLICY}", static_strict_authorization(settings))
        )
    for conv in converted_peer_authentications(store, settings):
        out.append((conv.resource_name, peer_authentication_authorization(conv)))
    out.sort(key=lambda pair: pair[0])
    return out


def affects(change: Change) -> bool:
    return change.key.kind in ("AuthorizationPolicy", "PeerAuthentication")


def affected_names(
    change: Change, store: StoreReader, settings: MeshSettings = MeshSettings()
) -> dict[str, set[str]]:
    """{AUTHORIZATION_TYPE_URL: names that may have changed} for an applied change."""
    if not affects(change):
        return {}
    names = AmbientIndex(store, settings).affected(change).policies
    return {AUTHORIZATION_TYPE_URL: names} if names else {}


def condition_is_l4(cond: Condition) -> bool:
    return cond.key in L4_CONDITION_KEYS
