"""Test helpers: a real xDS server (store + Envoy generators + pipeline + gRPC + debug HTTP) on free
loopback ports, and model objects to feed it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from istiopy.mesh.kinds import parse
from istiopy.mesh.meta import Resource
from istiopy.mesh.store import ConfigStore
from istiopy.xds.debug import DebugServer
from istiopy.xds.envoygen import register_envoy_generators
from istiopy.xds.push import PushPipeline
from istiopy.xds.registry import GeneratorRegistry
from istiopy.xds.server import ServerOptions, XdsServer


def service(
    name: str,
    port: int = 80,
    target: int | str | None = None,
    ns: str = "default",
    vip: str = "10.96.0.10",
    selector: dict[str, str] | None = None,
    **annotations: str,
) -> Resource:
    return parse(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": {
                "clusterIP": vip,
                "selector": selector or {"app": name},
                "ports": [{"name": "http", "port": port, **({"targetPort": target} if target else {})}],
            },
        }
    )


def pod(name: str, ip: str, labels: dict[str, str], ns: str = "default") -> Resource:
    return parse(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip},
        }
    )


@dataclass
class Harness:
    store: ConfigStore
    registry: GeneratorRegistry
    pipeline: PushPipeline
    server: XdsServer
    debug: DebugServer
    port: int
    debug_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.debug_port}/metrics"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels or {})
        return float(value or 0.0)


async def start_harness(
    debounce: float = 0.05, resources: Iterable[Resource] = (), **options: Any
) -> Harness:
    """Everything on free ports; ``resources`` are in the store before the first client can connect."""
    store = ConfigStore()
    for res in resources:
        store.apply(res)
    registry = GeneratorRegistry()
    register_envoy_generators(registry)
    pipeline = PushPipeline(store, registry, debounce_after=debounce, debounce_max=2.0)
    opts = ServerOptions(**{"plaintext_address": "127.0.0.1:0", **options})
    server = XdsServer(pipeline, opts)
    await pipeline.start()
    ports = await server.start()
    debug = DebugServer(server, store, host="127.0.0.1", port=0)
    debug_port = await debug.start()
    return Harness(store, registry, pipeline, server, debug, ports["plaintext"], debug_port)


async def stop_harness(h: Harness) -> None:
    await h.debug.stop()
    await h.server.stop(0.1)
    await h.pipeline.stop()
