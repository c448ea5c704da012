"""ztunnel-py with a real Envoy waypoint: pod -> ztunnel (HBONE, :authority = VIP:port) -> waypoint Envoy
-> HBONE -> destination ztunnel -> app, everything configured by the real control plane.

The waypoint runs as a pod (its own namespace on the fabric, not captured, as upstream's waypoint pods are
``dataplane-mode: none``); it reaches the control plane through loopback relays inside its namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import yaml

from istiopy.dataplane import fastpath
from istiopy.dataplane.capture import CaptureConfig
from istiopy.dataplane.nodeagent import NodeAgent, PodSpec
from istiopy.dataplane.waypoint import envoy_binary
from istiopy.testing import ztunnel as b
from istiopy.testing.netns import Pod, Topology
from istiopy.testing.ztunnel import TestControlPlane, ZtunnelProcess
from istiopy.testing.ztunnel_waypoint import NetnsRelay

pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.envoy]

VIP = "10.96.45.10"
WAYPOINT_VIP = "10.96.45.99"
GW_LABEL = "gateway.networking.k8s.io/gateway-name"


def _pod_doc(pod: Pod, labels: dict[str, str]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": labels},
        "spec": {
            "nodeName": pod.node.name,
            "serviceAccountName": pod.service_account,
            "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]},
    }


@dataclass
class WaypointCluster:
    plane: TestControlPlane
    zts: dict[str, ZtunnelProcess]
    pods: dict[str, Pod]
    workdir: str

    def diagnostics(self) -> str:
        """Recent proxy and waypoint logs, for a failing assertion's message."""
        out = []
        for name, zt in self.zts.items():
            lines = [ln for ln in zt.logs().splitlines() if "istiopy.ztunnel" in ln]
            out.append(f"--- ztunnel {name}\n" + "\n".join(lines[-15:]))
        for f in ("waypoint.log", "wp/envoy.log"):
            path = os.path.join(self.workdir, f)
            if os.path.exists(path):
                with open(path, errors="replace") as fh:
                    out.append(f"--- {f}\n" + fh.read()[-3000:])
        return "\n".join(out)

    async def until(self, cond: Callable[[], bool]) -> None:
        async with asyncio.timeout(20):
            while not await asyncio.to_thread(cond):  # noqa: ASYNC110 - polls other processes
                await asyncio.sleep(0.1)


@pytest.fixture
async def wcluster(
    topology: Topology, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[WaypointCluster]:
    """The cluster; an indirect parameter ("c" / "python") pins the ztunnels' byte path for tests whose
    subject is the tunnel's close semantics, which each byte path implements on its own."""
    try:
        envoy_binary()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    byte_path = getattr(request, "param", None)
    if byte_path is not None:
        monkeypatch.setenv(fastpath.BYTE_PATH_ENV, byte_path)
    n0, n1 = topology.add_node("node-0"), topology.add_node("node-1")
    pods = {
        "sleep": topology.add_pod("sleep", "cli", node=n0, service_account="sleep"),
        "echo-1": topology.add_pod("echo-1", "srv", node=n1, service_account="echo"),
        "echo-2": topology.add_pod("echo-2", "srv", node=n0, service_account="echo"),
        "waypoint": topology.add_pod("waypoint", "srv", node=n1, service_account="waypoint"),
    }
    for p in pods.values():
        p.uid = b.pod_uid(p.namespace, p.name)
        if p.name != "waypoint":
            p.spawn_server("http", port=8080)
    docs: list[dict[str, object]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}
        for ns, labels in (("cli", {"istio.io/dataplane-mode": "ambient"}),
                           ("srv", {"istio.io/dataplane-mode": "ambient"}), ("istio-system", {}))
    ]  # fmt: skip
    docs += [_pod_doc(pods[n], {"app": "echo"}) for n in ("echo-1", "echo-2")]
    docs += [_pod_doc(pods["sleep"], {"app": "sleep"}), _pod_doc(pods["waypoint"], {GW_LABEL: "waypoint"})]
    docs += [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"ztunnel-{n.name}", "namespace": "istio-system"},
            "spec": {"nodeName": n.name, "serviceAccountName": "ztunnel", "containers": [{"name": "z"}]},
            "status": {"phase": "Running", "podIP": n.ip},
        }
        for n in (n0, n1)
    ]
    docs += [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {
                "name": "waypoint",
                "namespace": "srv",
                "labels": {"istio.io/waypoint-for": "service"},
            },
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "waypoint", "namespace": "srv", "labels": {GW_LABEL: "waypoint"}},
            "spec": {
                "clusterIP": WAYPOINT_VIP,
                "selector": {GW_LABEL: "waypoint"},
                "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo", "namespace": "srv", "labels": {"istio.io/use-waypoint": "waypoint"}},
            "spec": {
                "clusterIP": VIP,
                "selector": {"app": "echo"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        },
    ]
    workdir = tempfile.mkdtemp(prefix="zt-wp-")
    plane = TestControlPlane(yaml.safe_dump_all(docs), waypoints=True)
    agents: list[NodeAgent] = []
    relays: list[NetnsRelay] = []
    zts: dict[str, ZtunnelProcess] = {}
    wp_proc: asyncio.subprocess.Process | None = None
    try:
        await plane.start()
        # The waypoint pod: Envoy inside its namespace, control plane through relays.
        wp = pods["waypoint"]
        fd = wp.open_netns()
        try:
            relays = [await NetnsRelay(fd, port).start() for port in (plane.xds_port, plane.ca_port)]
        finally:
            os.close(fd)
        root, chain, key = plane.bootstrap_files(wp.node.name, workdir, "srv", "waypoint")
        # stderr to a file (nobody drains a pipe after "ready"); stdout carries just the ready line.
        log_fd = os.open(os.path.join(workdir, "waypoint.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        wp_proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", wp.netns, sys.executable, "-m", "istiopy.testing.ztunnel_waypoint",
            "--name", "waypoint", "--namespace", "srv", "--pod-ip", wp.ip,
            "--xds", f"127.0.0.1:{plane.xds_port}", "--ca", f"127.0.0.1:{plane.ca_port}",
            "--root", root, "--cert", chain, "--key", key, "--workdir", os.path.join(workdir, "wp"),
            stdout=asyncio.subprocess.PIPE, stderr=log_fd, cwd=workdir, start_new_session=True,
        )  # fmt: skip
        os.close(log_fd)
        assert wp_proc.stdout is not None
        out = b""
        async with asyncio.timeout(60):
            while not out.endswith(b"ready\n"):
                line = await wp_proc.stdout.readline()
                assert line, f"waypoint exited: {WaypointCluster(plane, {}, pods, workdir).diagnostics()}"
                out += line
        for node in (n0, n1):
            path = os.path.join(workdir, f"{node.name}.zds.sock")
            agent = NodeAgent(path, capture=CaptureConfig())
            await agent.start()
            agents.append(agent)
            for p in node.pods:
                if p.name != "waypoint":  # waypoint pods are never captured
                    await agent.add_pod(PodSpec(p.uid, p.name, p.namespace, p.service_account, p.netns_path))
            zts[node.name] = ZtunnelProcess(plane, node.name, node.ip, (), workdir, zds_socket=path)
        for zt in zts.values():
            await asyncio.to_thread(zt.wait_ready)
        async with asyncio.timeout(30):
            for agent in agents:
                await agent.wait_for_proxy()
        yield WaypointCluster(plane, zts, pods, workdir)
    finally:
        for zt in zts.values():
            zt.stop()
        for agent in agents:
            await agent.stop()
        if wp_proc is not None and wp_proc.returncode is None:
            wp_proc.terminate()
            try:
                async with asyncio.timeout(15):
                    await wp_proc.wait()
            except TimeoutError:
                os.killpg(wp_proc.pid, 9)
                await wp_proc.wait()
        for r in relays:
            await r.close()
        await plane.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def _get(pod: Pod, host: str, port: int, path: str = "/") -> tuple[int, dict[str, str]]:
    """One keep-alive HTTP/1.1 request read by Content-Length, as a real client does (the connection is then
    closed by us, so how the far side would have ended it does not matter)."""
    r, w = await pod.open_connection(host, port)
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: echo.srv.svc.cluster.local\r\n\r\n".encode())
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 20)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await asyncio.wait_for(r.readexactly(int(headers.get("content-length", "0"))), 20)
    finally:
        w.close()
    status = int(lines[0].split()[1])
    return status, (json.loads(body) if status == 200 else {"raw": body[:200].decode(errors="replace")})


async def test_service_traffic_goes_through_the_waypoint(wcluster: WaypointCluster) -> None:
    sleep, wp = wcluster.pods["sleep"], wcluster.pods["waypoint"]
    zt0 = wcluster.zts["node-0"]
    await wcluster.until(
        lambda: any(s["name"] == "echo" and s.get("waypoint") for s in zt0.config_dump()["services"])
    )
    seen = set()
    for _ in range(4):
        try:
            status, body = await _get(sleep, VIP, 80, "/via-waypoint")
        except ConnectionError as e:
            await asyncio.sleep(0.5)
            raise AssertionError(f"{e}\n{wcluster.diagnostics()}") from e
        assert status == 200, body
        assert body["path"] == "/via-waypoint"
        # The app's peer is the waypoint: the destination ztunnel received the tunnel from the waypoint pod.
        assert body["peer"].split(":")[0] == wp.ip
        seen.add(body["pod"])
    assert seen == {"echo-1", "echo-2"}  # the waypoint balanced across both backends
    # Addressing a pod directly does not use its service's waypoint (upstream: traffic type follows the
    # original destination): the app sees the client itself.
    status, body = await _get(sleep, wcluster.pods["echo-1"].ip, 8080, "/direct")
    assert status == 200
    assert body["peer"].split(":")[0] == sleep.ip
    # The source ztunnel tunnelled to the waypoint; the destination ztunnels saw the waypoint's identity.
    out = zt0.config_dump()
    assert any(w["name"] == "waypoint" for w in out["workloads"])
    metrics = wcluster.zts["node-1"].metrics()
    inbound = [x for x in metrics.splitlines() if x.startswith("istio_tcp_connections_opened_total{")]
    assert any(
        'reporter="destination"' in x and 'source_principal="spiffe://cluster.local/ns/srv/sa/waypoint"' in x
        for x in inbound
    ), inbound


async def _get_to_eof(pod: Pod, host: str, port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """One ``Connection: close`` request read to EOF, as curl or ``http.client`` without keep-alive read
    it: the server's close ends the body, so a reset instead of EOF is an error (ConnectionResetError)."""
    r, w = await pod.open_connection(host, port)
    try:
        w.write(
            f"GET {path} HTTP/1.1\r\nHost: echo.srv.svc.cluster.local\r\nConnection: close\r\n\r\n".encode()
        )
        await w.drain()
        raw = b""
        async with asyncio.timeout(20):
            while chunk := await r.read(65536):
                raw += chunk
    finally:
        w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    return int(lines[0].split()[1]), headers, body


async def _waypoint_ready(wcluster: WaypointCluster) -> None:
    zt0 = wcluster.zts["node-0"]
    await wcluster.until(
        lambda: any(s["name"] == "echo" and s.get("waypoint") for s in zt0.config_dump()["services"])
    )


@pytest.mark.parametrize("wcluster", ["c", "python"], indirect=True)
async def test_connection_close_through_the_waypoint_reads_to_eof(wcluster: WaypointCluster) -> None:
    """The waypoint closes the client's connection after a ``Connection: close`` response: that graceful
    close must reach the client app as EOF after every byte (END_STREAM end to end), not as a reset.

    Regression: Envoy ended the CONNECT with RST_STREAM(CONNECT_ERROR) (its internal-listener socket
    reported the HTTP chain's close as a reset), and the Python byte path also turned Envoy's
    END_STREAM + RST_STREAM(NO_ERROR) into a TCP RST; the client saw ECONNRESET, bodies were cut."""
    sleep = wcluster.pods["sleep"]
    await _waypoint_ready(wcluster)
    seen = set()
    for i in range(6):
        path = f"/pad/{300_000 if i % 2 else 10}"  # a body bigger than the socket buffers, too
        try:
            status, headers, body = await _get_to_eof(sleep, VIP, 80, path)
        except ConnectionError as e:
            raise AssertionError(f"request {i}: {e!r}\n{wcluster.diagnostics()}") from e
        assert status == 200, body[:200]
        assert headers.get("connection") == "close"
        assert len(body) == int(headers["content-length"])
        doc = json.loads(body)
        assert doc["path"] == path
        assert doc["peer"].split(":")[0] == wcluster.pods["waypoint"].ip
        seen.add(doc["pod"])
    assert seen == {"echo-1", "echo-2"}


async def test_app_reset_still_reaches_the_client_as_reset(wcluster: WaypointCluster) -> None:
    """Only a real reset is a reset: an app that aborts its connection (TCP RST) mid-response makes the
    client see a reset across HBONE (RST -> RST_STREAM -> RST), never a clean EOF after a cut body; through
    the waypoint the cut is visible too (Envoy answers 503 or closes before the announced length)."""
    sleep, echo = wcluster.pods["sleep"], wcluster.pods["echo-1"]
    await _waypoint_ready(wcluster)
    for _ in range(3):
        with pytest.raises(ConnectionResetError):
            await _get_to_eof(sleep, echo.ip, 8080, "/reset")
    # Graceful closes on the same path still end in EOF (the reset above was the app's, not the tunnel's).
    status, headers, body = await _get_to_eof(sleep, echo.ip, 8080, "/direct")
    assert status == 200
    assert len(body) == int(headers["content-length"])
    for _ in range(3):
        try:
            status, headers, body = await _get_to_eof(sleep, VIP, 80, "/reset")
        except ConnectionResetError:
            continue
        assert status == 503 or len(body) < int(headers.get("content-length", "0")), (status, headers, body)
