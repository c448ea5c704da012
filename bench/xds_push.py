"""xDS push benchmark: N delta proxies, M services; change -> all acked, full push, RSS; generation time on
Istio's own benchmark configs.

Part 1 (push): the server (store + Envoy generators + pipeline + gRPC, istiod's 100 ms debounce) runs in
this process; N delta ADS clients (``istiopy.api.xds_client``, wildcard CDS/EDS/LDS/RDS) run in a child
process, so the server's CPU and RSS are its own. Measured:

- full push: from the clients' start until every proxy acked all four types (every resource to everyone),
  and the server CPU it took;
- change -> acked: per proxy, from ``store.apply`` to its ACK of the resulting responses, for an endpoint
  change (a pod added: EDS) and a service change (a service added: CDS, EDS, RDS), debounce included;
- the baseline: serializing the same resources once per proxy with plain protobuf (what a server that
  builds each connection's response separately pays at least), and the ratio of our push to it.

Part 2 (generation): Istio's ``pilot/pkg/xds/testdata/benchmarks`` templates rendered at 100 services
(``range`` blocks expanded here), loaded through the model, and each registered generator timed per proxy
(generate only, and generate + deterministic serialization + sha256). Upstream runs these for a waypoint;
our Envoy generator is the minimal sidecar-style one and WDS/WADS are ztunnel's, so set the figures beside
istiod's knowing the outputs differ in shape.

Run: ``.venv/bin/python bench/xds_push.py [--proxies 100] [--services 1000] [--iterations 10]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

UPSTREAM = Path(__file__).resolve().parents[2] / "shared" / "reference" / "upstream-benchmarks"
if not UPSTREAM.exists():
    UPSTREAM = Path("/work/shared/reference/upstream-benchmarks")
CONFIGS = ("http", "tcp", "virtualservice", "authorizationpolicy")


# ------------------------------------------------------------------------------------------ clients
async def run_clients(port: int, n: int) -> None:
    """Child process: N delta clients; exits when stdin closes."""
    from envoy.config.core.v3 import base_pb2

    from istiopy.api.xds_client import DeltaXdsClient

    types = [
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        "type.googleapis.com/envoy.config.listener.v3.Listener",
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
    ]
    clients = []
    for i in range(n):
        node = base_pb2.Node(
            id=f"sidecar~10.1.{i // 250}.{i % 250}~bench-{i}.default~default.svc.cluster.local"
        )
        c = DeltaXdsClient(f"127.0.0.1:{port}", node)
        for t in types:
            c.subscribe(t)
        clients.append(c)
    for c in clients:
        await c.start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for c in clients:
        await c.stop()


# --------------------------------------------------------------------------------------------- model
def service_doc(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": "default"},
        "spec": {
            "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
            "selector": {"app": f"svc-{i}"},
            "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
        },
    }


def pod_doc(i: int, replica: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"svc-{i}-{replica}", "namespace": "default", "labels": {"app": f"svc-{i}"}},
        "spec": {"containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": f"10.{100 + replica}.{i // 250}.{i % 250 + 1}"},
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def rss_mb() -> tuple[float, float]:
    status = Path("/proc/self/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    hwm = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss / 1024, hwm / 1024


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def push_bench(n: int, m: int, iterations: int, debounce: float) -> list[tuple[str, str]]:
    from envoy.service.discovery.v3 import discovery_pb2

    from istiopy.mesh.kinds import parse
    from istiopy.mesh.store import ConfigStore
    from istiopy.xds.envoygen import register_envoy_generators
    from istiopy.xds.push import PushPipeline
    from istiopy.xds.registry import GeneratorRegistry
    from istiopy.xds.server import ServerOptions, XdsServer

    rows: list[tuple[str, str]] = []
    store = ConfigStore()
    for i in range(m):
        store.apply(parse(service_doc(i)))
        store.apply(parse(pod_doc(i)))
    registry = GeneratorRegistry()
    register_envoy_generators(registry)
    pipeline = PushPipeline(store, registry, debounce_after=debounce, debounce_max=10.0)
    server = XdsServer(pipeline, ServerOptions(plaintext_address="127.0.0.1:0"))
    await pipeline.start()
    port = (await server.start())["plaintext"]
    rss0, _ = rss_mb()

    def synced(since: float) -> dict[int, float] | None:
        """Per connection: time of the last ACK for responses sent after ``since``, once all are acked."""
        if len(server.connections) < n:
            return None
        out = {}
        for conn in list(server.connections.values()):
            sts = list(conn.stream.types.values())
            if len(sts) < 4 or any(st.acked_nonce != st.sent_nonce or not st.sent_nonce for st in sts):
                return None
            recent = [
                st.ack_time
                for st in sts
                if st.sent_time is not None and st.sent_time >= since and st.ack_time is not None
            ]
            if not recent:
                return None
            out[conn.id] = max(recent)
        return out

    async def wait_synced(since: float, limit: float = 60.0) -> dict[int, float]:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            got = synced(since)
            if got is not None:
                return got
            await asyncio.sleep(0.002)
        raise TimeoutError(f"proxies did not converge within {limit}s")

    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--clients", str(port), str(n), stdin=asyncio.subprocess.PIPE
    )
    try:
        t0, c0 = time.monotonic(), cpu()
        await wait_synced(t0, limit=90)
        full = time.monotonic() - t0
        full_cpu = cpu() - c0
        rss1, hwm1 = rss_mb()
        snap = next(iter(server.connections.values())).stream.snapshot
        resources = [r for typed in snap.resources.values() for r in typed.items.values()]
        nbytes = sum(len(r.serialized) for r in resources)

        # Baseline: each proxy's full response serialized on its own with plain protobuf.
        b0 = time.perf_counter()
        for _ in range(n):
            for typed in snap.resources.values():
                resp = discovery_pb2.DeltaDiscoveryResponse(type_url=typed.type_url)
                for r in typed.items.values():
                    item = resp.resources.add(name=r.name, version=r.version)
                    item.resource.Pack(r.message, deterministic=True)
                resp.SerializeToString()
        baseline_full = time.perf_counter() - b0
        rows += [
            (
                "proxies x services",
                f"{n} x {m} ({len(resources)} resources/proxy, {nbytes / 1e6:.1f} MB/proxy)",
            ),
            (
                "full push: all proxies acked everything",
                f"{full * 1000:.0f} ms wall, server CPU {full_cpu:.2f} s",
            ),
            (
                "  baseline: per-proxy protobuf serialization",
                f"{baseline_full * 1000:.0f} ms (server CPU / baseline = {full_cpu / baseline_full:.2f}x)",
            ),
            (
                "server RSS before clients / after full push",
                f"{rss0:.0f} MB / {rss1:.0f} MB (peak {hwm1:.0f} MB)",
            ),
        ]

        async def measure(kind: str, make: Any) -> None:
            per_proxy: list[float] = []
            all_acked: list[float] = []
            pushes: list[float] = []
            base: list[float] = []
            server_push: list[float] = []
            server_cpu: list[float] = []
            for it in range(iterations):
                change = make(it)
                c0 = cpu()
                t = time.monotonic()
                store.apply(change)
                acks = await wait_synced(t)
                server_cpu.append(cpu() - c0)
                server_push.append(pipeline.last_push.duration)
                lat = [a - t for a in acks.values()]
                per_proxy += lat
                all_acked.append(max(lat))
                pushes.append(max(lat) - debounce)
                # Baseline for this change: serialize the changed resources once per proxy.
                snap = next(iter(server.connections.values())).stream.snapshot
                changed = [
                    r
                    for typed in snap.resources.values()
                    for r in typed.items.values()
                    if r.name.endswith(f"svc-x{it}.default.svc.cluster.local")
                    or (kind == "endpoint" and r.name == f"outbound|80||svc-{it}.default.svc.cluster.local")
                ]
                if kind == "service":
                    changed += list(
                        snap.resources[
                            "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
                        ].items.values()
                    )
                b0 = time.perf_counter()
                for _ in range(n):
                    resp = discovery_pb2.DeltaDiscoveryResponse()
                    for r in changed:
                        resp.resources.add(name=r.name, version=r.version).resource.Pack(
                            r.message, deterministic=True
                        )
                    resp.SerializeToString()
                base.append(time.perf_counter() - b0)
            rows.append(
                (
                    f"{kind} change -> acked, per proxy p50 / p99",
                    f"{pct(per_proxy, 50) * 1000:.0f} / {pct(per_proxy, 99) * 1000:.0f} ms",
                )
            )
            rows.append(
                (
                    f"{kind} change -> all {n} acked p50 / p99",
                    f"{pct(all_acked, 50) * 1000:.0f} / {pct(all_acked, 99) * 1000:.0f} ms "
                    f"(minus {debounce * 1000:.0f} ms debounce: {pct(pushes, 50) * 1000:.0f} / "
                    f"{pct(pushes, 99) * 1000:.0f} ms)",
                )
            )
            rows.append(
                (
                    f"  server: generate + hand to {n} writers / server CPU",
                    f"{statistics.median(server_push) * 1000:.0f} ms / "
                    f"{statistics.median(server_cpu) * 1000:.0f} ms",
                )
            )
            rows.append(
                (
                    f"  baseline: serialize its resources x {n}",
                    f"{statistics.median(base) * 1000:.1f} ms (push / baseline = "
                    f"{pct(pushes, 50) / max(statistics.median(base), 1e-9):.1f}x)",
                )
            )

        await measure("endpoint", lambda it: parse(pod_doc(it, replica=1)))
        await measure(
            "service",
            lambda it: parse(
                {**service_doc(m + it), "metadata": {"name": f"svc-x{it}", "namespace": "default"}}
            ),
        )
        rss2, hwm2 = rss_mb()
        rows.append(("server RSS at end", f"{rss2:.0f} MB (peak {hwm2:.0f} MB)"))
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 10)
        except TimeoutError:
            child.kill()
            await child.wait()
        await server.stop(0.5)
        await pipeline.stop()
    return rows


# ------------------------------------------------------------------------------------- upstream configs
_RANGE = re.compile(r"\{\{-?\s*range \$i := until \.Services\s*-?\}\}(.*?)\{\{-?\s*end\s*-?\}\}", re.S)


def render(template: str, services: int) -> str:
    """Expand Go-template ``range $i := until .Services`` blocks with ``$i``, ``div``, ``mod``."""

    def expand(block: str, i: int) -> str:
        block = re.sub(r"\{\{\s*div \$i (\d+)\s*\}\}", lambda mt: str(i // int(mt.group(1))), block)
        block = re.sub(r"\{\{\s*mod \$i (\d+)\s*\}\}", lambda mt: str(i % int(mt.group(1))), block)
        return re.sub(r"\{\{\s*\$i\s*\}\}", str(i), block)

    out = _RANGE.sub(lambda mt: "".join("\n" + expand(mt.group(1), i) for i in range(services)), template)
    if "{{" in out:
        raise ValueError(f"unrendered template construct: {out[out.index('{{') :][:60]!r}")
    return out


def generation_bench(services: int = 100, repeat: int = 5) -> tuple[list[list[str]], list[str]]:
    import yaml
    from envoy.config.core.v3 import base_pb2

    from istiopy.mesh.errors import InvalidResource
    from istiopy.mesh.kinds import parse
    from istiopy.mesh.store import ConfigStore
    from istiopy.xds.cache import TypedResources
    from istiopy.xds.envoygen import register_envoy_generators
    from istiopy.xds.proxy import Proxy
    from istiopy.xds.registry import GeneratorRegistry
    from istiopy.xds.types import short_name

    registry = GeneratorRegistry()
    register_envoy_generators(registry, proxy_kinds=("sidecar",))
    notes: list[str] = []
    try:
        from istiopy.xds.wds import register_ambient_generators

        register_ambient_generators(registry)
    except ImportError as e:
        notes.append(f"WDS/WADS generators not available ({e})")
    proxies = {
        "sidecar": Proxy.from_node(
            base_pb2.Node(id="sidecar~1.1.1.1~bench.default~default.svc.cluster.local")
        ),
        "ztunnel": Proxy.from_node(
            base_pb2.Node(id="ztunnel~1.1.1.1~zt.istio-system~istio-system.svc.cluster.local")
        ),
    }
    consumed = {
        "sidecar": {"Service", "Pod", "EndpointSlice", "ServiceEntry"},
        "ztunnel": {
            "Service",
            "Pod",
            "ServiceEntry",
            "WorkloadEntry",
            "AuthorizationPolicy",
            "PeerAuthentication",
            "Namespace",
            "Gateway",
        },
    }
    rows: list[list[str]] = []
    for name in CONFIGS:
        path = UPSTREAM / f"{name}.yaml"
        if not path.exists():
            notes.append(f"{name}: {path} missing")
            continue
        store = ConfigStore()
        kinds: dict[str, int] = {}
        failed: list[str] = []
        for doc in yaml.safe_load_all(render(path.read_text(), services)):
            if not doc:
                continue
            try:
                res = parse(doc, default_namespace="default")
            except (InvalidResource, KeyError, ValueError) as e:
                failed.append(f"{doc.get('kind')}: {str(e).splitlines()[0][:80]}")
                continue
            store.apply(res)
            kinds[res.KIND] = kinds.get(res.KIND, 0) + 1
        unused = sorted(k for k in kinds if not any(k in c for c in consumed.values()))
        notes.append(
            f"{name}: loaded {', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}"
            + (f"; not read by any generator: {', '.join(unused)}" if unused else "")
            + (f"; refused: {len(failed)} ({failed[0]})" if failed else "")
        )
        for kind, proxy in proxies.items():
            for gen in registry.generators():
                if gen.proxy_kinds and kind not in gen.proxy_kinds:
                    continue
                gen_times, full_times, count = [], [], 0
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    pairs = list(gen.generate(store, proxy))
                    t1 = time.perf_counter()
                    typed = TypedResources.build(gen.type_url, pairs)
                    for r in typed.items.values():
                        _ = r.version
                    t2 = time.perf_counter()
                    gen_times.append(t1 - t0)
                    full_times.append(t2 - t0)
                    count = len(pairs)
                rows.append(
                    [
                        name,
                        kind,
                        short_name(gen.type_url),
                        str(count),
                        f"{full_times[0] * 1000:.2f}",
                        f"{statistics.median(gen_times) * 1000:.2f}",
                        f"{statistics.median(full_times) * 1000:.2f}",
                    ]
                )
    return rows, notes


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--clients":
        asyncio.run(run_clients(int(sys.argv[2]), int(sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--proxies", type=int, default=100)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--debounce", type=float, default=0.1)
    ap.add_argument("--upstream-services", type=int, default=100)
    args = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    print(f"xDS push benchmark (pid {os.getpid()}, {os.cpu_count()} CPUs)\n")
    rows = asyncio.run(push_bench(args.proxies, args.services, args.iterations, args.debounce))
    print(table(["measure", "value"], [list(r) for r in rows]))
    print(
        f"\nGeneration per proxy per type, upstream benchmark configs at {args.upstream_services} services "
        "(first run cold; then median of 5 with the generators' memo warm, as on a repeat push)\n"
    )
    gen_rows, notes = generation_bench(args.upstream_services)
    print(
        table(
            ["config", "proxy", "type", "resources", "first (cold) ms", "generate ms", "gen+ser+hash ms"],
            gen_rows,
        )
    )
    print()
    for note in notes:
        print(f"- {note}")
    print(f"\ntotal {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
