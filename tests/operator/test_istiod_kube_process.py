"""``istiod-py kube`` as real processes on a cluster of their own: two replicas share a Lease, the leader is
SIGKILLed and the standby takes over within 15 s; the API server and etcd restart under a running operator,
which recovers (new Gateways still get their waypoint) without duplicating anything."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from op_helpers import eventually, install_crds

from istiopy.testing.cluster import TestCluster, free_port

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

LEASE = "istiod-py-proc"


def gateway(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": name},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        }
    )


@pytest.fixture
def cluster() -> Iterator[TestCluster]:
    with TestCluster() as c:
        install_crds(c)
        c.kubectl("create", "namespace", "istio-system")
        yield c


def start(cluster: TestCluster, identity: str, log: Path) -> subprocess.Popen[bytes]:
    port = free_port()
    argv = [
        str(Path(sys.executable).parent / "istiod-py"), "kube",
        "--kubeconfig", str(cluster.kubeconfig),
        "--identity", identity,
        "--lease-name", LEASE,
        "--webhook-port", str(port),
        "--webhook-url", f"https://127.0.0.1:{port}/validate",
        "--webhook-name", "istiod-py-proc",
        "--hub", "example.invalid/istiopy",
        # xDS/CA and monitoring on free ports: the replicas share this host.
        "--xds-port", str(free_port()),
        "--monitoring-port", str(free_port()),
    ]  # fmt: skip
    out = open(log, "wb")  # noqa: SIM115 - handed to the child
    # cwd away from the repo root, whose folders (xds/, api/) would shadow installed packages.
    return subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=log.parent
    )


def holder(cluster: TestCluster) -> str | None:
    out = cluster.kubectl("get", "lease", LEASE, "-n", "istio-system", "-o", "json", check=False)
    return json.loads(out.stdout)["spec"].get("holderIdentity") if out.returncode == 0 else None


def deployments(cluster: TestCluster, ns: str) -> list[str]:
    items = cluster.kubectl_json("get", "deployments", "-n", ns)["items"]
    return sorted(i["metadata"]["name"] for i in items)


def test_replicas_failover_and_api_restarts(cluster: TestCluster, tmp_path: Path) -> None:
    procs = {name: start(cluster, name, tmp_path / f"{name}.log") for name in ("replica-a", "replica-b")}
    try:

        def leading() -> str | None:
            for name, p in procs.items():
                assert p.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
            return holder(cluster)

        leader = eventually(leading, timeout=60, what="a leader")
        assert leader in procs
        cluster.kubectl("create", "namespace", "apps")
        cluster.kubectl("apply", "-n", "apps", "-f", "-", input=gateway("wp1"))
        eventually(lambda: deployments(cluster, "apps") == ["wp1"], timeout=60, what="wp1 deployed")

        # The CA's root lives in the Secret and reaches every namespace; the webhook trusts that root.
        secret = cluster.kubectl_json("get", "secret", "istio-ca-secret", "-n", "istio-system")
        assert {"ca-cert.pem", "ca-key.pem"} <= set(secret["data"])
        root = eventually(
            lambda: cluster.kubectl("get", "configmap", "istio-ca-root-cert", "-n", "apps", "-o", "json",
                                    check=False).stdout,
            what="istio-ca-root-cert in a new namespace",
        )  # fmt: skip
        root_pem = json.loads(root)["data"]["root-cert.pem"]
        hooks = cluster.kubectl_json("get", "validatingwebhookconfiguration", "istiod-py-proc")["webhooks"]
        assert base64.b64decode(hooks[0]["clientConfig"]["caBundle"]).decode() == root_pem
        refused = cluster.kubectl(
            "apply", "-n", "apps", "-f", "-", check=False,
            input=json.dumps({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                              "metadata": {"name": "bad"},
                              "spec": {"selector": {"matchLabels": {"a": "b"}},
                                       "targetRefs": [{"kind": "Service", "group": "", "name": "x"}]}}),
        )  # fmt: skip
        assert "denied the request" in refused.stderr, refused.stderr

        # API server crash and restart: the watches come back, new objects are handled, nothing doubles.
        cluster.restart_apiserver()
        cluster.kubectl("apply", "-n", "apps", "-f", "-", input=gateway("wp2"))
        eventually(
            lambda: deployments(cluster, "apps") == ["wp1", "wp2"], timeout=90, what="wp2 after restart"
        )

        # The leader dies without handing over: the standby takes the Lease within 15 s.
        t0 = time.monotonic()
        os.killpg(procs[leader].pid, signal.SIGKILL)
        procs[leader].wait(10)
        standby = next(n for n in procs if n != leader)
        eventually(lambda: holder(cluster) == standby, timeout=15, what="the standby to take over")
        assert time.monotonic() - t0 < 15

        # etcd restart under the new leader.
        cluster.restart_etcd()
        cluster.kubectl("apply", "-n", "apps", "-f", "-", input=gateway("wp3"))
        eventually(
            lambda: deployments(cluster, "apps") == ["wp1", "wp2", "wp3"],
            timeout=90,
            what="wp3 after etcd restart",
        )
        services = cluster.kubectl_json("get", "services", "-n", "apps")["items"]
        assert sorted(s["metadata"]["name"] for s in services) == ["wp1", "wp2", "wp3"]
        assert procs[standby].poll() is None, (tmp_path / f"{standby}.log").read_text()[-3000:]

        # A clean stop (SIGTERM) exits 0.
        procs[standby].send_signal(signal.SIGTERM)
        assert procs[standby].wait(30) == 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
