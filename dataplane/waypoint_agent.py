"""The waypoint's local agent services: SDS (its certificate) and ALS -> Istio HTTP metrics on 15020.

Both are gRPC services on one unix socket in the waypoint's private work directory, reached by Envoy
through the bootstrap clusters ``sds-grpc`` and ``waypoint-als`` (what pilot-agent does for Istio's
waypoints over its ``workload-spiffe-uds`` socket):

* **SDS** (``SecretDiscoveryService/StreamSecrets``, state of the world): secrets ``default`` (leaf +
  intermediates + private key) and ``ROOTCA`` (mesh roots). The key is generated in this process and
  certified by the CA through ``api.ca_client`` (a CSR, never the key, goes to the CA), so it exists only
  in the waypoint pod. A rotation bumps the version and every open stream gets the new secret: Envoy
  swaps it without a restart.
* **ALS** (``AccessLogService/StreamAccessLogs``): Envoy streams one HTTP log entry per request from every
  service chain (log name = the chain's ``inbound-vip|<port>|http|<host>``); each entry updates
  ``istio_requests_total``, ``istio_request_duration_milliseconds``, ``istio_request_bytes`` and
  ``istio_response_bytes`` with Istio's labels (``reporter="waypoint"``). Why ALS rather than Envoy stat
  tags: the source identity (HBONE peer) and per-request response code are in the log entry, and stock
  Envoy has no Istio stats filter.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2, wrappers_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from istiopy.api.identity import InvalidSpiffeId, SpiffeId
from istiopy.api.tls import CertBundle

log = logging.getLogger(__name__)

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
PEER_PRINCIPAL = "io.istio.peer_principal"
PEER_BAGGAGE = "io.istiopy.peer_baggage"  # the client's CONNECT ``baggage`` (source workload facts)
UNKNOWN = "unknown"


# ------------------------------------------------------------------------------------------------ SDS
def _secret(name: str, bundle: CertBundle) -> secret_pb2.Secret | None:
    if name == WORKLOAD_SECRET:
        return secret_pb2.Secret(
            name=name,
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=bundle.served_chain_pem.encode()),
                private_key=base_pb2.DataSource(inline_bytes=bundle.key_pem.encode()),
            ),
        )
    if name == ROOT_SECRET:
        return secret_pb2.Secret(
            name=name,
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(inline_bytes=bundle.roots_pem.encode())
            ),
        )
    return None


class SdsService(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves the current bundle; :meth:`update` (certificate rotation) pushes it to every stream."""

    def __init__(self) -> None:
        self.bundle: CertBundle | None = None
        self.version = 0
        self._wakers: set[asyncio.Event] = set()
        self._nonces = itertools.count(1)
        self.acks = 0
        self.nacks: list[str] = []

    def update(self, bundle: CertBundle | None) -> None:
        if bundle is None or bundle is self.bundle:
            return
        self.bundle = bundle
        self.version += 1
        for w in list(self._wakers):
            w.set()

    async def StreamSecrets(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        names: list[str] = []
        wake = asyncio.Event()
        self._wakers.add(wake)
        closed = False

        async def read() -> None:
            nonlocal names, closed
            try:
                async for req in request_iterator:
                    if req.HasField("error_detail"):
                        self.nacks.append(req.error_detail.message)
                        log.warning("waypoint SDS: Envoy rejected secrets: %s", req.error_detail.message)
                    elif req.response_nonce:
                        self.acks += 1
                    wanted = sorted(set(req.resource_names))
                    if wanted != names or not req.response_nonce:
                        names = wanted
                        wake.set()
            finally:
                closed = True
                wake.set()

        reader = asyncio.get_running_loop().create_task(read())
        last: tuple[int, tuple[str, ...]] | None = None
        try:
            while True:
                await wake.wait()
                wake.clear()
                if closed:
                    return
                bundle = self.bundle
                if bundle is None or not names:
                    continue
                sent = (self.version, tuple(names))
                if sent == last:
                    continue
                resources = []
                for name in names:
                    secret = _secret(name, bundle)
                    if secret is not None:
                        a = any_pb2.Any()
                        a.Pack(secret)
                        resources.append(a)
                last = sent
                yield discovery_pb2.DiscoveryResponse(
                    version_info=str(self.version),
                    type_url=SECRET_TYPE,
                    nonce=str(next(self._nonces)),
                    resources=resources,
                )
        finally:
            self._wakers.discard(wake)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader


# ------------------------------------------------------------------------------------------ metrics
LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
# Istio's TCP metrics carry the same labels minus the per-request ones.
TCP_LABELS = tuple(x for x in LABELS if x not in ("response_code", "grpc_response_status"))
_DURATION_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000)
_BYTES_BUCKETS = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000)


class WaypointMetrics:
    """Istio's HTTP metrics in a private registry (several waypoints may share a test process)."""

    def __init__(self, cluster_id: str = "Kubernetes", waypoint_identity: str = "") -> None:
        self.registry = CollectorRegistry()
        self.cluster_id = cluster_id
        self.waypoint_identity = waypoint_identity
        self.requests = Counter(
            "istio_requests", "Requests through the waypoint", LABELS, registry=self.registry
        )
        self.duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request duration",
            LABELS,
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes", "Request body size", LABELS, buckets=_BYTES_BUCKETS, registry=self.registry
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response body size",
            LABELS,
            buckets=_BYTES_BUCKETS,
            registry=self.registry,
        )
        self.tcp_opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", TCP_LABELS, registry=self.registry
        )
        self.tcp_closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", TCP_LABELS, registry=self.registry
        )
        self.tcp_received = Counter(
            "istio_tcp_received_bytes", "Bytes received from clients", TCP_LABELS, registry=self.registry
        )
        self.tcp_sent = Counter(
            "istio_tcp_sent_bytes", "Bytes sent to clients", TCP_LABELS, registry=self.registry
        )
        self.entries = 0

    def exposition(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data

    def labels_for(self, log_name: str, entry: Any) -> dict[str, str]:
        common = entry.common_properties
        principal = _filter_state_string(common, PEER_PRINCIPAL)
        baggage = parse_baggage(_filter_state_string(common, PEER_BAGGAGE))
        src_ns, src_sa = UNKNOWN, UNKNOWN
        with contextlib.suppress(InvalidSpiffeId):
            ident = SpiffeId.parse(principal)
            src_ns, src_sa = ident.namespace, ident.service_account
        # log name / cluster: inbound-vip|<port>|<subset|http>|<hostname>
        host = (common.upstream_cluster or log_name).rsplit("|", 1)[-1]
        if not host or "|" in host or (host == log_name and "|" not in log_name):
            host = log_name.rsplit("|", 1)[-1]
        svc_name, _, rest = host.partition(".")
        svc_ns = rest.split(".", 1)[0] if rest else UNKNOWN
        flags = _flags(common.response_flags)
        dst = {k[4:]: v for k, v in common.custom_tags.items() if k.startswith("dst.") and v}
        return {
            "reporter": "waypoint",
            "source_workload": baggage.get("workload") or (src_sa if principal else UNKNOWN),
            "source_workload_namespace": baggage.get("k8s.namespace.name") or src_ns,
            "source_principal": principal or UNKNOWN,
            "source_app": baggage.get("service.name") or UNKNOWN,
            "source_version": baggage.get("service.version") or UNKNOWN,
            "source_cluster": baggage.get("k8s.cluster.name") or (self.cluster_id if principal else UNKNOWN),
            "destination_workload": dst.get("workload", UNKNOWN),
            "destination_workload_namespace": dst.get("namespace", svc_ns),
            "destination_principal": dst.get("principal", UNKNOWN),
            "destination_app": dst.get("app", UNKNOWN),
            "destination_version": dst.get("version", UNKNOWN),
            "destination_service": host or UNKNOWN,
            "destination_service_name": svc_name or UNKNOWN,
            "destination_service_namespace": svc_ns,
            "destination_cluster": self.cluster_id,
            "request_protocol": "http",
            "response_code": str(entry.response.response_code.value or 0)
            if "response" in entry.DESCRIPTOR.fields_by_name
            else "0",
            "grpc_response_status": "",
            "response_flags": flags,
            "connection_security_policy": "mutual_tls" if principal else UNKNOWN,
        }

    def record_tcp(self, log_name: str, entry: Any) -> None:
        """A TCP chain's log: ``TcpUpstreamConnected`` opens, ``TcpConnectionEnd`` closes and counts bytes."""
        labels = self.labels_for(log_name, entry)
        labels = {k: v for k, v in labels.items() if k in TCP_LABELS} | {"request_protocol": "tcp"}
        kind = entry.common_properties.access_log_type
        if kind == accesslog_pb2.TcpUpstreamConnected:
            self.tcp_opened.labels(**labels).inc()
            return
        self.tcp_closed.labels(**labels).inc()
        self.tcp_received.labels(**labels).inc(entry.connection_properties.received_bytes)
        self.tcp_sent.labels(**labels).inc(entry.connection_properties.sent_bytes)
        self.entries += 1

    def record(self, log_name: str, entry: Any) -> None:
        labels = self.labels_for(log_name, entry)
        common = entry.common_properties
        ms = 0.0
        if common.HasField("duration"):
            ms = common.duration.ToNanoseconds() / 1e6
        elif common.HasField("time_to_last_downstream_tx_byte"):
            ms = common.time_to_last_downstream_tx_byte.ToNanoseconds() / 1e6
        self.requests.labels(**labels).inc()
        self.duration.labels(**labels).observe(ms)
        self.request_bytes.labels(**labels).observe(entry.request.request_body_bytes)
        self.response_bytes.labels(**labels).observe(entry.response.response_body_bytes)
        self.entries += 1


def _filter_state_string(common: Any, key: str) -> str:
    obj = common.filter_state_objects.get(key)
    if obj is None:
        return ""
    sv = wrappers_pb2.StringValue()
    return str(sv.value) if obj.Unpack(sv) else obj.value.decode(errors="replace")


_WORKLOAD_KEYS = ("deployment", "daemonset", "statefulset", "job", "cronjob", "pod", "replicaset")


def parse_baggage(text: str) -> dict[str, str]:
    """W3C baggage as ztunnel sends it (``k8s.namespace.name=..,k8s.deployment.name=..,service.name=..``);
    ``workload`` is the ``k8s.<kind>.name`` entry. Values are the sender's claims, used for labels only."""
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value:
            continue
        value = value.split(";", 1)[0].strip()
        out[key.strip()] = value
        parts = key.strip().split(".")
        if len(parts) == 3 and parts[0] == "k8s" and parts[2] == "name" and parts[1] in _WORKLOAD_KEYS:
            out.setdefault("workload", value)
    return out


def _flags(flags: Any) -> str:
    """Envoy's short response flags for the common cases, ``-`` when none."""
    names = {
        "no_healthy_upstream": "UH",
        "upstream_connection_failure": "UF",
        "upstream_overflow": "UO",
        "no_route_found": "NR",
        "upstream_request_timeout": "UT",
        "local_reset": "LR",
        "upstream_remote_reset": "UR",
        "upstream_connection_termination": "UC",
        "delay_injected": "DI",
        "fault_injected": "FI",
        "rate_limited": "RL",
        "unauthorized_details": "UAEX",
        "upstream_retry_limit_exceeded": "URX",
        "downstream_connection_termination": "DC",
    }
    out = [short for field, short in names.items() if getattr(flags, field, False) is True]
    if flags.HasField("unauthorized_details"):
        out.append("UAEX")
    return ",".join(out) or "-"


class AlsService(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, metrics: WaypointMetrics) -> None:
        self.metrics = metrics

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]
    ) -> als_pb2.StreamAccessLogsResponse:
        log_name = ""
        async for msg in request_iterator:
            if msg.HasField("identifier"):
                log_name = msg.identifier.log_name
            for entry in msg.http_logs.log_entry:
                try:
                    self.metrics.record(log_name, entry)
                except Exception:  # a malformed entry must not end the stream
                    log.exception("waypoint ALS: cannot record an entry")
            for tcp in msg.tcp_logs.log_entry:
                try:
                    self.metrics.record_tcp(log_name, tcp)
                except Exception:
                    log.exception("waypoint ALS: cannot record a TCP entry")
        return als_pb2.StreamAccessLogsResponse()


async def start_agent_server(socket_path: str, sds: SdsService, als: AlsService) -> grpc.aio.Server:
    """Both services on ``unix:<socket_path>`` (mode 0600: only this pod's Envoy may read the key)."""
    import os

    server = grpc.aio.server()
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(sds, server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(als, server)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    with contextlib.suppress(OSError):
        os.chmod(socket_path, 0o600)
    return server
