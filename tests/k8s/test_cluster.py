"""The real test cluster works end to end: versions, ServiceAccounts, TokenRequest/TokenReview with audiences,
Deployments -> Pods -> EndpointSlices via the kubelet stand-in, restarts of apiserver and etcd, and helm."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from istiopy.testing.cluster import K8S_VERSION, ClusterStartError, MissingBinariesError, TestCluster
from istiopy.testing.kubelet import KubeletStandIn

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

T = TypeVar("T")


def eventually(fn: Callable[[], T | None], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll fn until it returns something truthy: controllers are asynchronous by design."""
    deadline = time.monotonic() + timeout
    while True:
        result = fn()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def new_namespace(cluster: TestCluster) -> str:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    return ns


def token_review(cluster: TestCluster, token: str, audiences: list[str]) -> dict[str, Any]:
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": audiences},
    }
    result: dict[str, Any] = cluster.kubectl_json("create", "-f", "-", input=json.dumps(review))
    status: dict[str, Any] = result["status"]
    return status


def test_versions(k8s_cluster: TestCluster) -> None:
    v = k8s_cluster.kubectl_json("version")
    assert v["serverVersion"]["gitVersion"] == K8S_VERSION
    assert v["clientVersion"]["gitVersion"] == K8S_VERSION
    assert (v["serverVersion"]["major"], v["serverVersion"]["minor"]) == ("1", "34")


def test_namespace_gets_default_serviceaccount(k8s_cluster: TestCluster) -> None:
    ns = new_namespace(k8s_cluster)
    eventually(
        lambda: k8s_cluster.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0,
        what="the serviceaccount controller to create `default`",
    )
    k8s_cluster.kubectl("create", "serviceaccount", "app", "-n", ns)
    names = {i["metadata"]["name"] for i in k8s_cluster.kubectl_json("get", "sa", "-n", ns)["items"]}
    assert names == {"default", "app"}
    eventually(
        lambda: (
            k8s_cluster.kubectl("get", "configmap", "kube-root-ca.crt", "-n", ns, check=False).returncode == 0
        ),
        what="the root CA publisher",
    )


def test_token_request_and_review_with_audience(k8s_cluster: TestCluster) -> None:
    ns = new_namespace(k8s_cluster)
    k8s_cluster.kubectl("create", "serviceaccount", "app", "-n", ns)
    token = k8s_cluster.kubectl("create", "token", "app", "-n", ns, "--audience", "istio-ca").stdout.strip()
    assert token.count(".") == 2  # a JWT

    status = token_review(k8s_cluster, token, ["istio-ca"])
    assert status["authenticated"] is True, status
    assert status["user"]["username"] == f"system:serviceaccount:{ns}:app"
    assert "istio-ca" in status["audiences"]
    assert f"system:serviceaccounts:{ns}" in status["user"]["groups"]

    other = k8s_cluster.kubectl("create", "token", "app", "-n", ns, "--audience", "other").stdout.strip()
    rejected = token_review(k8s_cluster, other, ["istio-ca"])
    assert not rejected.get("authenticated"), rejected

    # A deleted ServiceAccount invalidates its bound tokens, but not instantly: kube-apiserver caches
    # successful token authentications (10 s), so a just-deleted SA's token still passes for up to ~10 s.
    k8s_cluster.kubectl("delete", "serviceaccount", "app", "-n", ns)
    eventually(
        lambda: not token_review(k8s_cluster, token, ["istio-ca"]).get("authenticated"),
        timeout=30,
        what="TokenReview to reject the token of a deleted ServiceAccount",
    )


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: example.invalid/web:1
        ports: [{containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


def test_deployment_pods_get_ips_and_endpointslices(
    k8s_cluster: TestCluster, k8s_kubelet: KubeletStandIn
) -> None:
    ns = new_namespace(k8s_cluster)
    k8s_cluster.kubectl("apply", "-n", ns, "-f", "-", input=DEPLOYMENT)
    pods = k8s_kubelet.wait_running(ns, "app=web", 2)
    ips = {p["status"]["podIP"] for p in pods}
    assert len(ips) == 2
    assert all(ip.startswith("10.244.0.") for ip in ips)
    assert {p["spec"]["nodeName"] for p in pods} == {"node-0"}

    def slice_ips() -> set[str] | None:
        slices = k8s_cluster.kubectl_json(
            "get", "endpointslices", "-n", ns, "-l", "kubernetes.io/service-name=web"
        )["items"]
        got = {
            a
            for s in slices
            for e in s.get("endpoints") or []
            if e.get("conditions", {}).get("ready")
            for a in e["addresses"]
        }
        return got if got == ips else None

    eventually(slice_ips, what=f"EndpointSlice for web to list {ips}")

    # Scale down: the stand-in finishes the deletion and the slice follows.
    k8s_cluster.kubectl("scale", "deployment", "web", "-n", ns, "--replicas=1")

    def one_pod() -> bool:
        items = k8s_cluster.kubectl_json("get", "pods", "-n", ns, "-l", "app=web")["items"]
        return len(items) == 1

    eventually(one_pod, what="scale-down to finish")
    remaining = k8s_cluster.kubectl_json("get", "pods", "-n", ns, "-l", "app=web")["items"][0]["status"][
        "podIP"
    ]
    ips = {remaining}
    eventually(slice_ips, what="EndpointSlice to drop the deleted pod")

    # Deleting the Deployment cascades (garbage collector) to ReplicaSets and Pods.
    k8s_cluster.kubectl("delete", "deployment", "web", "-n", ns)
    eventually(
        lambda: not k8s_cluster.kubectl_json("get", "pods,replicasets", "-n", ns)["items"],
        what="garbage collection of ReplicaSets and Pods",
    )


def test_restart_apiserver_and_etcd() -> None:
    """Own cluster: restarts must not disturb the session cluster (and two clusters run side by side)."""
    with TestCluster() as cluster:
        cluster.kubectl("create", "configmap", "before", "--from-literal=k=v")
        rv_before = cluster.kubectl_json("get", "configmap", "before")["metadata"]["resourceVersion"]

        cluster.restart_apiserver()
        assert cluster.kubectl_json("get", "configmap", "before")["data"] == {"k": "v"}
        cluster.kubectl("create", "configmap", "after-apiserver", "--from-literal=k=v")

        cluster.restart_etcd()
        eventually(
            lambda: (
                cluster.kubectl("get", "configmap", "before", "after-apiserver", check=False).returncode == 0
            ),
            what="the API server to serve again after an etcd restart",
        )
        cluster.kubectl("create", "configmap", "after-etcd", "--from-literal=k=v")
        got = cluster.kubectl_json("get", "configmap", "before")
        assert got["metadata"]["resourceVersion"] == rv_before
        # The controller-manager survived both restarts: a new namespace still gets its default SA.
        cluster.kubectl("create", "namespace", "later")
        eventually(
            lambda: cluster.kubectl("get", "sa", "default", "-n", "later", check=False).returncode == 0,
            what="default SA after restarts",
        )
        tmp = cluster.dir
    assert tmp is not None
    assert not Path(tmp).exists()


def test_helm(k8s_cluster: TestCluster, tmp_path: Path) -> None:
    out = k8s_cluster.helm("version", "--short").stdout
    assert out.startswith("v3.19.5"), out
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: demo\nversion: 0.1.0\nkubeVersion: '>=1.34.0-0'\n"
    )
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: demo}\n"
        "data: {kube: '{{ .Capabilities.KubeVersion.Version }}'}\n"
    )
    ns = new_namespace(k8s_cluster)
    k8s_cluster.helm("install", "demo", str(chart), "-n", ns, "--wait", "--timeout", "60s")
    cm = k8s_cluster.kubectl_json("get", "configmap", "demo", "-n", ns)
    assert cm["data"]["kube"] == K8S_VERSION
    k8s_cluster.helm("uninstall", "demo", "-n", ns)


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_failed_start_cleans_up() -> None:
    """A component dying mid-start raises with its log tail, and etcd (already running) is torn down."""
    cluster = TestCluster(extra_apiserver_args=["--no-such-flag=1"])
    with pytest.raises(ClusterStartError, match="no-such-flag"):
        cluster.start()
    assert cluster.dir is None
    assert not _processes_mentioning(f"--listen-client-urls=http://127.0.0.1:{cluster.etcd_port}")


def test_missing_binaries_say_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(MissingBinariesError, match="make k8s-tools"):
        TestCluster(bin_dir=tmp_path)


def test_kubelet_hooks_and_second_node(k8s_cluster: TestCluster) -> None:
    """The hook point later work uses to build a pod's network namespace: called with the pod and its IP."""
    started: list[tuple[str, str]] = []
    stopped: list[tuple[str, str]] = []

    def on_start(pod: dict[str, Any], ip: str) -> None:
        if not started and pod["metadata"]["name"] == "flaky":
            started.append(("failed-once", ip))
            raise RuntimeError("netns not ready yet")  # retried on the next poll, pod stays Pending meanwhile
        started.append((pod["metadata"]["name"], ip))

    def on_stop(pod: dict[str, Any], ip: str) -> None:
        stopped.append((pod["metadata"]["name"], ip))

    ns = new_namespace(k8s_cluster)
    with KubeletStandIn(
        k8s_cluster.kubeconfig, "node-1", index=1, schedule=False, on_pod_start=on_start, on_pod_stop=on_stop
    ) as kubelet:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "flaky", "labels": {"app": "flaky"}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "example.invalid/c:1"}]},
        }
        k8s_cluster.kubectl("create", "-n", ns, "-f", "-", input=json.dumps(pod))
        (running,) = kubelet.wait_running(ns, "app=flaky", 1)
        ip = running["status"]["podIP"]
        assert ip.startswith("10.244.1.")
        assert started == [("failed-once", ip), ("flaky", ip)]
        k8s_cluster.kubectl("delete", "pod", "flaky", "-n", ns, "--wait=true", "--timeout=30s")
        eventually(lambda: stopped == [("flaky", ip)], what="on_pod_stop")
