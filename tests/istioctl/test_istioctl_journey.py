"""The user journey of issue 10, scripted against the real kube-apiserver with real helm, kubectl and CLI.

``helm install`` base and istiod -> label a namespace ambient -> ``istioctl-py waypoint apply
--enroll-namespace --wait`` (returns once the waypoint is Programmed) -> ``kubectl apply`` an L7
AuthorizationPolicy targeting the waypoint -> ``waypoint list``/``status`` show it -> ``waypoint delete``
removes it -> ``helm uninstall``.

What stands in for what cannot run here (no container runtime): the istiod chart's pod never starts, so the
real operator (``istiopy.operator.KubeOperator``, what istiod-py runs in Kubernetes mode) runs in this test's
event loop against the same API server, configured from the *installed chart's* Deployment (waypoint image and
arguments, webhook configuration name) so the chart and the operator are proven to agree. The kubelet
stand-in makes the waypoint pod Running/Ready (nothing executes in it), which is what turns the Deployment
Available and the Gateway Programmed. The validating webhook is served in-process on loopback and reached
through the base chart's ``istiod-default-validator`` (its URL set with ``base.validationURL``).

Every external command runs in a thread so the operator keeps reconciling while the CLI waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[2]
if not (ROOT / "operator" / "runner.py").exists():  # the Kubernetes-mode operator lands with issue 9
    pytest.skip("needs the Kubernetes-mode operator (operator/runner.py)", allow_module_level=True)

from istiopy.istiod.cli import build_parser  # noqa: E402
from istiopy.istiod.kube import cmd_kube, config_from  # noqa: E402
from istiopy.mesh.indexes import install_indexes  # noqa: E402
from istiopy.mesh.store import ConfigStore  # noqa: E402
from istiopy.operator.config import OperatorConfig  # noqa: E402
from istiopy.operator.kubeapi import KubeApi  # noqa: E402
from istiopy.operator.runner import KubeOperator  # noqa: E402
from istiopy.testing.cluster import TestCluster, free_port  # noqa: E402
from istiopy.testing.kubelet import KubeletStandIn  # noqa: E402

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

CHARTS = ROOT / "charts"
ISTIOCTL = Path(sys.executable).parent / "istioctl-py"
ISTIO_NS = "istio-system"

POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-reads
  namespace: {ns}
spec:
  targetRefs:
  - kind: Gateway
    group: gateway.networking.k8s.io
    name: waypoint
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
        paths: ["/api/*"]
"""

INVALID_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: broken
  namespace: {ns}
spec:
  targetRefs:
  - kind: Gateway
    group: gateway.networking.k8s.io
    name: waypoint
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
        ports: ["not-a-port"]
"""


async def istioctl(cluster: TestCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(ISTIOCTL), *args],
        capture_output=True,
        text=True,
        env=cluster.env(),
        timeout=120,
        check=False,
    )


async def kubectl(cluster: TestCluster, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cluster.kubectl, *args, **kw)


async def helm(cluster: TestCluster, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cluster.helm, *args, **kw)


async def eventually(fn: Callable[[], Any], within: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + within
    while True:
        result = fn()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.2)


def operator_config_from_chart(deployment: dict[str, Any], webhook_port: int) -> OperatorConfig:
    """What istiod-py reads from the chart: the container's args parsed by the real CLI with the chart's
    environment, then pointed at this test's cluster (identity, lease, webhook on localhost)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    with mock.patch.dict(os.environ, env):
        args = build_parser().parse_args(container["args"])
    assert args.func is cmd_kube, container["args"]
    config = config_from(args)
    tag = uuid.uuid4().hex[:6]
    return dataclasses.replace(
        config,
        namespace=ISTIO_NS,
        identity=f"journey-{tag}",
        lease_name=f"istiod-py-journey-{tag}",
        lease_duration=4.0,
        renew_deadline=3.0,
        retry_period=0.5,
        webhook_address="127.0.0.1",
        webhook_port=webhook_port,
        webhook_url=f"https://127.0.0.1:{webhook_port}/validate",
    )


@contextlib.asynccontextmanager
async def operator_running(cluster: TestCluster, config: OperatorConfig) -> AsyncIterator[KubeOperator]:
    store = ConfigStore()
    install_indexes(store)
    api = await KubeApi.connect(cluster.kubeconfig)
    op = KubeOperator(store, api, config, resync_period=5.0)
    task = asyncio.create_task(op.run(), name="journey-operator")
    try:
        async with asyncio.timeout(60):
            while not (op.ready.is_set() and op.is_leader):
                if task.done():
                    task.result()
                await asyncio.sleep(0.1)
        yield op
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await api.close()
        await asyncio.to_thread(
            cluster.kubectl,
            "delete",
            "lease",
            config.lease_name,
            "-n",
            ISTIO_NS,
            "--ignore-not-found",
            check=False,
        )


async def test_user_journey(k8s_cluster: TestCluster, k8s_kubelet: KubeletStandIn) -> None:
    c = k8s_cluster
    demo = f"demo-{uuid.uuid4().hex[:6]}"
    webhook_port = free_port()
    try:
        # 1. helm install base and istiod, as the README says.
        await helm(
            c,
            "install",
            "istio-base",
            str(CHARTS / "base"),
            "-n",
            ISTIO_NS,
            "--create-namespace",
            "--set",
            f"base.validationURL=https://127.0.0.1:{webhook_port}/validate",
        )
        await kubectl(c, "wait", "--for=condition=Established", "crd/gateways.gateway.networking.k8s.io")
        await helm(
            c,
            "install",
            "istiod",
            str(CHARTS / "istiod"),
            "-n",
            ISTIO_NS,
            "--set",
            "global.hub=example.invalid/istiopy",
        )
        deployment = c.kubectl_json("get", "deployment", "istiod", "-n", ISTIO_NS)
        config = operator_config_from_chart(deployment, webhook_port)
        assert config.waypoint.image_ref == "example.invalid/istiopy/waypoint:0.1.0"
        assert config.waypoint.args == ()  # the image entrypoint runs the launcher, which takes none

        version = await istioctl(c, "version")
        assert version.returncode == 0, version.stderr
        assert "client version: 0.1.0" in version.stdout
        assert "control plane version: 0.1.0" in version.stdout

        async with operator_running(c, config) as op:
            # 2. A namespace in ambient mode.
            await kubectl(c, "create", "namespace", demo)
            await kubectl(c, "label", "namespace", demo, "istio.io/dataplane-mode=ambient")

            # 3. The waypoint, enrolled, waited for.
            t0 = time.monotonic()
            out = await istioctl(
                c,
                "waypoint",
                "apply",
                "-n",
                demo,
                "--enroll-namespace",
                "--wait",
                "--waypoint-timeout",
                "60s",
            )
            assert out.returncode == 0, out.stdout + out.stderr
            assert f"✅ waypoint {demo}/waypoint applied" in out.stdout
            assert f'✅ namespace "{demo}" labeled with "istio.io/use-waypoint=waypoint"' in out.stdout
            assert f"✅ waypoint {demo}/waypoint programmed" in out.stdout
            assert "not enrolled in ambient" not in out.stderr
            assert time.monotonic() - t0 < 60
            gw = c.kubectl_json("get", "gateway", "waypoint", "-n", demo, "--show-managed-fields")
            programmed = {x["type"]: x["status"] for x in gw["status"]["conditions"]}
            assert programmed["Programmed"] == "True"
            assert {m["manager"] for m in gw["metadata"]["managedFields"] if m["operation"] == "Apply"} == {
                "istioctl"
            }
            labels = c.kubectl_json("get", "namespace", demo)["metadata"]["labels"]
            assert labels["istio.io/use-waypoint"] == "waypoint"
            wp = c.kubectl_json("get", "deployment", "waypoint", "-n", demo)
            wp_container = wp["spec"]["template"]["spec"]["containers"][0]
            assert wp_container["image"] == config.waypoint.image_ref
            assert (
                wp_container.get("args", []) == list(config.waypoint.args) == []
            )  # the chart's waypoint.args

            # Re-applying is a no-op, not a conflict (server-side apply, same manager).
            again = await istioctl(c, "waypoint", "apply", "-n", demo, "--enroll-namespace")
            assert again.returncode == 0, again.stderr

            # 4. An L7 AuthorizationPolicy bound to the waypoint; an invalid one is refused by the webhook
            # that the base chart registered and istiod-py (here: the operator) serves.
            applied = await kubectl(c, "apply", "-f", "-", input=POLICY.format(ns=demo))
            assert "created" in applied.stdout
            refused = await kubectl(c, "apply", "-f", "-", input=INVALID_POLICY.format(ns=demo), check=False)
            assert refused.returncode != 0
            assert "admission webhook" in refused.stderr
            assert "not-a-port" in refused.stderr or "ports" in refused.stderr

            def policy_in_model() -> bool:
                return op.store.get("AuthorizationPolicy", demo, "allow-reads") is not None

            await eventually(policy_in_model, what="the policy in istiod's model")

            # 5. list and status.
            listed = await istioctl(c, "waypoint", "list", "-n", demo)
            assert listed.returncode == 0, listed.stderr
            row = [ln.split() for ln in listed.stdout.splitlines() if ln.split()[:1] == ["waypoint"]]
            assert row == [["waypoint", "default", "True"]], listed.stdout
            everywhere = await istioctl(c, "waypoint", "list", "-A")
            assert any(ln.split()[:2] == [demo, "waypoint"] for ln in everywhere.stdout.splitlines())
            status = await istioctl(c, "waypoint", "status", "-n", demo)
            assert status.returncode == 0, status.stderr
            assert any(
                ln.split()[:4] == [demo, "waypoint", "True", "Programmed"]
                for ln in status.stdout.splitlines()
            ), status.stdout
            precheck = await istioctl(c, "x", "precheck", "-v")
            assert "istiopy is already installed" in precheck.stdout, precheck.stdout
            assert precheck.returncode == 0

            # 6. delete removes the Gateway, unenrolls the namespace; the garbage collector takes the rest.
            deleted = await istioctl(c, "waypoint", "delete", "-n", demo)
            assert deleted.returncode == 0, deleted.stderr
            assert f"✅ waypoint {demo}/waypoint deleted" in deleted.stdout
            assert (await kubectl(c, "get", "gateway", "waypoint", "-n", demo, check=False)).returncode != 0
            assert (
                "istio.io/use-waypoint" not in c.kubectl_json("get", "namespace", demo)["metadata"]["labels"]
            )

            async def deployment_gone() -> bool:
                cp = await kubectl(c, "get", "deployment", "waypoint", "-n", demo, check=False)
                return cp.returncode != 0

            # The real garbage collector: seconds when idle, longer on a loaded 2-core machine.
            await eventually(
                deployment_gone, within=120, what="the waypoint Deployment to be garbage-collected"
            )
            empty = await istioctl(c, "waypoint", "list", "-n", demo)
            assert "No waypoints found" in empty.stdout

            # 7. helm uninstall istiod (its pod would stop: so does the stand-in operator).
            await helm(c, "uninstall", "istiod", "-n", ISTIO_NS, "--wait")
        await helm(c, "uninstall", "istio-base", "-n", ISTIO_NS, "--wait")
        assert (
            await kubectl(c, "get", "validatingwebhookconfiguration", "istiod-default-validator", check=False)
        ).returncode != 0
        assert (await kubectl(c, "get", "crd", "authorizationpolicies.security.istio.io")).returncode == 0
        assert (await kubectl(c, "get", "authorizationpolicy", "allow-reads", "-n", demo)).returncode == 0
        gone = await istioctl(c, "version")
        assert "control plane version: none" in gone.stdout
    finally:
        for release in ("istiod", "istio-base"):
            await helm(c, "uninstall", release, "-n", ISTIO_NS, check=False)
        await kubectl(c, "delete", "namespace", demo, "--wait=false", "--ignore-not-found", check=False)
