"""``istioctl-py`` run as users run it: offline commands, and every failure as one actionable line.

The cluster cases use a *bare* cluster of their own (no CRDs, nothing installed), because "the Gateway API
CRDs are missing" cannot be staged on the shared session cluster without breaking other suites.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from istiopy.testing.cluster import TestCluster, find_binaries, free_port

ROOT = Path(__file__).resolve().parents[2]
ISTIOCTL = Path(sys.executable).parent / "istioctl-py"


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST")}
    return subprocess.run(
        [str(ISTIOCTL), *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def one_error_line(cp: subprocess.CompletedProcess[str]) -> str:
    assert cp.returncode != 0
    assert "Traceback" not in cp.stderr
    lines = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, cp.stderr
    return lines[0]


def test_waypoint_generate_is_upstreams_gateway() -> None:
    cp = run("waypoint", "generate", "-n", "demo", "--for", "workload", "-r", "canary", "--name", "wp1")
    assert cp.returncode == 0, cp.stderr
    assert yaml.safe_load(cp.stdout) == {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": "wp1",
            "namespace": "demo",
            "labels": {"istio.io/waypoint-for": "workload", "istio.io/rev": "canary"},
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }
    plain = yaml.safe_load(run("waypoint", "generate", "-n", "x").stdout)
    assert "labels" not in plain["metadata"]
    assert plain["metadata"]["name"] == "waypoint"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["waypoint", "apply", "--for", "pods"], "invalid choice"),
        (["waypoint", "apply", "--name", "none"], "reserved"),
        (["waypoint", "apply", "--wait", "--waypoint-timeout", "soon"], "not a duration"),
        (["install", "--components", "base,sidecar"], "components are"),
        (["version", "--remote", "maybe"], "expected true or false"),
    ],
)
def test_bad_flags_are_one_line(args: list[str], needle: str) -> None:
    line = one_error_line(run(*args))
    assert needle in line
    assert run(*args).returncode == 2


def test_no_kubeconfig(tmp_path: Path) -> None:
    for args in (["waypoint", "list"], ["x", "precheck"], ["waypoint", "apply", "-n", "demo"]):
        line = one_error_line(run(*args, env={"HOME": str(tmp_path)}))
        assert line == (
            "error: no Kubernetes configuration found: "
            "set KUBECONFIG, pass --kubeconfig or create ~/.kube/config"
        )
    line = one_error_line(run("waypoint", "list", "--kubeconfig", str(tmp_path / "nope")))
    assert f"kubeconfig {tmp_path / 'nope'} does not exist" in line


def test_unreachable_cluster(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {"server": f"https://127.0.0.1:{port}", "insecure-skip-tls-verify": True},
            }
        ],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u", "namespace": "team"}}],
        "current-context": "c",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(cfg))
    line = one_error_line(run("waypoint", "status", "--kubeconfig", str(path)))
    assert line.startswith(f"error: cannot reach the Kubernetes API server at https://127.0.0.1:{port} (")
    assert "check that the cluster is running" in line
    # version still prints the client, then the one error line.
    cp = run("version", "--kubeconfig", str(path))
    assert cp.stdout.startswith("client version: ")
    assert one_error_line(cp).startswith("error: cannot reach the Kubernetes API server")
    # generate needs no cluster, and takes the context's namespace like kubectl.
    assert (
        yaml.safe_load(run("waypoint", "generate", "--kubeconfig", str(path)).stdout)["metadata"]["namespace"]
        == "team"
    )


def test_manifest_generate_and_dry_run_render_the_charts() -> None:
    helm = str(find_binaries() / "helm")
    cp = run(
        "manifest",
        "generate",
        "--helm",
        helm,
        "--set",
        "values.global.hub=reg.example/x",
        "--set",
        "istiod.replicaCount=3",
    )
    assert cp.returncode == 0, cp.stderr
    docs = [d for d in yaml.safe_load_all(cp.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {"ValidatingWebhookConfiguration", "Deployment", "DaemonSet", "Service", "ClusterRole"} <= kinds
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert dep["spec"]["replicas"] == 3
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/x/istiod-py:0.1.0"
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example/x/ztunnel-py:0.1.0"

    dry = run("install", "--dry-run", "--helm", helm, "-r", "canary", "--components", "istiod")
    assert dry.returncode == 0, dry.stderr
    names = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(dry.stdout) if d}
    assert ("Deployment", "istiod-canary") in names
    assert not any(k == "DaemonSet" for k, _ in names)

    line = one_error_line(run("manifest", "generate", "--helm", helm, "--set", "istiod.replicaCont=2"))
    assert line.startswith("error: rendering chart istiod failed:")
    assert "replicaCont" in line
    line = one_error_line(run("install", "-y", "--helm", str(ROOT / "no-such-helm")))
    assert line.startswith("error: cannot run")
    line = one_error_line(run("install", "-y", env={"PATH": "/nonexistent"}))
    assert "helm not found on PATH" in line


# ---------------------------------------------------------------------------------------------- bare cluster


@pytest.fixture(scope="module")
def bare_cluster() -> Iterator[TestCluster]:
    """A cluster with nothing installed: no CRDs, no control plane."""
    with TestCluster() as cluster:
        yield cluster


@pytest.mark.k8s
@pytest.mark.slow
def test_bare_cluster_errors_and_precheck(bare_cluster: TestCluster, tmp_path: Path) -> None:
    env = {"KUBECONFIG": str(bare_cluster.kubeconfig)}
    missing = "error: the Gateway API CRDs are not installed in this cluster: install them with `helm install"
    for args in (["waypoint", "apply", "-n", "default"], ["waypoint", "list", "-A"], ["waypoint", "delete"]):
        assert one_error_line(run(*args, env=env)).startswith(missing)

    cp = run("x", "precheck", env=env)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "Gateway API CRDs not installed" in cp.stdout
    assert "istiopy is safe to install or upgrade" in cp.stdout
    verbose = run("x", "precheck", "-v", env=env).stdout
    assert "Kubernetes v1.34.3 is supported" in verbose
    assert "you have the permissions needed to install" in verbose
    assert "control plane version: none" in run("version", env=env).stdout

    # Another (upstream) Istio control plane is a conflict.
    bare_cluster.kubectl("create", "namespace", "istio-system", check=False)
    bare_cluster.kubectl(
        "create", "deployment", "istiod", "-n", "istio-system", "--image=docker.io/istio/pilot:1.24.0"
    )
    bare_cluster.kubectl("label", "deployment", "istiod", "-n", "istio-system", "app=istiod", "--overwrite")
    cp = run("x", "precheck", env=env)
    assert cp.returncode == 1
    assert (
        "another Istio control plane is installed (istio-system/istiod, image docker.io/istio/pilot:1.24.0)"
        in cp.stdout
    )
    bare_cluster.kubectl("delete", "deployment", "istiod", "-n", "istio-system")

    # A user without permissions: precheck names what is missing (SelfSubjectAccessReview), other commands
    # say "not allowed" in one line.
    bare_cluster.kubectl("create", "serviceaccount", "nobody", "-n", "default")
    token = bare_cluster.kubectl("create", "token", "nobody", "-n", "default").stdout.strip()
    cfg = yaml.safe_load(bare_cluster.kubeconfig.read_text())
    cfg["users"] = [{"name": "admin", "user": {"token": token}}]
    weak = tmp_path / "nobody.kubeconfig"
    weak.write_text(yaml.safe_dump(cfg))
    cp = run("x", "precheck", "--kubeconfig", str(weak))
    assert cp.returncode == 1
    assert "missing permissions to install: create namespaces;" in cp.stdout
    assert "create deployments.apps in namespace istio-system" in cp.stdout
    line = one_error_line(run("version", "--kubeconfig", str(weak)))
    assert line.startswith("error: not allowed: ")
    assert "ask a cluster admin" in line
