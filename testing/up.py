"""``istiod-py up`` / ``make demo``: a whole mesh on this machine, traffic through it, and a report.

``python -P -m istiopy.testing.up --config-dir examples/ [--hold] [--rounds N]``

What a newcomer should see, in order: the parts starting (a progress display), the mesh that came up
(istiod, nodes with their ztunnel-py, pods with their SPIFFE identities, waypoints), then one round of traffic
from every ambient pod to every Service, each request with its path (ztunnel -> ztunnel, or ztunnel ->
waypoint -> ztunnel), the identities the destination ztunnel recorded, who decided (L4 policy at the
destination ztunnel, L7 at the waypoint), the canary split of services with several versions, and the
metrics. ``--hold`` keeps it running and re-runs the round whenever a file under the config directory
changes, so an edit shows its effect live; Ctrl-C tears everything down.

Everything here drives the public kit (``istiopy.testing.mesh.Mesh``); nothing is simulated.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import re
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from istiopy.testing.mesh import Mesh, MeshError, MeshPod, Response, requirements_missing

CANARY_REQUESTS = 50


@dataclass
class Call:
    source: MeshPod
    target: str  # ns/service
    port: int
    path: str
    response: Response | None = None
    error: str = ""
    waypoint: str = ""  # the service's waypoint, from ztunnel's view
    decision: str = ""
    identities: str = ""


def _console() -> Console:
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _targets(mesh: Mesh) -> list[tuple[str, int, str]]:
    """(ns/service, port, path) for every Service port except waypoints' own."""
    out = []
    for key, svc in sorted(mesh.services.items()):
        if not svc.get("vip"):
            continue
        ns, name = key.split("/")
        if any(w.split("/") == [ns, name] for w in mesh.waypoints):
            continue
        for p in svc["ports"]:
            port = int(p.get("port", 0))
            pname = str(p.get("name", ""))
            if port in (15008,):
                continue
            path = "/admin/status" if "admin" in pname or "admin" in name else "/api/hello"
            out.append((key, port, path))
    return out


def _service_waypoints(mesh: Mesh) -> dict[str, str]:
    """``ns/service`` -> waypoint description, as ztunnel-py has it (its admin config dump)."""
    out: dict[str, str] = {}
    with contextlib.suppress(Exception):
        zt = next(iter(mesh.ztunnels.values()))
        for s in zt.config_dump().get("services", []):
            wp = s.get("waypoint")
            if wp:
                out[f"{s.get('namespace')}/{s.get('name')}"] = str(
                    wp.get("destination") if isinstance(wp, dict) else wp
                )
    return out


def _log_marks(mesh: Mesh) -> dict[str, int]:
    return {n: zt.log.stat().st_size if zt.log.exists() else 0 for n, zt in mesh.ztunnels.items()}


def _refusals_since(mesh: Mesh, marks: dict[str, int]) -> list[str]:
    out = []
    for n, zt in mesh.ztunnels.items():
        with open(zt.log, "rb") as f:
            f.seek(marks.get(n, 0))
            for line in f.read().decode(errors="replace").splitlines():
                if " refused: " in line:
                    out.append(f"{n}: " + line.split(" refused: ", 1)[1])
    return out


def _principals_seen(mesh: Mesh) -> set[tuple[str, str]]:
    """(source, destination) principals ztunnel-py recorded: as destination for pod-to-pod hops, as source
    for the hop into a waypoint (a waypoint is Envoy, reporting HTTP metrics instead)."""
    return {(m.get("source_principal", ""), m.get("destination_principal", "")) for m in mesh.tcp_metrics()}


def _short(spiffe: str) -> str:
    return spiffe.removeprefix("spiffe://").split("/", 1)[-1].replace("ns/", "").replace("/sa/", "/")


def _policies(mesh: Mesh) -> list[dict[str, Any]]:
    """The AuthorizationPolicies istiod-py holds now (its ``/debug/configz``), to name who decided."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{mesh.ports['monitoring']}/debug/configz", timeout=5
        ) as r:
            data = json.loads(r.read())
    except (OSError, ValueError):
        return []
    return [x for x in data.get("resources", []) if x.get("kind") == "AuthorizationPolicy"]


def _name(p: dict[str, Any]) -> str:
    m = p.get("metadata") or {}
    action = (p.get("spec") or {}).get("action") or "ALLOW"
    return f"{m.get('namespace')}/{m.get('name')} ({action})"


def _l4_for(pod: MeshPod, policies: list[dict[str, Any]]) -> list[str]:
    """Policies ztunnel applies to ``pod``: selector (or none) in its namespace, or the root namespace."""
    out = []
    for p in policies:
        spec, ns = p.get("spec") or {}, (p.get("metadata") or {}).get("namespace")
        if spec.get("targetRefs") or spec.get("targetRef"):
            continue
        if ns not in (pod.namespace, "istio-system"):
            continue
        sel = (spec.get("selector") or {}).get("matchLabels") or {}
        if all(pod.labels.get(k) == v for k, v in sel.items()):
            out.append(_name(p))
    return out


def _l7_for(target: str, policies: list[dict[str, Any]]) -> list[str]:
    """Policies the waypoint applies to Service ``target`` (``targetRefs`` naming it)."""
    ns, name = target.split("/")
    out = []
    for p in policies:
        spec = p.get("spec") or {}
        refs = list(spec.get("targetRefs") or []) + ([spec["targetRef"]] if spec.get("targetRef") else [])
        if (p.get("metadata") or {}).get("namespace") == ns and any(
            r.get("kind") == "Service" and r.get("name") == name for r in refs
        ):
            out.append(_name(p))
    return out


def _by(names: list[str], none: str) -> str:
    return ", ".join(names) if names else none


def traffic_round(mesh: Mesh) -> list[Call]:
    waypoints = _service_waypoints(mesh)
    policies = _policies(mesh)
    calls: list[Call] = []
    clients = [p for p in mesh.pods.values() if p.ambient and p.waypoint_for is None]
    # Besides every Service, each pod that an L4 policy protects, addressed directly (no Service, so no
    # waypoint either): the destination ztunnel's decision alone.
    direct: dict[tuple[str, str], tuple[str, int, str]] = {}
    for p in sorted(mesh.pods.values(), key=lambda p: p.name):
        if p.ambient and p.waypoint_for is None and _l4_for(p, policies):
            direct.setdefault(
                (p.namespace, p.labels.get("app", p.name)), (f"{p.namespace}/{p.name}", p.ports[0], "/direct")
            )
    for src in clients:
        for target, port, path in _targets(mesh) + list(direct.values()):
            try:
                if mesh.pod(target).name == src.name:
                    continue
            except KeyError:
                pass
            call = Call(src, target, port, path, waypoint=waypoints.get(target, ""))
            marks = _log_marks(mesh)
            try:
                call.response = src.request(target, port, path, timeout=5)
            except (ConnectionError, OSError) as e:
                call.error = type(e).__name__
            l7 = _l7_for(target, policies)
            if call.response is None:
                time.sleep(0.1)  # the destination logs its refusal just after the reset
                refusals = _refusals_since(mesh, marks)
                guard = ""
                if target not in mesh.services:
                    with contextlib.suppress(KeyError):
                        guard = " under " + _by(_l4_for(mesh.pod(target), policies), "no policy")
                call.decision = (
                    f"L4 deny at ztunnel{guard}: " + "; ".join(refusals) if refusals else "connection refused"
                )
            elif (call.response.via_waypoint or call.waypoint) and call.response.status in (401, 403):
                call.decision = (
                    f"L7 deny at waypoint by {_by(l7, 'its policy')}: {call.response.text.strip()[:40]}"
                )
            else:
                served = _served_pod(mesh, call)
                l4 = _by(_l4_for(served, policies), "no L4 policy") if served else "?"
                if call.response.via_waypoint or call.waypoint:
                    call.decision = f"allowed at waypoint by {_by(l7, 'no L7 policy')}; at ztunnel by {l4}"
                else:
                    call.decision = f"allowed at ztunnel by {l4}"
            calls.append(call)
    seen = _principals_seen(mesh)
    for c in calls:
        if c.response is None:
            continue
        served = _served_pod(mesh, c)
        if served is None:
            continue
        chain = [c.source.spiffe_id]
        if c.response.via_waypoint or c.waypoint:
            wp = next((w for w in mesh.waypoints.values() if w.namespace == served.namespace), None)
            if wp is not None:
                chain.append(wp.pod.spiffe_id)
        chain.append(served.spiffe_id)
        checks = ["✓" if (a, b) in seen else "?" for a, b in itertools.pairwise(chain)]
        c.identities = " → ".join(
            _short(chain[0]) if i == 0 else f"{checks[i - 1]} {_short(x)}" for i, x in enumerate(chain)
        )
    return calls


def _label(pod: MeshPod) -> str:
    """A pod as people name it: its app (and version) label, else its name."""
    app = pod.labels.get("app")
    if not app:
        return pod.name
    return f"{app}-{pod.labels['version']}" if "version" in pod.labels else app


def _target_label(mesh: Mesh, c: Call) -> str:
    if c.target in mesh.services:
        return f"{c.target}:{c.port}{c.path}"
    pod = mesh.pod(c.target)
    return f"pod {pod.namespace}/{_label(pod)} ({pod.ip}:{c.port})"


def _served_pod(mesh: Mesh, c: Call) -> MeshPod | None:
    if c.response is None:
        return None
    try:
        return mesh.pod(f"{c.target.split('/')[0]}/{c.response.json().get('pod', '')}")
    except (KeyError, ValueError, AttributeError):
        return None


def canary(mesh: Mesh) -> list[tuple[str, dict[str, int]]]:
    """Services backed by several versions: who served CANARY_REQUESTS requests from the first client."""
    out = []
    clients = [p for p in mesh.pods.values() if p.ambient and p.waypoint_for is None]
    for target, port, path in _targets(mesh):
        ns, name = target.split("/")
        backends = [p for p in mesh.pods.values() if p.namespace == ns and p.labels.get("app") == name]
        if len({p.labels.get("version") for p in backends}) < 2:
            continue
        src = next((c for c in clients if c.namespace != ns), clients[0] if clients else None)
        if src is None:
            continue
        counts: collections.Counter[str] = collections.Counter()
        for _ in range(CANARY_REQUESTS):
            try:
                r = src.request(target, port, path, timeout=5)
                pod = r.json().get("pod", "?") if r.status == 200 else f"HTTP {r.status}"
                version = next((p.labels.get("version", pod) for p in backends if p.name == pod), pod)
                counts[version] += 1
            except (ConnectionError, OSError, ValueError):
                counts["refused"] += 1
        out.append((f"{src.namespace}/{src.name} → {target}:{port}", dict(counts)))
    return out


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
    return total


def report(mesh: Mesh, calls: list[Call], split: list[tuple[str, dict[str, int]]], console: Console) -> None:
    t = Table(title="The mesh", title_justify="left")
    for col in ("Component", "Where", "Details"):
        t.add_column(col)
    t.add_row("istiod-py", "host", ", ".join(f"{k} 127.0.0.1:{v}" for k, v in sorted(mesh.ports.items())))
    for name, zt in mesh.ztunnels.items():
        pods = [p for p in mesh.pods.values() if p.node == name and p.ambient]
        t.add_row("ztunnel-py", name, f"admin :{zt.admin_port}, {len(pods)} captured pods")
    for key, wp in mesh.waypoints.items():
        t.add_row("waypoint (Envoy)", wp.pod.node, f"{key} at {wp.pod.ip}:15008, {wp.pod.spiffe_id}")
    for p in sorted(mesh.pods.values(), key=lambda p: (p.namespace, p.name)):
        if p.waypoint_for is None:
            mode = "ambient" if p.ambient else "not captured"
            t.add_row("pod", p.node, f"{p.namespace}/{p.name} {p.ip} {p.spiffe_id} ({mode})")
    console.print(t)

    r = Table(title="Requests (one round)", title_justify="left", show_lines=False)
    for col in ("From", "To", "Result", "Path", "Identities (✓ = recorded by ztunnel)", "Decision"):
        r.add_column(col, overflow="fold")
    for c in calls:
        if c.response is not None:
            who = _served_pod(mesh, c)
            served = _label(who) if who is not None else c.response.headers.get("x-served-by", "")
            result = (
                f"[green]{c.response.status}[/] {served}"
                if c.response.status < 400
                else (f"[red]{c.response.status}[/]")
            )
        else:
            result = "[red]reset[/]"
        via = bool(c.waypoint) or (c.response is not None and c.response.via_waypoint)
        hops = "ztunnel → waypoint → ztunnel" if via else "ztunnel → ztunnel"
        r.add_row(
            f"{c.source.namespace}/{_label(c.source)}",
            _target_label(mesh, c),
            result,
            hops,
            c.identities or "-",
            c.decision,
        )
    console.print(r)

    if split:
        s = Table(title=f"Canary split ({CANARY_REQUESTS} requests)", title_justify="left")
        s.add_column("Traffic")
        s.add_column("Served by")
        for what, counts in split:
            s.add_row(what, ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        console.print(s)

    m = Table(title="Metrics", title_justify="left")
    m.add_column("Where")
    m.add_column("Series", overflow="fold")
    m.add_column("Value", justify="right")
    tcp: collections.Counter[tuple[str, str, str]] = collections.Counter()
    for d in mesh.tcp_metrics():
        tcp[
            (
                d.get("reporter", ""),
                _short(d.get("source_principal", "")),
                _short(d.get("destination_principal", "")),
            )
        ] += int(float(d["value"]))
    for (rep, src, dst), n in sorted(tcp.items()):
        m.add_row("ztunnel", f"istio_tcp_connections_opened_total reporter={rep} {src} → {dst}", str(n))
    http: collections.Counter[tuple[str, str]] = collections.Counter()
    for d in mesh.http_metrics(settle=5.0):  # counts the last requests' access logs too
        http[(d.get("destination_service", ""), d.get("response_code", ""))] += int(float(d["value"]))
    for (svc, code), n in sorted(http.items()):
        m.add_row("waypoint", f"istio_requests_total {svc} code={code}", str(n))
    text = mesh.istiod_metrics()
    for name in (
        "pilot_xds_pushes",
        "pilot_xds",
        "citadel_server_csr_count",
        "citadel_server_success_cert_issuance_count",
    ):
        m.add_row("istiod", name, f"{_metric_sum(text, name):g}")
    console.print(m)


def _snapshot(config: Path) -> dict[str, float]:
    files = [config] if config.is_file() else [p for p in config.rglob("*") if p.is_file()]
    return {str(p): p.stat().st_mtime for p in files}


def _round(mesh: Mesh, console: Console) -> None:
    with console.status("driving traffic through the mesh ..."):
        calls = traffic_round(mesh)
        split = canary(mesh)
    report(mesh, calls, split, console)


def run(args: argparse.Namespace) -> int:
    console = _console()
    why = requirements_missing()
    if why:
        console.print(f"[bold red]istiod-py up:[/] this {why}.")
        console.print(
            "The config alone can be inspected without it: istiod-py demo --config-only --config-dir DIR"
        )
        return 1
    config = Path(args.config_dir)
    if not config.exists():
        console.print(f"[bold red]istiod-py up:[/] --config-dir {config}: no such file or directory")
        return 2
    workdir = Path(args.state_dir) / "up"
    rounds = args.rounds if args.rounds is not None else 1
    try:
        with console.status("bringing the mesh up ...") as status:

            def progress(msg: str) -> None:
                status.update(msg + " ...")
                console.log(msg)

            mesh = Mesh(
                config, workdir=workdir, keep_workdir=True, ztunnel_log_level="info", progress=progress
            )
            mesh.__enter__()
    except MeshError as e:
        console.print(f"[bold red]istiod-py up: the mesh did not come up:[/] {e}")
        return 1
    try:
        seen = _snapshot(config)  # before the first round: an edit made during it still counts
        version = mesh.config_version()
        for _ in range(max(rounds, 1)):
            _round(mesh, console)
        if args.hold:
            console.print(
                f"[bold]Mesh running.[/] Edit files under {config} to change it live; logs in {workdir}. "
                "Ctrl-C tears everything down."
            )
            while True:
                time.sleep(1.0)
                now = _snapshot(config)
                if now != seen:
                    diff = {k for k in set(now) | set(seen) if now.get(k) != seen.get(k)}
                    changed = ", ".join(sorted(re.sub(r"^.*/", "", k) for k in diff))
                    seen = now
                    console.rule(f"config changed ({changed}); re-running the traffic round")
                    with contextlib.suppress(MeshError):  # an edit that changes nothing times out here
                        mesh.wait_synced(since=version, timeout=10)
                    version = mesh.config_version()
                    _round(mesh, console)
    except KeyboardInterrupt:
        console.print("tearing down ...")
    finally:
        mesh.close()
    console.print("mesh torn down.")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="istiod-py up")
    p.add_argument("--config-dir", required=True)
    p.add_argument("--state-dir", default=".istiopy")
    p.add_argument("--namespace", default="default")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--hold", action="store_true")
    try:
        return run(p.parse_args(argv))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
