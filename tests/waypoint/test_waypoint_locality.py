"""Locality failover at the waypoint with real Envoy and real backends: with outlier detection on (Istio's
condition), requests stay in the waypoint's own zone, move to the next-nearest locality when the local
endpoint is ejected, and follow a DestinationRule's region ``failover`` order."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from wp_helpers import NS, istio, service
from wp_mesh import WaypointMesh, eventually

from istiopy.mesh.kinds import parse

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]

ZONES = {  # node -> (region, zone)
    "node-a": ("us-east", "us-east-1a"),
    "node-b": ("us-east", "us-east-1b"),
    "node-w": ("us-west", "us-west-2a"),
    "node-e": ("eu-west", "eu-west-1a"),
}


def node(name: str) -> Any:
    region, zone = ZONES[name]
    labels = {"topology.kubernetes.io/region": region, "topology.kubernetes.io/zone": zone}
    return parse({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})


def on_node(resource: Any, node_name: str) -> Any:
    spec = resource.spec.model_copy(update={"node_name": node_name})
    return resource.model_copy(update={"spec": spec})


async def served_by(wmesh: WaypointMesh, target: str, n: int = 12) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        r = await wmesh.request(target, "/")
        seen[r.text.split()[0] if r.status == 200 else str(r.status)] += 1
    return seen


async def test_traffic_stays_near_and_fails_over_in_order(wmesh: WaypointMesh) -> None:
    await wmesh.apply(*(node(n) for n in ZONES))
    # The waypoint itself runs on node-a (us-east-1a): istiod finds its pod by the proxy's IP.
    wp_pod = parse(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "waypoint-0", "namespace": NS, "labels": {"app": "waypoint-pod"}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "istio-proxy"}]},
            "status": {"phase": "Running", "podIP": wmesh.waypoint_ip},
        }
    )
    await wmesh.apply(wp_pod)
    for name, where in (("geo-a", "node-a"), ("geo-b", "node-b"), ("geo-w", "node-w"), ("geo-e", "node-e")):
        await wmesh.add_pod(name, "geo")
        pod = wmesh.store.get("Pod", NS, name)
        assert pod is not None
        wmesh.store.apply(on_node(pod, where))
    await wmesh.apply(service("geo", wmesh.vip(70)))
    target = f"{wmesh.vip(70)}:80"

    # No outlier detection: Istio applies no locality failover, round robin reaches every zone.
    assert set(await served_by(wmesh, target)) == {"geo-a", "geo-b", "geo-w", "geo-e"}

    outlier = {
        "consecutive5xxErrors": 1,
        "interval": "0.2s",
        "baseEjectionTime": "60s",
        "maxEjectionPercent": 100,
    }
    await wmesh.apply(
        istio(
            "DestinationRule",
            "geo",
            {
                "host": "geo",
                "trafficPolicy": {
                    "outlierDetection": outlier,
                    "loadBalancer": {
                        "simple": "ROUND_ROBIN",
                        "localityLbSetting": {"failover": [{"from": "us-east", "to": "eu-west"}]},
                    },
                },
            },
        )
    )
    assert await served_by(wmesh, target) == {"geo-a": 12}  # the waypoint's own zone only

    async def fails_over_to(expected: str, failing: str) -> None:
        wmesh.backends[failing].always_fail = True

        async def moved() -> bool:
            return (await served_by(wmesh, target, 4)) == {expected: 4}

        await eventually(moved, timeout=20, what=f"traffic on {expected} once {failing} is ejected")

    await fails_over_to("geo-b", "geo-a")  # same region, next zone
    await fails_over_to("geo-e", "geo-b")  # the failover region before the rest of the world
    await fails_over_to("geo-w", "geo-e")
    assert not wmesh.nacks
