"""The whole xDS side as one component: push pipeline + ADS server + monitoring port.

``istiod`` wires it (it is the only module that also knows the CA):

    registry = GeneratorRegistry()
    register_envoy_generators(registry)          # xds.envoygen
    register_ambient_generators(registry)        # xds.wds (WDS/WADS for ztunnel)
    registry.register(sds_generator)             # from ca/, a Generator for the Secret type URL
    xds = XdsService(store, registry, ServerOptions(tls=TlsConfig(cert, key, ca), plaintext_address=None),
                     authenticate=ca_authenticator)
    control_plane.add("xds", xds.run)            # start, serve until cancelled, stop gracefully
"""

from __future__ import annotations

import asyncio
import logging

from istiopy.mesh.store import ConfigStore
from istiopy.xds.debug import DebugServer
from istiopy.xds.envoygen import register_envoy_generators
from istiopy.xds.monitoring import XdsMetrics
from istiopy.xds.push import PushPipeline
from istiopy.xds.registry import GeneratorRegistry
from istiopy.xds.server import Authenticator, ServerOptions, XdsServer, allow_all

log = logging.getLogger(__name__)


class XdsService:
    """Owns the pipeline, the gRPC server and the debug/metrics HTTP server of one control plane."""

    def __init__(
        self,
        store: ConfigStore,
        registry: GeneratorRegistry | None = None,
        options: ServerOptions | None = None,
        *,
        authenticate: Authenticator = allow_all,
        monitoring_host: str = "0.0.0.0",
        monitoring_port: int | None = 15014,
        debounce_after: float = 0.1,
        debounce_max: float = 10.0,
        push_concurrency: int = 100,
        shutdown_grace: float = 1.0,
    ) -> None:
        if registry is None:
            registry = GeneratorRegistry()
            register_envoy_generators(registry)
        self.store = store
        self.registry = registry
        self.metrics = XdsMetrics()
        self.pipeline = PushPipeline(
            store,
            registry,
            debounce_after=debounce_after,
            debounce_max=debounce_max,
            concurrency=push_concurrency,
            metrics=self.metrics,
        )
        self.server = XdsServer(self.pipeline, options, authenticate)
        self.debug = (
            DebugServer(self.server, store, monitoring_host, monitoring_port)
            if monitoring_port is not None
            else None
        )
        self.shutdown_grace = shutdown_grace
        self.ports: dict[str, int] = {}

    async def start(self) -> dict[str, int]:
        """Start everything; returns the bound ports (``tls``, ``plaintext``, ``monitoring``)."""
        await self.pipeline.start()
        try:
            self.ports = await self.server.start()
            if self.debug is not None:
                self.ports["monitoring"] = await self.debug.start()
        except BaseException:
            await self.stop()
            raise
        log.info("xDS serving: %s", ", ".join(f"{k} {v}" for k, v in sorted(self.ports.items())))
        return dict(self.ports)

    async def stop(self) -> None:
        if self.debug is not None:
            await self.debug.stop()
        await self.server.stop(self.shutdown_grace)
        await self.pipeline.stop()

    async def run(self) -> None:
        """A control-plane component: serve until cancelled, then shut down gracefully."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())
