"""ztunnel-py's three small HTTP servers: admin (15000), metrics (15020) and readiness (15021).

Why three listeners as upstream: the admin API exposes the whole config and a shutdown switch, so it binds to
localhost only, while metrics and readiness are scraped/probed from outside the pod.
``istioctl ztunnel-config`` reads ``/config_dump`` and expects upstream's JSON shape, so :func:`config_dump`
produces exactly that shape (camelCase keys; ``workloads``/``services``/``policies``/``certificates`` lists
and a ``workloadState`` map).

The servers are a few lines of HTTP/1.1 on asyncio streams rather than aiohttp's: they answer a probe, a
scrape or an ``istioctl`` GET, and aiohttp's import alone added ~8 MB to every node proxy's RSS (the RSS
target: <= 40 MB holding 1000 workloads). Each response closes its connection (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from istiopy.dataplane.metrics import ConnectionTracker, Metrics
from istiopy.dataplane.state import GatewayAddress, ProxyState, Service, Workload

log = logging.getLogger("istiopy.ztunnel.admin")

LOGGER_ROOT = "istiopy"


@dataclass
class LocalWorkloadInfo:
    """A pod this ztunnel serves (learned over ZDS): what ``workloadState`` shows even before WDS knows it."""

    uid: str
    name: str
    namespace: str
    service_account: str
    trust_domain: str = ""
    state: str = "Up"


@dataclass
class AdminSources:
    """Where the admin API reads from; each piece is optional so the servers run before everything exists."""

    state: ProxyState
    metrics: Metrics
    tracker: ConnectionTracker | None = None
    certificates: Callable[[], list[dict[str, Any]]] = list
    local_workloads: Callable[[], Iterable[LocalWorkloadInfo]] = tuple
    ready: Callable[[], bool] | None = None
    shutdown: Callable[[], Awaitable[None] | None] | None = None
    config: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# /config_dump


def _gateway_json(gw: GatewayAddress | None) -> dict[str, Any] | None:
    if gw is None:
        return None
    return {"destination": gw.destination, "hboneMtlsPort": gw.hbone_mtls_port}


def workload_json(wl: Workload) -> dict[str, Any]:
    out: dict[str, Any] = {
        "uid": wl.uid,
        "workloadIps": [str(a) for a in wl.addresses],
        "protocol": wl.protocol,
        "name": wl.name,
        "namespace": wl.namespace,
        "serviceAccount": wl.service_account,
        "workloadName": wl.workload_name,
        "workloadType": wl.workload_type,
        "canonicalName": wl.canonical_name,
        "canonicalRevision": wl.canonical_revision,
        "clusterId": wl.cluster_id,
        "trustDomain": wl.trust_domain,
        "node": wl.node,
        "status": "Healthy" if wl.healthy else "Unhealthy",
        "hostname": wl.hostname,
        "applicationTunnel": {"protocol": wl.application_tunnel_protocol.lower()},
        "services": sorted(wl.services),
        "capacity": wl.capacity,
    }
    if wl.application_tunnel_port:
        out["applicationTunnel"]["port"] = wl.application_tunnel_port
    if wl.waypoint is not None:
        out["waypoint"] = _gateway_json(wl.waypoint)
    if wl.network_gateway is not None:
        out["networkGateway"] = _gateway_json(wl.network_gateway)
    if wl.network:
        out["network"] = wl.network
    if wl.native_tunnel:
        out["nativeTunnel"] = True
    loc = wl.locality
    if loc.region or loc.zone or loc.subzone:
        out["locality"] = {
            k: v for k, v in (("region", loc.region), ("zone", loc.zone), ("subzone", loc.subzone)) if v
        }
    if wl.authorization_policies:
        out["authorizationPolicies"] = list(wl.authorization_policies)
    return out


def service_json(svc: Service, state: ProxyState) -> dict[str, Any]:
    endpoints: dict[str, Any] = {}
    for wl, ep in state.endpoints(svc.key):
        ports = {str(sp): (tp or svc.ports.get(sp, sp)) for sp, tp in sorted(ep.ports.items())}
        endpoints[wl.uid] = {
            "workloadUid": wl.uid,
            "service": svc.key,
            "port": ports,
            **({"address": f"{wl.network}/{wl.addresses[0]}"} if wl.addresses else {}),
        }
    out: dict[str, Any] = {
        "name": svc.name,
        "namespace": svc.namespace,
        "hostname": svc.hostname,
        "vips": [str(v) for v in svc.vips],
        "ports": {str(sp): tp for sp, tp in sorted(svc.ports.items())},
        "endpoints": endpoints,
        "subjectAltNames": list(svc.subject_alt_names),
        "ipFamilies": {
            "AUTOMATIC": "Automatic",
            "IPV4_ONLY": "IPv4",
            "IPV6_ONLY": "IPv6",
            "DUAL": "Dual",
        }.get(svc.ip_families, svc.ip_families),
    }
    if svc.waypoint is not None:
        out["waypoint"] = _gateway_json(svc.waypoint)
    if svc.has_load_balancing:
        out["loadBalancer"] = {
            "mode": svc.lb_mode.title().replace("_", ""),
            "routingPreferences": [p.title() for p in svc.lb_routing_preference],
            "healthPolicy": "OnlyHealthy" if svc.lb_health_policy == "ONLY_HEALTHY" else "AllowAll",
        }
    return out


def config_dump(src: AdminSources) -> dict[str, Any]:
    """Build the ``/config_dump`` document (the server streams the same text: :func:`config_dump_text`)."""
    workloads, services, policies = src.state.snapshot()
    return {
        "workloads": [workload_json(w) for w in sorted(workloads, key=lambda w: w.uid)],
        "services": [service_json(s, src.state) for s in sorted(services, key=lambda s: s.key)],
        "policies": [p.to_json() for p in sorted(policies, key=lambda p: p.key)],
        "certificates": src.certificates(),
        "workloadState": _workload_state(src),
        "config": src.config,
    }


def config_dump_text(src: AdminSources) -> Iterator[str]:
    """``json.dumps(config_dump(src), indent=2)``, piece by piece: one workload, service or policy at a time.

    Why: the whole document for 1000 workloads is a few MB of dicts and text at once, and after it is freed
    the allocator keeps most of it, so each ``istioctl ztunnel-config`` grew the node proxy's RSS by ~5 MB.
    Streamed, only one entry's JSON exists at a time.
    """
    workloads, services, policies = src.state.snapshot()
    workloads.sort(key=lambda w: w.uid)
    services.sort(key=lambda s: s.key)
    policies.sort(key=lambda p: p.key)
    sections: list[tuple[str, Iterable[Any], Callable[[Any], Any]]] = [
        ("workloads", workloads, workload_json),
        ("services", services, lambda s: service_json(s, src.state)),
        ("policies", policies, lambda p: p.to_json()),
    ]
    yield "{"
    first = True
    for key, items, to_json in sections:
        yield ("\n" if first else ",\n") + f"  {json.dumps(key)}: ["
        first = False
        empty = True
        for item in items:
            yield ("\n    " if empty else ",\n    ") + json.dumps(to_json(item), indent=2).replace(
                "\n", "\n    "
            )
            empty = False
        yield "]" if empty else "\n  ]"
    rest = {"certificates": src.certificates(), "workloadState": _workload_state(src), "config": src.config}
    for key, value in rest.items():
        yield f",\n  {json.dumps(key)}: " + json.dumps(value, indent=2).replace("\n", "\n  ")
    yield "\n}"


def _workload_state(src: AdminSources) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for info in src.local_workloads():
        state[info.uid] = {
            "state": info.state,
            "connections": {"inbound": [], "outbound": []},
            "info": {
                "name": info.name,
                "namespace": info.namespace,
                "trustDomain": info.trust_domain,
                "serviceAccount": info.service_account,
            },
        }
    if src.tracker is not None:
        for conn in src.tracker.live():
            entry = state.get(conn.workload_uid)
            if entry is None:
                wl = src.state.workload_by_uid(conn.workload_uid)
                entry = state[conn.workload_uid] = {
                    "state": "Up",
                    "connections": {"inbound": [], "outbound": []},
                    "info": {
                        "name": wl.name if wl else "",
                        "namespace": wl.namespace if wl else "",
                        "trustDomain": wl.trust_domain if wl else "",
                        "serviceAccount": wl.service_account if wl else "",
                    },
                }
            entry["connections"][conn.direction].append(conn.to_json())
    return state


# --------------------------------------------------------------------------------------------------
# Servers


def _levels() -> dict[str, str]:
    root = logging.getLogger(LOGGER_ROOT)
    out = {LOGGER_ROOT: logging.getLevelName(root.getEffectiveLevel()).lower()}
    for name, lg in sorted(logging.root.manager.loggerDict.items()):
        if name.startswith(LOGGER_ROOT + ".") and isinstance(lg, logging.Logger) and lg.level:
            out[name] = logging.getLevelName(lg.level).lower()
    return out


_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "off": logging.CRITICAL + 10,
}


def set_log_level(spec: str) -> None:
    """Apply ``level`` or ``target=level[,...]`` (upstream's /logging syntax; targets are loggers)."""
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        target, _, level = part.rpartition("=") if "=" in part else ("", "", part)
        lv = _LEVELS.get(level.lower())
        if lv is None:
            raise ValueError(f"unknown log level {level!r} (want one of {', '.join(sorted(_LEVELS))})")
        if not target:  # a bare level applies to everything: per-target overrides are dropped
            for lname, lg in list(logging.root.manager.loggerDict.items()):
                if lname.startswith(LOGGER_ROOT + ".") and isinstance(lg, logging.Logger):
                    lg.setLevel(logging.NOTSET)
        name = target if not target or target.startswith(LOGGER_ROOT) else f"{LOGGER_ROOT}.{target}"
        logging.getLogger(name or LOGGER_ROOT).setLevel(lv)


@dataclass
class Request:
    """What a handler sees of a request: method, path and query (no bodies: no endpoint takes one)."""

    method: str
    path: str
    query: dict[str, str]


@dataclass
class Response:
    status: int = 200
    text: str = ""
    body: bytes | None = None
    content_type: str = "text/plain; charset=utf-8"
    # A body written as it is produced, without Content-Length (the connection close ends it).
    stream: Iterator[str] | None = None


Handler = Callable[[Request], Awaitable[Response]]
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
_MAX_HEAD = 16384


async def _write_stream(writer: asyncio.StreamWriter, chunks: Iterator[str], batch: int = 65536) -> None:
    """Write ``chunks`` in ~64 KiB batches, waiting for the peer between them, so a slow reader holds back
    the producer instead of the whole body piling up in the transport."""
    buf: list[str] = []
    size = 0
    try:
        for chunk in chunks:
            buf.append(chunk)
            size += len(chunk)
            if size >= batch:
                writer.write("".join(buf).encode())
                buf, size = [], 0
                await writer.drain()
    finally:  # also when producing failed: the reader gets everything up to the failure
        writer.write("".join(buf).encode())
    await writer.drain()


class AdminServer:
    """Runs the admin, metrics and readiness listeners on the current event loop."""

    def __init__(
        self,
        sources: AdminSources,
        *,
        admin_addr: tuple[str, int] = ("127.0.0.1", 15000),
        metrics_addr: tuple[str, int] | None = ("0.0.0.0", 15020),
        readiness_addr: tuple[str, int] | None = ("0.0.0.0", 15021),
    ) -> None:
        self.src = sources
        self._addrs = {"admin": admin_addr, "metrics": metrics_addr, "readiness": readiness_addr}
        self._servers: list[asyncio.Server] = []
        self._conns: set[asyncio.Task[None]] = set()
        self.ports: dict[str, int] = {}
        self._pending: asyncio.Future[None] | None = None

    # ---- handlers -----------------------------------------------------------------------------

    async def _config_dump(self, request: Request) -> Response:
        return Response(stream=config_dump_text(self.src), content_type="application/json")

    async def _logging(self, request: Request) -> Response:
        if request.method == "POST":
            spec = request.query.get("level", "")
            if not spec:
                return Response(status=400, text="usage: POST /logging?level=<level>|<target>=<level>\n")
            try:
                set_log_level(spec)
            except ValueError as e:
                return Response(status=400, text=f"{e}\n")
        levels = _levels()
        body = "current log level is " + ",".join(f"{k}={v}" for k, v in levels.items()) + "\n"
        return Response(text=body)

    async def _quit(self, request: Request) -> Response:
        if request.method != "POST":
            return Response(status=405, text="POST only\n")
        log.warning("shutdown requested through /quitquitquit")
        if self.src.shutdown is not None:
            res = self.src.shutdown()
            if res is not None:
                self._pending = asyncio.ensure_future(res)
        return Response(text="shutdown now\n")

    async def _index(self, request: Request) -> Response:
        return Response(
            text="ztunnel-py admin\n  /config_dump\n  /debug/modules\n  /logging\n  /quitquitquit\n"
        )

    async def _modules(self, request: Request) -> Response:
        """The top-level Python packages this process has imported, one per line: what a memory
        investigation (and the test that keeps grpcio, cryptography and prometheus_client out of the node
        proxy) wants to know without attaching a debugger."""
        return Response(text="".join(f"{m}\n" for m in sorted({n.partition(".")[0] for n in sys.modules})))

    async def _metrics(self, request: Request) -> Response:
        from istiopy.dataplane.metrics import CONTENT_TYPE

        return Response(body=self.src.metrics.render(), content_type=CONTENT_TYPE)

    async def _ready(self, request: Request) -> Response:
        ok = self.src.ready() if self.src.ready is not None else self.src.state.ready
        return Response(status=200 if ok else 503, text="ready\n" if ok else "not ready\n")

    # ---- HTTP ---------------------------------------------------------------------------------

    async def _serve(
        self,
        routes: dict[str, tuple[Handler, bool]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """One request per connection. ``routes``: path -> (handler, whether any method is allowed; else
        GET and HEAD only, as aiohttp's ``add_get``)."""
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) != 3 or not line[2].startswith("HTTP/") or len(head) > _MAX_HEAD:
                resp = Response(status=400, text="bad request\n")
                method = "GET"
            else:
                method, target = line[0].upper(), urlsplit(line[1])
                route = routes.get(target.path)
                if route is None:
                    resp = Response(status=404, text="404: Not Found")
                elif not route[1] and method not in ("GET", "HEAD"):
                    resp = Response(status=405, text="405: Method Not Allowed")
                else:
                    try:
                        resp = await route[0](Request(method, target.path, dict(parse_qsl(target.query))))
                    except Exception:
                        log.exception("admin handler %s failed", target.path)
                        resp = Response(status=500, text="500: Internal Server Error")
            payload = resp.body if resp.body is not None else resp.text.encode()
            reason = _REASONS.get(resp.status, "Internal Server Error" if resp.status >= 500 else "")
            length = f"Content-Length: {len(payload)}\r\n" if resp.stream is None else ""
            writer.write(
                f"HTTP/1.1 {resp.status} {reason}\r\nContent-Type: {resp.content_type}\r\n"
                f"{length}Connection: close\r\n\r\n".encode()
                + (payload if method != "HEAD" else b"")
            )
            with contextlib.suppress(ConnectionError):
                await writer.drain()
                if resp.stream is not None and method != "HEAD":
                    try:
                        await _write_stream(writer, resp.stream)
                    except ConnectionError:
                        raise
                    except Exception:  # the status line is out: all that is left is to cut the body short
                        log.exception("admin %s failed while streaming its body", line[1])
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._conns.discard(task)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        routes: dict[str, dict[str, tuple[Handler, bool]]] = {
            "admin": {
                "/": (self._index, False),
                "/config_dump": (self._config_dump, False),
                "/debug/modules": (self._modules, False),
                "/logging": (self._logging, True),
                "/quitquitquit": (self._quit, True),
            },
            "metrics": {"/stats/prometheus": (self._metrics, False), "/metrics": (self._metrics, False)},
            "readiness": {"/healthz/ready": (self._ready, False)},
        }
        try:
            for name, table in routes.items():
                addr = self._addrs[name]
                if addr is None:
                    continue
                cb = functools.partial(self._serve, table)
                server = await asyncio.start_server(cb, addr[0], addr[1], reuse_address=True)
                self._servers.append(server)
                self.ports[name] = server.sockets[0].getsockname()[1]
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        servers, self._servers = self._servers, []
        for srv in servers:
            srv.close()
        for t in list(self._conns):
            t.cancel()
        for srv in servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
