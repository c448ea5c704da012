"""Istio's TCP metrics and the live connection table, as ztunnel reports them.

Why an own exposition instead of ``prometheus_client``: the node proxy exports six counters, and the library
(its registry, per-child locks and ``_created`` timestamps, plus its import: ~2 MB of every ztunnel-py's RSS)
is more than the RSS target (<= 40 MB holding 1000 workloads) can carry for that. :class:`Counter` keeps one
float per label set and :meth:`Metrics.render` writes the Prometheus text exposition format 0.0.4 itself:
``# HELP``/``# TYPE`` lines, ``_total`` sample names, label values escaped (backslash, double quote,
newline) and values formatted as Go's ``ParseFloat`` reads them (``1.0``, ``1.234567e+06``), the same
text ``prometheus_client`` produced here before, minus the ``*_created`` series upstream ztunnel does not have
either. Each proxy owns its :class:`Metrics`, so several proxies in one test process keep separate numbers.

Names and labels follow upstream (``istio_tcp_connections_opened_total`` etc., with the standard Istio
label set); ``reporter`` is ``destination`` for inbound and ``source`` for outbound, as ztunnel does.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from istiopy.dataplane.state import Identity, Service, Workload

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value as Prometheus clients write it (Go's float formatting): ``1.0``, ``1.234567e+06``."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    s = repr(float(value))
    dot = s.find(".")
    if value > 0 and dot > 6:  # from 1e6 on, an exponent (as prometheus_client and Go's %g write it)
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1 :]}".rstrip("0").rstrip(".")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


class CounterChild:
    """One label set of a :class:`Counter` (what ``labels(...)`` returns)."""

    __slots__ = ("_counter", "_key")

    def __init__(self, counter: Counter, key: tuple[str, ...]) -> None:
        self._counter = counter
        self._key = key

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError(f"counter {self._counter.name}: cannot decrease by {amount}")
        self._counter._add(self._key, amount)


class Counter:
    """A Prometheus counter with a fixed label set; ``name`` without ``_total`` (the exposition adds it)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str, **kw: str) -> CounterChild:
        """Select one label set, by position or by name (all labels, no others), like prometheus_client."""
        if values and kw:
            raise ValueError(f"counter {self.name}: labels by position or by name, not both")
        if kw:
            if set(kw) != set(self.labelnames):
                raise ValueError(
                    f"counter {self.name}: labels {sorted(kw)} do not match {sorted(self.labelnames)}"
                )
            key = tuple(str(kw[n]) for n in self.labelnames)
        else:
            if len(values) != len(self.labelnames):
                raise ValueError(f"counter {self.name}: {len(values)} label values for {self.labelnames}")
            key = tuple(str(v) for v in values)
        return CounterChild(self, key)

    def _add(self, key: tuple[str, ...], amount: float) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        """The current value of one label set (0 if never incremented)."""
        key = tuple(labels.get(n, "") for n in self.labelnames)
        with self._lock:
            return self._values.get(key, 0.0)

    def expose(self) -> Iterator[str]:
        """This counter's lines of the text exposition format, in first-seen label-set order."""
        total = self.name + "_total"
        yield f"# HELP {total} {_escape_help(self.documentation)}\n"
        yield f"# TYPE {total} counter\n"
        with self._lock:
            samples = list(self._values.items())
        for key, value in samples:
            if key:
                labels = ",".join(
                    f'{n}="{_escape_label(v)}"' for n, v in zip(self.labelnames, key, strict=True)
                )
                yield f"{total}{{{labels}}} {format_value(value)}\n"
            else:
                yield f"{total} {format_value(value)}\n"


class Metrics:
    """The counters ztunnel-py exports on 15020."""

    def __init__(self) -> None:
        self.opened = Counter("istio_tcp_connections_opened", "Total TCP connections opened", LABELS)
        self.closed = Counter("istio_tcp_connections_closed", "Total TCP connections closed", LABELS)
        self.sent = Counter("istio_tcp_sent_bytes", "Total bytes sent over TCP", LABELS)
        self.received = Counter("istio_tcp_received_bytes", "Total bytes received over TCP", LABELS)
        self.failed = Counter("istio_tcp_connections_failed", "Total TCP connections failed", LABELS)
        self.xds_messages = Counter("istio_xds_message", "Total xDS messages received", ("url",))
        self.counters = (self.opened, self.closed, self.sent, self.received, self.failed, self.xds_messages)

    def render(self) -> bytes:
        """The text exposition (format 0.0.4) of every counter: what ``/stats/prometheus`` serves."""
        return "".join(line for c in self.counters for line in c.expose()).encode()


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
