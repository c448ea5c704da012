"""End to end: the real gRPC delta ADS server with the WDS/WADS generators registered, and the real delta
client ztunnel-py uses. The client receives exactly the generated resources, and a pod label change to
``istio.io/use-waypoint`` reaches it as an update of that one workload."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from envoy.config.core.v3 import base_pb2
from wds_helpers import docs, pod, store_from

from istiopy.api.gen import authorization_pb2 as az
from istiopy.api.gen import workload_pb2 as wl
from istiopy.api.xds_client import DeltaXdsClient
from istiopy.mesh.kinds import parse
from istiopy.mesh.store import ConfigStore
from istiopy.xds.push import PushPipeline
from istiopy.xds.registry import GeneratorRegistry
from istiopy.xds.server import ServerOptions, XdsServer
from istiopy.xds.wads import AUTHORIZATION_TYPE_URL, generate_authorizations
from istiopy.xds.wds import ADDRESS_TYPE_URL, generate_addresses, register_ambient_generators

MESH = (
    """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: shop}
spec: {selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [shop]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: shop}
spec: {action: DENY, rules: [{to: [{operation: {ports: ["9000"], paths: [/admin]}}]}]}
"""
    + pod("web-1", "shop", "10.0.0.1", {"app": "web"})
    + pod("web-2", "shop", "10.0.0.2", {"app": "web"})
)
ZTUNNEL_ID = "ztunnel~10.0.0.200~ztunnel-x7k2p.istio-system~istio-system.svc.cluster.local"


@dataclass
class Plane:
    store: ConfigStore
    pipeline: PushPipeline
    server: XdsServer
    port: int


@pytest.fixture
async def plane() -> AsyncIterator[Plane]:
    store = store_from(MESH)
    registry = GeneratorRegistry()
    register_ambient_generators(registry)
    pipeline = PushPipeline(store, registry, debounce_after=0.02, debounce_max=0.5)
    server = XdsServer(pipeline, ServerOptions(plaintext_address="127.0.0.1:0"))
    await pipeline.start()
    ports = await server.start()
    try:
        yield Plane(store, pipeline, server, ports["plaintext"])
    finally:
        await server.stop(0.1)
        await pipeline.stop()


def held(client: DeltaXdsClient, type_url: str, cls: type) -> dict[str, bytes]:
    return {
        n: h.unpack(cls).SerializeToString(deterministic=True) for n, h in client.resources(type_url).items()
    }


def expected(store: ConfigStore) -> tuple[dict[str, bytes], dict[str, bytes]]:
    addrs = {n: m.SerializeToString(deterministic=True) for n, m in generate_addresses(store)}
    pols = {n: m.SerializeToString(deterministic=True) for n, m in generate_authorizations(store)}
    return addrs, pols


async def test_ztunnel_receives_exactly_the_generated_resources_and_label_updates(plane: Plane) -> None:
    updates: list[tuple[str, list[str], list[str]]] = []

    def record(update: object) -> None:
        updates.append((update.type_url, sorted(update.updated), list(update.removed)))  # type: ignore[attr-defined]

    client = DeltaXdsClient(f"127.0.0.1:{plane.port}", base_pb2.Node(id=ZTUNNEL_ID), backoff_initial=0.05)
    client.subscribe(ADDRESS_TYPE_URL, record)
    client.subscribe(AUTHORIZATION_TYPE_URL, record)
    want_addrs, want_pols = expected(plane.store)
    async with client:
        async with asyncio.timeout(10):
            await client.wait_for(
                lambda c: (
                    held(c, ADDRESS_TYPE_URL, wl.Address) == want_addrs
                    and held(c, AUTHORIZATION_TYPE_URL, az.Authorization) == want_pols
                )
            )
        assert sorted(want_addrs) == [
            "Kubernetes//Pod/shop/web-1",
            "Kubernetes//Pod/shop/web-2",
            "shop/web.shop.svc.cluster.local",
        ]
        assert sorted(want_pols) == ["shop/l7", "shop/web-allow"]
        web1 = client.resources(ADDRESS_TYPE_URL)["Kubernetes//Pod/shop/web-1"].unpack(wl.Address).workload
        assert not web1.HasField("waypoint")
        assert list(web1.authorization_policies) == ["shop/web-allow"]

        updates.clear()
        for d in docs(pod("web-1", "shop", "10.0.0.1", {"app": "web", "istio.io/use-waypoint": "waypoint"})):
            plane.store.apply(parse(d))
        async with asyncio.timeout(10):
            await client.wait_for(
                lambda c: (
                    c.resources(ADDRESS_TYPE_URL)["Kubernetes//Pod/shop/web-1"]
                    .unpack(wl.Address)
                    .workload.HasField("waypoint")
                )
            )
        web1 = client.resources(ADDRESS_TYPE_URL)["Kubernetes//Pod/shop/web-1"].unpack(wl.Address).workload
        assert web1.waypoint == wl.GatewayAddress(
            hostname=wl.NamespacedHostname(namespace="shop", hostname="waypoint.shop.svc.cluster.local"),
            hbone_mtls_port=15008,
        )
        # Only the changed workload was sent; the other resources were not resent.
        assert updates == [(ADDRESS_TYPE_URL, ["Kubernetes//Pod/shop/web-1"], [])]
        assert held(client, ADDRESS_TYPE_URL, wl.Address) == expected(plane.store)[0]

        # Deleting the pod removes its workload from the client.
        plane.store.delete(plane.store.get("Pod", "shop", "web-2").key)  # type: ignore[union-attr]
        async with asyncio.timeout(10):
            await client.wait_for(lambda c: "Kubernetes//Pod/shop/web-2" not in c.resources(ADDRESS_TYPE_URL))


async def test_policy_changes_reach_ztunnel(plane: Plane) -> None:
    client = DeltaXdsClient(f"127.0.0.1:{plane.port}", base_pb2.Node(id=ZTUNNEL_ID), backoff_initial=0.05)
    client.subscribe(ADDRESS_TYPE_URL)
    client.subscribe(AUTHORIZATION_TYPE_URL)
    async with client:
        async with asyncio.timeout(10):
            await client.wait_for(
                lambda c: set(c.resources(AUTHORIZATION_TYPE_URL)) == {"shop/l7", "shop/web-allow"}
            )
        # Mesh-wide STRICT: the static policy appears and every workload references it.
        for d in docs(
            """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""
        ):
            plane.store.apply(parse(d))
        plane.store.delete(plane.store.get("AuthorizationPolicy", "shop", "l7").key)  # type: ignore[union-attr]

        def converged(c: DeltaXdsClient) -> bool:
            pols = set(c.resources(AUTHORIZATION_TYPE_URL))
            if pols != {"istio-system/istio_converted_static_strict", "shop/web-allow"}:
                return False
            w = c.resources(ADDRESS_TYPE_URL)["Kubernetes//Pod/shop/web-2"].unpack(wl.Address).workload
            return list(w.authorization_policies) == [
                "shop/web-allow",
                "istio-system/istio_converted_static_strict",
            ]

        async with asyncio.timeout(10):
            await client.wait_for(converged)
        static = client.resources(AUTHORIZATION_TYPE_URL)["istio-system/istio_converted_static_strict"]
        assert static.unpack(az.Authorization).action == az.DENY
