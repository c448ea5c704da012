"""Admin (config_dump, logging, quitquitquit), readiness and metrics servers over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from istiopy.dataplane.admin import AdminServer, AdminSources, LocalWorkloadInfo
from istiopy.dataplane.metrics import ConnectionTracker, Metrics, connection_labels
from istiopy.dataplane.state import ProxyState
from istiopy.testing import ztunnel as b

SVC = b.service_key("echo", "ns1")


def _state() -> ProxyState:
    st = ProxyState()
    adds = [
        b.service("echo", "ns1", "10.96.0.10", {80: 8080}),
        b.service("waypoint", "ns1", "10.96.0.99", {15008: 15008}),
        b.workload("echo-1", "ns1", "10.1.0.1", services={SVC: {80: 8080}}, service_account="echo"),
        b.workload("client-1", "ns1", "10.1.0.2", waypoint=b.gateway(address="10.96.0.99")),
    ]
    st.apply_addresses({b.resource_name(a): a for a in adds})
    return st


@pytest.fixture
async def admin() -> AsyncIterator[tuple[AdminServer, AdminSources, list[str]]]:
    st = _state()
    metrics = Metrics()
    quits: list[str] = []

    async def shutdown() -> None:
        quits.append("quit")

    src = AdminSources(
        state=st,
        metrics=metrics,
        tracker=ConnectionTracker(metrics),
        local_workloads=lambda: [
            LocalWorkloadInfo(b.pod_uid("ns1", "client-1"), "client-1", "ns1", "default")
        ],
        shutdown=shutdown,
    )
    server = AdminServer(
        src, admin_addr=("127.0.0.1", 0), metrics_addr=("127.0.0.1", 0), readiness_addr=("127.0.0.1", 0)
    )
    await server.start()
    try:
        yield server, src, quits
    finally:
        await server.stop()


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.request(method, f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.text()


async def test_config_dump_has_upstream_shape(admin: tuple[AdminServer, AdminSources, list[str]]) -> None:
    server, src, _ = admin
    src.state.apply_authorizations(
        {"ns1/deny": b.policy("deny", "ns1", [[[b.match(destination_ports=[9])]]], action="DENY")}
    )
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{server.ports['admin']}/config_dump") as r,
    ):
        assert r.status == 200
        dump = await r.json()
    assert set(dump) >= {"workloads", "services", "policies", "certificates", "workloadState"}
    wl = {w["name"]: w for w in dump["workloads"]}
    assert wl["echo-1"]["workloadIps"] == ["10.1.0.1"]
    assert wl["echo-1"]["protocol"] == "HBONE"
    assert wl["echo-1"]["serviceAccount"] == "echo"
    assert wl["echo-1"]["status"] == "Healthy"
    assert wl["echo-1"]["uid"] == b.pod_uid("ns1", "echo-1")
    assert wl["client-1"]["waypoint"] == {"destination": "/10.96.0.99", "hboneMtlsPort": 15008}
    svc = {s["name"]: s for s in dump["services"]}["echo"]
    assert svc["vips"] == ["/10.96.0.10"]
    assert svc["ports"] == {"80": 8080}
    assert svc["hostname"] == "echo.ns1.svc.cluster.local"
    assert svc["endpoints"][b.pod_uid("ns1", "echo-1")] == {
        "workloadUid": b.pod_uid("ns1", "echo-1"),
        "service": SVC,
        "address": "/10.1.0.1",
        "port": {"80": 8080},
    }
    assert dump["policies"] == [
        {
            "name": "deny",
            "namespace": "ns1",
            "scope": "Namespace",
            "action": "Deny",
            "rules": [[[{"destinationPorts": [9]}]]],
        }
    ]
    state = dump["workloadState"][b.pod_uid("ns1", "client-1")]
    assert state == {
        "state": "Up",
        "connections": {"inbound": [], "outbound": []},
        "info": {"name": "client-1", "namespace": "ns1", "trustDomain": "", "serviceAccount": "default"},
    }


async def test_connections_and_metrics(admin: tuple[AdminServer, AdminSources, list[str]]) -> None:
    server, src, _ = admin
    st = src.state
    client, echo = st.workload_by_ip("10.1.0.2"), st.workload_by_ip("10.1.0.1")
    assert client is not None
    assert echo is not None
    labels = connection_labels(
        reporter="source",
        src=client,
        src_identity=client.identity,
        dst=echo,
        dst_identity=echo.identity,
        service=st.service_by_vip(ipaddress.ip_address("10.96.0.10")),
        mtls=True,
    )
    assert src.tracker is not None
    conn = src.tracker.open(
        direction="outbound",
        workload_uid=client.uid,
        src="10.1.0.2:40000",
        original_dst="10.96.0.10:80",
        actual_dst="10.1.0.1:15008",
        protocol="HBONE",
        labels=labels,
    )
    src.tracker.add_bytes(conn, sent=100, received=7)
    status, body = await _get(server.ports["admin"], "/config_dump")
    assert '"actualDst": "10.1.0.1:15008"' in body
    status, metrics = await _get(server.ports["metrics"], "/stats/prometheus")
    assert status == 200
    assert "istio_tcp_connections_opened_total{" in metrics
    line = next(x for x in metrics.splitlines() if x.startswith("istio_tcp_sent_bytes_total{"))
    assert line.endswith(" 100.0")
    assert 'reporter="source"' in line
    assert 'source_principal="spiffe://cluster.local/ns/ns1/sa/default"' in line
    assert 'destination_principal="spiffe://cluster.local/ns/ns1/sa/echo"' in line
    assert 'destination_service="echo.ns1.svc.cluster.local"' in line
    assert 'destination_workload="echo"' in line
    assert 'source_workload_namespace="ns1"' in line
    assert 'connection_security_policy="mutual_tls"' in line
    src.tracker.close(conn)
    src.tracker.close(conn)  # idempotent
    _, metrics = await _get(server.ports["metrics"], "/metrics")
    closed = [x for x in metrics.splitlines() if x.startswith("istio_tcp_connections_closed_total{")]
    assert len(closed) == 1
    assert closed[0].endswith(" 1.0")
    _, body = await _get(server.ports["admin"], "/config_dump")
    assert "10.1.0.1:15008" not in body


async def test_readiness_follows_sync(admin: tuple[AdminServer, AdminSources, list[str]]) -> None:
    server, src, _ = admin
    port = server.ports["readiness"]
    assert (await _get(port, "/healthz/ready"))[0] == 503  # WADS not received yet
    src.state.apply_authorizations({})
    assert await _get(port, "/healthz/ready") == (200, "ready\n")


async def test_logging_and_quit(admin: tuple[AdminServer, AdminSources, list[str]]) -> None:
    server, _, quits = admin
    port = server.ports["admin"]
    old = logging.getLogger("istiopy").level
    try:
        status, body = await _get(port, "/logging?level=debug", "POST")
        assert status == 200
        assert "istiopy=debug" in body
        status, body = await _get(port, "/logging?level=rbac=error", "POST")
        assert "istiopy.rbac=error" in body
        assert logging.getLogger("istiopy.rbac").level == logging.ERROR
        status, body = await _get(port, "/logging?level=loud", "POST")
        assert status == 400
        assert "unknown log level" in body
    finally:
        logging.getLogger("istiopy").setLevel(old)
        logging.getLogger("istiopy.rbac").setLevel(logging.NOTSET)
    assert (await _get(port, "/quitquitquit"))[0] == 405
    assert (await _get(port, "/quitquitquit", "POST"))[0] == 200
    # The quit callback runs after the response is sent: poll (a loaded machine may take a while).
    async with asyncio.timeout(20):
        while not quits:  # noqa: ASYNC110 - the callback is the server's, the list is all a test can see
            await asyncio.sleep(0.02)
    assert quits == ["quit"]
