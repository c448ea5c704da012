"""Istio's TCP metrics and the live connection table, as ztunnel reports them.

Why an own registry: several proxies (and the control plane) can live in one test process; a private
``CollectorRegistry`` keeps each ztunnel-py's numbers separate and keeps Python's process/GC collectors out of
the Istio metric namespace unless asked for.

Names and labels follow upstream (``istio_tcp_connections_opened_total`` etc., with the standard Istio
label set); ``reporter`` is ``destination`` for inbound and ``source`` for outbound, as ztunnel does.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from istiopy.dataplane.state import Identity, Service, Workload

CONTENT_TYPE = CONTENT_TYPE_LATEST

LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

UNKNOWN = "unknown"


def connection_labels(
    *,
    reporter: str,
    src: Workload | None,
    src_identity: Identity | None,
    dst: Workload | None,
    dst_identity: Identity | None,
    service: Service | None,
    mtls: bool,
) -> dict[str, str]:
    """The Istio label set for one connection; unknown parts read ``unknown`` like upstream."""

    def wl(w: Workload | None, attr: str) -> str:
        value = getattr(w, attr, "") if w is not None else ""
        return value or UNKNOWN

    return {
        "reporter": reporter,
        "source_workload": (src.workload_name or src.name) if src else UNKNOWN,
        "source_canonical_service": wl(src, "canonical_name"),
        "source_canonical_revision": wl(src, "canonical_revision"),
        "source_workload_namespace": wl(src, "namespace")
        if src
        else (src_identity.namespace if src_identity else UNKNOWN),
        "source_principal": str(src_identity) if src_identity else UNKNOWN,
        "source_app": wl(src, "canonical_name"),
        "source_version": wl(src, "canonical_revision"),
        "source_cluster": wl(src, "cluster_id"),
        "destination_service": service.hostname if service else UNKNOWN,
        "destination_service_namespace": service.namespace if service else UNKNOWN,
        "destination_service_name": service.name if service else UNKNOWN,
        "destination_workload": (dst.workload_name or dst.name) if dst else UNKNOWN,
        "destination_canonical_service": wl(dst, "canonical_name"),
        "destination_canonical_revision": wl(dst, "canonical_revision"),
        "destination_workload_namespace": wl(dst, "namespace"),
        "destination_principal": str(dst_identity) if dst_identity else UNKNOWN,
        "destination_app": wl(dst, "canonical_name"),
        "destination_version": wl(dst, "canonical_revision"),
        "destination_cluster": wl(dst, "cluster_id"),
        "request_protocol": "tcp",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls" if mtls else UNKNOWN,
    }


class Metrics:
    """The counters ztunnel-py exports on 15020."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.opened = Counter(
            "istio_tcp_connections_opened", "Total TCP connections opened", LABELS, registry=self.registry
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "Total TCP connections closed", LABELS, registry=self.registry
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes", "Total bytes sent over TCP", LABELS, registry=self.registry
        )
        self.received = Counter(
            "istio_tcp_received_bytes", "Total bytes received over TCP", LABELS, registry=self.registry
        )
        self.failed = Counter(
            "istio_tcp_connections_failed", "Total TCP connections failed", LABELS, registry=self.registry
        )
        self.xds_messages = Counter(
            "istio_xds_message", "Total xDS messages received", ("url",), registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class TrackedConnection:
    """One proxied connection, for metrics and for ``/config_dump``'s workloadState."""

    id: int
    direction: str  # "inbound" | "outbound"
    workload_uid: str
    src: str
    original_dst: str
    actual_dst: str
    protocol: str  # "HBONE" | "TCP"
    labels: dict[str, str]
    started: float = field(default_factory=time.time)
    sent: int = 0  # bytes toward the remote end (reporter's point of view)
    received: int = 0

    def to_json(self) -> dict[str, str]:
        return {
            "src": self.src,
            "originalDst": self.original_dst,
            "actualDst": self.actual_dst,
            "protocol": self.protocol,
        }


class ConnectionTracker:
    """Counts opens/closes/bytes with Istio labels and keeps the live table the admin API dumps."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._live: dict[int, TrackedConnection] = {}

    def open(
        self,
        *,
        direction: str,
        workload_uid: str,
        src: str,
        original_dst: str,
        actual_dst: str,
        protocol: str,
        labels: dict[str, str],
    ) -> TrackedConnection:
        conn = TrackedConnection(
            next(self._ids), direction, workload_uid, src, original_dst, actual_dst, protocol, labels
        )
        with self._lock:
            self._live[conn.id] = conn
        self.metrics.opened.labels(**labels).inc()
        return conn

    def add_bytes(self, conn: TrackedConnection, *, sent: int = 0, received: int = 0) -> None:
        """Account bytes as they flow (so long-lived connections show progress, like upstream)."""
        if sent:
            conn.sent += sent
            self.metrics.sent.labels(**conn.labels).inc(sent)
        if received:
            conn.received += received
            self.metrics.received.labels(**conn.labels).inc(received)

    def close(self, conn: TrackedConnection) -> None:
        with self._lock:
            if self._live.pop(conn.id, None) is None:
                return
        self.metrics.closed.labels(**conn.labels).inc()

    def failed(self, labels: dict[str, str]) -> None:
        self.metrics.failed.labels(**labels).inc()

    def live(self) -> Iterator[TrackedConnection]:
        with self._lock:
            return iter(list(self._live.values()))
