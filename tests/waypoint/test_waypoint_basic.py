"""The core path: HBONE in -> real Envoy waypoint (config from our xDS server, certificate from our CA over
the launcher's local SDS) -> HBONE out to the pod; plus envoy --mode validate of the generated config."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from wp_helpers import gateway, service
from wp_mesh import WaypointMesh, eventually

from istiopy.dataplane.hbone import HboneError

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]


async def test_http_through_waypoint(wmesh: WaypointMesh) -> None:
    web1 = await wmesh.add_pod("web-1", "web")
    await wmesh.apply(service("web", wmesh.vip(10)))
    resp = await wmesh.request(f"{wmesh.vip(10)}:80", "/hello")
    assert resp.status == 200, resp
    assert resp.text == "web-1 /hello"
    assert web1.hits == 1
    assert not wmesh.nacks


async def test_workload_addressed_traffic_through_a_workload_waypoint(wmesh: WaypointMesh) -> None:
    """``istio.io/waypoint-for: all`` + a pod labelled ``istio.io/use-waypoint``: a tunnel to the pod's own
    IP is served (chain ``direct-http``) and reaches exactly that pod through ``encap``."""
    await wmesh.apply(gateway(waypoint_for="all"))
    pod = await wmesh.add_pod("direct-1", "direct", {"istio.io/use-waypoint": "waypoint"})
    other = await wmesh.add_pod("direct-2", "direct")  # not bound: its IP is not served
    await wmesh.synced()
    r = await wmesh.request(f"{pod.ip}:8080", "/pod")
    assert (r.status, r.text) == (200, "direct-1 /pod")
    assert pod.hits == 1
    # a destination the waypoint does not serve: the inner connection is closed, CONNECT answers 503
    with pytest.raises(HboneError) as err:
        await wmesh.request(f"{other.ip}:8080", "/pod", timeout=5)
    assert err.value.status == 503
    assert other.hits == 0
    assert not wmesh.nacks


async def test_tcp_port_is_proxied_as_tcp(wmesh: WaypointMesh) -> None:
    """A port declared TCP (``appProtocol: tcp``) gets a TCP proxy chain to ``inbound-vip|<port>|tcp|...``."""
    await wmesh.add_pod("raw-1", "raw")
    svc = service("raw", wmesh.vip(12))
    svc = svc.model_copy(
        update={
            "spec": svc.spec.model_copy(
                update={
                    "ports": [svc.spec.ports[0].model_copy(update={"app_protocol": "tcp", "name": "tcp"})]
                }
            )
        }
    )
    await wmesh.apply(svc)
    r = await wmesh.request(f"{wmesh.vip(12)}:80", "/bytes")
    assert (r.status, r.text) == (200, "raw-1 /bytes")
    assert "server" not in r.headers or r.headers["server"] != "envoy"  # no HTTP processing on the way

    # Istio's TCP metrics for it, from the TCP proxy's access log (opened on connect, bytes on close)
    assert wmesh.launcher is not None
    port = wmesh.launcher.metrics_port

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/prometheus", timeout=5) as resp:
            return str(resp.read().decode())

    def value(text: str, name: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and 'destination_service="raw.default.svc.cluster.local"' in line
        )

    async def closed() -> bool:
        return value(await asyncio.to_thread(scrape), "istio_tcp_connections_closed_total") >= 1

    await eventually(closed, what="istio_tcp_connections_closed_total for raw")
    text = await asyncio.to_thread(scrape)
    assert value(text, "istio_tcp_connections_opened_total") >= 1
    assert value(text, "istio_tcp_received_bytes_total") > 0
    assert value(text, "istio_tcp_sent_bytes_total") > len("raw-1 /bytes")
