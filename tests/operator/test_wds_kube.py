"""Kubernetes to ztunnel: a pod created with kubectl in an ambient namespace reaches a connected delta xDS
client as a WDS workload (the kubelet stand-in gives it an IP), and labelling it ``istio.io/use-waypoint``
changes that workload's waypoint. The xDS server runs over the operator's store, as istiod wires it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable

import pytest
from envoy.config.core.v3 import base_pb2
from op_helpers import RunningOperator, eventually, new_namespace, operator_config

from istiopy.api.gen import workload_pb2 as wl
from istiopy.api.xds_client import DeltaXdsClient
from istiopy.mesh.store import ConfigStore
from istiopy.testing.cluster import TestCluster
from istiopy.testing.kubelet import KubeletStandIn
from istiopy.xds.push import PushPipeline
from istiopy.xds.registry import GeneratorRegistry
from istiopy.xds.server import ServerOptions, XdsServer
from istiopy.xds.wds import ADDRESS_TYPE_URL, register_ambient_generators

pytestmark = [pytest.mark.k8s, pytest.mark.slow]
ZTUNNEL_ID = "ztunnel~10.244.0.200~ztunnel-x.istio-system~istio-system.svc.cluster.local"


def xds_over(port_box: list[int]) -> Callable[[ConfigStore], object]:
    async def run(store: ConfigStore) -> None:
        registry = GeneratorRegistry()
        register_ambient_generators(registry)
        pipeline = PushPipeline(store, registry, debounce_after=0.02, debounce_max=0.5)
        server = XdsServer(pipeline, ServerOptions(plaintext_address="127.0.0.1:0"))
        await pipeline.start()
        ports = await server.start()
        port_box.append(ports["plaintext"])
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop(0.1)
            await pipeline.stop()

    return run


def test_pod_reaches_wds_and_waypoint_label_changes_it(k8s: TestCluster, k8s_kubelet: KubeletStandIn) -> None:
    ns = new_namespace(k8s, {"istio.io/dataplane-mode": "ambient"})
    port: list[int] = []
    with RunningOperator(k8s, operator_config(), extra=xds_over(port)) as running:  # type: ignore[arg-type]
        eventually(lambda: port, what="xDS server")
        k8s.kubectl(
            "apply", "-n", ns, "-f", "-",
            input=json.dumps({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "waypoint", "labels": {"istio.io/waypoint-for": "all"}},
                "spec": {"gatewayClassName": "istio-waypoint",
                         "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
            }),
        )  # fmt: skip
        eventually(
            lambda: k8s.kubectl("get", "sa", "default", "-n", ns, check=False).returncode == 0, what="SA"
        )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]},
        }
        k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod))
        (running_pod,) = k8s_kubelet.wait_running(ns, "app=web", 1)
        ip = running_pod["status"]["podIP"]
        name = f"Kubernetes//Pod/{ns}/web"
        result: dict[str, object] = {}
        labelled = threading.Event()

        async def client_flow() -> None:
            client = DeltaXdsClient(
                f"127.0.0.1:{port[0]}", base_pb2.Node(id=ZTUNNEL_ID), backoff_initial=0.05
            )
            client.subscribe(ADDRESS_TYPE_URL, lambda _u: None)
            async with client, asyncio.timeout(60):
                await client.wait_for(lambda c: name in c.resources(ADDRESS_TYPE_URL))
                w = client.resources(ADDRESS_TYPE_URL)[name].unpack(wl.Address).workload
                result["addresses"] = list(w.addresses)
                result["waypoint_before"] = w.HasField("waypoint")
                await asyncio.to_thread(
                    k8s.kubectl, "label", "pod", "web", "-n", ns, "istio.io/use-waypoint=waypoint"
                )
                labelled.set()
                await client.wait_for(
                    lambda c: (
                        c.resources(ADDRESS_TYPE_URL)[name].unpack(wl.Address).workload.HasField("waypoint")
                    )
                )
                w = client.resources(ADDRESS_TYPE_URL)[name].unpack(wl.Address).workload
                result["waypoint"] = w.waypoint.hostname.hostname

        asyncio.run(client_flow())
        import ipaddress

        assert result["addresses"] == [ipaddress.ip_address(ip).packed]
        assert result["waypoint_before"] is False
        assert result["waypoint"] == f"waypoint.{ns}.svc.cluster.local"
        assert running.store.get("Pod", ns, "web") is not None
    k8s.kubectl("delete", "namespace", ns, "--wait=false", check=False)
