"""Operating the waypoint: Istio HTTP metrics on 15020 from Envoy's access logs, restart resuming from xDS,
the certificate (issued by our CA to the waypoint identity, key local) served on 15008."""

from __future__ import annotations

import asyncio
import os
import signal
import urllib.request

import pytest
from wp_helpers import istio, service
from wp_mesh import CLIENT_ID, WAYPOINT_ID, WaypointMesh, eventually

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]


def scrape(wmesh: WaypointMesh) -> str:
    assert wmesh.launcher is not None
    assert wmesh.launcher.metrics_port
    url = f"http://127.0.0.1:{wmesh.launcher.metrics_port}/stats/prometheus"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


async def test_istio_request_metrics(wmesh: WaypointMesh) -> None:
    await wmesh.add_pod("metered-1", "metered")
    await wmesh.apply(service("metered", wmesh.vip(60)))
    await wmesh.apply(
        istio(
            "AuthorizationPolicy",
            "metered",
            {
                "targetRefs": [{"group": "", "kind": "Service", "name": "metered"}],
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/forbidden"]}}]}],
            },
            group="security.istio.io/v1",
        )
    )
    target = f"{wmesh.vip(60)}:80"
    baggage = (
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=client-v1,"
        "service.name=client,service.version=v1"
    )
    for _ in range(3):
        assert (
            await wmesh.request(target, "/ok", method="POST", body=b"x" * 100, baggage=baggage)
        ).status == 200
    assert (await wmesh.request(target, "/missing?status=404")).status == 404
    assert (await wmesh.request(target, "/forbidden")).status == 403
    host = "metered.default.svc.cluster.local"
    common = {
        "reporter": "waypoint",
        "destination_service": host,
        "destination_service_name": "metered",
        "destination_service_namespace": "default",
        "source_principal": CLIENT_ID.uri,
        "source_workload_namespace": "default",
        "connection_security_policy": "mutual_tls",
    }

    async def counted() -> bool:
        text = await asyncio.to_thread(scrape, wmesh)
        return (
            sample(text, "istio_requests_total", response_code="200", **common) == 3
            and sample(text, "istio_requests_total", response_code="404", **common) == 1
            and sample(text, "istio_requests_total", response_code="403", **common) == 1
        )

    await eventually(counted, what="istio_requests_total by response code")
    text = await asyncio.to_thread(scrape, wmesh)
    assert sample(text, "istio_request_duration_milliseconds_count", response_code="200", **common) == 3
    assert sample(text, "istio_request_bytes_sum", response_code="200", **common) == 300
    assert sample(text, "istio_response_bytes_count", response_code="403", **common) == 1
    assert sample(text, "istio_response_bytes_sum", response_code="200", **common) > 0
    # source workload facts from the client's HBONE baggage (what ztunnel sends)
    assert (
        sample(
            text,
            "istio_requests_total",
            response_code="200",
            source_workload="client-v1",
            source_app="client",
            source_version="v1",
            **common,
        )
        == 3
    )
    assert sample(text, "istio_requests_total", response_code="403", source_workload="client", **common) == 1
    # destination facts from the endpoint's metadata (the pod that served it); none for a local 403
    dst = {
        "destination_workload": "metered-1",
        "destination_workload_namespace": "default",
        "destination_principal": "spiffe://cluster.local/ns/default/sa/metered",
        "destination_app": "metered",
    }
    assert sample(text, "istio_requests_total", response_code="200", **dst, **common) == 3
    assert (
        sample(text, "istio_requests_total", response_code="403", destination_workload="unknown", **common)
        == 1
    )


async def test_waypoint_serves_its_own_ca_issued_identity(wmesh: WaypointMesh) -> None:
    """The client's TLS view of 15008: a certificate for the waypoint's SPIFFE id, chained to our CA."""
    await wmesh.add_pod("ident-1", "ident")
    await wmesh.apply(service("ident", wmesh.vip(61)))
    stream = await wmesh.pool.open_stream(
        ("ident", "x"), (wmesh.waypoint_ip, 15008), f"{wmesh.vip(61)}:80", [], wmesh.client_ctx(CLIENT_ID)
    )
    try:
        assert stream.peer_identity == WAYPOINT_ID
    finally:
        stream.reset()
    # istiod authenticated the waypoint's xDS stream by that same certificate (mTLS, from SDS)
    assert wmesh.server is not None
    idents = {c.proxy.identity for c in wmesh.server.connections.values() if c.proxy is not None}
    assert idents == {WAYPOINT_ID.uri}
    # the key never went anywhere: the launcher generated it and only the CSR reached the CA
    assert wmesh.launcher is not None
    assert wmesh.launcher.sds.acks >= 1
    assert not wmesh.launcher.sds.nacks


async def test_restart_resumes_from_xds(wmesh: WaypointMesh) -> None:
    await wmesh.add_pod("durable-1", "durable")
    await wmesh.apply(service("durable", wmesh.vip(62)))
    await wmesh.apply(
        istio(
            "VirtualService",
            "durable",
            {"hosts": ["durable"], "http": [{"directResponse": {"status": 202, "body": {"string": "kept"}}}]},
        )
    )
    target = f"{wmesh.vip(62)}:80"
    assert (await wmesh.request(target, "/")).status == 202
    launcher = wmesh.launcher
    assert launcher is not None
    assert launcher.proc is not None
    before = launcher.restarts
    os.killpg(launcher.proc.pid, signal.SIGKILL)
    await eventually(lambda: _restarted(launcher, before), what="supervisor restart")
    await launcher.wait_ready()
    await wmesh.synced()
    await wmesh.pool.close()
    from istiopy.dataplane.hbone import HbonePool

    wmesh.pool = HbonePool(idle_timeout=30.0)
    r = await wmesh.request(target, "/")
    assert (r.status, r.text) == (202, "kept")


async def _restarted(launcher: object, before: int) -> bool:
    return bool(getattr(launcher, "restarts", 0) > before)
