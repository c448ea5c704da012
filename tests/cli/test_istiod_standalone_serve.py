"""``istiod-py serve`` as a user runs it (real console script, real ports): xDS and the CA share one TLS port
with a serving certificate from our CA; real clients get WDS over delta ADS, a workload certificate by node
impersonation, and istiod's metrics; the root persists in the state directory across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from istiopy.api.ca_client import CaClient, CaClientError
from istiopy.api.identity import SpiffeId
from istiopy.api.xds_client import DeltaXdsClient
from istiopy.testing.envoy import wait_until
from istiopy.testing.tools import built_tool

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent / "istiod-py"
ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
ZTUNNEL_POD = """
apiVersion: v1
kind: Pod
metadata: {name: ztunnel-n1, namespace: istio-system, labels: {app: ztunnel}}
spec: {nodeName: node-1, serviceAccountName: ztunnel, containers: [{name: istio-proxy}]}
status: {phase: Running, podIP: 10.10.0.1, podIPs: [{ip: 10.10.0.1}]}
"""


class Istiod:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.extra = tmp / "extra"
        self.extra.mkdir(exist_ok=True)
        (self.extra / "ztunnel.yaml").write_text(ZTUNNEL_POD)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.state_flag = ["--state-dir", str(self.state)]
        self.extra_flags: list[str] = []

    def start(self) -> Istiod:
        with contextlib.suppress(FileNotFoundError):
            (self.state / "ports").unlink()
        self.log = open(self.tmp / "istiod.log", "ab")  # noqa: SIM115 - closed in stop
        argv = [
            str(BIN),
            "serve",
            "--config-dir",
            str(ROOT / "examples"),
            "--extra-config-dir",
            str(self.extra),
        ]
        argv += [
            "--state-dir",
            str(self.state),
            "--xds-port",
            "0",
            "--monitoring-port",
            "0",
            *self.extra_flags,
        ]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.tmp)
        deadline = time.monotonic() + 30
        while not (self.state / "ports").exists():
            assert self.proc.poll() is None, (self.tmp / "istiod.log").read_text()
            assert time.monotonic() < deadline, "istiod-py did not start"
            time.sleep(0.05)
        self.ports = {
            k: int(v) for k, v in (ln.split("=") for ln in (self.state / "ports").read_text().split())
        }
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def bootstrap(self, node: str, identity: str = "istio-system/ztunnel") -> tuple[str, str, str]:
        out = self.tmp / f"boot-{node}-{identity.replace('/', '-')}"
        subprocess.run(
            [str(BIN), "bootstrap-node", node, "--out", str(out), "--identity", identity, *self.state_flag],
            check=True,
            capture_output=True,
        )
        return tuple((out / n).read_text() for n in ("root-cert.pem", "cert-chain.pem", "key.pem"))  # type: ignore[return-value]

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.ports['monitoring']}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()  # type: ignore[no-any-return]


@pytest.fixture
def istiod(tmp_path: Path) -> Iterator[Istiod]:
    d = Istiod(tmp_path)
    try:
        yield d.start()
    finally:
        d.stop()


def _node(node_id: str) -> object:
    from envoy.config.core.v3 import base_pb2

    return base_pb2.Node(id=node_id)


async def test_serve_wds_over_tls_ca_and_metrics(istiod: Istiod) -> None:
    roots, chain, key = istiod.bootstrap("node-1")
    assert roots == (istiod.state / "root-cert.pem").read_text()  # the trust bundle written for proxies
    port = istiod.ports["tls"]
    client = DeltaXdsClient.connect(
        f"127.0.0.1:{port}",
        _node("ztunnel~10.10.0.1~ztunnel-n1.istio-system~istio-system.svc.cluster.local"),
        roots,
        server_name="istiod.istio-system.svc",
        client_cert=(chain, key),
        backoff_initial=0.05,
    )
    client.subscribe(ADDRESS_TYPE)
    async with client:
        async with asyncio.timeout(20):
            await client.wait_for(
                lambda c: "backend/backend.backend.svc.cluster.local" in c.resources(ADDRESS_TYPE)
            )
        names = set(client.resources(ADDRESS_TYPE))
    assert "Kubernetes//Pod/frontend/frontend-7d9f8b6c5-abcde" in names

    # The CA on the same port: ztunnel on node-1 gets the frontend's certificate (a pod on its node) ...
    ca = CaClient.connect(f"127.0.0.1:{port}", roots, client_cert=(chain, key))
    try:
        bundle = await ca.fetch(SpiffeId("cluster.local", "frontend", "frontend"), impersonate=True)
        assert bundle.identity == SpiffeId("cluster.local", "frontend", "frontend")
        # ... but not backend-v2's (that pod runs on node-2).
        with pytest.raises(CaClientError, match="UNAUTHENTICATED"):
            await ca.fetch(SpiffeId("cluster.local", "admin-api", "admin-api"), impersonate=True)
    finally:
        await ca.close()

    metrics = istiod.metrics()
    assert "pilot_xds_pushes" in metrics
    assert "citadel_server_csr_count" in metrics
    issued = [
        ln for ln in metrics.splitlines() if ln.startswith("citadel_server_success_cert_issuance_count")
    ]
    assert issued
    assert float(issued[0].split()[-1]) >= 1


async def test_serve_refuses_streams_without_a_client_certificate(istiod: Istiod) -> None:
    roots = (istiod.state / "root-cert.pem").read_text()
    client = DeltaXdsClient.connect(
        f"127.0.0.1:{istiod.ports['tls']}",
        _node("ztunnel~10.10.0.1~x.istio-system~istio-system.svc.cluster.local"),
        roots,
        server_name="istiod.istio-system.svc",
        backoff_initial=0.05,
    )
    client.subscribe(ADDRESS_TYPE)
    async with client:
        await asyncio.sleep(1.0)
        assert not client.resources(ADDRESS_TYPE)


@pytest.mark.slow  # two more istiod-py starts on top of the fixture's: 5-10 s on 2 cores
def test_root_persists_across_restarts_and_port_in_use_is_one_line(istiod: Istiod, tmp_path: Path) -> None:
    first = (istiod.state / "root-cert.pem").read_text()
    istiod.stop()
    again = Istiod(tmp_path).start()
    try:
        assert (istiod.state / "root-cert.pem").read_text() == first
        busy = subprocess.run(
            [
                str(BIN),
                "serve",
                "--config-dir",
                str(ROOT / "examples"),
                "--state-dir",
                str(tmp_path / "s2"),
                "--xds-port",
                str(again.ports["tls"]),
                "--monitoring-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=tmp_path,
        )
        assert busy.returncode != 0
        assert "Traceback" not in busy.stderr
        assert "error" in busy.stderr
    finally:
        again.stop()


def test_tokens_instead_of_client_certificates_and_explicit_plaintext(tmp_path: Path) -> None:
    d = Istiod(tmp_path)
    d.extra_flags = ["--allow-tokens", "--plaintext-port", "0"]
    d.start()
    try:
        token = subprocess.run(
            [
                sys.executable,
                "-P",
                "-m",
                "istiopy.ca",
                "token",
                "--tokens-file",
                str(d.state / "tokens.yaml"),
                "--identity",
                "istio-system/ztunnel",
                "--node",
                "node-1",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        roots = (d.state / "root-cert.pem").read_text()

        async def fetch() -> None:
            ca = CaClient.connect(f"127.0.0.1:{d.ports['tls']}", roots, token_source=lambda: token)
            try:
                bundle = await ca.fetch(SpiffeId("cluster.local", "frontend", "frontend"), impersonate=True)
                assert bundle.identity == SpiffeId("cluster.local", "frontend", "frontend")
            finally:
                await ca.close()
            plain = DeltaXdsClient(
                f"127.0.0.1:{d.ports['plaintext']}",
                _node("ztunnel~10.10.0.1~z.istio-system~istio-system.svc.cluster.local"),
                backoff_initial=0.05,
            )
            plain.subscribe(ADDRESS_TYPE)
            async with plain, asyncio.timeout(20):
                await plain.wait_for(lambda c: bool(c.resources(ADDRESS_TYPE)))

        asyncio.run(fetch())
    finally:
        d.stop()


def _istioctl(istiod: Istiod, cert_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Upstream istioctl (``tools/istioctl/build.sh``) against this istiod's xDS port, with a client
    certificate from ``cert_dir``. The kubeconfig names no reachable cluster and ``--revision`` is given, so
    istioctl asks nothing of one (without it, it waits for a cluster to tell the default revision)."""
    env = os.environ.get("ISTIOPY_UPSTREAM_ISTIOCTL")
    istioctl = Path(env) if env else built_tool(ROOT / "tools" / "istioctl" / "build.sh")
    kubeconfig = istiod.tmp / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: none\n"
        "clusters: [{name: none, cluster: {server: 'https://127.0.0.1:1'}}]\n"
        "contexts: [{name: none, context: {cluster: none, user: none}}]\nusers: [{name: none, user: {}}]\n"
    )
    argv = [
        str(istioctl),
        *args,
        "--revision",
        "default",
        "--xds-address",
        f"127.0.0.1:{istiod.ports['tls']}",
    ]
    argv += ["--cert-dir", str(cert_dir), "--kubeconfig", str(kubeconfig)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.slow
async def test_upstream_istioctl_proxy_status_over_xds(istiod: Istiod) -> None:
    """``istioctl proxy-status`` asks istiod over ADS (type ``istio.io/debug/syncz``): upstream's binary lists
    the proxies connected to istiod-py with the state of each xDS type; only an identity in istio-system may
    ask (the answer lists the whole mesh)."""
    roots, chain, key = istiod.bootstrap("node-1")
    node_id = "ztunnel~10.10.0.1~ztunnel-n1.istio-system~istio-system.svc.cluster.local"
    client = DeltaXdsClient.connect(
        f"127.0.0.1:{istiod.ports['tls']}",
        _node(node_id),
        roots,
        server_name="istiod.istio-system.svc",
        client_cert=(chain, key),
        backoff_initial=0.05,
    )
    client.subscribe(ADDRESS_TYPE)
    istiod.bootstrap("admin", "istio-system/istioctl")
    admin = istiod.tmp / "boot-admin-istio-system-istioctl"
    istiod.bootstrap("admin", "frontend/frontend")
    stranger = istiod.tmp / "boot-admin-frontend-frontend"
    async with client:
        async with asyncio.timeout(20):
            await client.wait_for(lambda c: bool(c.resources(ADDRESS_TYPE)))
        # istiod has the client's ACK (its HTTP debug view says so), so the type reads SYNCED
        await wait_until(lambda: _acked(istiod, node_id), timeout=20, what="the client's ACK at istiod")
        table = await asyncio.to_thread(_istioctl, istiod, admin, "proxy-status")
        as_json = await asyncio.to_thread(_istioctl, istiod, admin, "proxy-status", "-o", "json")
        refused = await asyncio.to_thread(_istioctl, istiod, stranger, "proxy-status")
        ours = await asyncio.to_thread(_istioctl_py, istiod, admin, "proxy-status")
        ours_one = await asyncio.to_thread(_istioctl_py, istiod, admin, "ps", "ztunnel-n1.istio-system")
        ours_none = await asyncio.to_thread(_istioctl_py, istiod, admin, "ps", "no-such-pod.shop")
        ours_refused = await asyncio.to_thread(_istioctl_py, istiod, stranger, "ps")

    assert table.returncode == 0, table.stdout + table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "CLUSTER"]
    row = next(r for r in rows if r.startswith(node_id))
    assert "1 (WDS)" in row, table.stdout  # one subscribed type (istio.workload.Address), acknowledged

    assert as_json.returncode == 0, as_json.stderr
    doc = json.loads(as_json.stdout)
    assert doc["typeUrl"] == "istio.io/debug/syncz"
    assert json.loads(doc["controlPlane"]["identifier"])["Component"] == "istiod"
    configs = {r["node"]["id"]: r["genericXdsConfigs"] for r in doc["resources"]}
    assert list(configs) == [node_id]  # istioctl's own debug stream is no proxy
    assert [(c["typeUrl"], c["configStatus"]) for c in configs[node_id]] == [(ADDRESS_TYPE, "SYNCED")]

    # A workload's identity is refused (here already by the node check: istioctl claims istio-system).
    assert refused.returncode != 0
    assert "Unauthenticated" in refused.stderr, refused.stderr
    assert "ns/frontend/sa/frontend" in refused.stderr
    assert node_id not in refused.stdout

    # istioctl-py asks the same way and agrees.
    assert ours.returncode == 0, ours.stderr
    header, *rows = (ln.split() for ln in ours.stdout.splitlines())
    assert header == ["NAME", "CLUSTER", "ISTIOD", "WDS"]
    assert rows == [[node_id, json.loads(doc["controlPlane"]["identifier"])["ID"], "SYNCED"]]  # no cluster id
    assert node_id in ours_one.stdout
    assert node_id not in ours_none.stdout
    assert ours_refused.returncode == 1
    assert "ns/frontend/sa/frontend" in ours_refused.stderr


def _istioctl_py(istiod: Istiod, cert_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN.parent / "istioctl-py"), *args, "--xds-address", f"127.0.0.1:{istiod.ports['tls']}"]
    return subprocess.run(
        [*argv, "--cert-dir", str(cert_dir)], capture_output=True, text=True, timeout=60, check=False
    )


def _acked(istiod: Istiod, node_id: str) -> bool:
    url = f"http://127.0.0.1:{istiod.ports['monitoring']}/debug/syncz"
    with urllib.request.urlopen(url, timeout=5) as r:
        conns = json.loads(r.read())
    return any(
        c["proxy"] == node_id and c["types"] and all(t["acked_nonce"] == t["sent_nonce"] for t in c["types"])
        for c in conns
    )
