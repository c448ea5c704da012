"""Data-plane benchmark: direct vs real Envoy sidecars vs ztunnel-py (Python byte path, C byte path).

One run, one machine, same payloads; client and server are separate pods (network namespaces from
``istiopy.testing.netns``) on separate nodes:

1. ``direct``: the client talks to the server pod's IP (the physical baseline);
2. ``sidecar``: a real Envoy in each pod, mTLS (TLS 1.3) TCP proxying (Istio sidecars at L4; the set-up
   of ``shared/reference/baselines.md``), with ``--workers`` worker threads each (default 2, Istio's
   default for sidecars and ztunnel alike; the C engine gets the same count, ``--workers 1`` is the
   reference's one-worker set-up);
3. ``ztunnel-python`` and 4. ``ztunnel-c``: a ztunnel-py node-proxy pair built from the data-plane byte path
   (``HbonePool``/``HboneServer``/``relay``, or :class:`istiopy.dataplane.fastpath.FastPath`): the client
   side listens in the client pod, opens pooled HBONE (mTLS + HTTP/2 CONNECT) to port 15008 in the server
   pod, whose side dials the app. No capture or xDS: those cost nothing per byte, and this measures the
   byte path alone;
5. ``waypoint``: ztunnel-py's C path through a real Envoy waypoint, in a whole mesh from the testing kit
   (``istiopy.testing.mesh``: istiod-py, the real ``ztunnel-py`` process on each node fed by its xDS,
   capture, the waypoint launcher's Envoy): client pod -> ztunnel -> waypoint -> ztunnel -> server pod, to
   the server's Service VIP. iperf3 goes to a TCP port (the waypoint proxies it at L4), fortio to an HTTP
   port (routed at L7). CPU and RSS are both ztunnels', then the waypoint Envoy's. The mesh config adds
   1000 workloads in 500 services and 20 policies, so the same run also gives the RSS of the real
   ``ztunnel-py`` processes holding that (``ztunnel_real`` in the JSON, a line under the table).

Per mode: iperf3 throughput with 1 and 8 connections; HTTP latency p50/p90/p99 at a fixed 1000 req/s with
1 KB responses (fortio, pinned, built by ``make bench`` with ``go install`` into ``.build/tools``; without
it the latency columns stay empty); proxy CPU seconds per GB moved (single-connection iperf3) and per 1000
requests (both proxies of the
pair, measured over the latency run); proxy RSS (each, after the run; the ztunnel-py processes hold 1000 known
workloads in their WDS state, as the RSS target is stated). Each mode runs ``--rounds`` times
and reports the best round per column (max throughput, min latency/CPU): the box is shared with other test
runs, whose load only ever makes a round worse. Printed as a table with ratios to ``direct`` and
``sidecar``; saved as JSON (every round included) under ``bench/results/``.

Run: ``make bench`` or ``.venv/bin/python bench/dataplane.py [--modes ...] [--seconds 3]`` (root).
Internal: ``bench/dataplane.py proxy --side out|in --byte-path c|python ...`` is the proxy process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
FORTIO_VERSION = "1.63.9"
FORTIO = ROOT / ".build" / "tools" / f"fortio-{FORTIO_VERSION}" / "fortio"
IPERF_PORT, HTTP_PORT = 5201, 8080
OUT_IPERF, OUT_HTTP = 15001, 15002  # client-side proxy listeners (one per destination port)
SIDECAR_IPERF, SIDECAR_HTTP = 15443, 15444
HBONE = 15008
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
MODES = ("direct", "sidecar", "ztunnel-python", "ztunnel-c", "waypoint")
_FORTIO_QUIET = ["-grpc-port", "disabled", "-redirect-port", "disabled", "-loglevel", "error"]


# ------------------------------------------------------------------------------------------------------
# The ztunnel-py proxy process (runs inside a pod netns)

# Started the way ztunnel-py's entry point starts (dataplane/launch.py): on the C path Python's ssl is refused
# before asyncio loads, so the RSS column compares like with like.
_AS_ZTUNNEL = (
    "import importlib.util, sys; from istiopy.dataplane import launch; sys.argv = sys.argv[1:]; "
    "launch.refuse_ssl_if_c_path(sys.argv[1:]); "
    "spec = importlib.util.spec_from_file_location('bench_dataplane', sys.argv[0]); "
    "mod = importlib.util.module_from_spec(spec); sys.modules['bench_dataplane'] = mod; "
    "spec.loader.exec_module(mod); mod.main()"
)


async def _proxy(args: argparse.Namespace) -> None:
    """One side of the pair, built from exactly what ztunnel-py's core (``dataplane/proxy.py``) selects per
    byte path: ``HboneServer``/``HbonePool``/``hbone.relay`` or ``FastHboneServer``/``FastPool``/
    ``fastpath.relay``; the inbound side dials the app per CONNECT, as ``_PodProxy.on_connect`` does."""
    from istiopy.api.identity import SpiffeId
    from istiopy.api.tls import CertBundle
    from istiopy.dataplane import fastpath
    from istiopy.dataplane.tunnel import Accept, ConnectRequest, Decision, PoolKey, TcpStream, hbone_headers

    _STATE.append(_known_workloads(args.workloads))  # held for the process's life: RSS includes it
    d = Path(args.certs)
    bundle = CertBundle.from_pem(
        (d / "key.pem").read_text(), (d / "chain.pem").read_text(), (d / "roots.pem").read_text()
    )
    c_path = args.byte_path == "c"

    if args.side == "in":

        async def on_connect(req: ConnectRequest) -> Decision:
            r, w = await asyncio.open_connection(req.host, req.port)
            return Accept(TcpStream(r, w))

        lsock = socket.create_server(("0.0.0.0", HBONE), backlog=1024)
        if c_path:
            server: Any = fastpath.FastHboneServer(on_connect, bundle)
        else:  # the Python byte path and its ssl contexts, imported only when chosen (as ztunnel-py does)
            from istiopy.api.tls import server_context
            from istiopy.dataplane.hbone import HboneServer

            server = HboneServer(on_connect, server_context(bundle))
        await server.serve(lsock)
        await asyncio.Event().wait()

    dst_ip = args.dst
    expected = {SpiffeId.parse(SERVER_ID)}
    if c_path:
        pool: Any = fastpath.FastPool()
        tls: Any = bundle
    else:
        from istiopy.api.tls import client_context
        from istiopy.dataplane.hbone import HbonePool

        pool, tls = HbonePool(), client_context(bundle)
    key = PoolKey(CLIENT_ID, SERVER_ID, dst_ip)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        down = TcpStream(reader, writer)
        peer = writer.get_extra_info("peername")
        authority = f"{dst_ip}:{port}"
        try:
            up = await pool.open_stream(
                key,
                (dst_ip, HBONE),
                authority,
                hbone_headers((peer[0], peer[1])),
                tls,
                expected_identities=expected,
            )
            await fastpath.relay(down, up, splice=c_path)
        except Exception as e:  # a benchmark connection failing is reported by the load tools
            print(f"proxy: {authority}: {e!r}", file=sys.stderr)
            down.reset()

    servers = []
    for listen_port, dst_port in ((OUT_IPERF, IPERF_PORT), (OUT_HTTP, HTTP_PORT)):

        async def cb(r: asyncio.StreamReader, w: asyncio.StreamWriter, p: int = dst_port) -> None:
            await handle(r, w, p)

        servers.append(await asyncio.start_server(cb, "127.0.0.1", listen_port, backlog=1024))
    await asyncio.gather(*(s.serve_forever() for s in servers))


_STATE: list[object] = []


def _known_workloads(n: int) -> object:
    """ztunnel-py's own WDS state holding ``n`` workloads (in services of 10), as the RSS target asks:
    the same ``ProxyState`` and protobuf decoding a node proxy fed by istiod keeps in memory."""
    from istiopy.dataplane.state import ProxyState
    from istiopy.testing import ztunnel as b

    st = ProxyState()
    adds = []
    for i in range(0, n, 10):
        adds.append(b.service(f"svc-{i}", "bench", f"10.96.{i // 250}.{i % 250 + 1}", {80: 8080}))
    for i in range(n):
        svc = {b.service_key(f"svc-{i - i % 10}", "bench"): {80: 8080}}
        ip = f"10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"
        adds.append(b.workload(f"wl-{i}", "bench", ip, services=svc))
    if adds:
        st.apply_addresses({b.resource_name(a): a for a in adds})
    return st


# ------------------------------------------------------------------------------------------------------
# Sidecar Envoy configuration


def _tls_common(certs: dict[str, str]) -> dict[str, Any]:
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "tls_certificates": [
            {
                "certificate_chain": {"inline_string": certs["chain"]},
                "private_key": {"inline_string": certs["key"]},
            }
        ],
        "validation_context": {"trusted_ca": {"inline_string": certs["roots"]}},
    }


def _tcp_listener(
    name: str, addr: str, port: int, cluster: str, tls: dict[str, Any] | None
) -> dict[str, Any]:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": name,
                    "cluster": cluster,
                },
            }
        ]
    }
    if tls is not None:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": tls,
            },
        }
    return {
        "name": name,
        "address": {"socket_address": {"address": addr, "port_value": port}},
        "filter_chains": [chain],
    }


def _sa(addr: str, port: int) -> dict[str, Any]:
    return {"address": addr, "port_value": port}


def _cluster(name: str, addr: str, port: int, tls: dict[str, Any] | None) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": addr, "port_value": port}}}}
                    ]
                }
            ],
        },
    }
    if tls is not None:
        c["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": tls,
            },
        }
    return c


def sidecar_bootstrap(side: str, certs: dict[str, str], server_ip: str) -> dict[str, Any]:
    tls = _tls_common(certs)
    if side == "out":
        listeners = [
            _tcp_listener("out_iperf", "127.0.0.1", OUT_IPERF, "iperf", None),
            _tcp_listener("out_http", "127.0.0.1", OUT_HTTP, "http", None),
        ]
        clusters = [
            _cluster("iperf", server_ip, SIDECAR_IPERF, tls),
            _cluster("http", server_ip, SIDECAR_HTTP, tls),
        ]
    else:
        listeners = [
            _tcp_listener("in_iperf", "0.0.0.0", SIDECAR_IPERF, "iperf", tls),
            _tcp_listener("in_http", "0.0.0.0", SIDECAR_HTTP, "http", tls),
        ]
        clusters = [
            _cluster("iperf", "127.0.0.1", IPERF_PORT, None),
            _cluster("http", "127.0.0.1", HTTP_PORT, None),
        ]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


# ------------------------------------------------------------------------------------------------------
# Measurements


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def iperf(pod: Any, host: str, port: int, streams: int, seconds: float) -> float:
    res = pod.run(
        ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"],
        timeout=seconds + 30,
        check=False,
    )
    try:
        data = json.loads(res.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (ValueError, KeyError):
        print(f"  iperf3 failed: {res.stdout[-300:]} {res.stderr[-300:]}", file=sys.stderr)
        return 0.0


def http_latency(pod: Any, host: str, port: int, seconds: float, qps: int = 1000) -> dict[str, float]:
    """Fixed-rate 1 KB requests; percentiles in ms and the number of requests done."""
    url = f"http://{host}:{port}/echo?size=1024"
    if FORTIO.exists():
        res = pod.run(
            [
                str(FORTIO),
                "load",
                "-qps",
                str(qps),
                "-t",
                f"{seconds}s",
                "-c",
                "8",
                "-uniform",
                "-p",
                "50,90,99",
                "-json",
                "-",
                "-quiet",
                url,
            ],
            timeout=seconds + 30,
            check=False,
        )
        try:
            data = json.loads(res.stdout)
        except ValueError:
            print(f"  fortio failed: {res.stderr[-300:]}", file=sys.stderr)
            return {}
        pct = {p["Percentile"]: p["Value"] * 1000 for p in data["DurationHistogram"]["Percentiles"]}
        codes = data.get("RetCodes", {})
        return {
            "p50": pct[50],
            "p90": pct[90],
            "p99": pct[99],
            "requests": float(data["DurationHistogram"]["Count"]),
            "errors": float(sum(v for k, v in codes.items() if k != "200")),
            "qps": float(data["ActualQPS"]),
        }
    return {}


def wait_port(pod: Any, host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pod.connect((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{host}:{port} not listening in {pod.netns}")


# ------------------------------------------------------------------------------------------------------


def start_mode(
    mode: str, client: Any, server: Any, work: Path, certs: dict[str, dict[str, str]], workers: int
) -> list[Any]:
    """Start the proxies of ``mode`` (none for direct) and wait until they listen. ``workers`` is both the
    Envoys' ``--concurrency`` and the C engine's ``ISTIOPY_WORKER_THREADS``, so neither side gets more
    threads than the other (the pure-Python path is one asyncio loop either way)."""
    from istiopy.testing.envoy import envoy_binary

    procs: list[Any] = []
    if mode == "sidecar":
        for side, pod in (("in", server), ("out", client)):
            cfg = work / f"envoy-{side}.json"
            cfg.write_text(json.dumps(sidecar_bootstrap(side, certs[side], server.ip)))
            base_id = str(os.getpid() % 1000 + len(procs))
            argv = [envoy_binary(), "-c", str(cfg), "--concurrency", str(workers)]
            argv.append("--disable-hot-restart")
            procs.append(pod.spawn([*argv, "-l", "error", "--base-id", base_id]))
        wait_port(server, server.ip, SIDECAR_HTTP)
        wait_port(client, "127.0.0.1", OUT_HTTP)
    elif mode.startswith("ztunnel-"):
        bp = mode.split("-", 1)[1]
        for side, pod in (("in", server), ("out", client)):
            argv = [
                sys.executable,
                "-P",
                "-c",
                _AS_ZTUNNEL,
                __file__,
                "proxy",
                "--side",
                side,
                "--byte-path",
                bp,
                "--workloads",
                "1000",
            ]

            env = {"ISTIOPY_WORKER_THREADS": str(workers)}
            procs.append(pod.spawn([*argv, "--certs", str(work / side), "--dst", server.ip], env=env))
            if side == "out":
                wait_port(pod, "127.0.0.1", OUT_HTTP, timeout=30)
            else:
                wait_port(pod, server.ip, HBONE, timeout=30)
    return procs


# ------------------------------------------------------------------------------------------------------
# Row 5: ztunnel-py (C path) through a real Envoy waypoint, in a whole mesh from the testing kit

WP_NS = "bench"
FILL_WORKLOADS, FILL_SERVICES, FILL_POLICIES = 1000, 500, 20


def waypoint_documents() -> str:
    """The mesh of row 5: an ambient namespace using a waypoint (the kit adds its Pod and Service, as
    Istio's waypoint controller would), a client and a server pod on separate nodes, the server Service
    with a TCP port (iperf3: the waypoint proxies it as TCP) and an HTTP port (fortio: routed at L7). Plus
    filler config every ztunnel-py holds, so its RSS is measured at the size the target names: 1000
    workloads (ServiceEntry inline endpoints, two each) in 500 services, and some policies."""
    docs = [
        f"""apiVersion: v1
kind: Namespace
metadata: {{name: {WP_NS}, labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {WP_NS}, labels: {{app: client}}}}
spec:
  nodeName: bench-0
  serviceAccountName: client
  containers: [{{name: c, ports: [{{containerPort: 9090}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: {WP_NS}, labels: {{app: server}}}}
spec:
  nodeName: bench-1
  serviceAccountName: server
  containers: [{{name: c, ports: [{{containerPort: 9090}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {WP_NS}}}
spec:
  clusterIP: 10.96.50.50
  selector: {{app: server}}
  ports:
  - {{name: tcp-iperf, port: {IPERF_PORT}, targetPort: {IPERF_PORT}, appProtocol: tcp}}
  - {{name: http, port: {HTTP_PORT}, targetPort: {HTTP_PORT}, appProtocol: http}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: {WP_NS}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Namespace
metadata: {{name: fill}}
"""
    ]
    per = FILL_WORKLOADS // FILL_SERVICES
    for s in range(FILL_SERVICES):
        ips = [s * per + e for e in range(per)]
        eps = ", ".join(f"{{address: 10.{120 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}}}" for i in ips)
        docs.append(
            f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc-{s}, namespace: fill}}
spec:
  hosts: [svc-{s}.fill.example]
  addresses: [10.97.{s // 250}.{s % 250 + 1}]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  resolution: STATIC
  location: MESH_INTERNAL
  endpoints: [{eps}]
"""
        )
    for p in range(FILL_POLICIES):
        docs.append(
            f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-{p}, namespace: fill}}
spec:
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/ns-{p}/sa/sa-{p}]}}}}]
    to: [{{operation: {{ports: ["80"]}}}}]
"""
        )
    return "---\n".join(docs)


def _descendant(pid: int, comm: str) -> int | None:
    """The first process named ``comm`` below ``pid`` (the waypoint launcher's Envoy)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        with contextlib.suppress(OSError):
            if Path(f"/proc/{p}/comm").read_text().strip() == comm:
                return p
        todo += children.get(p, [])
    return None


@contextlib.contextmanager
def waypoint_mesh(work: Path) -> Iterator[dict[str, Any]]:
    """A whole mesh from ``istiopy.testing.mesh`` (istiod-py, node agents, ztunnel-py on each node with
    the C byte path, a real Envoy waypoint), with iperf3 and fortio serving in the server pod. Yields the
    client pod, the Service VIP, the pids measured (both ztunnels, then Envoy) and the idle RSS of the
    ztunnel-py processes once they hold the whole config."""
    from istiopy.testing.mesh import Mesh

    os.environ["ISTIOPY_BYTE_PATH"] = "c"  # inherited by the kit's ztunnel-py processes
    os.environ.setdefault("ISTIOPY_WORKER_THREADS", "2")
    with Mesh(documents=waypoint_documents(), workdir=work / "mesh", log_level="warning") as mesh:
        server = mesh.pod(f"{WP_NS}/server")
        apps = [server.pod.spawn(["iperf3", "-s", "-p", str(IPERF_PORT)])]
        if FORTIO.exists():
            apps.append(
                server.pod.spawn([str(FORTIO), "server", "-http-port", str(HTTP_PORT), *_FORTIO_QUIET])
            )
        try:
            wait_port(server.pod, "127.0.0.1", IPERF_PORT)
            if FORTIO.exists():
                wait_port(server.pod, "127.0.0.1", HTTP_PORT)
            zts = [mesh.ztunnels[n] for n in sorted(mesh.ztunnels)]
            wp = mesh.waypoint(f"{WP_NS}/waypoint")
            envoy = _descendant(wp.proc.pid, "envoy")
            dump = zts[0].config_dump()
            known = {
                "workloads": len(dump.get("workloads", [])),
                "services": len(dump.get("services", [])),
                "policies": len(dump.get("policies", [])),
            }
            gc_rss = [round(_proc_rss_mb(z.proc.pid), 1) for z in zts]
            yield {
                "client": mesh.pod(f"{WP_NS}/client").pod,
                "vip": mesh.services[f"{WP_NS}/server"]["vip"],
                "pids": [z.proc.pid for z in zts] + ([envoy] if envoy else []),
                "ztunnel_rss_idle_mb": gc_rss,
                "ztunnel_known": known,
            }
        finally:
            for a in apps:
                a.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from istiopy.testing.certs import TestCA
    from istiopy.testing.netns import Topology

    ca = TestCA()
    work = Path(tempfile.mkdtemp(prefix="istiopy-bench-"))
    certs: dict[str, dict[str, str]] = {}
    for side, ident in (("out", CLIENT_ID), ("in", SERVER_ID)):
        b = ca.issue(ident).bundle
        certs[side] = {"chain": b.served_chain_pem, "key": b.key_pem, "roots": b.roots_pem}
        (work / side).mkdir()
        (work / side / "chain.pem").write_text(b.served_chain_pem)
        (work / side / "key.pem").write_text(b.key_pem)
        (work / side / "roots.pem").write_text(b.roots_pem)
    results: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "load_generator": f"fortio {FORTIO_VERSION}" if FORTIO.exists() else "none",
        "modes": {},
    }
    try:
        with contextlib.ExitStack() as stack:
            topo = stack.enter_context(Topology(prefix="ipybench"))
            n0, n1 = topo.add_node("bench-0"), topo.add_node("bench-1")
            client = topo.add_pod("client", node=n0, service_account="client")
            server = topo.add_pod("server", node=n1, service_account="server")
            for p in (client, server):
                p.run(["ip", "link", "set", "lo", "up"], check=False)
            server.spawn(["iperf3", "-s", "-p", str(IPERF_PORT)])
            if FORTIO.exists():
                server.spawn([str(FORTIO), "server", "-http-port", str(HTTP_PORT), *_FORTIO_QUIET])
            wait_port(server, "127.0.0.1", IPERF_PORT)
            if FORTIO.exists():
                wait_port(server, "127.0.0.1", HTTP_PORT)
            for mode in args.modes:
                results["modes"][mode] = {"measured": True, "rounds": []}
            mesh: dict[str, Any] = {}
            if "waypoint" in args.modes:  # one mesh for every round: ~5 s to start, config pushed once
                print("== starting the waypoint mesh (istiod-py, ztunnel-py x2, Envoy waypoint)", flush=True)
                mesh = stack.enter_context(waypoint_mesh(work))
                results["ztunnel_real"] = {
                    "rss_idle_mb": mesh["ztunnel_rss_idle_mb"],
                    "known": mesh["ztunnel_known"],
                }
            # Rounds go across modes (direct, sidecar, ..., then again): a burst of other load on the shared
            # box then hurts one round of every mode instead of every round of one mode.
            for rnd in range(args.rounds):
                for mode in args.modes:
                    print(f"== round {rnd + 1}: {mode}", flush=True)
                    r = results["modes"][mode]
                    cpod = client
                    if mode == "waypoint":  # the client pod of the mesh dials the Service VIP (captured)
                        procs: list[Any] = []
                        pids = list(mesh["pids"])
                        cpod, host, iport, hport = mesh["client"], mesh["vip"], IPERF_PORT, HTTP_PORT
                    else:
                        procs = start_mode(mode, client, server, work, certs, args.workers)
                        pids = [p.pid for p in procs]
                        local = mode != "direct"
                        host = "127.0.0.1" if local else server.ip
                        iport, hport = (OUT_IPERF, OUT_HTTP) if local else (IPERF_PORT, HTTP_PORT)
                    c0 = sum(_proc_cpu(p) for p in pids)
                    one: dict[str, Any] = {"tput_1": iperf(cpod, host, iport, 1, args.seconds)}
                    if pids and one["tput_1"]:  # proxy CPU seconds per GB moved (all proxies on the path)
                        gb = one["tput_1"] * args.seconds / 8
                        one["cpu_per_gb"] = (sum(_proc_cpu(p) for p in pids) - c0) / gb
                    one["tput_8"] = iperf(cpod, host, iport, 8, args.seconds)
                    each0 = [_proc_cpu(p) for p in pids]
                    lat = http_latency(cpod, host, hport, args.seconds * 2)
                    each1 = [_proc_cpu(p) for p in pids]
                    cpu0, cpu1 = sum(each0), sum(each1)
                    one.update(lat)
                    if pids and lat.get("requests"):
                        one["cpu_per_1k"] = (cpu1 - cpu0) / (lat["requests"] / 1000)
                        # per process, in the order of rss_mb: which proxy of the path costs what
                        one["cpu_per_1k_each"] = [
                            round((b - a) / (lat["requests"] / 1000), 4)
                            for a, b in zip(each0, each1, strict=True)
                        ]
                        one["rss_mb"] = [round(_proc_rss_mb(p), 1) for p in pids]
                    for p in procs:
                        p.stop()
                    r["rounds"].append(one)
                    print("  " + json.dumps(one), flush=True)
            for r in results["modes"].values():
                rounds = r["rounds"]
                if not rounds:
                    continue
                for key in ("tput_1", "tput_8"):  # best of N: other load only ever slows a round down
                    r[key] = max(x.get(key, 0.0) for x in rounds)
                for key in ("p50", "p90", "p99", "cpu_per_1k", "cpu_per_gb"):
                    vals = [x[key] for x in rounds if key in x]
                    if vals:
                        r[key] = min(vals)
                rss = [x["rss_mb"] for x in rounds if "rss_mb" in x]
                if rss:
                    r["rss_mb"] = [max(col) for col in zip(*rss, strict=True)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def table(results: dict[str, Any]) -> str:
    modes = results["modes"]
    base, side = modes.get("direct", {}), modes.get("sidecar", {})

    def ratio(v: float | None, ref: dict[str, Any], key: str) -> str:
        rv = ref.get(key)
        if not v or not rv:
            return "-"
        return f"{v / rv:.2f}x"

    cols = [
        "mode",
        "tput 1 (Gbps)",
        "tput 8 (Gbps)",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "CPU s/1k req",
        "CPU s/GB",
        "RSS MB",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in modes.items():
        if not r.get("measured"):
            lines.append(f"| {name} | not measured ({r.get('why', '')}) |" + " |" * (len(cols) - 2))
            continue
        cells = [name]
        for key in ("tput_1", "tput_8", "p50", "p90", "p99"):
            v = r.get(key)
            cells.append(
                f"{v:.2f} ({ratio(v, base, key)} direct, {ratio(v, side, key)} sidecar)" if v else "-"
            )
        cpu = r.get("cpu_per_1k")
        cells.append(f"{cpu:.3f} ({ratio(cpu, side, 'cpu_per_1k')} sidecar)" if cpu else "-")
        gbc = r.get("cpu_per_gb")
        cells.append(f"{gbc:.2f} ({ratio(gbc, side, 'cpu_per_gb')} sidecar)" if gbc else "-")
        cells.append("/".join(str(x) for x in r.get("rss_mb", [])) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    px = sub.add_parser("proxy")
    px.add_argument("--side", choices=("out", "in"), required=True)
    px.add_argument("--byte-path", choices=("c", "python"), required=True)
    px.add_argument("--certs", required=True)
    px.add_argument("--dst", required=True)
    px.add_argument("--workloads", type=int, default=0, help="known workloads held in ProxyState")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3, help="best of N rounds per mode")
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker threads of every proxy: Envoy --concurrency and the C engine's threads (Istio's "
        "default is 2 for sidecars and ztunnel alike; shared/reference/baselines.md used 1)",
    )
    args = ap.parse_args()
    if args.cmd == "proxy":
        asyncio.run(_proxy(args))
        return
    if os.geteuid() != 0:
        sys.exit("bench/dataplane.py needs root (network namespaces)")
    if not FORTIO.exists():
        print(f"note: {FORTIO} missing (make bench builds it); latency columns stay empty", file=sys.stderr)
    results = run(args)
    print(f"worker threads per proxy: {results['workers']} (Envoy --concurrency, C engine threads)")
    print(table(results))
    real = results.get("ztunnel_real")
    if real:
        k = real["known"]
        print(
            f"ztunnel-py (real process, xDS from istiod-py) holding {k['workloads']} workloads, "
            f"{k['services']} services, {k['policies']} policies: RSS idle "
            + "/".join(str(x) for x in real["rss_idle_mb"])
            + " MB"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"dataplane-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
