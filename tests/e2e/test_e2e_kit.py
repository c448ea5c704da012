"""The embedded default as a user meets it: ``istiod-py demo`` (what ``make demo`` runs), ``istiod-py up``
with live edits, Ctrl-C, a crashed run's leftovers, a machine that cannot run a mesh; and the public kit's
promises (cleanup when the test body fails, the pytest fixtures).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from istiopy.testing.fixtures import mesh_factory  # noqa: F401 - the fixture under test
from istiopy.testing.mesh import Mesh, leftovers
from istiopy.testing.netns import list_netns
from istiopy.testing.up import CANARY_REQUESTS

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.envoy]


def _examples(tmp: Path) -> Path:
    dst = tmp / "examples"
    shutil.copytree(ROOT / "examples", dst)
    return dst


def _own_leftovers(pids: list[int]) -> list[str]:
    """Kit namespaces created by one of ``pids`` (other runs may be going on concurrently)."""
    return [n for n in leftovers() if int(n.split("-")[1]) in pids]


class Up:
    """``istiod-py up --hold`` as a child process whose output we read line by line."""

    def __init__(self, config: Path, state: Path) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "istiod-py"), "up", "--config-dir", str(config), "--state-dir", str(state)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=state.parent,
            start_new_session=True,
        )
        self.out = ""

    def wait_for(self, text: str, timeout: float = 120.0) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while text not in self.out:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} in:\n{self.out[-4000:]}"
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536).decode(errors="replace")
                assert chunk, f"exited ({self.proc.wait()}) before {text!r}:\n{self.out[-4000:]}"
                self.out += chunk

    def kill(self) -> None:
        if self.proc.poll() is None:
            with_group = os.getpgid(self.proc.pid)
            os.killpg(with_group, signal.SIGKILL)
            self.proc.wait()


def test_demo_runs_one_round_reports_and_tears_down(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            str(BIN / "istiod-py"),
            "demo",
            "--config-dir",
            str(ROOT / "examples"),
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    for expected in (
        "Resources loaded from",  # the config tables come first
        "The mesh",
        "ztunnel → waypoint → ztunnel",  # backend has a waypoint
        "ztunnel → ztunnel",  # frontend has none
        "backend/waypoint → ✓",  # identities ztunnel recorded, hop by hop
        "L7 deny at waypoint by",  # the admin API's policy (cells wrap: names are checked apart)
        "backend/admin-api-operators",
        "L4 deny at ztunnel under",  # a backend pod addressed directly
        "backend/backend-allow-frontend",
        "Canary split",
        "istio_requests_total",
        "istio_tcp_connections_opened_total",
        "citadel_server_success_cert_issuance_count",
        "mesh torn down",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text[-5000:]}"
    assert "Traceback" not in out.stderr
    # The canary's requests all crossed the backend waypoint: its HTTP metrics count every one of them
    # (and the round's), none lost to Envoy's late access-log flush.
    served = re.search(
        r"istio_requests_total backend\.backend\.svc\.cluster\.local code=200\s*│\s*(\d+)", text
    )
    assert served, text[-5000:]
    assert int(served.group(1)) >= CANARY_REQUESTS, served.group(0)


def test_up_applies_edits_live_ctrl_c_tears_down_and_a_crash_is_cleaned_next_time(tmp_path: Path) -> None:
    config = _examples(tmp_path)
    state = tmp_path / "state"
    up = Up(config, state)
    try:
        up.wait_for("Mesh running")
        assert "v1: " in up.out
        # Live edit: send every backend request to v2.
        traffic = config / "traffic.yaml"
        traffic.write_text(
            traffic.read_text().replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 100")
        )
        up.wait_for("config changed (traffic.yaml)")
        up.wait_for("v2: 50")
        # Crash: the runner dies without tearing down (its children and namespaces stay behind).
        pids = [int(p) for p in (state / "up" / "pids").read_text().split()]
        os.kill(up.proc.pid, signal.SIGKILL)
        up.proc.wait()
        assert _own_leftovers([up.proc.pid])
    finally:
        if up.proc.poll() is None:
            up.kill()
    # The next run in the same state directory cleans up first, then works; Ctrl-C tears it down.
    again = Up(config, state)
    try:
        again.wait_for("Mesh running")
        assert "leftover" in again.out
        assert not _own_leftovers([up.proc.pid])
        assert all(not Path(f"/proc/{p}").exists() or b"istiopy" not in _cmdline(p) for p in pids)
        again.proc.send_signal(signal.SIGINT)
        again.wait_for("mesh torn down", timeout=60)
        assert again.proc.wait(30) == 0
        assert not _own_leftovers([again.proc.pid])
    finally:
        again.kill()


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_not_root_is_one_clear_message(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop privileges")
    tmp_path.chmod(0o777)
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(BIN / "istiod-py"), "up"]
    argv += ["--config-dir", str(ROOT / "examples"), "--state-dir", str(tmp_path / "s")]
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "needs root" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


def test_kit_tears_everything_down_when_the_test_body_fails() -> None:
    docs = (
        (ROOT / "examples" / "namespaces.yaml").read_text()
        + "\n---\n"
        + (ROOT / "examples" / "workloads.yaml").read_text()
    )
    holder: dict[str, object] = {}

    def failing_test_body() -> None:
        with Mesh(documents=docs) as mesh:
            holder["names"] = mesh.netns_names()
            holder["procs"] = [zt.proc for zt in mesh.ztunnels.values()] + [mesh.istiod]
            assert mesh.pod("backend/backend-v2").http("frontend/frontend", 8080).status == 200  # pod IP
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_test_body()
    names = holder["names"]
    assert isinstance(names, list)
    assert names
    assert not set(names) & set(list_netns())
    procs = holder["procs"]
    assert isinstance(procs, list)
    assert all(p.poll() is not None for p in procs)


MANIFESTS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {serviceAccountName: client, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, labels: {app: cart}}
spec: {serviceAccountName: cart, containers: [{name: c, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec: {clusterIP: 10.96.7.7, selector: {app: cart}, ports: [{port: 80, targetPort: 8080}]}
"""


def test_mesh_factory_fixture_with_manifests_lacking_ips(mesh_factory: Callable[..., Mesh]) -> None:  # noqa: F811
    mesh = mesh_factory(documents=MANIFESTS)  # Pods as in a manifest: the kit places them and gives IPs
    client, cart = mesh.pod("shop/client"), mesh.pod("shop/cart")
    assert client.ip != cart.ip
    body = client.http("shop/cart", 80).json()
    assert body["pod"] == "cart"
    assert body["peer"].split(":")[0] == client.ip


def test_a_waypoint_gateway_alone_gets_its_pod_and_service(mesh_factory: Callable[..., Mesh]) -> None:  # noqa: F811
    docs = MANIFESTS.replace(
        "labels: {istio.io/dataplane-mode: ambient}}",
        "labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}",
        1,
    )
    docs += """
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""
    mesh = mesh_factory(documents=docs)  # as the waypoint controller would, the kit adds the Pod and Service
    r = mesh.pod("shop/client").http("shop/cart", 80, "/via")
    assert r.status == 200
    assert r.via_waypoint
    assert r.json()["pod"] == "cart"
    assert r.json()["peer"].split(":")[0] == mesh.waypoint("shop/waypoint").pod.ip
