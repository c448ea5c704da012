"""``python -m istiopy.dataplane.waypoint``: the launcher as a process against the real control plane kit
(delta ADS over TLS, the CA with a bootstrap client certificate), stopped cleanly by SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request

import pytest
import yaml

from istiopy.testing.ztunnel import TestControlPlane

pytestmark = [pytest.mark.envoy]

DOCS = [
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}},
    {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop"},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    },
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "cart", "namespace": "shop", "labels": {"istio.io/use-waypoint": "waypoint"}},
        "spec": {
            "clusterIP": "10.96.7.7",
            "selector": {"app": "cart"},
            "ports": [{"name": "http", "port": 80}],
        },
    },
]


async def test_cli_runs_a_waypoint_until_sigterm() -> None:
    plane = TestControlPlane(yaml.safe_dump_all(DOCS), waypoints=True)
    await plane.start()
    workdir = tempfile.mkdtemp(prefix="wp-cli-")
    root, chain, key = plane.bootstrap_files("node-0", workdir, namespace="shop", service_account="waypoint")
    argv = [
        sys.executable, "-m", "istiopy.dataplane.waypoint",
        "--pod-ip", "127.0.0.1",
        "--xds", f"127.0.0.1:{plane.xds_port}", "--ca", f"127.0.0.1:{plane.ca_port}",
        "--root", root, "--cert", chain, "--key", key,
        "--listen", "127.0.0.1", "--metrics", "127.0.0.1:0", "--status", "127.0.0.1:0", "--admin-port", "0",
        "--concurrency", "1", "--workdir", os.path.join(workdir, "wp"),
    ]  # fmt: skip
    # not from the repository root: its ``xds/`` folder would shadow the xds-protos package
    proc = subprocess.Popen(  # noqa: ASYNC220 - a long-lived child, awaited through threads below
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=workdir,
        env={**os.environ, "ISTIO_META_WAYPOINT": "shop/waypoint"},  # as the waypoint Deployment sets it
    )
    try:
        import asyncio

        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
        assert line.startswith("ready"), (line, proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        admin = fields["admin"]

        def ready() -> tuple[int, bytes]:
            with urllib.request.urlopen(f"http://127.0.0.1:{fields['status']}/healthz/ready", timeout=5) as r:
                return r.status, r.read()

        assert await asyncio.to_thread(ready) == (200, b"ok")

        def dump() -> dict[str, object]:
            with urllib.request.urlopen(
                f"http://{admin}/config_dump?resource=dynamic_active_clusters", timeout=5
            ) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]

        names = {c["cluster"]["name"] for c in dump()["configs"]}  # type: ignore[index,union-attr]
        assert "inbound-vip|80|http|cart.shop.svc.cluster.local" in names
        os.killpg(proc.pid, signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        await plane.close()
        shutil.rmtree(workdir, ignore_errors=True)
