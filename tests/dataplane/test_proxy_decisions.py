"""Outbound routing plans and inbound decisions, from WDS state alone (no sockets)."""

from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from istiopy.api.gen import workload_pb2
from istiopy.api.identity import SpiffeId
from istiopy.dataplane.inbound import InboundAuthorizer, InboundRefused, parse_authority
from istiopy.dataplane.outbound import NoHealthyUpstream, OutboundResolver
from istiopy.dataplane.state import ProxyState
from istiopy.testing import ztunnel as b

ECHO = b.service_key("echo", "srv")
WP = b.service_key("waypoint", "wp")


def _mesh() -> ProxyState:
    st = ProxyState()
    adds = [
        b.service("echo", "srv", "10.96.0.10", {80: 8080}),
        b.workload("echo-1", "srv", "10.1.0.1", services={ECHO: {80: 8080}}),
        b.workload("echo-2", "srv", "10.1.0.2", services={ECHO: {80: 8080}}),
        b.workload("echo-3", "srv", "10.1.0.3", services={ECHO: {80: 8080}}),
        b.workload("client", "cli", "10.1.1.1", service_account="sleep"),
        b.workload("legacy", "cli", "10.1.1.9", hbone=False),
        b.service("waypoint", "wp", "10.96.0.99", {15008: 15008}),
        b.workload("waypoint-1", "wp", "10.1.2.1", service_account="waypoint", services={WP: {15008: 15008}}),
        b.service("behind", "srv", "10.96.0.20", {90: 9090}, waypoint=b.gateway(address="10.96.0.99")),
        b.workload("behind-1", "srv", "10.1.0.20", services={b.service_key("behind", "srv"): {90: 9090}}),
        b.workload(
            "wlwp",
            "srv",
            "10.1.0.30",
            waypoint=b.gateway(hostname="waypoint.wp.svc.cluster.local", namespace="wp"),
        ),
    ]
    st.apply_addresses({b.resource_name(a): a for a in adds})
    return st


def test_service_vip_round_robins_over_three_backends() -> None:
    r = OutboundResolver(_mesh())
    plans = [r.plan(("10.96.0.10", 80)) for _ in range(9)]
    assert Counter(p.dial for p in plans) == {
        ("10.1.0.1", 15008): 3,
        ("10.1.0.2", 15008): 3,
        ("10.1.0.3", 15008): 3,
    }
    first = plans[0]
    assert first.hbone
    assert first.authority == f"{first.dial[0]}:8080"  # podIP:targetPort
    assert first.service is not None
    assert first.service.key == ECHO
    assert first.expected_identities == {SpiffeId("cluster.local", "srv", "default")}


def test_unhealthy_and_removed_endpoints_get_no_connections() -> None:
    st = _mesh()
    r = OutboundResolver(st)
    sick = b.workload("echo-2", "srv", "10.1.0.2", services={ECHO: {80: 8080}}, healthy=False)
    st.apply_addresses({sick.workload.uid: sick}, removed=[b.pod_uid("srv", "echo-3")])
    assert {r.plan(("10.96.0.10", 80)).dial[0] for _ in range(6)} == {"10.1.0.1"}
    st.apply_addresses({}, removed=[b.pod_uid("srv", "echo-1")])
    with pytest.raises(NoHealthyUpstream):
        r.plan(("10.96.0.10", 80))
    with pytest.raises(NoHealthyUpstream, match="port 81"):
        OutboundResolver(_mesh()).plan(("10.96.0.10", 81))


def test_pod_ip_goes_direct_with_pod_authority() -> None:
    p = OutboundResolver(_mesh()).plan(("10.1.0.2", 7777))
    assert p.hbone
    assert p.dial == ("10.1.0.2", 15008)
    assert p.authority == "10.1.0.2:7777"
    assert p.dst_workload is not None
    assert p.dst_workload.name == "echo-2"


def test_service_waypoint_gets_vip_authority() -> None:
    p = OutboundResolver(_mesh()).plan(("10.96.0.20", 90))
    assert p.dial == ("10.1.2.1", 15008)
    assert p.authority == "10.96.0.20:90"  # the waypoint picks the backend
    assert p.via_waypoint is not None
    assert p.via_waypoint.name == "waypoint-1"
    assert p.expected_identities == {SpiffeId("cluster.local", "wp", "waypoint")}
    # Addressing the pod behind the service directly does not use the *service* waypoint.
    assert OutboundResolver(_mesh()).plan(("10.1.0.20", 9090)).dial == ("10.1.0.20", 15008)


def test_workload_waypoint_and_no_loop_from_the_waypoint() -> None:
    st = _mesh()
    p = OutboundResolver(st).plan(("10.1.0.30", 80))
    assert p.dial == ("10.1.2.1", 15008)
    assert p.authority == "10.1.0.30:80"
    wp = st.workload_by_ip("10.1.2.1")
    back = OutboundResolver(st).plan(("10.1.0.30", 80), source=wp)
    assert back.dial == ("10.1.0.30", 15008)
    assert back.via_waypoint is None


def test_non_mesh_destinations_pass_through() -> None:
    r = OutboundResolver(_mesh())
    legacy = r.plan(("10.1.1.9", 5432))
    assert legacy.protocol == "TCP"
    assert legacy.dial == ("10.1.1.9", 5432)
    outside = r.plan(("192.0.2.1", 443))
    assert outside.protocol == "TCP"
    assert outside.dial == ("192.0.2.1", 443)
    assert outside.authority == ""


SLEEP = SpiffeId("cluster.local", "cli", "sleep")


def test_inbound_hbone_decisions() -> None:
    st = _mesh()
    ia = InboundAuthorizer(st)
    t = ia.hbone(SLEEP, "10.1.0.1:8080", "10.1.1.1")
    assert t.dial == ("10.1.0.1", 8080)
    assert t.workload.name == "echo-1"
    for bad in ("nonsense", "10.1.0.1", "10.1.0.1:0", "10.1.0.1:99999", "host:80"):
        with pytest.raises(InboundRefused) as e:
            ia.hbone(SLEEP, bad, "10.1.1.1")
        assert e.value.status == 400
    with pytest.raises(InboundRefused, match="unknown destination") as e:
        ia.hbone(SLEEP, "192.0.2.1:80", "10.1.1.1")
    assert e.value.status == 400
    with pytest.raises(InboundRefused, match="not served here"):
        ia.hbone(SLEEP, "10.1.0.2:8080", "10.1.1.1", local_ips={ipaddress.ip_address("10.1.0.1")})
    st.apply_authorizations({"srv/only-ns-x": b.policy("only-ns-x", "srv", [[[b.match(namespaces=["x"])]]])})
    with pytest.raises(InboundRefused) as e:
        ia.hbone(SLEEP, "10.1.0.1:8080", "10.1.1.1")
    assert e.value.status == 401
    st.apply_authorizations({}, removed=["srv/only-ns-x"])
    # The waypoint rule: a workload with a waypoint refuses everyone else with 401.
    with pytest.raises(InboundRefused, match="waypoint"):
        ia.hbone(SLEEP, "10.1.0.30:80", "10.1.1.1")
    assert ia.hbone(SpiffeId("cluster.local", "wp", "waypoint"), "10.1.0.30:80", "10.1.2.1").dial == (
        "10.1.0.30",
        80,
    )
    assert parse_authority("[fd00::1]:80") == (ipaddress.ip_address("fd00::1"), 80)


def test_inbound_plaintext_has_no_identity() -> None:
    st = _mesh()
    ia = InboundAuthorizer(st)
    assert ia.plaintext(("10.1.1.9", 4000), ("10.1.0.1", 8080)).connection.src_identity is None
    st.apply_authorizations({"srv/ns": b.policy("ns", "srv", [[[b.match(namespaces=["cli"])]]])})
    with pytest.raises(InboundRefused) as e:
        ia.plaintext(("10.1.1.9", 4000), ("10.1.0.1", 8080))
    assert e.value.status == 401
    st.apply_authorizations({"srv/ns": b.policy("ns", "srv", [[[b.match(source_ips=["10.1.1.0/24"])]]])})
    assert ia.plaintext(("10.1.1.9", 4000), ("10.1.0.1", 8080))


def _zoned(name: str, ip: str, region: str, zone: str, node: str = "n") -> object:
    a = b.workload(name, "loc", ip, services={b.service_key("near", "loc"): {80: 80}}, node=node)
    a.workload.locality.region = region
    a.workload.locality.zone = zone
    return a


def _locality_mesh(mode: int) -> ProxyState:
    st = ProxyState()
    svc = b.service("near", "loc", "10.96.5.5", {80: 80})
    lb = workload_pb2.LoadBalancing
    svc.service.load_balancing.routing_preference.extend([lb.NETWORK, lb.REGION, lb.ZONE, lb.SUBZONE])
    svc.service.load_balancing.mode = mode
    adds = [
        svc,
        _zoned("same-zone", "10.5.0.1", "eu", "eu-1"),
        _zoned("same-region", "10.5.0.2", "eu", "eu-2"),
        _zoned("far", "10.5.0.3", "us", "us-1"),
        _zoned("client", "10.5.0.9", "eu", "eu-1"),
    ]
    st.apply_addresses({b.resource_name(a): a for a in adds})  # type: ignore[arg-type]
    return st


def test_prefer_close_failover_picks_the_closest_endpoints() -> None:
    st = _locality_mesh(workload_pb2.LoadBalancing.FAILOVER)
    r = OutboundResolver(st)
    client = st.workload_by_ip("10.5.0.9")
    assert {r.plan(("10.96.5.5", 80), source=client).dial[0] for _ in range(4)} == {"10.5.0.1", "10.5.0.9"}
    # The same-zone endpoints go away: the next closest (same region) take over, never the far one first.
    st.apply_addresses({}, removed=[b.pod_uid("loc", "same-zone"), b.pod_uid("loc", "client")])
    assert {r.plan(("10.96.5.5", 80), source=client).dial[0] for _ in range(4)} == {"10.5.0.2"}
    # Without a known source there is no ranking.
    assert {r.plan(("10.96.5.5", 80)).dial[0] for _ in range(4)} == {"10.5.0.2", "10.5.0.3"}


def test_prefer_close_strict_refuses_partial_matches() -> None:
    st = _locality_mesh(workload_pb2.LoadBalancing.STRICT)
    r = OutboundResolver(st)
    client = st.workload_by_ip("10.5.0.9")
    st.apply_addresses({}, removed=[b.pod_uid("loc", "same-zone")])
    # Only the client itself (same network/region/zone/subzone) still fully matches.
    assert {r.plan(("10.96.5.5", 80), source=client).dial[0] for _ in range(3)} == {"10.5.0.9"}
    st.apply_addresses({}, removed=[b.pod_uid("loc", "client")])
    with pytest.raises(NoHealthyUpstream):
        r.plan(("10.96.5.5", 80), source=client)
