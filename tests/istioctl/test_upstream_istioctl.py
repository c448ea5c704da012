"""Upstream ``istioctl`` (built from the Go module proxy by ``tools/istioctl/build.sh``) reads ztunnel-py.

Wire compatibility reaches the tools too: ``istioctl ztunnel-config ... --file`` parses a config dump exactly
as it does one fetched from a ztunnel pod's admin port. This takes a real ztunnel-py (real xDS and CA from
the test control plane, a captured pod so a certificate is issued) and its ``/config_dump``, and checks that
upstream istioctl lists its workloads, services, policies and certificates.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from istiopy.testing import ztunnel as b
from istiopy.testing.netns import Topology
from istiopy.testing.tools import built_tool
from istiopy.testing.ztunnel import TestControlPlane, ZtunnelProcess

ROOT = Path(__file__).resolve().parents[2]
VIP = "10.96.77.7"


def upstream_istioctl() -> Path:
    """The binary ``tools/istioctl/build.sh`` builds, or ``$ISTIOPY_UPSTREAM_ISTIOCTL``."""
    env = os.environ.get("ISTIOPY_UPSTREAM_ISTIOCTL")
    return Path(env) if env else built_tool(ROOT / "tools" / "istioctl" / "build.sh")


def _docs(node: str, node_ip: str, pod_ip: str, uid: str) -> list[dict[str, object]]:
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "cart", "namespace": "shop", "uid": uid, "labels": {"app": "cart"}},
         "spec": {"nodeName": node, "serviceAccountName": "cart",
                  "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
         "status": {"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
                    "conditions": [{"type": "Ready", "status": "True"}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": f"ztunnel-{node}", "namespace": "istio-system", "labels": {"app": "ztunnel"}},
         "spec": {"nodeName": node, "serviceAccountName": "ztunnel", "containers": [{"name": "istio-proxy"}]},
         "status": {"phase": "Running", "podIP": node_ip, "podIPs": [{"ip": node_ip}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "cart", "namespace": "shop"},
         "spec": {"clusterIP": VIP, "selector": {"app": "cart"},
                  "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "cart-readers", "namespace": "shop"},
         "spec": {"selector": {"matchLabels": {"app": "cart"}}, "action": "ALLOW",
                  "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]}},
    ]  # fmt: skip


@pytest.mark.netns
@pytest.mark.slow
async def test_upstream_istioctl_reads_ztunnel_py_config_dump(topology: Topology) -> None:
    istioctl = upstream_istioctl()
    node = topology.add_node("up-0")
    pod = topology.add_pod("cart", "shop", node=node, service_account="cart")
    pod.uid = b.pod_uid(pod.namespace, pod.name)
    workdir = tempfile.mkdtemp(prefix="zt-istioctl-")
    plane = TestControlPlane(yaml.safe_dump_all(_docs(node.name, node.ip, pod.ip, pod.uid)))
    zt: ZtunnelProcess | None = None
    try:
        await plane.start()
        zt = ZtunnelProcess(
            plane, node.name, node.ip, [(pod.uid, pod.name, pod.namespace, "cart", pod.netns_path)], workdir
        )
        await asyncio.to_thread(zt.wait_ready)

        def complete() -> bool:
            assert zt is not None
            d = zt.config_dump()
            return bool(d["policies"]) and any(c["state"] == "Available" for c in d["certificates"])

        async with asyncio.timeout(30):
            while not await asyncio.to_thread(complete):  # noqa: ASYNC110 - another process's state
                await asyncio.sleep(0.1)
        dump = Path(workdir) / "config_dump.json"
        dump.write_text(json.dumps(zt.config_dump()))

        def run(*args: str) -> str:
            res = subprocess.run(
                [str(istioctl), "ztunnel-config", *args, "--file", str(dump)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert res.returncode == 0, f"istioctl ztunnel-config {' '.join(args)}: {res.stderr}"
            return res.stdout

        workloads = run("workloads")
        row = next(line.split() for line in workloads.splitlines() if " cart " in f" {line} ")
        assert row[:3] == ["shop", "cart", pod.ip], workloads  # NAMESPACE POD-NAME ADDRESS
        assert "HBONE" in row, workloads
        services = run("services")
        assert any(line.split()[:3] == ["shop", "cart", VIP] for line in services.splitlines()), services
        policies = run("policies")
        assert any(line.split()[:3] == ["shop", "cart-readers", "Allow"] for line in policies.splitlines()), (
            policies
        )
        certs = run("certificates")
        assert "spiffe://cluster.local/ns/shop/sa/cart" in certs, certs
        assert "Available" in certs, certs
        # The structured form round-trips every workload field istioctl knows.
        as_json = json.loads(run("workloads", "-o", "json"))
        (cart,) = [w for w in as_json if w["name"] == "cart"]
        assert cart["workloadIps"] == [pod.ip]
        assert cart["serviceAccount"] == "cart"
        assert cart["protocol"] == "HBONE"
    finally:
        if zt is not None:
            zt.stop()
        await plane.close()
        shutil.rmtree(workdir, ignore_errors=True)


# Rules the API server enforces through the upstream CRDs' schema (oneOf, CEL), which `istioctl validate`
# (upstream's Go validation alone) does not run; our model enforces both (tests/mesh/test_crds.py checks the
# API server refusing them).
SCHEMA_ONLY = {
    "requestauthentication-jwks-and-jwksuri.yaml",  # CEL: only one of jwks or jwksUri
    "virtualservice-string-match-two-kinds.yaml",  # schema oneOf: exact, prefix or regex
}


def test_upstream_istioctl_validate_agrees_with_our_model_on_the_test_documents() -> None:
    """Every document our model accepts, upstream accepts; every Istio document it refuses, upstream refuses
    too, apart from the schema-only rules above. (Gateway API and core kinds are not istioctl validate's.)"""
    istioctl = upstream_istioctl()
    data = ROOT / "tests" / "data"
    valid = sorted((data / "valid").glob("*.yaml"))
    args = [a for p in valid for a in ("-f", str(p))]
    res = subprocess.run([str(istioctl), "validate", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    accepted = []
    invalid = [p for p in sorted((data / "invalid").glob("*.yaml")) if ".istio.io/" in p.read_text()]
    assert len(invalid) > 40
    for path in invalid:
        out = subprocess.run(
            [str(istioctl), "validate", "-f", str(path)], capture_output=True, text=True, timeout=60
        )
        if out.returncode == 0:
            accepted.append(path.name)
    assert set(accepted) == SCHEMA_ONLY
