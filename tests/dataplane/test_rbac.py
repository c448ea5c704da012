"""L4 authorization: one table per semantic rule of ambient.md 1.3, plus the waypoint rule."""

from __future__ import annotations

import ipaddress

import pytest

from istiopy.api.gen import authorization_pb2
from istiopy.api.identity import SpiffeId
from istiopy.dataplane.rbac import Authorization, Connection, check_inbound, evaluate
from istiopy.dataplane.state import ProxyState
from istiopy.testing import ztunnel as b

SLEEP = SpiffeId("cluster.local", "client", "sleep")
OTHER = SpiffeId("other.domain", "client", "sleep")


def conn(
    ident: SpiffeId | None = SLEEP, src: str = "10.0.1.5", dst: str = "10.0.2.7", port: int = 8080
) -> Connection:
    return Connection(ident, ipaddress.ip_address(src), ipaddress.ip_address(dst), port)


def pol(
    rules: list[list[list[authorization_pb2.Match]]], action: str = "ALLOW", **kw: object
) -> Authorization:
    return Authorization.from_proto(b.policy("p", "server", rules, action=action, **kw))  # type: ignore[arg-type]


M = b.match

# ---- structure: rules OR, clauses AND, matches OR, empty match skipped, empty rules never match ----------

STRUCTURE = [
    ("empty rules never match", [], conn(), False),
    ("a rule with no clauses matches everything", [[]], conn(), True),
    ("a rule with no clauses matches plaintext too", [[]], conn(None), True),
    ("an empty match is skipped (matches nothing)", [[[M()]]], conn(), False),
    ("empty match skipped, sibling decides (true)", [[[M(), M(destination_ports=[8080])]]], conn(), True),
    ("empty match skipped, sibling decides (false)", [[[M(), M(destination_ports=[9])]]], conn(), False),
    ("a clause with no matches fails its rule", [[[]]], conn(), False),
    ("matches in a clause OR", [[[M(destination_ports=[1]), M(destination_ports=[8080])]]], conn(), True),
    (
        "clauses in a rule AND (one fails)",
        [[[M(destination_ports=[8080])], [M(namespaces=["nope"])]]],
        conn(),
        False,
    ),
    (
        "clauses in a rule AND (both hold)",
        [[[M(destination_ports=[8080])], [M(namespaces=["client"])]]],
        conn(),
        True,
    ),
    ("rules OR", [[[M(destination_ports=[1])]], [[M(destination_ports=[8080])]]], conn(), True),
    ("rules OR (none)", [[[M(destination_ports=[1])]], [[M(destination_ports=[2])]]], conn(), False),
]

# ---- fields inside one match: kinds AND, values OR, not_* negate ---------------------------------------

FIELDS = [
    ("values of one kind OR", [M(destination_ports=[1, 8080])], conn(), True),
    ("kinds AND (both hold)", [M(destination_ports=[8080], namespaces=["client"])], conn(), True),
    ("kinds AND (one fails)", [M(destination_ports=[8080], namespaces=["x"])], conn(), False),
    ("not_destination_ports excludes", [M(not_destination_ports=[8080])], conn(), False),
    ("not_destination_ports allows others", [M(not_destination_ports=[9])], conn(), True),
    (
        "positive and negative kinds AND",
        [M(destination_ports=[8080], not_namespaces=["client"])],
        conn(),
        False,
    ),
    ("source ip CIDR", [M(source_ips=["10.0.1.0/24"])], conn(), True),
    ("source ip CIDR miss", [M(source_ips=["10.0.9.0/24"])], conn(), False),
    ("source ip /32", [M(source_ips=["10.0.1.5/32"])], conn(), True),
    ("not source ip", [M(not_source_ips=["10.0.0.0/16"])], conn(), False),
    ("destination ip", [M(destination_ips=["10.0.2.7/32"])], conn(), True),
    ("not destination ip", [M(not_destination_ips=["10.0.2.0/24"])], conn(), False),
    ("ipv6 source ip", [M(source_ips=["fd00::/8"])], conn(src="fd00::5", dst="fd00::7"), True),
    ("namespace exact", [M(namespaces=["client"])], conn(), True),
    ("namespace prefix", [M(namespaces=[b.prefix("cli")])], conn(), True),
    ("namespace suffix", [M(namespaces=[b.suffix("ent")])], conn(), True),
    ("namespace presence", [M(namespaces=[b.presence()])], conn(), True),
    ("not namespace", [M(not_namespaces=["client"])], conn(), False),
    ("service account", [M(service_accounts=[("client", "sleep")])], conn(), True),
    ("service account, wrong namespace", [M(service_accounts=[("other", "sleep")])], conn(), False),
    ("not service account", [M(not_service_accounts=[("client", "sleep")])], conn(), False),
]

# ---- principals: spiffe:// stripped, exact/prefix/suffix/presence ---------------------------------------

PRINCIPALS = [
    ("exact principal without scheme", [M(principals=["cluster.local/ns/client/sa/sleep"])], conn(), True),
    (
        "the scheme is not part of the principal",
        [M(principals=["spiffe://cluster.local/ns/client/sa/sleep"])],
        conn(),
        False,
    ),
    ("principal prefix", [M(principals=[b.prefix("cluster.local/ns/client/")])], conn(), True),
    ("principal suffix", [M(principals=[b.suffix("/sa/sleep")])], conn(), True),
    ("principal suffix miss", [M(principals=[b.suffix("/sa/other")])], conn(), False),
    ("principal presence", [M(principals=[b.presence()])], conn(), True),
    ("principal presence, plaintext", [M(principals=[b.presence()])], conn(None), False),
    (
        "trust domain is part of the principal",
        [M(principals=["cluster.local/ns/client/sa/sleep"])],
        conn(OTHER),
        False,
    ),
    ("not principal", [M(not_principals=["cluster.local/ns/client/sa/sleep"])], conn(), False),
    ("plaintext: positive identity fields cannot match", [M(namespaces=[b.presence()])], conn(None), False),
    (
        "plaintext: negative identity fields cannot exclude",
        [M(not_principals=[b.prefix("")])],
        conn(None),
        True,
    ),
]


@pytest.mark.parametrize(("case", "rules", "c", "want"), STRUCTURE, ids=[c[0] for c in STRUCTURE])
def test_structure(case: str, rules: list, c: Connection, want: bool) -> None:  # type: ignore[type-arg]
    assert pol(rules).matches(c) is want


@pytest.mark.parametrize(
    ("case", "clause", "c", "want"), FIELDS + PRINCIPALS, ids=[c[0] for c in FIELDS + PRINCIPALS]
)
def test_match_fields(case: str, clause: list, c: Connection, want: bool) -> None:  # type: ignore[type-arg]
    assert pol([[clause]]).matches(c) is want


# ---- decision order: DENY first -> no ALLOW -> allow -> ALLOW match -> allow -> deny ----------------------

ALL = [[]]  # a rule that matches everything
NONE: list = []  # type: ignore[type-arg]  # no rules: never matches ("spec: {}")
PORT_8080 = [[[M(destination_ports=[8080])]]]
PORT_9 = [[[M(destination_ports=[9])]]]

DECISIONS = [
    ("no policies allow", [], True),
    ("spec {} ALLOW denies everything", [("ALLOW", NONE)], False),
    ("rules [{}] ALLOW allows everything", [("ALLOW", ALL)], True),
    ("a matching ALLOW allows", [("ALLOW", PORT_8080)], True),
    ("a non-matching ALLOW denies", [("ALLOW", PORT_9)], False),
    ("any of several ALLOWs suffices", [("ALLOW", PORT_9), ("ALLOW", PORT_8080)], True),
    ("DENY beats a matching ALLOW", [("ALLOW", ALL), ("DENY", PORT_8080)], False),
    ("a non-matching DENY with no ALLOW allows", [("DENY", PORT_9)], True),
    ("a non-matching DENY does not rescue a failed ALLOW", [("DENY", PORT_9), ("ALLOW", PORT_9)], False),
    ("DENY with empty rules never matches", [("DENY", NONE)], True),
    ("a dry-run DENY does not deny", [("DENY", ALL, True)], True),
    ("a dry-run ALLOW does not count as an ALLOW", [("ALLOW", PORT_9, True)], True),
]


@pytest.mark.parametrize(("case", "spec", "want"), DECISIONS, ids=[d[0] for d in DECISIONS])
def test_decision_order(case: str, spec: list, want: bool) -> None:  # type: ignore[type-arg]
    policies = [
        Authorization.from_proto(
            b.policy(f"p{i}", "server", s[1], action=s[0], dry_run=len(s) > 2 and bool(s[2]))
        )
        for i, s in enumerate(spec)
    ]
    d = evaluate(policies, conn())
    assert d.allowed is want
    assert bool(d) is want


def test_deny_reports_the_policy() -> None:
    d = evaluate([pol(ALL, action="DENY")], conn())
    assert not d
    assert d.policy == "server/p"
    assert "denied" in d.reason


# ---- the waypoint rule and the per-destination policy lookup ---------------------------------------------


def _waypoint_mesh() -> ProxyState:
    st = ProxyState()
    wp = b.service_key("waypoint", "server")
    adds = [
        b.service("waypoint", "server", "10.96.9.9", {15008: 15008}),
        b.workload(
            "waypoint-1", "server", "10.0.9.1", service_account="waypoint", services={wp: {15008: 15008}}
        ),
        b.workload("app", "server", "10.0.2.7", waypoint=b.gateway(address="10.96.9.9")),
        b.workload("plain", "server", "10.0.2.8"),
    ]
    st.apply_addresses({b.resource_name(a): a for a in adds})
    return st


def test_waypoint_destination_accepts_only_the_waypoint() -> None:
    st = _waypoint_mesh()
    app = st.workload_by_ip("10.0.2.7")
    assert app is not None
    wp_ident = SpiffeId("cluster.local", "server", "waypoint")
    assert check_inbound(st, app, conn(wp_ident))
    denied = check_inbound(st, app, conn(SLEEP))
    assert not denied
    assert "waypoint" in denied.reason
    assert not check_inbound(st, app, conn(None))
    # Without a waypoint the client is fine.
    assert check_inbound(st, st.workload_by_ip("10.0.2.8"), conn(SLEEP))  # type: ignore[arg-type]


def test_policy_still_applies_to_traffic_from_the_waypoint() -> None:
    st = _waypoint_mesh()
    st.apply_authorizations({"server/deny-all": b.policy("deny-all", "server", [])})
    app = st.workload_by_ip("10.0.2.7")
    assert not check_inbound(st, app, conn(SpiffeId("cluster.local", "server", "waypoint")))  # type: ignore[arg-type]


def test_check_inbound_uses_namespace_global_and_selector_policies() -> None:
    st = _waypoint_mesh()
    plain = st.workload_by_ip("10.0.2.8")
    assert plain is not None
    st.apply_authorizations(
        {
            "istio-system/deny-9": b.policy(
                "deny-9", "istio-system", [[[M(destination_ports=[9])]]], action="DENY", scope="GLOBAL"
            )
        }
    )
    assert check_inbound(st, plain, conn(port=8080))
    assert not check_inbound(st, plain, conn(port=9))
    # Another namespace's namespace-scoped policy does not apply here.
    st.apply_authorizations({"elsewhere/allow-nothing": b.policy("allow-nothing", "elsewhere", [])})
    assert check_inbound(st, plain, conn())
    # A selector policy applies only once the workload lists it.
    st.apply_authorizations(
        {
            "server/only-sleep": b.policy(
                "only-sleep", "server", [[[M(namespaces=["x"])]]], scope="WORKLOAD_SELECTOR"
            )
        }
    )
    assert check_inbound(st, plain, conn())
    relisted = b.workload("plain", "server", "10.0.2.8", policies=["server/only-sleep"])
    st.apply_addresses({relisted.workload.uid: relisted})
    assert not check_inbound(st, st.workload_by_ip("10.0.2.8"), conn())  # type: ignore[arg-type]


def test_policy_json_shape() -> None:
    p = pol(
        [
            [
                [
                    M(
                        namespaces=["a"],
                        principals=[b.presence()],
                        destination_ports=[80],
                        source_ips=["10.0.0.0/8"],
                    )
                ]
            ]
        ]
    )
    assert p.to_json() == {
        "name": "p",
        "namespace": "server",
        "scope": "Namespace",
        "action": "Allow",
        "rules": [
            [
                [
                    {
                        "namespaces": [{"Exact": "a"}],
                        "principals": [{"Presence": {}}],
                        "sourceIps": ["10.0.0.0/8"],
                        "destinationPorts": [80],
                    }
                ]
            ]
        ],
    }
