"""Prometheus metrics under istiod's names, in a registry of our own (tests and several servers in one
process must not collide in the global registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from istiopy.xds import types

_CONVERGENCE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.5, 1, 3, 5, 10, 20, 30)
_PUSH_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 3, 5, 10, 20, 30)


class XdsMetrics:
    """The metric set of one xDS server; ``registry`` is what the /metrics endpoint exposes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.pushes = Counter(
            "pilot_xds_pushes", "Pilot build and send errors for lds, rds, cds and eds.", ["type"], registry=r
        )
        self.connected = Gauge(
            "pilot_xds", "Number of endpoints connected to this pilot using XDS.", registry=r
        )
        self.convergence = Histogram(
            "pilot_proxy_convergence_time",
            "Delay in seconds between config change and a proxy receiving all required configuration.",
            buckets=_CONVERGENCE_BUCKETS,
            registry=r,
        )
        self.rejects = Counter(
            "pilot_total_xds_rejects",
            "Total number of XDS responses from pilot rejected by proxy.",
            ["type"],
            registry=r,
        )
        self.push_time = Histogram(
            "pilot_xds_push_time",
            "Total time in seconds Pilot takes to push lds, rds, cds and eds.",
            ["type"],
            buckets=_PUSH_BUCKETS,
            registry=r,
        )
        self.write_timeouts = Counter(
            "pilot_xds_write_timeout", "Pilot XDS response write timeouts.", registry=r
        )
        self.stale_requests = Counter(
            "pilot_xds_expired_nonce",
            "Total number of XDS requests with an expired nonce.",
            ["type"],
            registry=r,
        )
        self.debounce_time = Histogram(
            "pilot_debounce_time",
            "Delay in seconds between the first config enters "
            "debouncing and the merged push request is pushed into the push queue.",
            buckets=_PUSH_BUCKETS,
            registry=r,
        )
        self.generate_time = Histogram(
            "istiopy_xds_generate_seconds",
            "Time to generate one type for one proxy group.",
            ["type"],
            buckets=_PUSH_BUCKETS,
            registry=r,
        )
        self.stream_errors = Counter(
            "istiopy_xds_stream_errors",
            "Streams closed by the server because of a client error.",
            ["reason"],
            registry=r,
        )

    def label(self, type_url: str) -> str:
        return types.short_name(type_url)
