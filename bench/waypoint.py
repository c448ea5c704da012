"""Waypoint figures on this machine: HTTP through the real waypoint Envoy, config push to ACK, generation.

    .venv/bin/python bench/waypoint.py            # run from anywhere but the repository root (see below)

Set-up (all loopback): wrk (1 thread, 4 connections) -> a client Envoy playing ztunnel's outbound part
(TCP proxy tunnelling each connection as HBONE: HTTP/2 CONNECT over mTLS, ``:authority`` = VIP:80, with a
certificate from our CA) -> the waypoint (launcher + Envoy, config over mTLS xDS from our server) ->
  a) ``/direct``: a VirtualService direct response of 1 KiB at the waypoint (the waypoint's own L7 cost);
  b) ``/``: routed to a pod through ``connect_originate`` (HBONE again) to the Python HBONE terminator of
     the test kit and an aiohttp app (so that path is bounded by Python, not by Envoy).
Also: the time from a VirtualService change in the store to the waypoint's ACK, and the generation time
of the four waypoint types for N services with a VirtualService and a DestinationRule each.

The repository root has an ``xds/`` folder that shadows the ``xds`` protobuf package, so run it from
another directory (``cd /tmp && /work/main/.venv/bin/python /work/main/bench/waypoint.py``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "waypoint"))

from wp_helpers import istio, service  # noqa: E402
from wp_mesh import CLIENT_ID, WaypointMesh  # noqa: E402

from istiopy.testing.envoy import EnvoyProcess, free_port  # noqa: E402


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def client_envoy(
    port: int, waypoint_ip: str, target: str, chain: str, key: str, roots: str
) -> dict[str, Any]:
    t = "type.googleapis.com/"
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "in",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "tcp",
                                    "typed_config": {
                                        "@type": t + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                                        "stat_prefix": "client",
                                        "cluster": "waypoint",
                                        "tunneling_config": {"hostname": target},
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "waypoint",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": t + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "waypoint",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": waypoint_ip,
                                                    "port_value": 15008,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                    "transport_socket": {
                        "name": "tls",
                        "typed_config": {
                            "@type": t + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                            "common_tls_context": {
                                "tls_params": {
                                    "tls_minimum_protocol_version": "TLSv1_3",
                                    "tls_maximum_protocol_version": "TLSv1_3",
                                },
                                "alpn_protocols": ["h2"],
                                "tls_certificates": [
                                    {
                                        "certificate_chain": {"inline_bytes": b64(chain)},
                                        "private_key": {"inline_bytes": b64(key)},
                                    }
                                ],
                                "validation_context": {"trusted_ca": {"inline_bytes": b64(roots)}},
                            },
                        },
                    },
                }
            ],
        },
    }


def wrk(url: str, seconds: int = 5) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", "-c4", f"-d{seconds}s", "--latency", url], capture_output=True, text=True, check=True
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        v = float(m.group(1))
        return {"us": v / 1000, "ms": v, "s": v * 1000}[m.group(2)]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": float(rps.group(1)) if rps else float("nan"),
        "p50_ms": ms("50%"),
        "p90_ms": ms("90%"),
        "p99_ms": ms("99%"),
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def push_to_ack(m: WaypointMesh, rounds: int = 20) -> dict[str, float]:
    times = []
    for i in range(rounds):
        vs = istio(
            "VirtualService",
            "bench",
            {
                "hosts": ["bench"],
                "http": [
                    {
                        "match": [{"uri": {"prefix": "/direct"}}],
                        "directResponse": {"status": 200, "body": {"string": "x" * 1024}},
                        "headers": {"response": {"set": {"x-round": str(i)}}},
                    },
                    {"route": [{"destination": {"host": "bench"}}]},
                ],
            },
        )
        started = time.perf_counter()
        m.store.apply(vs)
        await m.synced()
        times.append((time.perf_counter() - started - 0.15) * 1000)  # synced() sleeps 0.15 s after the ACK
    return {"median_ms": statistics.median(times), "max_ms": max(times)}


def generation(n: int) -> dict[str, float]:
    import istiopy.mesh.resources  # noqa: F401
    from istiopy.mesh.kinds import parse
    from istiopy.mesh.store import ConfigStore
    from istiopy.xds.proxy import Proxy
    from istiopy.xds.waypoint import (
        generate_clusters,
        generate_endpoints,
        generate_listeners,
        generate_routes,
    )

    store = ConfigStore()
    docs: list[Any] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}},
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "default"},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        },
    ]
    for i in range(n):
        name = f"svc{i}"
        docs.append(
            service(name, f"10.{96 + i // 60000}.{(i // 250) % 250}.{i % 250 + 1}").model_dump(by_alias=True)
        )
        for v in ("v1", "v2"):
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": f"{name}-{v}",
                        "namespace": "default",
                        "labels": {"app": name, "version": v},
                    },
                    "spec": {"containers": [{"name": "c"}]},
                    "status": {
                        "phase": "Running",
                        "podIP": f"10.{100 + i // 30000}.{(i // 120) % 250}.{(i % 120) * 2 + (v == 'v2') + 1}",  # noqa: E501
                    },
                }
            )
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {
                    "host": name,
                    "subsets": [
                        {"name": "v1", "labels": {"version": "v1"}},
                        {"name": "v2", "labels": {"version": "v2"}},
                    ],
                },
            }
        )
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "VirtualService",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {
                    "hosts": [name],
                    "http": [
                        {
                            "match": [{"headers": {"x-canary": {"exact": "1"}}}],
                            "route": [{"destination": {"host": name, "subset": "v2"}}],
                        },
                        {
                            "route": [
                                {"destination": {"host": name, "subset": "v1"}, "weight": 90},
                                {"destination": {"host": name, "subset": "v2"}, "weight": 10},
                            ]
                        },
                    ],
                },
            }
        )
    for d in docs:
        if isinstance(d, dict) and "apiVersion" not in d:
            continue
        store.apply(parse(d) if isinstance(d, dict) else d)
    proxy = Proxy(
        "waypoint~1.1.1.1~w.default~default.svc.cluster.local",
        "waypoint",
        "1.1.1.1",
        "default",
        metadata={"WAYPOINT_NAME": "waypoint"},
    )

    def generate_all() -> tuple[float, int]:
        started = time.perf_counter()
        sizes = 0
        for fn in (generate_clusters, generate_endpoints, generate_listeners, generate_routes):
            for _, msg in fn(store, proxy):
                sizes += msg.ByteSize()
        return time.perf_counter() - started, sizes

    cold, sizes = generate_all()
    # one VirtualService changes: everything is regenerated, unchanged resources come from the memo
    changed = istio(
        "VirtualService",
        "svc0",
        {"hosts": ["svc0"], "http": [{"route": [{"destination": {"host": "svc0", "subset": "v2"}}]}]},
    )
    store.apply(changed)
    warm, _ = generate_all()
    return {"services": n, "cold_s": cold, "after_one_change_s": warm, "config_kib": sizes / 1024}


async def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="wp-bench-"))
    m = WaypointMesh(tmp)
    results: dict[str, Any] = {}
    try:
        await m.start()
        await m.add_pod("bench-1", "bench")
        await m.apply(service("bench", m.vip(90)))
        results["push_to_ack"] = await push_to_ack(m)
        assert m.ca is not None
        assert m.launcher is not None
        assert m.launcher.proc is not None
        cert = m.ca.issue_workload(CLIENT_ID)
        port = free_port()
        client = EnvoyProcess(
            client_envoy(
                port, m.waypoint_ip, f"{m.vip(90)}:80", cert.served_chain_pem, cert.key_pem, m.ca.roots_pem
            ),
            concurrency=1,
        )
        await asyncio.to_thread(client.start)
        try:
            wp_pid = m.launcher.proc.pid
            results["rss_idle_mb"] = rss_mb(wp_pid)
            results["direct_response_1k"] = await asyncio.to_thread(wrk, f"http://127.0.0.1:{port}/direct")
            results["rss_after_mb"] = rss_mb(wp_pid)
            results["to_python_backend"] = await asyncio.to_thread(wrk, f"http://127.0.0.1:{port}/", 3)
        finally:
            await asyncio.to_thread(client.stop)
    finally:
        await m.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    for n in (100, 1000):
        results[f"generation_{n}"] = generation(n)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
