"""ProxyState: the WDS/WADS handlers, their indexes and the keep-last-good NACK contract."""

from __future__ import annotations

import ipaddress

import pytest

from istiopy.api.gen import workload_pb2
from istiopy.api.identity import SpiffeId
from istiopy.dataplane.state import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    ProxyState,
    RejectedResources,
)
from istiopy.testing import ztunnel as b

SVC = b.service_key("echo", "ns1")


def _apply(state: ProxyState, *addrs: workload_pb2.Address) -> None:
    state.apply_addresses({b.resource_name(a): a for a in addrs})


def _mesh() -> ProxyState:
    st = ProxyState()
    _apply(
        st,
        b.service("echo", "ns1", "10.96.0.10", {80: 8080}),
        b.workload("echo-1", "ns1", "10.1.0.1", services={SVC: {80: 8080}}, service_account="echo"),
        b.workload("echo-2", "ns1", "10.1.0.2", services={SVC: {80: 8080}}, node="node-b"),
    )
    return st


def test_workloads_indexed_by_uid_and_ip() -> None:
    st = _mesh()
    wl = st.workload_by_ip("10.1.0.1")
    assert wl is not None
    assert wl.uid == "Kubernetes//Pod/ns1/echo-1"
    assert st.workload_by_uid(wl.uid) is wl
    assert wl.identity == SpiffeId("cluster.local", "ns1", "echo")
    assert wl.hbone
    assert wl.healthy
    # The elided service account reads as "default" and the elided trust domain as cluster.local.
    assert st.workload_by_ip("10.1.0.2").identity == SpiffeId.parse(
        "spiffe://cluster.local/ns/ns1/sa/default"
    )
    assert st.workload_by_ip("10.1.0.9") is None
    assert st.workload_by_ip("10.1.0.1", network="other") is None


def test_services_by_key_and_vip_with_endpoints_in_stable_order() -> None:
    st = _mesh()
    svc = st.service_by_vip(ipaddress.ip_address("10.96.0.10"))
    assert svc is not None
    assert svc.key == SVC
    assert svc.ports == {80: 8080}
    assert st.service_by_key(SVC) is svc
    assert [w.name for w, _ in st.endpoints(SVC)] == ["echo-1", "echo-2"]
    assert [ep.ports for _, ep in st.endpoints(SVC)] == [{80: 8080}, {80: 8080}]
    assert [s.key for s in st.services_of(st.workload_by_ip("10.1.0.1"))] == [SVC]
    assert st.services_by_hostname("echo.ns1.svc.cluster.local") == [svc]


def test_update_reindexes_and_removal_cleans_every_index() -> None:
    st = _mesh()
    uid = b.pod_uid("ns1", "echo-1")
    # The pod moves to a new IP and leaves the service.
    _apply(st, b.workload("echo-1", "ns1", "10.1.0.7"))
    assert st.workload_by_ip("10.1.0.1") is None
    assert st.workload_by_ip("10.1.0.7").uid == uid
    assert [w.name for w, _ in st.endpoints(SVC)] == ["echo-2"]
    st.apply_addresses({}, removed=[uid, SVC])
    assert st.workload_by_uid(uid) is None
    assert st.workload_by_ip("10.1.0.7") is None
    assert st.service_by_vip("10.96.0.10") is None
    assert st.service_by_key(SVC) is None
    # Removing what is not there is not an error (the server may repeat removals after a reconnect).
    st.apply_addresses({}, removed=["nope", uid])


def test_bad_resource_nacks_and_keeps_last_good_while_good_ones_apply() -> None:
    st = _mesh()
    uid = b.pod_uid("ns1", "echo-1")
    broken = b.workload("echo-1", "ns1", "10.1.0.1")
    broken.workload.addresses[0] = b"\x01\x02\x03"  # 3 bytes is no IP
    fresh = b.workload("new-1", "ns1", "10.1.0.3")
    with pytest.raises(RejectedResources) as err:
        st.apply_addresses({uid: broken, fresh.workload.uid: fresh})
    assert uid in err.value.errors
    assert "4 or 16 bytes" in err.value.errors[uid]
    assert err.value.type_url == ADDRESS_TYPE
    assert "WDS" in str(err.value)
    # Last good echo-1 still served, with its service membership; the valid resource was applied.
    assert st.workload_by_ip("10.1.0.1").uid == uid
    assert [w.name for w, _ in st.endpoints(SVC)] == ["echo-1", "echo-2"]
    assert st.workload_by_ip("10.1.0.3") is not None


@pytest.mark.parametrize(
    ("name", "mutate", "why"),
    [
        ("wrong-name", lambda a: None, "resource name must equal the workload uid"),
        (None, lambda a: a.workload.ClearField("uid"), "uid is empty"),
        (None, lambda a: a.workload.ClearField("namespace"), "namespace is empty"),
        (None, lambda a: a.workload.ClearField("addresses"), "needs addresses or a hostname"),
        (None, lambda a: setattr(a.workload, "tunnel_protocol", 9), "unknown tunnel_protocol"),
        (None, lambda a: a.workload.services["bad"].ports.add(service_port=1), "not namespace/hostname"),
        (None, lambda a: a.workload.services["a/b"].ports.add(service_port=70000), "invalid port"),
        (None, lambda a: setattr(a.workload, "service_account", "Bad_SA"), "invalid service account"),
        (None, lambda a: a.workload.waypoint.SetInParent(), "neither hostname nor address"),
    ],
)
def test_workload_validation(name: str | None, mutate: object, why: str) -> None:
    st = ProxyState()
    addr = b.workload("p", "ns", "10.2.0.1")
    mutate(addr)  # type: ignore[operator]
    key = name or addr.workload.uid or "k"
    with pytest.raises(RejectedResources) as err:
        st.apply_addresses({key: addr})
    assert why in err.value.errors[key]
    assert not st.workloads


def test_service_validation_and_undecodable_bytes() -> None:
    st = ProxyState()
    svc = b.service("s", "ns", "10.96.1.1", {80: 80})
    svc.service.ports.add(service_port=0)
    with pytest.raises(RejectedResources, match="invalid port 0"):
        st.apply_addresses({"ns/s.ns.svc.cluster.local": svc})
    with pytest.raises(RejectedResources, match="cannot decode"):
        st.apply_addresses({"x": b"\xff\xff\xff"})
    with pytest.raises(RejectedResources, match="neither a workload nor a service"):
        st.apply_addresses({"x": workload_pb2.Address()})
    # Serialized bytes (what a raw xDS client may hand over) are accepted.
    good = b.service("s", "ns", "10.96.1.1", {80: 80})
    st.apply_addresses({"ns/s.ns.svc.cluster.local": good.SerializeToString()})
    assert st.service_by_vip("10.96.1.1") is not None


def test_policies_by_scope_and_selector() -> None:
    st = ProxyState()
    _apply(
        st,
        b.workload("a", "ns1", "10.3.0.1", policies=["ns1/selected"]),
        b.workload("b", "ns2", "10.3.0.2"),
    )
    st.apply_authorizations(
        {
            "ns1/ns-wide": b.policy("ns-wide", "ns1", [[]]),
            "ns2/ns-wide": b.policy("ns-wide", "ns2", [[]]),
            "istio-system/global": b.policy("global", "istio-system", [[]], scope="GLOBAL"),
            "ns1/selected": b.policy("selected", "ns1", [[]], scope="WORKLOAD_SELECTOR"),
            "ns1/not-selected": b.policy("not-selected", "ns1", [[]], scope="WORKLOAD_SELECTOR"),
        }
    )
    a, bb = st.workload_by_ip("10.3.0.1"), st.workload_by_ip("10.3.0.2")
    assert [p.key for p in st.policies_for(a)] == ["istio-system/global", "ns1/ns-wide", "ns1/selected"]
    assert [p.key for p in st.policies_for(bb)] == ["istio-system/global", "ns2/ns-wide"]
    st.apply_authorizations({}, removed=["istio-system/global", "ns1/selected"])
    assert [p.key for p in st.policies_for(a)] == ["ns1/ns-wide"]


def test_policy_nack_keeps_last_good() -> None:
    st = ProxyState()
    st.apply_authorizations({"ns/p": b.policy("p", "ns", [[[b.match(destination_ports=[80])]]])})
    bad = b.policy("p", "ns", [[[b.match(source_ips=[b.cidr("10.0.0.0/8")])]]])
    bad.rules[0].clauses[0].matches[0].source_ips[0].length = 40
    with pytest.raises(RejectedResources, match="prefix length 40") as err:
        st.apply_authorizations({"ns/p": bad, "ns/q": b.policy("q", "ns", [])})
    assert err.value.type_url == AUTHORIZATION_TYPE
    assert st.policies["ns/p"].rules[0][0][0].destination_ports == (80,)
    assert "ns/q" in st.policies
    p = b.policy("r", "ns", [])
    p.action = 7
    with pytest.raises(RejectedResources, match="unknown action"):
        st.apply_authorizations({"ns/r": p})
    with pytest.raises(RejectedResources, match="resource name must equal"):
        st.apply_authorizations({"ns/other": b.policy("r", "ns", [])})


def test_waypoint_resolution_and_identities() -> None:
    st = ProxyState()
    wp_key = b.service_key("waypoint", "ns1")
    _apply(
        st,
        b.service("waypoint", "ns1", "10.96.9.9", {15008: 15008}),
        b.workload(
            "waypoint-1", "ns1", "10.4.0.9", service_account="waypoint", services={wp_key: {15008: 15008}}
        ),
        b.workload("app", "ns1", "10.4.0.1", waypoint=b.gateway(address="10.96.9.9")),
        b.workload(
            "app2",
            "ns1",
            "10.4.0.2",
            waypoint=b.gateway(hostname="waypoint.ns1.svc.cluster.local", namespace="ns1"),
        ),
    )
    app = st.workload_by_ip("10.4.0.1")
    assert app.waypoint is not None
    assert app.waypoint.destination == "/10.96.9.9"
    assert st.resolve_gateway(app.waypoint).key == wp_key  # type: ignore[union-attr]
    want = {SpiffeId("cluster.local", "ns1", "waypoint")}
    assert st.gateway_identities(app.waypoint) == want
    assert st.gateway_identities(st.workload_by_ip("10.4.0.2").waypoint) == want  # type: ignore[arg-type]


def test_readiness_and_listeners() -> None:
    st = ProxyState()
    seen: list[str] = []
    st.subscribe(seen.append)
    assert not st.ready
    st.apply_addresses({})
    assert not st.ready
    st.apply_authorizations({})
    assert st.ready
    assert seen == [ADDRESS_TYPE, AUTHORIZATION_TYPE]
    assert st.local_workloads("node-a") == []
