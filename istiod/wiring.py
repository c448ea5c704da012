"""Standalone istiod assembled from its parts: file source, CA, xDS (ADS + CA on one TLS port), monitoring.

Why a module of its own: ``cli.py`` parses flags, ``server.ControlPlane`` runs components; this is the one
place that knows how the CA and the xDS server fit together, so the CLI, ``istiod-py up`` and the testing
kit all start the *same* control plane.

What it wires, and why:

* **State directory** (default ``./.istiopy``): ``ca/`` holds the persisted self-signed root (reused across
  restarts, so proxies bootstrapped earlier still verify), ``root-cert.pem`` is the trust bundle proxies
  read, ``tokens.yaml`` the operator-controlled bearer tokens. ``python -m istiopy.ca bootstrap`` /
  ``istiod-py bootstrap-node`` issue node credentials from the same root.
* **One TLS port (15012)** serving ADS and ``IstioCertificateService``, with a serving certificate from our
  own CA. gRPC's Python API cannot *request* a client certificate without requiring it, so the port either
  requires mTLS (default: node proxies present their bootstrap certificate, waypoint Envoys their workload
  certificate) or, with ``allow_tokens``, asks for none and authenticates bearer tokens only.
* **Plaintext 15010** only when explicitly asked for (development): its streams carry no identity.
* **Generators**: Envoy (plain), WDS/WADS (ztunnel), waypoint (CDS/EDS/LDS/RDS) and SDS (waypoints and
  gateways), with SDS rotations pushed through the pipeline since certificates are not store content.
* **Metrics**: one Prometheus registry for ``pilot_*`` and ``citadel_*`` on the monitoring port (15014).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from istiopy.api.identity import DEFAULT_TRUST_DOMAIN, SpiffeId
from istiopy.ca.auth import Authenticator, StaticTokenAuthenticator, stream_authenticator
from istiopy.ca.bundle import FileTrustBundlePublisher
from istiopy.ca.sds import WaypointSecrets, generator_fields, rotation_change
from istiopy.ca.service import CaConfig, CertificateAuthority, start_authority
from istiopy.istiod.server import ControlPlane, standalone
from istiopy.xds.envoygen import register_envoy_generators
from istiopy.xds.registry import Generator, GeneratorRegistry
from istiopy.xds.server import AuthenticationError, ServerOptions, TlsConfig
from istiopy.xds.service import XdsService
from istiopy.xds.waypoint import register_waypoint_generators
from istiopy.xds.wds import register_ambient_generators

__all__ = [
    "DEFAULT_STATE_DIR",
    "Istiod",
    "IstiodOptions",
    "assemble",
    "build_registry",
    "start_istiod",
]

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path(".istiopy")


@dataclass
class IstiodOptions:
    """Everything ``istiod-py serve`` can be told; ports 0 pick free ones (tests)."""

    config_dirs: Sequence[str | Path]
    state_dir: Path = DEFAULT_STATE_DIR
    namespace: str = "default"  # for documents without one
    system_namespace: str = "istio-system"  # istiod's own: identities there may read debug types (syncz)
    host: str = "127.0.0.1"
    tls_port: int = 15012
    plaintext_port: int | None = None  # 15010 only when explicitly enabled
    monitoring_port: int = 15014
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    allow_tokens: bool = False  # see the module docstring: tokens instead of required client certificates
    serving_names: Sequence[str] = ("istiod.istio-system.svc", "istiod.istio-system.svc.cluster.local")
    serving_ips: Sequence[str] = ("127.0.0.1",)
    debounce_after: float = 0.1
    debounce_max: float = 10.0
    max_connection_age: float | None = None  # KEEPALIVE_MAX_SERVER_CONNECTION_AGE (see ServerOptions)
    extra_ca_authenticators: list[Authenticator] = field(default_factory=list)

    @property
    def root_dir(self) -> Path:
        return self.state_dir / "ca"

    @property
    def bundle_path(self) -> Path:
        return self.state_dir / "root-cert.pem"

    @property
    def tokens_path(self) -> Path:
        return self.state_dir / "tokens.yaml"


def build_registry(secrets: WaypointSecrets | None) -> GeneratorRegistry:
    """Every generator istiod serves: plain Envoy, ztunnel's WDS/WADS, waypoints, and SDS."""
    registry = GeneratorRegistry()
    register_envoy_generators(registry)
    register_ambient_generators(registry)
    register_waypoint_generators(registry)
    if secrets is not None:
        registry.register(Generator(**generator_fields(secrets)))
    return registry


@dataclass
class Istiod:
    """A started standalone control plane: ``run`` it as a task; ``ports`` are known once it serves."""

    options: IstiodOptions
    plane: ControlPlane
    ca: CertificateAuthority
    xds: XdsService
    secrets: WaypointSecrets

    @property
    def ports(self) -> dict[str, int]:
        return dict(self.xds.ports)

    async def bind(self) -> dict[str, int]:
        """Bind every port now, so a port in use fails here with one error instead of inside a component."""
        if not self.xds.ports:
            await self.xds.start()
        return self.ports

    async def run(self) -> None:
        """Serve until cancelled (binding first if ``bind`` was not called)."""
        await self.bind()
        await self.plane.run()


def _tokens(path: Path) -> StaticTokenAuthenticator:
    """The operator's token file (created empty, mode 0600); re-read whenever it changes."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("tokens: []\n")
    return StaticTokenAuthenticator(path=path)


async def start_istiod(options: IstiodOptions) -> Istiod:
    """Load the config, start the CA and assemble xDS; nothing listens until ``Istiod.run``."""
    state = options.state_dir
    state.mkdir(parents=True, exist_ok=True)
    dirs = list(options.config_dirs)
    if not dirs:
        raise ValueError("at least one config directory is required")
    plane = standalone(dirs[0], default_namespace=options.namespace)
    assert plane.file_source is not None
    plane.file_source.load()
    for extra in dirs[1:]:  # more directories feed the same store, each file its own source
        from istiopy.mesh.filesource import FileSource

        source = FileSource(plane.store, extra, default_namespace=options.namespace)
        source.load()
        plane.add(f"file-source:{extra}", source.run)

    ca = await start_authority(
        CaConfig(trust_domain=options.trust_domain, root_dir=options.root_dir),
        publishers=[FileTrustBundlePublisher(options.bundle_path)],
    )
    authenticators: list[Authenticator] = [ca.client_cert_authenticator()]
    if options.allow_tokens:
        authenticators.append(_tokens(options.tokens_path))
    authenticators += options.extra_ca_authenticators
    return assemble(plane, ca, authenticators, options)


def assemble(
    plane: ControlPlane,
    ca: CertificateAuthority,
    authenticators: Sequence[Authenticator],
    options: IstiodOptions,
) -> Istiod:
    """xDS (ADS + CA on the TLS port, optional plaintext, monitoring) and SDS over ``plane.store``.

    Shared by standalone (file source, CA root on disk) and Kubernetes mode (operator store, root in a
    Secret, TokenReview): only the store and the CA's authenticators differ."""
    authenticators = list(authenticators)
    serving = ca.issue_serving(options.serving_names, options.serving_ips)

    secrets = WaypointSecrets(ca)
    registry = build_registry(secrets)
    tls = TlsConfig(
        cert_pem=serving.served_chain_pem.encode(),
        key_pem=serving.key_pem.encode(),
        client_ca_pem=ca.roots_pem.encode(),
        require_client_cert=not options.allow_tokens,
    )
    server_options = ServerOptions(
        tls=tls,
        tls_address=f"{options.host}:{options.tls_port}",
        plaintext_address=(
            f"{options.host}:{options.plaintext_port}" if options.plaintext_port is not None else None
        ),
        max_connection_age=options.max_connection_age,
        debug_namespace=options.system_namespace,
    )
    xds = XdsService(
        plane.store,
        registry,
        server_options,
        # A plaintext listener means development mode: a stream with no credential at all is served without
        # identity (and SDS gives it nothing); one *with* a bad credential is still refused.
        authenticate=stream_authenticator(
            authenticators, AuthenticationError, required=options.plaintext_port is None
        ),
        monitoring_host=options.host,
        monitoring_port=options.monitoring_port,
        debounce_after=options.debounce_after,
        debounce_max=options.debounce_max,
    )
    servicer = ca.servicer(authenticators, plane.store, xds.metrics.registry)
    server_options.extra_services.append(servicer.add_to_server)
    if options.plaintext_port is not None:
        log.warning(
            "plaintext xDS on %s:%s: streams there carry no identity", options.host, options.plaintext_port
        )

    def on_rotation(identity: SpiffeId) -> None:
        xds.pipeline.notify(rotation_change(identity))

    secrets.subscribe(on_rotation)

    async def xds_component() -> None:  # started by ``Istiod.bind``; stopped gracefully on the way out
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(xds.stop())

    plane.add("xds", xds_component)
    plane.add("sds-rotation", secrets.run)
    return Istiod(options, plane, ca, xds, secrets)


async def serve(options: IstiodOptions, started: asyncio.Event | None = None) -> None:
    """Start and run until cancelled; sets ``started`` once the ports are bound (for the CLI's message)."""
    istiod = await start_istiod(options)
    task = asyncio.create_task(istiod.run(), name="istiod")
    try:
        while not istiod.xds.ports or (
            options.monitoring_port is not None and "monitoring" not in istiod.ports
        ):
            if task.done():
                break
            await asyncio.sleep(0.02)
        if not task.done():
            _write_ports(options.state_dir, istiod.ports)
            log.info(
                "istiod-py serving: %s; trust bundle %s",
                ", ".join(f"{k} {options.host}:{v}" for k, v in sorted(istiod.ports.items())),
                options.bundle_path,
            )
            if started is not None:
                started.set()
        await task
    finally:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass  # a failure was already logged by the component guard


def _write_ports(state: Path, ports: dict[str, int]) -> None:
    """``<state>/ports``: what was bound (free ports in tests), for launchers that started us."""
    text = "".join(f"{k}={v}\n" for k, v in sorted(ports.items()))
    tmp = state / "ports.tmp"
    tmp.write_text(text)
    tmp.replace(state / "ports")
