"""``/config_dump`` is streamed: over real HTTP it is exactly the JSON document, however large.

The server writes it entry by entry without a Content-Length (the connection close ends it), so a node
proxy holding a thousand workloads does not build the whole text at once; the text must still be the same
bytes ``json.dumps(config_dump(...), indent=2)`` gives, which ``istioctl ztunnel-config`` parses.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from istiopy.dataplane.admin import AdminServer, AdminSources, LocalWorkloadInfo, config_dump
from istiopy.dataplane.metrics import ConnectionTracker, Metrics, connection_labels
from istiopy.dataplane.state import ProxyState
from istiopy.testing import ztunnel as b


async def _get(port: int, path: str, method: str = "GET") -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await reader.read()  # until the server closes: that is what ends a streamed body
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.decode(), body


def _mesh(n: int) -> ProxyState:
    st = ProxyState()
    adds = []
    for s in range(n // 2):
        key = b.service_key(f"svc-{s}", "ns1")
        adds.append(b.service(f"svc-{s}", "ns1", f"10.96.{s // 250}.{s % 250 + 1}", {80: 8080}))
        for r in range(2):
            i = 2 * s + r
            ip = f"10.1.{i // 250}.{i % 250 + 1}"
            adds.append(b.workload(f"svc-{s}-{r}", "ns1", ip, services={key: {80: 8080}}))
    st.apply_addresses({b.resource_name(a): a for a in adds})
    st.apply_authorizations(
        {"ns1/deny": b.policy("deny", "ns1", [[[b.match(destination_ports=[9])]]], action="DENY")}
    )
    return st


async def test_streamed_dump_is_the_document() -> None:
    st = _mesh(600)  # ~1 MB of JSON: many 64 KiB batches
    metrics = Metrics()
    tracker = ConnectionTracker(metrics)
    uid = b.pod_uid("ns1", "svc-0-0")
    conn = tracker.open(
        direction="inbound",
        workload_uid=uid,
        src="10.1.0.2:1234",
        original_dst="10.1.0.1:8080",
        actual_dst="10.1.0.1:8080",
        protocol="HBONE",
        labels=connection_labels(
            reporter="destination",
            src=None,
            src_identity=None,
            dst=None,
            dst_identity=None,
            service=None,
            mtls=True,
        ),
    )
    src = AdminSources(
        state=st,
        metrics=metrics,
        tracker=tracker,
        local_workloads=lambda: [LocalWorkloadInfo(uid, "svc-0-0", "ns1", "default")],
        certificates=lambda: [{"identity": "spiffe://cluster.local/ns/ns1/sa/default", "state": "Available"}],
        config={"nodeName": "n1", "proxyMode": "Shared"},
    )
    server = AdminServer(src, admin_addr=("127.0.0.1", 0), metrics_addr=None, readiness_addr=None)
    await server.start()
    try:
        head, body = await _get(server.ports["admin"], "/config_dump")
        assert head.startswith("HTTP/1.1 200 OK")
        assert "Content-Type: application/json" in head
        assert "Content-Length" not in head  # streamed; the close delimits it
        assert len(body) > 512 * 1024
        assert body.decode() == json.dumps(config_dump(src), indent=2)
        doc = json.loads(body)
        assert len(doc["workloads"]) == 600
        assert len(doc["services"]) == 300
        assert [p["name"] for p in doc["policies"]] == ["deny"]
        assert doc["workloadState"][uid]["connections"]["inbound"][0]["actualDst"] == "10.1.0.1:8080"

        head, body = await _get(server.ports["admin"], "/config_dump", "HEAD")
        assert head.startswith("HTTP/1.1 200 OK")
        assert body == b""
    finally:
        tracker.close(conn)
        await server.stop()


async def test_empty_dump_is_the_document() -> None:
    src = AdminSources(state=ProxyState(), metrics=Metrics())
    server = AdminServer(src, admin_addr=("127.0.0.1", 0), metrics_addr=None, readiness_addr=None)
    await server.start()
    try:
        _, body = await _get(server.ports["admin"], "/config_dump")
        assert body.decode() == json.dumps(config_dump(src), indent=2)
        assert json.loads(body)["workloads"] == []
    finally:
        await server.stop()


async def test_failure_mid_stream_cuts_the_body_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> list[dict[str, object]]:
        raise RuntimeError("certificate store on fire")

    src = AdminSources(state=_mesh(10), metrics=Metrics(), certificates=broken)
    server = AdminServer(src, admin_addr=("127.0.0.1", 0), metrics_addr=None, readiness_addr=None)
    await server.start()
    try:
        head, body = await _get(server.ports["admin"], "/config_dump")
        assert head.startswith("HTTP/1.1 200 OK")  # already sent when the failure came
        assert body.startswith(b'{\n  "workloads": [')
        with pytest.raises(json.JSONDecodeError):
            json.loads(body)  # a reader can tell: the document is incomplete
        assert "failed while streaming" in caplog.text
        assert "certificate store on fire" in caplog.text
        head, _ = await _get(server.ports["admin"], "/debug/modules")
        assert head.startswith("HTTP/1.1 200 OK")  # the server keeps serving
    finally:
        await server.stop()
