"""ztunnel-py's own Prometheus exposition, read back by Prometheus' reference parser over real HTTP.

The proxy writes the text format itself (no prometheus_client at run time); the parser here is the test's
independent judge that the names, types, label escaping and values are what a scraper understands.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from istiopy.dataplane.admin import AdminServer, AdminSources
from istiopy.dataplane.metrics import LABELS, ConnectionTracker, Metrics, connection_labels
from istiopy.dataplane.state import ADDRESS_TYPE, ProxyState
from istiopy.testing import ztunnel as b

SVC = b.service_key("echo", "ns1")


async def _scrape(port: int, path: str = "/stats/prometheus") -> tuple[str, str]:
    """(Content-Type, body) of one GET over a plain socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines[0]
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert int(headers["Content-Length"]) == len(body)
    return headers["Content-Type"], body.decode()


@pytest.fixture
async def served() -> AsyncIterator[tuple[AdminServer, AdminSources]]:
    st = ProxyState()
    adds = [
        b.service("echo", "ns1", "10.96.0.10", {80: 8080}),
        b.workload("echo-1", "ns1", "10.1.0.1", services={SVC: {80: 8080}}, service_account="echo"),
        # A canonical name with every character the format must escape: backslash, quote, newline.
        b.workload("client-1", "ns1", "10.1.0.2", canonical_name='we\\ird"app\nname'),
    ]
    st.apply_addresses({b.resource_name(a): a for a in adds})
    metrics = Metrics()
    src = AdminSources(state=st, metrics=metrics, tracker=ConnectionTracker(metrics))
    server = AdminServer(src, admin_addr=None, metrics_addr=("127.0.0.1", 0), readiness_addr=None)
    await server.start()
    try:
        yield server, src
    finally:
        await server.stop()


async def test_exposition_parses_with_names_labels_and_values(
    served: tuple[AdminServer, AdminSources],
) -> None:
    server, src = served
    st, tracker = src.state, src.tracker
    assert tracker is not None
    client, echo = st.workload_by_ip("10.1.0.2"), st.workload_by_ip("10.1.0.1")
    assert client is not None
    assert echo is not None
    labels = connection_labels(
        reporter="source",
        src=client,
        src_identity=client.identity,
        dst=echo,
        dst_identity=echo.identity,
        service=st.service_by_key(SVC),
        mtls=True,
    )
    for _ in range(2):
        conn = tracker.open(
            direction="outbound",
            workload_uid=client.uid,
            src="10.1.0.2:40000",
            original_dst="10.96.0.10:80",
            actual_dst="10.1.0.1:15008",
            protocol="HBONE",
            labels=labels,
        )
        tracker.add_bytes(conn, sent=12_345_678, received=7)
        tracker.close(conn)
    plain = connection_labels(
        reporter="destination",
        src=None,
        src_identity=None,
        dst=echo,
        dst_identity=None,
        service=None,
        mtls=False,
    )
    tracker.failed(plain)
    src.metrics.xds_messages.labels(ADDRESS_TYPE).inc()

    ctype, text = await _scrape(server.ports["metrics"])
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    assert '\\\\ird\\"app\\nname' in text  # escaped on the wire, one sample per line
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_sent_bytes",
        "istio_tcp_received_bytes",
        "istio_tcp_connections_failed",
        "istio_xds_message",
    }
    assert set(families) == expected
    assert all(f.type == "counter" for f in families.values())
    assert families["istio_tcp_sent_bytes"].documentation == "Total bytes sent over TCP"

    def only(name: str) -> tuple[dict[str, str], float]:
        samples = families[name].samples
        assert len(samples) == 1, samples
        assert samples[0].name == name + "_total"
        return samples[0].labels, samples[0].value

    got, value = only("istio_tcp_connections_opened")
    assert got == labels  # every label round-trips, the escaped canonical name included
    assert got["source_canonical_service"] == 'we\\ird"app\nname'
    assert set(got) == set(LABELS)
    assert value == 2
    assert only("istio_tcp_connections_closed")[1] == 2
    assert only("istio_tcp_sent_bytes")[1] == 24_691_356  # written 2.4691356e+07
    assert only("istio_tcp_received_bytes")[1] == 14
    failed, n = only("istio_tcp_connections_failed")
    assert (failed["reporter"], failed["connection_security_policy"], n) == ("destination", "unknown", 1)
    assert only("istio_xds_message") == ({"url": ADDRESS_TYPE}, 1)

    _, again = await _scrape(server.ports["metrics"], "/metrics")
    assert again == text  # both paths serve the same exposition; scraping changes nothing


def test_counters_refuse_wrong_labels_and_decrements() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="istio_xds_message"):
        m.xds_messages.labels(nope="x")
    with pytest.raises(ValueError, match="label values"):
        m.opened.labels("only-one")
    with pytest.raises(ValueError, match="cannot decrease"):
        m.xds_messages.labels("u").inc(-1)
    text = m.render().decode()
    # Nothing counted yet: every family is still declared (scrapers see the metric exists) with no samples.
    assert [f.samples for f in text_string_to_metric_families(text)] == [[]] * 6
