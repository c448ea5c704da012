"""The real ztunnel-py process (C byte path) runs without grpcio, cryptography, prometheus_client or a
second OpenSSL.

Issue 8's RSS target (<= 40 MB holding 1000 workloads) has no room for them: grpcio and cryptography cost
~9 MB each just by being imported, prometheus_client ~2 MB, Python's ssl with the system OpenSSL ~4.4 MB
(its xDS and CA connections use the extension's OpenSSL instead). This starts the proxy as deployed
(real xDS and CA from the test control plane, one pod of its own so the certificate path runs: key, CSR,
signed chain) and then looks from outside: ``/proc/PID/maps`` for the shared objects (grpcio's
``cygrpc``, cryptography's ``_rust``, the system's libssl), the admin ``/debug/modules`` for the imported
top-level packages.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from istiopy.testing import ztunnel as b
from istiopy.testing.netns import Topology
from istiopy.testing.ztunnel import TestControlPlane, ZtunnelProcess

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _mapped(pid: int) -> set[str]:
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and ".so" in fields[5]:
            out.add(os.path.basename(fields[5]))
    return out


async def test_node_proxy_loads_no_grpcio_cryptography_prometheus_client_or_system_openssl(
    topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = topology.add_node("lean-0")
    pod = topology.add_pod("app", "lean", node=node, service_account="app")
    pod.uid = b.pod_uid(pod.namespace, pod.name)
    docs = [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "lean", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "app", "namespace": "lean", "uid": pod.uid, "labels": {"app": "app"}},
         "spec": {"nodeName": node.name, "serviceAccountName": "app", "containers": [{"name": "app"}]},
         "status": {"phase": "Running", "podIP": pod.ip, "podIPs": [{"ip": pod.ip}]}},
        # The CA signs for pods on the node only when a ztunnel pod runs there (node impersonation check).
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": f"ztunnel-{node.name}", "namespace": "istio-system",
                      "labels": {"app": "ztunnel"}},
         "spec": {"nodeName": node.name, "serviceAccountName": "ztunnel",
                  "containers": [{"name": "istio-proxy"}]},
         "status": {"phase": "Running", "podIP": node.ip, "podIPs": [{"ip": node.ip}]}},
    ]  # fmt: skip
    monkeypatch.setenv("ISTIOPY_BYTE_PATH", "c")
    workdir = tempfile.mkdtemp(prefix="zt-lean-")
    plane = TestControlPlane(yaml.safe_dump_all(docs))
    zt: ZtunnelProcess | None = None
    try:
        await plane.start()
        zt = ZtunnelProcess(
            plane, node.name, node.ip, [(pod.uid, pod.name, pod.namespace, "app", pod.netns_path)], workdir
        )
        await asyncio.to_thread(zt.wait_ready)

        def certified() -> bool:
            assert zt is not None
            dump = zt.config_dump()
            names = {w["name"] for w in dump["workloads"]}
            leaf = [c for c in dump["certificates"] if c["identity"].endswith("/ns/lean/sa/app")]
            return "app" in names and bool(leaf) and leaf[0]["state"] == "Available"

        async with asyncio.timeout(30):
            while not await asyncio.to_thread(certified):  # noqa: ASYNC110 - another process's state
                await asyncio.sleep(0.1)

        objects = _mapped(zt.popen.pid)
        assert any(o.startswith("_fastpath") for o in objects), objects  # the C byte path is running
        assert not [o for o in objects if "cygrpc" in o], objects  # grpcio
        assert not [o for o in objects if o.startswith("_rust")], objects  # cryptography
        # xDS and the CA ran over TLS (the certificate is there), on the extension's OpenSSL: the system's
        # libssl/libcrypto and Python's _ssl are not even mapped.
        assert not [o for o in objects if o.startswith(("libssl", "libcrypto", "_ssl"))], objects
        status, body = zt.get(zt.admin_port, "/debug/modules")
        assert status == 200
        modules = set(body.split())
        assert {"asyncio", "h2", "istiopy"} <= modules  # the list is real
        assert not modules & {"grpc", "cryptography", "prometheus_client", "ssl"}, sorted(modules)
    finally:
        if zt is not None:
            zt.stop()
        await plane.close()
        shutil.rmtree(workdir, ignore_errors=True)
