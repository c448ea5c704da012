"""WADS: AuthorizationPolicy -> ztunnel conversion, each row of the ambient conversion table, exact protos."""

from __future__ import annotations

import ipaddress

import pytest
from google.protobuf import empty_pb2
from wds_helpers import pod, store_from

from istiopy.api.gen import authorization_pb2 as az
from istiopy.mesh.authz import PolicyCondition, ztunnel_condition, ztunnel_policy
from istiopy.mesh.resources.security import AuthorizationPolicy
from istiopy.mesh.store import ConfigStore
from istiopy.xds.wads import AUTHORIZATION_TYPE_URL, generate_authorizations
from istiopy.xds.wds import generate_addresses

PRESENCE = az.StringMatch(presence=empty_pb2.Empty())


def policy(name: str, ns: str, spec: str, annotations: str = "") -> str:
    return f"""
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}{", annotations: {" + annotations + "}" if annotations else ""}}}
spec: {spec}
"""


def authz(store: ConfigStore) -> dict[str, az.Authorization]:
    return dict(generate_authorizations(store))


def status(store: ConfigStore, ns: str, name: str) -> tuple[str | None, str | None, bool]:
    pol = store.get_typed(AuthorizationPolicy, ns, name)
    assert pol is not None
    zp = ztunnel_policy(pol)
    return zp.reason, zp.message, zp.sent


def cidr(text: str, length: int) -> az.Address:
    return az.Address(address=ipaddress.ip_address(text).packed, length=length)


def test_type_url_is_upstreams() -> None:
    assert AUTHORIZATION_TYPE_URL == "type.googleapis.com/istio.security.Authorization"


def test_l4_allow_policy_full_message() -> None:
    store = store_from(
        policy(
            "allow-l4",
            "a",
            """
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/b/sa/client", "spiffe://cluster.local/ns/c/sa/*", "*/sa/admin", "*"]
        notNamespaces: [kube-system]
    - source: {ipBlocks: [10.0.0.0/8, 192.168.1.7], notIpBlocks: ["fd00::/64"]}
    to:
    - operation: {ports: ["8080", "9090"], notPorts: ["22"]}
    when:
    - {key: source.namespace, values: [b], notValues: [c*]}
    - {key: destination.port, values: ["8080"]}
""",
        )
    )
    expected = az.Authorization(
        name="allow-l4",
        namespace="a",
        scope=az.WORKLOAD_SELECTOR,
        action=az.ALLOW,
        rules=[
            az.Rule(
                clauses=[
                    az.Clause(matches=[az.Match(destination_ports=[8080, 9090], not_destination_ports=[22])]),
                    az.Clause(
                        matches=[
                            az.Match(
                                principals=[
                                    az.StringMatch(exact="cluster.local/ns/b/sa/client"),
                                    az.StringMatch(prefix="cluster.local/ns/c/sa/"),
                                    az.StringMatch(suffix="/sa/admin"),
                                    PRESENCE,
                                ],
                                not_namespaces=[az.StringMatch(exact="kube-system")],
                            ),
                            az.Match(
                                source_ips=[cidr("10.0.0.0", 8), cidr("192.168.1.7", 32)],
                                not_source_ips=[cidr("fd00::", 64)],
                            ),
                        ]
                    ),
                    az.Clause(
                        matches=[
                            az.Match(
                                namespaces=[az.StringMatch(exact="b")],
                                not_namespaces=[az.StringMatch(prefix="c")],
                            )
                        ]
                    ),
                    az.Clause(matches=[az.Match(destination_ports=[8080])]),
                ]
            )
        ],
    )
    assert authz(store) == {"a/allow-l4": expected}
    assert status(store, "a", "allow-l4") == (None, None, True)


@pytest.mark.parametrize(
    ("ns", "spec", "scope"),
    [
        ("a", "{selector: {matchLabels: {app: x}}, rules: [{}]}", az.WORKLOAD_SELECTOR),
        ("a", "{rules: [{}]}", az.NAMESPACE),
        ("istio-system", "{rules: [{}]}", az.GLOBAL),
        ("istio-system", "{selector: {matchLabels: {app: x}}, rules: [{}]}", az.WORKLOAD_SELECTOR),
    ],
)
def test_scope_by_selector_namespace_and_root(ns: str, spec: str, scope: int) -> None:
    store = store_from(policy("p", ns, spec))
    assert authz(store)[f"{ns}/p"].scope == scope


def test_allow_all_and_allow_nothing() -> None:
    store = store_from(policy("allow-all", "a", "{rules: [{}]}") + policy("deny-all", "b", "{}"))
    got = authz(store)
    # rules: [{}] -> one rule with no clauses: matches everything.
    assert got["a/allow-all"] == az.Authorization(
        name="allow-all", namespace="a", scope=az.NAMESPACE, action=az.ALLOW, rules=[az.Rule()]
    )
    # spec: {} -> an ALLOW policy with no rules: matches nothing, so everything else is denied.
    assert got["b/deny-all"] == az.Authorization(name="deny-all", namespace="b", scope=az.NAMESPACE)
    assert list(got["b/deny-all"].rules) == []


def test_allow_rule_with_http_fields_is_dropped_fail_closed() -> None:
    store = store_from(
        policy(
            "mixed",
            "a",
            """
  action: ALLOW
  rules:
  - to: [{operation: {paths: [/admin], methods: [GET]}}]
  - from: [{source: {namespaces: [b]}}]
  - from: [{source: {requestPrincipals: ["*"]}}]
  - when: [{key: "request.headers[x-user]", values: [alice]}]
""",
        )
        + policy("only-l7", "b", "{rules: [{to: [{operation: {paths: [/x]}}]}]}")
    )
    got = authz(store)
    assert list(got["a/mixed"].rules) == [
        az.Rule(clauses=[az.Clause(matches=[az.Match(namespaces=[az.StringMatch(exact="b")])])])
    ]
    reason, message, sent = status(store, "a", "mixed")
    assert sent
    assert reason == "UnsupportedValue"
    assert message is not None
    assert message.startswith(
        "ztunnel does not support HTTP attributes (found: methods, paths, request.headers[x-user], "
        "requestPrincipals). In ambient mode you must use a waypoint proxy to enforce HTTP rules."
    )
    # An ALLOW whose every rule is HTTP is still an ALLOW policy, with no rules: it denies what it selects.
    assert got["b/only-l7"] == az.Authorization(
        name="only-l7", namespace="b", scope=az.NAMESPACE, action=az.ALLOW
    )
    assert status(store, "b", "only-l7")[1] == (
        "ztunnel does not support HTTP attributes (found: paths). In ambient mode you must use a waypoint "
        "proxy to enforce HTTP rules. Rules of this ALLOW policy that match HTTP attributes are left out, "
        "which is more restrictive than requested."
    )


def test_deny_keeps_its_l4_part() -> None:
    store = store_from(
        policy(
            "deny-mixed",
            "a",
            """
  action: DENY
  rules:
  - from: [{source: {namespaces: [evil]}}]
    to: [{operation: {ports: ["8080"], paths: [/admin]}}]
""",
        )
    )
    assert list(authz(store)["a/deny-mixed"].rules) == [
        az.Rule(
            clauses=[
                az.Clause(matches=[az.Match(destination_ports=[8080])]),
                az.Clause(matches=[az.Match(namespaces=[az.StringMatch(exact="evil")])]),
            ]
        )
    ]
    reason, message, _ = status(store, "a", "deny-mixed")
    assert reason == "UnsupportedValue"
    assert message is not None
    assert "(found: paths)" in message
    assert "enforced on its L4 parts only" in message


def test_deny_with_only_http_fields_is_sent_but_has_no_effect() -> None:
    store = store_from(
        policy("deny-l7", "a", "{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}")
    )
    # The clause keeps an empty match, which ztunnel skips: the rule can never fire.
    assert list(authz(store)["a/deny-l7"].rules) == [az.Rule(clauses=[az.Clause(matches=[az.Match()])])]
    message = status(store, "a", "deny-l7")[1]
    assert message is not None
    assert "has no effect" in message


@pytest.mark.parametrize("action", ["CUSTOM", "AUDIT"])
def test_custom_and_audit_are_not_sent(action: str) -> None:
    provider = ", provider: {name: ext-authz}" if action == "CUSTOM" else ""
    store = store_from(policy("p", "a", f"{{action: {action}{provider}, rules: [{{}}]}}"))
    assert authz(store) == {}
    assert status(store, "a", "p") == (
        "UnsupportedValue",
        f"ztunnel does not support the {action} action",
        False,
    )


def test_target_ref_policies_are_waypoint_only() -> None:
    store = store_from(
        policy(
            "at-waypoint",
            "a",
            "{targetRefs: [{kind: Service, group: '', name: web}],"
            " rules: [{to: [{operation: {paths: [/]}}]}]}",
        )
    )
    assert authz(store) == {}
    assert status(store, "a", "at-waypoint") == (None, None, False)


def test_dry_run_policies_are_not_sent_by_default() -> None:
    store = store_from(policy("dry", "a", "{rules: [{}]}", annotations='"istio.io/dry-run": "true"'))
    assert authz(store) == {}
    reason, message, sent = status(store, "a", "dry")
    assert (reason, sent) == ("UnsupportedValue", False)
    assert message is not None
    assert "dry-run" in message


def test_service_accounts_default_to_the_policy_namespace() -> None:
    store = store_from(
        policy("sa", "a", "{rules: [{from: [{source: {serviceAccounts: [client, other/robot]}}]}]}")
    )
    match = authz(store)["a/sa"].rules[0].clauses[0].matches[0]
    assert list(match.service_accounts) == [
        az.ServiceAccountMatch(namespace="a", serviceAccount="client"),
        az.ServiceAccountMatch(namespace="other", serviceAccount="robot"),
    ]


def test_workload_lists_only_selector_policies_it_matches() -> None:
    store = store_from(
        """
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
"""
        + pod("web", "a", "10.0.0.1", {"app": "web"})
        + policy("ns-wide", "a", "{rules: [{}]}")
        + policy("for-web", "a", "{selector: {matchLabels: {app: web}}, rules: [{}]}")
        + policy("for-db", "a", "{selector: {matchLabels: {app: db}}, rules: [{}]}")
        + policy("mesh-web", "istio-system", "{selector: {matchLabels: {app: web}}, rules: [{}]}")
        + policy(
            "custom-web",
            "a",
            "{selector: {matchLabels: {app: web}}, action: CUSTOM, provider: {name: x}, rules: [{}]}",
        )
        + policy("other-ns", "b", "{selector: {matchLabels: {app: web}}, rules: [{}]}")
        + policy("waypoint", "a", "{targetRefs: [{kind: Service, group: '', name: web}]}")
    )
    (_, addr), *_ = generate_addresses(store)
    assert list(addr.workload.authorization_policies) == ["a/for-web", "istio-system/mesh-web"]


def test_generation_is_deterministic() -> None:
    docs = [policy(f"p{i}", "a", "{rules: [{from: [{source: {namespaces: [x, y]}}]}]}") for i in range(5)]
    one = store_from("".join(docs))
    two = store_from("".join(reversed(docs)))

    def ser(store: ConfigStore) -> list[tuple[str, bytes]]:
        return [(n, m.SerializeToString(deterministic=True)) for n, m in generate_authorizations(store)]

    assert ser(one) == ser(two)


def test_ztunnel_accepted_conditions_for_the_operator() -> None:
    store = store_from(
        policy("clean", "a", "{rules: [{}]}")
        + policy("l7", "a", "{rules: [{to: [{operation: {paths: [/x]}}]}]}")
        + policy("custom", "a", "{action: CUSTOM, provider: {name: x}, rules: [{}]}")
        + policy("wp", "a", "{targetRefs: [{kind: Service, group: '', name: web}]}")
    )

    def cond(name: str) -> PolicyCondition | None:
        pol = store.get_typed(AuthorizationPolicy, "a", name)
        assert pol is not None
        return ztunnel_condition(ztunnel_policy(pol))

    assert cond("clean") == PolicyCondition("ZtunnelAccepted", "True", "Accepted", "attached to ztunnel")
    l7 = cond("l7")
    assert l7 is not None
    assert (l7.status, l7.reason) == ("True", "UnsupportedValue")
    assert l7.message.startswith("ztunnel does not support HTTP attributes (found: paths).")
    assert cond("custom") == PolicyCondition(
        "ZtunnelAccepted", "False", "UnsupportedValue", "ztunnel does not support the CUSTOM action"
    )
    assert cond("wp") is None
