"""The monitoring port (istiod's 15014): ``/metrics``, ``/debug/syncz``, ``/debug/configz``,
``/debug/snapshotz``, ``/ready``.

aiohttp is already a dependency (through kopf), so it serves these; everything returned is JSON except the
Prometheus text.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from istiopy.mesh.store import ConfigStore
from istiopy.xds.server import XdsServer


def _escape(value: str, quote: bool = False) -> str:
    out = value.replace("\\", "\\\\").replace("\n", "\\n")
    return out.replace('"', '\\"') if quote else out


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def istio_exposition(registry: CollectorRegistry) -> bytes:
    """Prometheus text format with Istio's metric names: counters without the ``_total`` suffix
    prometheus_client adds (istiod exports ``pilot_xds_pushes``, and dashboards query that), no
    ``_created`` samples."""
    lines: list[str] = []
    for family in registry.collect():
        name = family.name
        lines.append(f"# HELP {name} {_escape(family.documentation)}")
        lines.append(f"# TYPE {name} {family.type}")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            sample_name = name if family.type == "counter" and sample.name == name + "_total" else sample.name
            labels = ",".join(
                f'{k}="{_escape(str(v), quote=True)}"' for k, v in sorted(sample.labels.items())
            )
            value = _number(sample.value)
            lines.append(f"{sample_name}{{{labels}}} {value}" if labels else f"{sample_name} {value}")
    return ("\n".join(lines) + "\n").encode()


def _json(data: Any) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=1, sort_keys=True, default=str), content_type="application/json"
    )


class DebugServer:
    """HTTP server over one ``XdsServer`` and its store."""

    def __init__(self, xds: XdsServer, store: ConfigStore, host: str = "0.0.0.0", port: int = 15014) -> None:
        self.xds = xds
        self.store = store
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/debug/syncz", self._syncz)
        app.router.add_get("/debug/configz", self._configz)
        app.router.add_get("/debug/snapshotz", self._snapshotz)
        app.router.add_get("/ready", self._ready)
        return app

    async def start(self) -> int:
        """Bind and serve; returns the bound port (``port=0`` picks a free one)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = istio_exposition(self.xds.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _syncz(self, request: web.Request) -> web.Response:
        """Per connected proxy and type: sent/acked version and nonce, NACK count and last error."""
        return _json(self.xds.syncz())

    async def _configz(self, request: web.Request) -> web.Response:
        """The model the generators read: every resource in the store, with the store version."""
        return _json({"version": self.store.version, "resources": [r.to_dict() for r in self.store]})

    async def _snapshotz(self, request: web.Request) -> web.Response:
        """What one proxy (``?proxy=<node id>``) is being served, resources rendered as JSON."""
        proxy_id = request.query.get("proxy", "")
        for conn in self.xds.connections.values():
            if conn.proxy is not None and conn.proxy.id == proxy_id:
                snap = conn.stream.snapshot
                out: dict[str, Any] = {}
                for t, typed in sorted(snap.resources.items()):
                    out[t] = {
                        "version": typed.version,
                        "resources": {
                            n: json_format.MessageToDict(r.message) for n, r in typed.items.items()
                        },
                    }
                return _json(out)
        raise web.HTTPNotFound(text=f"no connected proxy with node id {proxy_id!r}")

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")
