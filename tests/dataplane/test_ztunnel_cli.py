"""``ztunnel-py`` flags and ``istioctl-py ztunnel-config`` against a live admin API and saved dumps."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

import istiopy
from istiopy.api.identity import SpiffeId
from istiopy.api.tls import CertBundle
from istiopy.ca.authority import generate_root
from istiopy.ca.service import CaConfig, CertificateAuthority
from istiopy.dataplane.admin import AdminServer, AdminSources, LocalWorkloadInfo
from istiopy.dataplane.identity import SecretManager
from istiopy.dataplane.metrics import ConnectionTracker, Metrics, connection_labels
from istiopy.dataplane.proxy import ProxyConfig
from istiopy.dataplane.state import ProxyState
from istiopy.testing import ztunnel as b

BIN = Path(sys.executable).parent


def _run(*argv: str, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


# ---- ztunnel-py ---------------------------------------------------------------------------------------


def test_ztunnel_help_and_version() -> None:
    r = _run(str(BIN / "ztunnel-py"), "--help")
    assert r.returncode == 0
    flags = ["--xds-address", "--ca-address", "--root-cert", "--token-file", "--node-name", "--zds-socket"]
    for flag in [*flags, "--admin-port", "--metrics-port", "--readiness-port"]:
        assert flag in r.stdout
    r = _run(str(BIN / "ztunnel-py"), "--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"ztunnel-py {istiopy.__version__}"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--admin-port", "70000"], "port out of range"),
        (["--metrics-port", "x"], "not a port number"),
        (["--xds-address", "nohost"], "expected host:port"),
        (["--pod", "a,b"], "expected uid,name,namespace"),
    ],
)
def test_ztunnel_bad_flags_exit_2_with_one_line(argv: list[str], needle: str) -> None:
    r = _run(str(BIN / "ztunnel-py"), *argv)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert needle in r.stderr
    assert r.stderr.startswith("ztunnel-py: error:")


def test_ztunnel_missing_root_cert_is_one_clear_line(tmp_path: Path) -> None:
    r = _run(str(BIN / "ztunnel-py"), "--root-cert", str(tmp_path / "nope.pem"))
    assert r.returncode == 1
    assert (
        r.stderr.strip()
        == f"ztunnel-py: cannot read root certificate {tmp_path / 'nope.pem'}: No such file or directory"
    )


def test_node_id_and_metadata_as_upstream() -> None:
    cfg = ProxyConfig(
        node_name="node-7", pod_name="ztunnel-abc", pod_namespace="istio-system", instance_ip="10.0.0.9"
    )
    assert cfg.node_id == "ztunnel~10.0.0.9~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
    md = cfg.node_metadata()
    assert md["NAME"] == "ztunnel-abc"
    assert md["NAMESPACE"] == "istio-system"
    assert md["INSTANCE_IPS"] == "10.0.0.9"
    assert md["NODE_NAME"] == "node-7"


# ---- istioctl-py ztunnel-config -------------------------------------------------------------------------


@pytest.fixture
async def admin_port() -> AsyncIterator[int]:
    st = ProxyState()
    svc = b.service_key("echo", "srv")
    adds = [
        b.service("echo", "srv", "10.96.0.10", {80: 8080}),
        b.service("waypoint", "srv", "10.96.0.99", {15008: 15008}),
        b.workload("echo-1", "srv", "10.1.0.1", services={svc: {80: 8080}}, node="node-b"),
        b.workload("echo-2", "srv", "10.1.0.2", services={svc: {80: 8080}}, healthy=False, node="node-b"),
        b.workload(
            "sleep", "cli", "10.1.1.1", service_account="sleep", waypoint=b.gateway(address="10.96.0.99")
        ),
    ]
    st.apply_addresses({b.resource_name(a): a for a in adds})
    st.apply_authorizations(
        {"srv/deny": b.policy("deny", "srv", [[[b.match(destination_ports=[9])]]], action="DENY")}
    )
    authority = CertificateAuthority(CaConfig(), generate_root("cluster.local"))

    async def fetch(ident: SpiffeId) -> CertBundle:
        return authority.issue_workload(ident)

    secrets = SecretManager(fetch)
    sleep_id = SpiffeId("cluster.local", "cli", "sleep")
    await secrets.fetch(sleep_id)
    metrics = Metrics()
    tracker = ConnectionTracker(metrics)
    sleep_wl = st.workload_by_ip("10.1.1.1")
    tracker.open(
        direction="outbound",
        workload_uid=b.pod_uid("cli", "sleep"),
        src="10.1.1.1:40000",
        original_dst="10.96.0.10:80",
        actual_dst="10.1.0.1:15008",
        protocol="HBONE",
        labels=connection_labels(
            reporter="source",
            src=sleep_wl,
            src_identity=sleep_id,
            dst=None,
            dst_identity=None,
            service=None,
            mtls=True,
        ),
    )
    server = AdminServer(
        AdminSources(
            state=st,
            metrics=metrics,
            tracker=tracker,
            certificates=secrets.dump,
            local_workloads=lambda: [LocalWorkloadInfo(b.pod_uid("cli", "sleep"), "sleep", "cli", "sleep")],
        ),
        admin_addr=("127.0.0.1", 0),
        metrics_addr=None,
        readiness_addr=None,
    )
    await server.start()
    try:
        yield server.ports["admin"]
    finally:
        await server.stop()
        await secrets.close()


async def _istioctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(_run, str(BIN / "istioctl-py"), *argv)


async def test_workloads_services_policies_tables(admin_port: int) -> None:
    port = str(admin_port)
    # Independent read-only queries, run side by side (each is mostly interpreter start-up).
    r, w, svc, pol = await asyncio.gather(
        _istioctl("ztunnel-config", "workloads", "--proxy-admin-port", port),
        _istioctl(
            "zc", "w", "--workload-namespace", "srv", "--workload-node", "node-b", "--proxy-admin-port", port
        ),
        _istioctl("zc", "svc", "--proxy-admin-port", port),
        _istioctl("zc", "policies", "--proxy-admin-port", port),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "POD", "NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]
    assert lines[1].split() == ["cli", "sleep", "10.1.1.1", "node-a", "waypoint", "HBONE"]
    assert lines[2].split() == ["srv", "echo-1", "10.1.0.1", "node-b", "None", "HBONE"]
    assert [ln.split()[1] for ln in w.stdout.splitlines()[1:]] == ["echo-1", "echo-2"]
    assert svc.stdout.splitlines()[1].split() == ["srv", "echo", "10.96.0.10", "None", "1/2"]
    assert pol.stdout.splitlines() == [
        "NAMESPACE POLICY NAME ACTION SCOPE",
        "srv       deny        Deny   Namespace",
    ]


async def test_certificates_and_connections(admin_port: int) -> None:
    port = str(admin_port)
    certs, cons, inbound = await asyncio.gather(  # independent read-only queries, side by side
        _istioctl("zc", "certificates", "--proxy-admin-port", port),
        _istioctl("zc", "connections", "--proxy-admin-port", port),
        _istioctl("zc", "cons", "--raw", "--direction", "inbound", "--proxy-admin-port", port),
    )
    rows = [ln.split() for ln in certs.stdout.splitlines()[1:]]
    assert rows[0][:4] == ["spiffe://cluster.local/ns/cli/sa/sleep", "Leaf", "Available", "True"]
    assert rows[-1][1] == "Root"
    row = cons.stdout.splitlines()[1].split()
    assert row[:4] == ["sleep.cli", "Outbound", "sleep.cli:40000", "echo-1.srv:15008"]
    assert row[4:] == ["echo.srv.svc.cluster.local:80", "HBONE"]
    assert inbound.stdout.splitlines()[1:] == []


async def test_json_yaml_all_and_file(admin_port: int, tmp_path: Path) -> None:
    port = str(admin_port)
    r = await _istioctl("zc", "workloads", "-o", "json", "--address", "10.1.0.1", "--proxy-admin-port", port)
    data = json.loads(r.stdout)
    assert [w["name"] for w in data] == ["echo-1"]
    r = await _istioctl("zc", "policies", "-o", "yaml", "--proxy-admin-port", port)
    assert yaml.safe_load(r.stdout)[0]["rules"] == [[[{"destinationPorts": [9]}]]]
    r = await _istioctl("zc", "all", "-o", "json", "--proxy-admin-port", port)
    dump = json.loads(r.stdout)
    assert set(dump) >= {"workloads", "services", "policies", "certificates", "workloadState"}
    saved = tmp_path / "dump.json"
    saved.write_text(json.dumps(dump))
    r = await _istioctl("zc", "all", "-f", str(saved))
    assert r.returncode == 0
    for header in ("POD NAME", "SERVICE NAME", "POLICY NAME", "CERTIFICATE NAME", "REMOTE TARGET"):
        assert header in r.stdout
    r = await _istioctl("zc", "services", "-f", str(tmp_path / "missing.json"))
    assert r.returncode == 1
    assert "cannot read" in r.stderr


def test_ztunnel_process_serves_admin_and_quits_on_quitquitquit(tmp_path: Path) -> None:
    """A real ztunnel-py process without a control plane: admin answers, not ready, /quitquitquit ends it."""
    root = tmp_path / "root.pem"
    root.write_text(CertificateAuthority(CaConfig(), generate_root("cluster.local")).roots_pem)
    ports = [b.free_port() for _ in range(3)]
    argv = [str(BIN / "ztunnel-py"), "--root-cert", str(root), "--xds-address", f"127.0.0.1:{b.free_port()}",
            "--admin-port", str(ports[0]), "--metrics-address", "127.0.0.1", "--metrics-port", str(ports[1]),
            "--readiness-port", str(ports[2]), "--no-zds", "--node-name", "node-q"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import time
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/config_dump", timeout=2) as r:
                    dump = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert (
            dump["config"]["xdsNodeId"]
            == "ztunnel~127.0.0.1~ztunnel.istio-system~istio-system.svc.cluster.local"
        )
        assert dump["workloads"] == []
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{ports[2]}/healthz/ready", timeout=2)
        assert e.value.code == 503  # no control plane yet: not ready
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/metrics", timeout=2) as r:
            assert r.status == 200
        req = urllib.request.Request(f"http://127.0.0.1:{ports[0]}/quitquitquit", method="POST")
        with urllib.request.urlopen(req, timeout=2) as r:
            assert r.status == 200
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_log_levels_through_istioctl(admin_port: int) -> None:
    port = str(admin_port)
    old = logging.getLogger("istiopy").level
    try:
        r = await _istioctl("zc", "log", "--level", "rbac=debug", "--proxy-admin-port", port)
        assert r.returncode == 0, r.stderr
        assert "istiopy.rbac=debug" in r.stdout
        r = await _istioctl("zc", "log", "--proxy-admin-port", port)
        assert "istiopy.rbac=debug" in r.stdout
        r = await _istioctl("zc", "log", "-r", "--proxy-admin-port", port)
        assert "istiopy=info" in r.stdout
        assert "rbac" not in r.stdout
        r = await _istioctl("zc", "log", "--level", "chatty", "--proxy-admin-port", port)
        assert r.returncode == 1
        assert "unknown log level" in r.stderr
    finally:
        logging.getLogger("istiopy").setLevel(old)
