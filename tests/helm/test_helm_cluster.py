"""The charts against the real kube-apiserver: install, server-side validation, upgrade, uninstall.

No container runtime exists here, so no image runs: the istiod Deployment gets its ReplicaSet and Pods from
the real controller-manager and the ztunnel DaemonSet is stored, but nothing executes. What these tests prove
is what the API server decides: every object is accepted (strict field validation, so a misspelt field is an
error), helm's release bookkeeping works for upgrade and uninstall, and uninstall leaves only the CRDs.

The base chart's validating webhook is pointed at a closed loopback port (``base.validationURL``): with
``failurePolicy: Ignore`` the API server skips it at once, and never dials a Service address that has nothing
behind it in this cluster.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import yaml
from helm_helpers import CHARTS

from istiopy.testing.cluster import TestCluster, free_port

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

CRD_NAMES = (
    "authorizationpolicies.security.istio.io",
    "virtualservices.networking.istio.io",
    "gateways.gateway.networking.k8s.io",
)


def _docs(text: str) -> list[dict[str, object]]:
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]


@pytest.fixture
def istio_ns(k8s_cluster: TestCluster) -> Iterator[str]:
    """A fresh control-plane namespace; every release in it is uninstalled even when the test fails."""
    ns = f"istio-h{uuid.uuid4().hex[:6]}"
    yield ns
    releases = json.loads(k8s_cluster.helm("list", "-n", ns, "-o", "json", check=False).stdout or "[]")
    for r in releases:
        k8s_cluster.helm("uninstall", r["name"], "-n", ns, "--wait", check=False)
    k8s_cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)


def _closed_url() -> str:
    return f"https://127.0.0.1:{free_port()}/validate"


@pytest.mark.parametrize(
    ("chart", "values"),
    [
        ("base", ["--set", f"base.validationURL={_closed_url()}"]),
        ("istiod", []),
        ("istiod", ["--set", "revision=canary", "--set", "autoscaleEnabled=true", "--set", "env.FOO=bar"]),
        ("ztunnel", ["--set", "revision=canary", "--set", "logLevel=debug"]),
    ],
)
def test_rendered_manifests_pass_strict_server_side_validation(
    k8s_cluster: TestCluster, chart: str, values: list[str]
) -> None:
    """``kubectl apply --dry-run=server --validate=strict``: the API server checks every field."""
    k8s_cluster.kubectl("create", "namespace", "istio-system", check=False)
    rendered = k8s_cluster.helm(
        "template", f"istio-{chart}", str(CHARTS / chart), "-n", "istio-system", "--include-crds", *values
    ).stdout
    assert _docs(rendered), "nothing rendered"
    cp = k8s_cluster.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "--server-side",
        "-n",
        "istio-system",
        "-f",
        "-",
        input=rendered,
    )
    assert "serverside-applied (server dry run)" in cp.stdout
    # A misspelt field is refused, proving the check is strict rather than lenient.
    broken = rendered.replace("serviceAccountName:", "serviceAccountNam:", 1)
    if broken != rendered:
        bad = k8s_cluster.kubectl(
            "apply",
            "--dry-run=server",
            "--validate=strict",
            "-n",
            "istio-system",
            "-f",
            "-",
            input=broken,
            check=False,
        )
        assert bad.returncode != 0
        assert "serviceAccountNam" in bad.stderr


def _manifest(cluster: TestCluster, release: str, ns: str) -> str:
    return cluster.helm("get", "manifest", release, "-n", ns).stdout


def _exists(cluster: TestCluster, manifest: str, ns: str) -> list[str]:
    """``kind/name`` of every object of ``manifest`` that exists in the cluster."""
    cp = cluster.kubectl("get", "-n", ns, "-f", "-", "-o", "name", "--ignore-not-found", input=manifest)
    return sorted(line for line in cp.stdout.splitlines() if line.strip())


def test_install_upgrade_uninstall(k8s_cluster: TestCluster, istio_ns: str) -> None:
    ns = istio_ns
    common = ["-n", ns, "--set", f"global.istioNamespace={ns}"]
    k8s_cluster.helm(
        "install",
        "istio-base",
        str(CHARTS / "base"),
        *common,
        "--create-namespace",
        "--set",
        f"base.validationURL={_closed_url()}",
    )
    for crd in CRD_NAMES:
        k8s_cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
    k8s_cluster.helm("install", "istiod", str(CHARTS / "istiod"), *common)
    k8s_cluster.helm("install", "ztunnel", str(CHARTS / "ztunnel"), "-n", ns, "--set", f"istioNamespace={ns}")

    manifests = {r: _manifest(k8s_cluster, r, ns) for r in ("istio-base", "istiod", "ztunnel")}
    for release, manifest in manifests.items():
        want = len(_docs(manifest))
        have = _exists(k8s_cluster, manifest, ns)
        assert len(have) == want, (
            f"{release}: {want} objects in the release, {len(have)} in the cluster: {have}"
        )

    dep = k8s_cluster.kubectl_json("get", "deployment", "istiod", "-n", ns)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "docker.io/istiopy/istiod-py:0.1.0"
    assert dep["spec"]["replicas"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CA_TRUSTED_NODE_ACCOUNTS"] == f"{ns}/ztunnel"
    assert k8s_cluster.kubectl("get", "pdb", "istiod", "-n", ns, check=False).returncode == 0
    ds = k8s_cluster.kubectl_json("get", "daemonset", "ztunnel", "-n", ns)
    assert ds["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] == f"istiod.{ns}.svc:15012"
    webhook = k8s_cluster.kubectl_json("get", "validatingwebhookconfiguration", "istiod-default-validator")
    assert webhook["webhooks"][0]["failurePolicy"] == "Ignore"

    # helm upgrade with changed values: the objects follow, and objects switched off go away.
    k8s_cluster.helm(
        "upgrade",
        "istiod",
        str(CHARTS / "istiod"),
        *common,
        "--set",
        "replicaCount=2",
        "--set",
        "global.hub=registry.example/istiopy",
        "--set",
        "global.tag=9.9.9",
        "--set",
        "meshConfig.trustDomain=example.org",
        "--set",
        "global.defaultPodDisruptionBudget.enabled=false",
    )
    dep = k8s_cluster.kubectl_json("get", "deployment", "istiod", "-n", ns)
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["spec"]["replicas"] == 2
    assert container["image"] == "registry.example/istiopy/istiod-py:9.9.9"
    assert {e["name"]: e.get("value") for e in container["env"]}["TRUST_DOMAIN"] == "example.org"
    mesh = k8s_cluster.kubectl_json("get", "configmap", "istio", "-n", ns)["data"]["mesh"]
    assert "trustDomain: example.org" in mesh
    assert k8s_cluster.kubectl("get", "pdb", "istiod", "-n", ns, check=False).returncode != 0
    history = json.loads(k8s_cluster.helm("history", "istiod", "-n", ns, "-o", "json").stdout)
    assert [h["revision"] for h in history] == [1, 2]
    assert history[-1]["status"] == "deployed"

    # A bad value is refused by the schema before anything changes.
    bad = k8s_cluster.helm(
        "upgrade", "istiod", str(CHARTS / "istiod"), *common, "--set", "replicas=3", check=False
    )
    assert bad.returncode != 0
    assert "replicas" in bad.stderr
    assert k8s_cluster.kubectl_json("get", "deployment", "istiod", "-n", ns)["spec"]["replicas"] == 2

    # helm uninstall leaves nothing behind but the CRDs (as Istio's base chart does).
    manifests["istiod"] = _manifest(k8s_cluster, "istiod", ns)
    for release in ("ztunnel", "istiod", "istio-base"):
        k8s_cluster.helm("uninstall", release, "-n", ns, "--wait")
    for release, manifest in manifests.items():
        assert _exists(k8s_cluster, manifest, ns) == [], f"{release} left objects behind"
    for kind in ("clusterroles", "clusterrolebindings", "validatingwebhookconfigurations"):
        left = k8s_cluster.kubectl(
            "get", kind, "-l", "app.kubernetes.io/part-of=istiopy", "-o", "name"
        ).stdout
        assert f"-{ns}" not in left
        assert "istiod-default-validator" not in left
    for crd in CRD_NAMES:
        assert k8s_cluster.kubectl("get", "crd", crd, check=False).returncode == 0, f"CRD {crd} was removed"
    assert json.loads(k8s_cluster.helm("list", "-n", ns, "-o", "json").stdout) == []
