"""Waypoint deployment: a Gateway of class ``istio-waypoint`` becomes a ServiceAccount, Deployment, Service.

The desired objects are pure functions of the Gateway and the template (tested without a cluster); the
reconciler server-side-applies them (idempotent: retries and API server restarts never duplicate anything)
with an ownerReference to the Gateway, so the real garbage collector removes them when the Gateway goes.

Gateway status follows the Gateway API: ``Accepted`` (the class is ours and the Gateway is valid) and
``Programmed`` (``Pending`` until the Deployment reports Available, then ``Programmed``), and
``status.addresses`` lists the Service's cluster IP and hostname. The GatewayClass ``istio-waypoint`` is
created if missing and marked Accepted.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from istiopy.mesh.ambient import GATEWAY_NAME_LABEL, HBONE_PORT, MANAGED_LABEL, MANAGED_MESH
from istiopy.mesh.resources.core import Service
from istiopy.mesh.resources.gateway import Gateway, GatewayClass
from istiopy.operator.config import OperatorConfig, WaypointTemplate
from istiopy.operator.kubeapi import KubeApi, resource_path

__all__ = [
    "WAYPOINT_PORTS",
    "WaypointReconciler",
    "deployment_available",
    "desired_objects",
    "gateway_status",
]

log = logging.getLogger(__name__)

GATEWAY_GROUP = "gateway.networking.k8s.io"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
# 15008 HBONE, 15021 readiness/health, 15020 merged metrics (upstream waypoint Service ports).
WAYPOINT_PORTS: tuple[tuple[str, int, str], ...] = (
    ("mesh", HBONE_PORT, "all"),
    ("status-port", 15021, "http"),
    ("metrics", 15020, "http"),
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _owner(gw: Gateway, api_version: str) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": "Gateway",
        "name": gw.name,
        "uid": gw.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def desired_objects(
    gw: Gateway, template: WaypointTemplate, *, api_version: str = f"{GATEWAY_GROUP}/v1", istio_ns: str = ""
) -> list[dict[str, Any]]:
    """ServiceAccount, Deployment and Service for waypoint ``gw`` (all named like the Gateway)."""
    name, ns = gw.name, gw.namespace
    labels = {
        GATEWAY_NAME_LABEL: name,
        MANAGED_LABEL: MANAGED_MESH,
        **{k: v for k, v in gw.labels.items() if k.startswith("istio.io/waypoint-for")},
    }
    if gw.spec.infrastructure is not None:
        labels.update(gw.spec.infrastructure.labels)
    annotations = dict(gw.spec.infrastructure.annotations) if gw.spec.infrastructure is not None else {}
    owner = [_owner(gw, api_version)]
    meta = {"name": name, "namespace": ns, "labels": labels, "ownerReferences": owner}
    if annotations:
        meta["annotations"] = annotations
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "INSTANCE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "SERVICE_ACCOUNT", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "ISTIO_META_WAYPOINT", "value": f"{ns}/{name}"},
        *({"name": k, "value": v} for k, v in template.env),
    ]
    if istio_ns and not any(k == "XDS_ADDRESS" for k, _ in template.env):
        env.append({"name": "XDS_ADDRESS", "value": f"istiod.{istio_ns}.svc:15012"})
    container: dict[str, Any] = {
        "name": "istio-proxy",
        "image": template.image_ref,
        "imagePullPolicy": template.image_pull_policy,
        "args": list(template.args),
        "env": env,
        "ports": [
            {"name": "mesh", "containerPort": HBONE_PORT, "protocol": "TCP"},
            {"name": "status-port", "containerPort": 15021, "protocol": "TCP"},
            {"name": "metrics", "containerPort": 15020, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}, "periodSeconds": 5},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": 1337,
            "runAsGroup": 1337,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens"},
            {"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio"},
        ],
    }
    resources = template.resources()
    if resources:
        container["resources"] = resources
    pod_labels = {**labels, DATAPLANE_MODE_LABEL: "none"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "serviceAccountName": name,
                    "terminationGracePeriodSeconds": 2,
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "istio-token",
                            "projected": {
                                "sources": [
                                    {
                                        "serviceAccountToken": {
                                            "audience": "istio-ca",
                                            "expirationSeconds": 43200,
                                            "path": "istio-token",
                                        }
                                    }
                                ]
                            },
                        },
                        {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": [
                {"name": pname, "port": port, "targetPort": port, "protocol": "TCP", "appProtocol": proto}
                for pname, port, proto in WAYPOINT_PORTS
            ],
        },
    }
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}
    return [sa, deployment, service]


def _path_of(obj: Mapping[str, Any]) -> str:
    md = obj["metadata"]
    plural = {"ServiceAccount": "serviceaccounts", "Deployment": "deployments", "Service": "services"}[
        obj["kind"]
    ]
    group, _, version = obj["apiVersion"].rpartition("/")
    return resource_path(group, version, plural, md["namespace"], md["name"])


def deployment_available(deployment: Mapping[str, Any] | None) -> bool:
    if not deployment:
        return False
    for c in (deployment.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Available":
            return bool(c.get("status") == "True")
    return False


def _condition(
    ctype: str, status: bool, reason: str, message: str, generation: int | None, old: list[Mapping[str, Any]]
) -> dict[str, Any]:
    """A metav1.Condition; ``lastTransitionTime`` only moves when the status does."""
    st = "True" if status else "False"
    prev = next((c for c in old if c.get("type") == ctype), None)
    when = prev.get("lastTransitionTime") if prev and prev.get("status") == st else None
    return {
        "type": ctype,
        "status": st,
        "reason": reason,
        "message": message,
        "observedGeneration": generation or 0,
        "lastTransitionTime": when or _now(),
    }


def gateway_status(
    gw: Gateway,
    service: Service | None,
    deployment: Mapping[str, Any] | None,
    old_status: Mapping[str, Any],
    domain: str = "cluster.local",
) -> dict[str, Any]:
    """The Gateway's status: Accepted, Programmed (Pending until the Deployment is Available), addresses."""
    old = list(old_status.get("conditions") or [])
    gen = gw.metadata.generation
    available = deployment_available(deployment)
    addresses: list[dict[str, str]] = []
    if service is not None:
        addresses += [{"type": "IPAddress", "value": ip} for ip in service.vips]
        addresses.append({"type": "Hostname", "value": service.hostname(domain)})
    if deployment is None:
        programmed = _condition(
            "Programmed", False, "Pending", "waypoint Deployment not created yet", gen, old
        )
    elif not available:
        programmed = _condition(
            "Programmed", False, "Pending", "waypoint Deployment is not available yet", gen, old
        )
    elif not addresses:
        programmed = _condition(
            "Programmed", False, "AddressNotAssigned", "waypoint Service has no address", gen, old
        )
    else:
        programmed = _condition("Programmed", True, "Programmed", "resources available", gen, old)
    accepted = _condition("Accepted", True, "Accepted", "resources deployed", gen, old)
    listeners: list[dict[str, Any]] = [
        {
            "name": lst.name,
            "supportedKinds": [],
            "attachedRoutes": 0,
            "conditions": [
                _condition("Accepted", True, "Accepted", "", gen, []),
                _condition("Programmed", programmed["status"] == "True", programmed["reason"], "", gen, []),
            ],
        }
        for lst in gw.spec.listeners
    ]
    # Keep listener transition times stable too.
    old_listeners = {item.get("name"): item for item in old_status.get("listeners") or []}
    for item in listeners:
        prev = old_listeners.get(item["name"]) or {}
        item["conditions"] = [
            _condition(c["type"], c["status"] == "True", c["reason"], "", gen, prev.get("conditions") or [])
            for c in item["conditions"]
        ]
    return {"addresses": addresses, "conditions": [accepted, programmed], "listeners": listeners}


def comparable(status: Mapping[str, Any]) -> Any:
    """A status without timestamps, for deciding whether a write would change anything."""

    def strip(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in value.items() if k != "lastTransitionTime"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(status)


class WaypointReconciler:
    """Leader-only: makes the cluster match the waypoint Gateways in the store."""

    def __init__(self, api: KubeApi, config: OperatorConfig) -> None:
        self.api = api
        self.config = config
        self._applied: dict[tuple[str, str], Any] = {}  # (ns, name) -> (uid, template) last applied
        self._class_ok = False

    def forget(self) -> None:
        """After leadership changes hands, re-apply everything once (another leader may have written)."""
        self._applied.clear()
        self._class_ok = False

    async def ensure_gateway_class(self, existing: GatewayClass | None, status: Mapping[str, Any]) -> None:
        cfg = self.config
        path = resource_path(GATEWAY_GROUP, "v1", "gatewayclasses", None, cfg.waypoint_class)
        if existing is None and not self._class_ok:
            await self.api.apply(
                path,
                {
                    "apiVersion": f"{GATEWAY_GROUP}/v1",
                    "kind": "GatewayClass",
                    "metadata": {"name": cfg.waypoint_class},
                    "spec": {
                        "controllerName": cfg.controller_name,
                        "description": "Ambient waypoints (istiopy)",
                    },
                },
            )
            self._class_ok = True
            return
        if existing is None or existing.spec.controller_name != cfg.controller_name:
            return
        old = list(status.get("conditions") or [])
        want = {
            "conditions": [
                _condition(
                    "Accepted", True, "Accepted", "Handled by istiopy", existing.metadata.generation, old
                )
            ]
        }
        if comparable(want) != comparable({"conditions": old}):
            await self.api.merge_patch(path + "/status", {"status": want})

    async def reconcile(
        self,
        gw: Gateway,
        service: Service | None,
        deployment: Mapping[str, Any] | None,
        status: Mapping[str, Any],
    ) -> None:
        """Apply the children (when the Gateway or template changed) and write the Gateway's status."""
        key = (gw.namespace, gw.name)
        fingerprint = (
            gw.metadata.uid,
            gw.metadata.generation,
            gw.labels.get("istio.io/waypoint-for"),
            self.config.waypoint,
        )
        if self._applied.get(key) != fingerprint or deployment is None:
            for obj in desired_objects(gw, self.config.waypoint, istio_ns=self.config.namespace):
                await self.api.apply(_path_of(obj), obj)
            self._applied[key] = fingerprint
            log.info("waypoint %s/%s: ServiceAccount, Deployment and Service applied", gw.namespace, gw.name)
        want = gateway_status(gw, service, deployment, status, self.config.domain_suffix)
        if comparable(want) != comparable(status):
            path = resource_path(GATEWAY_GROUP, "v1", "gateways", gw.namespace, gw.name, "status")
            await self.api.merge_patch(path, {"status": want})

    def dropped(self, namespace: str, name: str) -> None:
        self._applied.pop((namespace, name), None)
