"""The headline: two nodes, a ztunnel-py *process* on each, the real control plane (WDS/WADS over delta ADS
with TLS, the CA with node impersonation), pods as network namespaces with in-pod capture.

Proves: captured pod-to-pod traffic crosses the fabric as HBONE mTLS (tcpdump sees TLS to 15008 and never the
payload), the destination ztunnel sees the source's SPIFFE id, L4 policy from AuthorizationPolicy documents
allows and denies, round robin across three backends, and with the control plane stopped existing and new
connections keep working on the last config.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import yaml

from istiopy.dataplane import sockets
from istiopy.dataplane.capture import CaptureConfig
from istiopy.dataplane.nodeagent import NodeAgent, PodSpec
from istiopy.testing import ztunnel as b
from istiopy.testing.netns import Node, Pod, Topology
from istiopy.testing.ztunnel import TestControlPlane, ZtunnelProcess

pytestmark = [pytest.mark.netns, pytest.mark.slow]

VIP = "10.96.44.10"


def _namespace(name: str, ambient: bool = True) -> dict[str, object]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def _pod(pod: Pod, labels: dict[str, str]) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": labels, "uid": pod.uid},
        "spec": {
            "nodeName": pod.node.name,
            "serviceAccountName": pod.service_account,
            "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}]}],
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def _ztunnel_pod(node: str, ip: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"ztunnel-{node}", "namespace": "istio-system", "labels": {"app": "ztunnel"}},
        "spec": {"nodeName": node, "serviceAccountName": "ztunnel", "containers": [{"name": "istio-proxy"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def _policy(name: str, ns: str, spec: dict[str, object]) -> str:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }
    return yaml.safe_dump(doc)


@dataclass
class Cluster:
    topo: Topology
    plane: TestControlPlane
    zts: dict[str, ZtunnelProcess]
    pods: dict[str, Pod]
    agents: dict[str, NodeAgent]
    workdir: str

    def start_ztunnel(self, node: Node) -> ZtunnelProcess:
        zt = ZtunnelProcess(self.plane, node.name, node.ip, (), self.workdir, zds_socket=self.zds_path(node))
        self.zts[node.name] = zt
        return zt

    def zds_path(self, node: Node) -> str:
        return os.path.join(self.workdir, f"{node.name}.zds.sock")

    async def until(self, cond: Callable[[], bool]) -> None:
        """Poll another process's admin API (no event to wait on) until ``cond`` holds."""
        async with asyncio.timeout(15):
            while not await asyncio.to_thread(cond):  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    def policies_everywhere(self, names: set[str]) -> bool:
        return all(
            {p["namespace"] + "/" + p["name"] for p in zt.config_dump()["policies"]} == names
            for zt in self.zts.values()
        )


@pytest.fixture
async def cluster(topology: Topology) -> AsyncIterator[Cluster]:
    n0, n1 = topology.add_node("node-0"), topology.add_node("node-1")
    pods = {
        "sleep": topology.add_pod("sleep", "cli", node=n0, service_account="sleep"),
        "other": topology.add_pod("other", "cli", node=n0, service_account="other"),
        "echo-1": topology.add_pod("echo-1", "srv", node=n1, service_account="echo"),
        "echo-2": topology.add_pod("echo-2", "srv", node=n1, service_account="echo"),
        "echo-3": topology.add_pod("echo-3", "srv", node=n0, service_account="echo"),
    }
    for pod in pods.values():
        pod.uid = b.pod_uid(pod.namespace, pod.name)  # the uid WDS names the workload by
        pod.spawn_server("http", port=8080)
        pod.spawn_server("echo", port=9000)
    docs: list[dict[str, object]] = [_namespace("cli"), _namespace("srv"), _namespace("istio-system", False)]
    docs += [_pod(p, {"app": p.name.split("-")[0]}) for p in pods.values()]
    docs += [_ztunnel_pod(n.name, n.ip) for n in (n0, n1)]
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "echo", "namespace": "srv"},
            "spec": {
                "clusterIP": VIP,
                "selector": {"app": "echo"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}, {"name": "tcp", "port": 9000}],
            },
        }
    )
    workdir = tempfile.mkdtemp(prefix="zt-it-")
    plane = TestControlPlane(yaml.safe_dump_all(docs))
    cluster = Cluster(topology, plane, {}, pods, {}, workdir)
    try:
        await plane.start()
        for node in (n0, n1):
            # The node agent captures each pod's traffic and hands the pod to the node's ztunnel-py over ZDS.
            agent = cluster.agents[node.name] = NodeAgent(cluster.zds_path(node), capture=CaptureConfig())
            await agent.start()
            for p in node.pods:
                await agent.add_pod(PodSpec(p.uid, p.name, p.namespace, p.service_account, p.netns_path))
            cluster.start_ztunnel(node)
        for zt in cluster.zts.values():
            await asyncio.to_thread(zt.wait_ready)
        async with asyncio.timeout(30):
            for agent in cluster.agents.values():
                await agent.wait_for_proxy()
        yield cluster
    finally:
        for zt in cluster.zts.values():
            zt.stop()
            # pytest shows a test's captured output only when it fails: then these logs say why.
            print(f"--- ztunnel-py {zt.node} log (tail) ---\n{zt.logs()[-4000:]}")
        for agent in cluster.agents.values():
            await agent.stop()
        await plane.close()
        shutil.rmtree(workdir, ignore_errors=True)


async def _get(pod: Pod, host: str, port: int, path: str = "/") -> dict[str, str]:
    r, w = await pod.open_connection(host, port)
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        await w.drain()
        raw = await asyncio.wait_for(r.read(), 10)
    finally:
        w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionResetError(f"no HTTP answer: {raw[:100]!r}")
    return json.loads(body)  # type: ignore[no-any-return]


async def _denied(pod: Pod, host: str, port: int) -> bool:
    try:
        await _get(pod, host, port)
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        return True
    return False


async def test_pod_to_pod_is_hbone_mtls_and_identity_reaches_the_destination(cluster: Cluster) -> None:
    sleep, echo1 = cluster.pods["sleep"], cluster.pods["echo-1"]
    marker = "/secret-marker-5d21e0"
    with cluster.topo.sniff() as cap:
        body = await _get(sleep, echo1.ip, 8080, marker)
        await asyncio.sleep(0.3)
    assert body["pod"] == "echo-1"
    assert body["path"] == marker
    assert body["peer"].split(":")[0] == sleep.ip  # source IP preserved toward the app
    text = cap.text
    assert f"{sleep.ip}." in text
    assert f"> {echo1.ip}.15008:" in text  # to the destination pod's HBONE port
    assert f"{echo1.ip}.8080" not in text  # never plaintext to the app port
    assert marker not in text  # payload encrypted
    # The destination node's ztunnel-py recorded the client's SPIFFE identity.
    metrics = cluster.zts["node-1"].metrics()
    opened = [x for x in metrics.splitlines() if x.startswith("istio_tcp_connections_opened_total{")]
    assert any(
        'reporter="destination"' in x and 'source_principal="spiffe://cluster.local/ns/cli/sa/sleep"' in x
        for x in opened
    ), opened
    # Certificates were issued by the real CA through impersonation, one per local identity.
    certs = {c["identity"]: c for c in cluster.zts["node-1"].config_dump()["certificates"]}
    assert certs["spiffe://cluster.local/ns/srv/sa/echo"]["state"] == "Available"


async def test_round_robin_and_l4_policy_from_authorization_policies(cluster: Cluster) -> None:
    sleep, other = cluster.pods["sleep"], cluster.pods["other"]
    seen = Counter([(await _get(sleep, VIP, 80))["pod"] for _ in range(6)])
    assert seen == {"echo-1": 2, "echo-2": 2, "echo-3": 2}
    # ALLOW by principal: only cli/sleep may call srv.
    cluster.plane.apply(
        _policy(
            "only-sleep",
            "srv",
            {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/cli/sa/sleep"]}}]}]},
        )
    )
    await cluster.until(lambda: cluster.policies_everywhere({"srv/only-sleep"}))
    assert (await _get(sleep, VIP, 80))["pod"].startswith("echo-")
    assert await _denied(other, VIP, 80)
    # DENY by port beats the ALLOW.
    cluster.plane.apply(
        _policy("no-http", "srv", {"action": "DENY", "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]})
    )
    await cluster.until(lambda: cluster.policies_everywhere({"srv/only-sleep", "srv/no-http"}))
    assert await _denied(sleep, VIP, 80)
    cluster.plane.delete("AuthorizationPolicy", "srv", "no-http")
    cluster.plane.delete("AuthorizationPolicy", "srv", "only-sleep")
    await cluster.until(lambda: cluster.policies_everywhere(set()))
    assert (await _get(other, VIP, 80))["pod"].startswith("echo-")


async def test_control_plane_down_keeps_existing_and_new_connections(cluster: Cluster) -> None:
    sleep = cluster.pods["sleep"]
    echo1 = cluster.pods["echo-1"]
    r, w = await sleep.open_connection(echo1.ip, 9000)
    w.write(b"before ")
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(7), 10) == b"before "
    await cluster.plane.stop()  # xDS and CA both gone
    await asyncio.sleep(0.5)
    w.write(b"during")
    await w.drain()
    assert await asyncio.wait_for(r.readexactly(6), 10) == b"during"
    w.close()
    # New connections, to a pod and through the service VIP, still work on the last config.
    assert (await _get(sleep, echo1.ip, 8080))["pod"] == "echo-1"
    seen = {(await _get(sleep, VIP, 80))["pod"] for _ in range(3)}
    assert seen == {"echo-1", "echo-2", "echo-3"}
    assert cluster.zts["node-0"].get(cluster.zts["node-0"].readiness_port, "/healthz/ready")[0] == 200
    # While it is away, config changes; when it is back (same address) the proxies reconnect and catch up.
    cluster.plane.apply(_policy("nothing", "srv", {}))
    await cluster.plane.start()
    await cluster.until(lambda: cluster.policies_everywhere({"srv/nothing"}))
    assert await _denied(sleep, echo1.ip, 8080)


async def test_pod_removal_and_ztunnel_restart_relearn_from_the_node_agent(cluster: Cluster) -> None:
    sleep, echo1, echo2 = cluster.pods["sleep"], cluster.pods["echo-1"], cluster.pods["echo-2"]
    n1 = echo1.node
    # A restarted ztunnel-py gets every pod again from the agent's snapshot and serves them at once.
    before = cluster.agents[n1.name].snapshots_sent
    cluster.zts[n1.name].stop()
    zt = cluster.start_ztunnel(n1)
    await asyncio.to_thread(zt.wait_ready)
    async with asyncio.timeout(30):
        await cluster.agents[n1.name].wait_for_proxy(before + 1)
    assert (await _get(sleep, echo1.ip, 8080))["pod"] == "echo-1"
    state = zt.config_dump()["workloadState"]
    assert {s["info"]["name"] for s in state.values()} == {"echo-1", "echo-2"}
    # A pod removed by the agent: its listeners inside the pod close (HBONE to it is refused).
    await cluster.agents[n1.name].remove_pod(echo2.uid)
    cluster.plane.delete("Pod", "srv", "echo-2")
    await cluster.until(lambda: "echo-2" not in {w["name"] for w in zt.config_dump()["workloads"]})
    fd = sleep.open_netns()
    try:
        with pytest.raises(ConnectionRefusedError):
            await sockets.async_connect_in_netns(fd, (echo2.ip, 15008), connect_timeout=5)
    finally:
        os.close(fd)
    seen = {(await _get(sleep, VIP, 80))["pod"] for _ in range(4)}
    assert seen == {"echo-1", "echo-3"}


async def _echo_ok(pod: Pod, host: str, port: int) -> bool:
    try:
        r, w = await pod.open_connection(host, port)
        try:
            w.write(b"hi")
            await w.drain()
            return await asyncio.wait_for(r.readexactly(2), 10) == b"hi"
        finally:
            w.close()
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        return False


async def test_authorization_policy_matrix_through_the_real_conversion(cluster: Cluster) -> None:
    """Each AuthorizationPolicy goes through istiod's WADS conversion and ztunnel-py's evaluation."""
    sleep, other, echo1 = cluster.pods["sleep"], cluster.pods["other"], cluster.pods["echo-1"]
    steps: list[tuple[str, dict[str, object], dict[tuple[str, int], bool]]] = [
        # allow by namespace
        ("ns-cli", {"rules": [{"from": [{"source": {"namespaces": ["cli"]}}]}]}, {("sleep", 8080): True}),
        ("ns-other", {"rules": [{"from": [{"source": {"namespaces": ["nope"]}}]}]}, {("sleep", 8080): False}),
        # allow by port (the port the destination pod sees)
        ("port-8080", {"rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]},
         {("sleep", 8080): True, ("sleep", 9000): False}),
        # deny by ipBlock: only sleep's address
        ("deny-ip", {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": [f"{sleep.ip}/32"]}}]}]},
         {("sleep", 8080): False, ("other", 8080): True}),
        # spec: {} allows nothing
        ("nothing", {}, {("sleep", 8080): False, ("other", 9000): False}),
        # an ALLOW with an HTTP attribute cannot be enforced at L4: it fails closed
        ("http-only", {"rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}, {("sleep", 8080): False}),
        # rules: [{}] allows everything
        ("everything", {"rules": [{}]}, {("sleep", 8080): True, ("other", 9000): True}),
    ]  # fmt: skip
    previous = ""
    for name, spec, expect in steps:
        cluster.plane.apply(_policy(name, "srv", spec))
        if previous:
            cluster.plane.delete("AuthorizationPolicy", "srv", previous)
        await cluster.until(lambda n=name: cluster.policies_everywhere({f"srv/{n}"}))  # type: ignore[misc]
        for (client, port), allowed in expect.items():
            pod = sleep if client == "sleep" else other
            if port == 8080:
                ok = not await _denied(pod, echo1.ip, 8080)
            else:
                ok = await _echo_ok(pod, echo1.ip, port)
            assert ok is allowed, f"{name}: {client} -> :{port} allowed={ok}, want {allowed}"
        previous = name
