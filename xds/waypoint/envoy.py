"""Listeners, clusters and endpoints of a waypoint, in upstream istiod's structure (ambient.md 3.2).

    client ztunnel --HBONE--> connect_terminate (:15008, mTLS, HTTP/2 CONNECT)
        CONNECT :authority = service VIP:port -> filter state original_dst.local_ip (+ peer principal)
    -> cluster main_internal -> internal listener main_internal
        original_dst restores VIP:port; one filter chain per served (VIP, port): HCM (RDS, jwt_authn,
        RBAC, fault, CORS, router) or TCP proxy
    -> cluster inbound-vip|<port>|<subset|http>|<host> (DestinationRule: LB, circuit breaking, outlier)
        endpoints are internal addresses of connect_originate with metadata local=<pod ip>:<target port>
    -> internal listener connect_originate (original_dst from that metadata) -> TCP proxy tunnelling
        CONNECT <pod ip>:<port> -> cluster connect_originate (ORIGINAL_DST, port 15008, mTLS, HTTP/2)

Two more kinds of chain in ``main_internal``: ``direct-http|<ns>/<pod>`` for traffic addressed to a pod's
own IP when the waypoint serves workloads (``waypoint-for`` workload/all), sent through ``encap`` straight
to ``connect_originate`` with the pod address as original destination; and ServiceEntry hosts bound to
the waypoint (egress), whose clusters are the external endpoints themselves (STATIC/STRICT_DNS, plain or
DestinationRule ``tls.mode: SIMPLE``), not HBONE.

Gotchas found on the way (each has a test): filter state reaches an internal listener only through the
``internal_upstream`` transport socket, so ``main_internal``'s cluster has one too; an updated EDS cluster
warms until its assignment is sent again, which Envoy does not ask for (the name is already subscribed):
the xDS stream layer resends it after every changed EDS cluster (``istiopy.xds.stream``), so EDS names are
plain cluster names; Envoy's default RE2 program-size limit (100) refuses ordinary regexes, so the
launcher raises it as Istio's bootstrap does.

Why the layout: the client's peer identity is only known on the outer connection, so it is carried into
``main_internal`` as the filter state ``io.istio.peer_principal`` (shared with the upstream internal
connection), where RBAC matches it and the access log reports it. The mTLS certificate comes over SDS from
the cluster ``sds-grpc`` that the waypoint launcher puts in the bootstrap (its local SDS server): the key
never leaves the waypoint and istiod never holds it.

Built as JSON-shaped dicts parsed into the typed protos: readable, and a wrong field name fails loudly at
generation time rather than as a NACK.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

# Imported for their descriptors: ``json_format`` resolves ``@type`` of Any fields through the pool.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401
from envoy.extensions.bootstrap.internal_listener.v3 import internal_listener_pb2  # noqa: F401
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401
from envoy.extensions.filters.http.fault.v3 import fault_pb2  # noqa: F401
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.http.set_filter_state.v3 import set_filter_state_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.network.direct_response.v3 import config_pb2 as direct_response_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.filters.network.set_filter_state.v3 import (  # noqa: F401
    set_filter_state_pb2 as network_set_filter_state_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.transport_sockets.internal_upstream.v3 import internal_upstream_pb2  # noqa: F401
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from istiopy.mesh.ambient import pod_locality
from istiopy.mesh.resources.common import duration_seconds
from istiopy.mesh.resources.networking import SimpleLB, TrafficPolicy
from istiopy.xds.waypoint.plan import (
    ClusterTarget,
    EntryCluster,
    ServedPort,
    WaypointPlan,
    endpoint_pods,
    workload_meta,
)

CONNECT_TERMINATE = "connect_terminate"
MAIN_INTERNAL = "main_internal"
CONNECT_ORIGINATE = "connect_originate"
ENCAP = "encap"  # workload-addressed traffic: straight to connect_originate, original destination kept
HBONE_PORT = 15008
# Bootstrap clusters the waypoint launcher defines (``istiopy.dataplane.waypoint``): its local SDS server
# and its access-log (metrics) server.
SDS_CLUSTER = "sds-grpc"
ALS_CLUSTER = "waypoint-als"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
PEER_PRINCIPAL = "io.istio.peer_principal"
# The client's ``baggage`` CONNECT header (ztunnel sends the source workload's name, namespace, canonical
# service and revision in it): logged for the source labels of the request metrics.
PEER_BAGGAGE = "io.istiopy.peer_baggage"
ORIGINAL_DST = "envoy.filters.listener.original_dst"
# Endpoint metadata naming the destination pod (workload, namespace, principal, app, version); the access
# log copies it into custom tags ``dst.<field>`` for the destination labels of the request metrics.
ENDPOINT_META = "istio"
DESTINATION_TAGS = ("workload", "namespace", "principal", "app", "version")

T = "type.googleapis.com/"


_PARSED: dict[tuple[str, str], Any] = {}


def parse(data: dict[str, Any], message: Any) -> Any:
    """The typed message for a JSON-shaped dict, memoized by content: a push regenerates every resource
    of a type, and parsing is most of the cost, while most resources did not change. Callers never
    mutate the result (it may be shared), which keeps generators pure."""
    key = (message.DESCRIPTOR.full_name, json.dumps(data, sort_keys=True, separators=(",", ":")))
    hit = _PARSED.get(key)
    if hit is None:
        if len(_PARSED) > 100_000:
            _PARSED.clear()
        hit = _PARSED[key] = json_format.ParseDict(data, message)
    return hit


def dur(seconds: float) -> str:
    """A protobuf JSON Duration."""
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def _sds(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
            },
            "resource_api_version": "V3",
            "initial_fetch_timeout": "0s",
        },
    }


def common_tls(trust_domain: str) -> dict[str, Any]:
    """TLS 1.3 only, ALPN h2, our certificate and mesh roots over SDS, peers from our trust domain."""
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificate_sds_secret_configs": [_sds(WORKLOAD_SECRET)],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"prefix": f"spiffe://{trust_domain}/"}}
                ]
            },
            "validation_context_sds_secret_config": _sds(ROOT_SECRET),
        },
    }


def _filter_state(key: str, fmt: str, factory: str = "", skip_if_empty: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "object_key": key,
        "format_string": {"text_format_source": {"inline_string": fmt}},
        "shared_with_upstream": "ONCE",
    }
    if skip_if_empty:
        out["skip_if_empty"] = True
    if factory:
        out["factory_key"] = factory
    return out


# ------------------------------------------------------------------------------------------ listeners
def connect_terminate(plan: WaypointPlan) -> Any:
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": CONNECT_TERMINATE,
        "codec_type": "HTTP2",
        "http2_protocol_options": {
            "allow_connect": True,
            "max_concurrent_streams": 100,
            "connection_keepalive": {"interval": "10s", "timeout": "20s"},
        },
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "stream_idle_timeout": "0s",
        "route_config": {
            "name": CONNECT_TERMINATE,
            "virtual_hosts": [
                {
                    "name": CONNECT_TERMINATE,
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": MAIN_INTERNAL,
                                "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}],
                                "timeout": "0s",
                            },
                        }
                    ],
                }
            ],
        },
        "http_filters": [
            {
                # The connect-authority step: the tunnel target (service VIP:port) becomes the original
                # destination of the internal connection; the peer's SPIFFE id travels with it.
                "name": "envoy.filters.http.set_filter_state",
                "typed_config": {
                    "@type": T + "envoy.extensions.filters.http.set_filter_state.v3.Config",
                    "on_request_headers": [
                        _filter_state(ORIGINAL_DST + ".local_ip", "%REQ(:AUTHORITY)%"),
                        _filter_state(ORIGINAL_DST + ".remote_ip", "%DOWNSTREAM_REMOTE_ADDRESS%"),
                        _filter_state(PEER_PRINCIPAL, "%DOWNSTREAM_PEER_URI_SAN%", "envoy.string"),
                        _filter_state(PEER_BAGGAGE, "%REQ(baggage)%", "envoy.string", skip_if_empty=True),
                    ],
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
    }
    return parse(
        {
            "name": CONNECT_TERMINATE,
            "address": {"socket_address": {"address": plan.wid.listen_address, "port_value": HBONE_PORT}},
            "connection_balance_config": {"exact_balance": {}},
            "filter_chains": [
                {
                    "transport_socket": {
                        "name": "envoy.transport_sockets.tls",
                        "typed_config": {
                            "@type": T + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "require_client_certificate": True,
                            "common_tls_context": common_tls(plan.wid.trust_domain),
                        },
                    },
                    "filters": [
                        {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                    ],
                }
            ],
        },
        listener_pb2.Listener(),
    )


def access_log(sp: ServedPort, tcp: bool = False) -> list[dict[str, Any]]:
    """Access log to the launcher's ALS server: the source of Istio's request (HTTP) and connection (TCP)
    metrics. The log name is the chain's service route, so the server knows the destination even for
    local replies."""
    kind = "Tcp" if tcp else "Http"
    return [
        {
            "name": f"envoy.access_loggers.{kind.lower()}_grpc",
            "typed_config": {
                "@type": T + f"envoy.extensions.access_loggers.grpc.v3.{kind}GrpcAccessLogConfig",
                "common_config": {
                    "log_name": sp.route_name,
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": ALS_CLUSTER}},
                    "filter_state_objects_to_log": [PEER_PRINCIPAL, PEER_BAGGAGE],
                    "custom_tags": [
                        {
                            "tag": f"dst.{key}",
                            "metadata": {
                                "kind": {"host": {}},
                                "metadata_key": {"key": ENDPOINT_META, "path": [{"key": key}]},
                            },
                        }
                        for key in DESTINATION_TAGS
                    ],
                    "buffer_flush_interval": "0.2s",
                },
            },
        }
    ]


def main_internal(plan: WaypointPlan, http_filters: dict[str, list[dict[str, Any]]]) -> Any:
    """One chain per served (VIP, port); ``http_filters`` maps a route name to its filter list."""
    chains: list[dict[str, Any]] = []
    claimed: set[tuple[str, int]] = set()
    for sp in plan.served:
        # Two served names on one VIP:port (a ServiceEntry with several hosts and one address, or a
        # duplicated clusterIP) would be identical filter-chain matches, which Envoy rejects: the first
        # (services before entries, then by name) keeps the address.
        vips = [ip for ip in sp.vips if (ip, sp.number) not in claimed]
        claimed.update((ip, sp.number) for ip in vips)
        if not vips:
            continue
        match = {
            "destination_port": sp.number,
            "prefix_ranges": [{"address_prefix": ip, "prefix_len": 128 if ":" in ip else 32} for ip in vips],
        }
        if sp.http:
            hcm = {
                "@type": T
                + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": sp.route_name,
                "codec_type": "AUTO",
                "rds": {
                    "route_config_name": sp.route_name,
                    "config_source": {"ads": {}, "resource_api_version": "V3"},
                },
                "http_filters": [
                    *http_filters.get(sp.route_name, []),
                    {
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
                    },
                ],
                "access_log": access_log(sp),
                "use_remote_address": False,
                "normalize_path": True,
                "merge_slashes": True,
                "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
            }
            filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
        else:
            filters = [
                {
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": sp.cluster,
                        "cluster": sp.cluster,
                        "access_log": access_log(sp, tcp=True),
                        "access_log_options": {"flush_access_log_on_connected": True},
                    },
                }
            ]
        chains.append({"name": sp.cluster, "filter_chain_match": match, "filters": filters})
    pod_ips = {ip for ip, _ in claimed}
    chains += [direct_chain(pod) for pod in plan.workloads if not pod_ips & set(pod.ips)]
    # Envoy's in-place filter-chain update loses an internal listener from the workers' registry (new
    # tunnels then fail with "Invalid argument"): a listener-level field that changes with the chains
    # forces the full update path, which re-registers it.
    digest = hashlib.sha256(json.dumps(chains, sort_keys=True).encode()).hexdigest()[:16]
    return parse(
        {
            "name": MAIN_INTERNAL,
            "metadata": {"filter_metadata": {"istiopy": {"chains": digest}}},
            "internal_listener": {},
            "listener_filters": [
                {
                    "name": ORIGINAL_DST,
                    "typed_config": {
                        "@type": T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                    },
                }
            ],
            "filter_chains": chains,
            # A tunnel to an address this waypoint does not serve: close it (no NACK for an empty list).
            "default_filter_chain": {
                "name": "unknown-destination",
                "filters": [
                    {
                        "name": "envoy.filters.network.direct_response",
                        "typed_config": {
                            "@type": T + "envoy.extensions.filters.network.direct_response.v3.Config"
                        },
                    }
                ],
            },
        },
        listener_pb2.Listener(),
    )


def direct_chain(pod: Any) -> dict[str, Any]:
    """Traffic addressed to a pod's own IP (a workload waypoint): HTTP to ``encap``, which tunnels it to
    that pod unchanged; the pod address is handed on as the original destination of the inner hop."""
    name = f"direct-http|{pod.namespace}/{pod.name}"
    hcm = {
        "@type": T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {
                    "name": name,
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": ENCAP, "timeout": "0s"}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": T + "envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": name,
        "filter_chain_match": {
            "prefix_ranges": [
                {"address_prefix": ip, "prefix_len": 128 if ":" in ip else 32} for ip in pod.ips
            ]
        },
        "filters": [
            {
                "name": "envoy.filters.network.set_filter_state",
                "typed_config": {
                    "@type": T + "envoy.extensions.filters.network.set_filter_state.v3.Config",
                    "on_new_connection": [
                        _filter_state(ORIGINAL_DST + ".local_ip", "%DOWNSTREAM_LOCAL_ADDRESS%")
                    ],
                },
            },
            {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm},
        ],
    }


def connect_originate(plan: WaypointPlan) -> Any:
    return parse(
        {
            "name": CONNECT_ORIGINATE,
            "internal_listener": {},
            "listener_filters": [
                {
                    "name": ORIGINAL_DST,
                    "typed_config": {
                        "@type": T + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                    },
                }
            ],
            "filter_chains": [
                {
                    "filters": [
                        {
                            "name": "envoy.filters.network.tcp_proxy",
                            "typed_config": {
                                "@type": T + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                "stat_prefix": CONNECT_ORIGINATE,
                                "cluster": CONNECT_ORIGINATE,
                                "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                            },
                        }
                    ]
                }
            ],
        },
        listener_pb2.Listener(),
    )


# ------------------------------------------------------------------------------------------- clusters
def _internal_upstream(passthrough: bool) -> dict[str, Any]:
    """The internal-upstream transport socket: it is what carries filter state shared with upstream (and,
    with ``passthrough``, the endpoint's original-destination metadata) into the internal listener."""
    cfg: dict[str, Any] = {
        "@type": T + "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        "transport_socket": {
            "name": "envoy.transport_sockets.raw_buffer",
            "typed_config": {"@type": T + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"},
        },
    }
    if passthrough:
        cfg["passthrough_metadata"] = [{"kind": {"host": {}}, "name": ORIGINAL_DST}]
    return {"name": "envoy.transport_sockets.internal_upstream", "typed_config": cfg}


def _internal_cluster(name: str) -> Any:
    return parse(
        {
            "name": name,
            "type": "STATIC",
            "transport_socket": _internal_upstream(False),
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {
                                "endpoint": {
                                    "address": {"envoy_internal_address": {"server_listener_name": name}}
                                }
                            }
                        ]
                    }
                ],
            },
        },
        cluster_pb2.Cluster(),
    )


def main_internal_cluster() -> Any:
    return _internal_cluster(MAIN_INTERNAL)


def encap_cluster() -> Any:
    """``encap`` -> ``connect_originate``: the original destination travels as shared filter state."""
    data = json_format.MessageToDict(_internal_cluster(CONNECT_ORIGINATE), preserving_proto_field_name=True)
    data["name"] = ENCAP
    data["load_assignment"]["cluster_name"] = ENCAP
    return parse(data, cluster_pb2.Cluster())


def connect_originate_cluster(plan: WaypointPlan) -> Any:
    return parse(
        {
            "name": CONNECT_ORIGINATE,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "10s",
            "cleanup_interval": "60s",
            "original_dst_lb_config": {"upstream_port_override": HBONE_PORT},
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {"allow_connect": True}},
                    "common_http_protocol_options": {"idle_timeout": "15s"},
                }
            },
            "transport_socket": {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "common_tls_context": common_tls(plan.wid.trust_domain),
                },
            },
        },
        cluster_pb2.Cluster(),
    )


_LB = {
    SimpleLB.ROUND_ROBIN: "ROUND_ROBIN",
    SimpleLB.LEAST_REQUEST: "LEAST_REQUEST",
    SimpleLB.LEAST_CONN: "LEAST_REQUEST",
    SimpleLB.RANDOM: "RANDOM",
}


def service_cluster(target: ClusterTarget) -> Any:
    """``inbound-vip|...``: EDS over ADS, internal upstream passing each endpoint's original destination
    to ``connect_originate``, and the DestinationRule's traffic policy."""
    data: dict[str, Any] = {
        "name": target.name,
        "type": "EDS",
        "eds_cluster_config": {
            "service_name": target.name,
            "eds_config": {"ads": {}, "resource_api_version": "V3", "initial_fetch_timeout": "0s"},
        },
        "connect_timeout": "10s",
        "transport_socket": _internal_upstream(True),
    }
    apply_traffic_policy(data, target.policy)
    return parse(data, cluster_pb2.Cluster())


def apply_traffic_policy(data: dict[str, Any], policy: TrafficPolicy | None) -> None:
    """DestinationRule settings on a cluster: LB, connection pool (circuit breaking), outlier detection."""
    if policy is None:
        return
    lb = policy.load_balancer
    if lb is not None:
        if lb.consistent_hash is not None:
            ch = lb.consistent_hash
            if ch.maglev is not None:
                data["lb_policy"] = "MAGLEV"
                if ch.maglev.table_size:
                    data["maglev_lb_config"] = {"table_size": ch.maglev.table_size}
            else:
                data["lb_policy"] = "RING_HASH"
                size = (ch.ring_hash.minimum_ring_size if ch.ring_hash else 0) or ch.minimum_ring_size or 0
                if size:
                    data["ring_hash_lb_config"] = {"minimum_ring_size": str(size)}
        elif lb.simple is not None and lb.simple in _LB:
            data["lb_policy"] = _LB[lb.simple]
    pool = policy.connection_pool
    if pool is not None:
        thresholds: dict[str, Any] = {}
        proto: dict[str, Any] = {}
        if pool.tcp is not None:
            if pool.tcp.max_connections is not None:
                thresholds["max_connections"] = pool.tcp.max_connections
            if pool.tcp.connect_timeout is not None:
                data["connect_timeout"] = dur(duration_seconds(pool.tcp.connect_timeout))
            if pool.tcp.max_connection_duration is not None:
                proto["max_connection_duration"] = dur(duration_seconds(pool.tcp.max_connection_duration))
        if pool.http is not None:
            h = pool.http
            if h.http1_max_pending_requests is not None:
                thresholds["max_pending_requests"] = h.http1_max_pending_requests
            if h.http2_max_requests is not None:
                thresholds["max_requests"] = h.http2_max_requests
            if h.max_retries is not None:
                thresholds["max_retries"] = h.max_retries
            if h.max_requests_per_connection is not None:
                proto["max_requests_per_connection"] = h.max_requests_per_connection
            if h.idle_timeout is not None:
                proto["idle_timeout"] = dur(duration_seconds(h.idle_timeout))
        if thresholds:
            data["circuit_breakers"] = {"thresholds": [{"priority": "DEFAULT", **thresholds}]}
        if proto:
            data["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http_protocol_options": {}},
                    "common_http_protocol_options": proto,
                }
            }
    od = policy.outlier_detection
    if od is not None:
        consecutive = (
            od.consecutive_5xx_errors if od.consecutive_5xx_errors is not None else od.consecutive_errors
        )
        out: dict[str, Any] = {
            "interval": dur(duration_seconds(od.interval, 10.0)),
            "base_ejection_time": dur(duration_seconds(od.base_ejection_time, 30.0)),
            "max_ejection_percent": od.max_ejection_percent if od.max_ejection_percent is not None else 10,
        }
        if consecutive is None:
            consecutive = 5
        if consecutive > 0:
            out["consecutive_5xx"] = consecutive
            out["enforcing_consecutive_5xx"] = 100
        else:
            out["enforcing_consecutive_5xx"] = 0
        if od.consecutive_gateway_errors:
            out["consecutive_gateway_failure"] = od.consecutive_gateway_errors
            out["enforcing_consecutive_gateway_failure"] = 100
        else:
            out["enforcing_consecutive_gateway_failure"] = 0
        if od.split_external_local_origin_errors:
            out["split_external_local_origin_errors"] = True
            if od.consecutive_local_origin_failures is not None:
                out["consecutive_local_origin_failure"] = od.consecutive_local_origin_failures
        data["outlier_detection"] = out
        # Istio: minHealthPercent (default 0) is the panic threshold; 0 never lets ejected hosts back.
        data["common_lb_config"] = {"healthy_panic_threshold": {"value": float(od.min_health_percent or 0)}}


def entry_cluster(ec: EntryCluster) -> Any:
    """A ServiceEntry host's cluster at an egress waypoint: the external endpoints themselves (STATIC, or
    STRICT_DNS for DNS resolution), plain TCP unless the DestinationRule originates TLS (``SIMPLE``)."""
    lb = [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        for host, port in ec.targets()
    ]
    data: dict[str, Any] = {
        "name": ec.name,
        "type": "STRICT_DNS" if ec.dns else "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {"cluster_name": ec.name, "endpoints": [{"lb_endpoints": lb}] if lb else []},
    }
    if ec.dns:
        data["dns_lookup_family"] = "V4_PREFERRED"
    apply_traffic_policy(data, ec.policy)
    tls = ec.policy.tls if ec.policy is not None else None
    if tls is not None and tls.mode.value == "SIMPLE":
        validation: dict[str, Any] = {}
        if not tls.insecure_skip_verify:
            validation["trusted_ca"] = {
                "filename": tls.ca_certificates or "/etc/ssl/certs/ca-certificates.crt"
            }
            if tls.subject_alt_names:
                validation["match_typed_subject_alt_names"] = [
                    {"san_type": "DNS", "matcher": {"exact": n}} for n in tls.subject_alt_names
                ]
        data["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": tls.sni or ec.host,
                "common_tls_context": {"validation_context": validation} if validation else {},
            },
        }
    return parse(data, cluster_pb2.Cluster())


Locality = tuple[str, str, str]


def locality_priority(mine: Locality, theirs: Locality | None, failover: Mapping[str, str]) -> int:
    """Istio's locality failover order: same region/zone/subzone 0, same zone 1, same region 2, the region
    ``failover`` names for ours 3, anywhere else 4 (priorities are compacted afterwards)."""
    if theirs is None:
        return 4
    if theirs[:2] == mine[:2]:
        return 0 if theirs[2] == mine[2] else 1
    if theirs[0] == mine[0]:
        return 2
    return 3 if failover.get(mine[0]) == theirs[0] else 4


def _failover_enabled(policy: TrafficPolicy | None) -> dict[str, str] | None:
    """The failover region map when locality failover applies to a cluster (Istio: with outlier detection,
    unless ``localityLbSetting.enabled`` is false or ``distribute`` is used instead), else None."""
    if policy is None or policy.outlier_detection is None:
        return None
    setting = policy.load_balancer.locality_lb_setting if policy.load_balancer is not None else None
    if setting is not None and (setting.enabled is False or setting.distribute):
        return None
    return {f.from_: f.to for f in setting.failover} if setting is not None else {}


def cluster_endpoints(plan: WaypointPlan, target: ClusterTarget, locality: Locality | None = None) -> Any:
    """The endpoints of one cluster, grouped by locality; with locality failover on (see
    ``_failover_enabled``) and the waypoint's own ``locality`` known, nearer groups get higher priority,
    so Envoy sends everything to the nearest healthy group and fails over as outlier detection ejects."""
    assert plan.store is not None
    failover = _failover_enabled(target.policy) if locality is not None else None
    groups: dict[Locality | None, list[dict[str, Any]]] = {}
    for ip, port, pod in endpoint_pods(plan.store, target, plan.pod_index):
        addr = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        groups.setdefault(pod_locality(plan.store, pod), []).append(
            {
                "endpoint": {
                    "address": {
                        "envoy_internal_address": {
                            "server_listener_name": CONNECT_ORIGINATE,
                            "endpoint_id": addr,
                        }
                    }
                },
                "metadata": {
                    "filter_metadata": {
                        ORIGINAL_DST: {"local": addr},
                        ENDPOINT_META: workload_meta(pod, plan.wid.trust_domain),
                    }
                },
            }
        )
    raw = {
        loc: (
            locality_priority(locality, loc, failover) if locality is not None and failover is not None else 0
        )
        for loc in groups
    }
    compact = {p: i for i, p in enumerate(sorted(set(raw.values())))}  # Envoy wants 0..n without gaps
    endpoints = []
    for loc in sorted(groups, key=lambda g: (raw[g], g or ("", "", ""))):
        entry: dict[str, Any] = {"lb_endpoints": groups[loc], "priority": compact[raw[loc]]}
        if loc is not None:
            entry["locality"] = {"region": loc[0], "zone": loc[1], "sub_zone": loc[2]}
        endpoints.append(entry)
    return parse({"cluster_name": target.name, "endpoints": endpoints}, endpoint_pb2.ClusterLoadAssignment())


def empty_route(name: str) -> Any:
    return route_pb2.RouteConfiguration(name=name)
