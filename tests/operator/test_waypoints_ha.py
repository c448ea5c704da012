"""Waypoint deployment and high availability against the real API server and controller-manager: a waypoint
Gateway becomes ServiceAccount/Deployment/Service owned by it, is Programmed once the Deployment is available
(the kubelet stand-in runs its pod), and is garbage-collected with it; a standby takes over the Lease."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from op_helpers import RunningOperator, eventually, operator_config

from istiopy.mesh.kinds import parse
from istiopy.operator.config import WaypointTemplate
from istiopy.operator.waypoints import desired_objects
from istiopy.testing.cluster import TestCluster
from istiopy.testing.kubelet import KubeletStandIn

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

WAYPOINT = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {"name": "waypoint", "labels": {"istio.io/waypoint-for": "service"}},
    "spec": {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    },
}


def test_desired_objects_follow_the_template() -> None:
    gw = parse({**WAYPOINT, "metadata": {**WAYPOINT["metadata"], "namespace": "shop", "uid": "u1"}})
    sa, dep, svc = desired_objects(gw, WaypointTemplate(hub="reg.example/istiopy", tag="1.2"))  # type: ignore[arg-type]
    assert sa["kind"] == "ServiceAccount"
    pod = dep["spec"]["template"]
    assert pod["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"
    assert pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"] == "waypoint"
    assert pod["spec"]["containers"][0]["image"] == "reg.example/istiopy/waypoint:1.2"
    assert pod["spec"]["containers"][0]["args"] == []  # the image entrypoint is the launcher
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [15008, 15020, 15021]
    for obj in (sa, dep, svc):
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner == {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "name": "waypoint",
            "uid": "u1",
            "controller": True,
            "blockOwnerDeletion": True,
        }


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def test_waypoint_gateway_is_deployed_programmed_and_collected(
    k8s: TestCluster, k8s_kubelet: KubeletStandIn, operator: RunningOperator, ns: str
) -> None:
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(WAYPOINT))

    def children() -> list[str]:
        items = k8s.kubectl_json(
            "get",
            "serviceaccount,deployment,service",
            "-n",
            ns,
            "-l",
            "gateway.networking.k8s.io/gateway-name=waypoint",
        )["items"]
        return sorted(f"{i['kind']}/{i['metadata']['name']}" for i in items)

    eventually(
        lambda: children() == ["Deployment/waypoint", "Service/waypoint", "ServiceAccount/waypoint"],
        what="waypoint objects",
    )
    svc = k8s.kubectl_json("get", "service", "waypoint", "-n", ns)
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [15008, 15020, 15021]
    gw_uid = k8s.kubectl_json("get", "gateway", "waypoint", "-n", ns)["metadata"]["uid"]
    assert svc["metadata"]["ownerReferences"][0]["uid"] == gw_uid

    def programmed() -> dict[str, Any] | None:
        gw = k8s.kubectl_json("get", "gateway", "waypoint", "-n", ns)
        c = _conditions(gw).get("Programmed")
        return gw if c and c["status"] == "True" else None

    gw = eventually(programmed, timeout=60, what="Programmed once the Deployment is available")
    conds = _conditions(gw)
    assert conds["Accepted"]["status"] == "True"
    assert conds["Programmed"]["reason"] == "Programmed"
    addresses = gw["status"]["addresses"]
    assert {"type": "IPAddress", "value": svc["spec"]["clusterIP"]} in addresses
    assert {"type": "Hostname", "value": f"waypoint.{ns}.svc.cluster.local"} in addresses
    pods = k8s_kubelet.wait_running(ns, "gateway.networking.k8s.io/gateway-name=waypoint", 1)
    assert pods[0]["metadata"]["labels"]["istio.io/dataplane-mode"] == "none"

    gc = k8s.kubectl_json("get", "gatewayclass", "istio-waypoint")
    assert gc["spec"]["controllerName"] == "istio.io/mesh-controller"
    eventually(
        lambda: _conditions(k8s.kubectl_json("get", "gatewayclass", "istio-waypoint")).get("Accepted"),
        what="GatewayClass Accepted",
    )

    # The model sees the waypoint's own Service (WDS resolves the waypoint hostname through it).
    eventually(lambda: operator.store.get("Service", ns, "waypoint"), what="waypoint Service in the store")

    # Deleting the Gateway lets the real garbage collector remove what it owns.
    k8s.kubectl("delete", "gateway", "waypoint", "-n", ns)
    eventually(lambda: children() == [], timeout=60, what="garbage collection of the waypoint objects")


def test_standby_takes_over_when_the_leader_dies(k8s: TestCluster, ns: str) -> None:
    """Two operators on one Lease: one leads, both watch; the standby leads within the lease time after the
    leader stops renewing, and then does the leader's work (waypoint objects)."""
    cfg = operator_config()
    first = RunningOperator(k8s, cfg).start()
    second = RunningOperator(
        k8s, operator_config(lease_name=cfg.lease_name, webhook_name=cfg.webhook_name)
    ).start()
    try:
        leader = eventually(
            lambda: first if first.is_leader else second if second.is_leader else None, what="a leader"
        )
        standby = second if leader is first else first
        time.sleep(1.0)
        assert not standby.is_leader
        # Both replicas watch: the standby's store has the same objects.
        k8s.kubectl("create", "serviceaccount", "both", "-n", ns)
        eventually(
            lambda: (
                leader.store.get("ServiceAccount", ns, "both")
                and standby.store.get("ServiceAccount", ns, "both")
            ),
            what="both stores",
        )
        lease = k8s.kubectl_json("get", "lease", cfg.lease_name, "-n", cfg.namespace)
        assert lease["spec"]["holderIdentity"] == leader.config.identity

        t0 = time.monotonic()
        leader.crash()
        eventually(lambda: standby.is_leader, timeout=15, what="the standby to take over")
        took = time.monotonic() - t0
        lease = k8s.kubectl_json("get", "lease", cfg.lease_name, "-n", cfg.namespace)
        assert lease["spec"]["holderIdentity"] == standby.config.identity
        assert took < 15
        # The new leader writes: a waypoint gets its objects.
        k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(WAYPOINT))
        eventually(
            lambda: k8s.kubectl("get", "deployment", "waypoint", "-n", ns, check=False).returncode == 0,
            what="the new leader to deploy the waypoint",
        )
    finally:
        first.stop()
        second.stop()
