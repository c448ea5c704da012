"""Operator settings: one dataclass, filled by istiod's flags (and environment in a pod).

Why a dataclass and not module constants: tests run several operators against one API server side by side
(leader failover), so every name that must differ between them - Lease, webhook configuration, ports - is a
field here, and the defaults are what a Helm install uses.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

__all__ = ["OperatorConfig", "WaypointTemplate"]


@dataclass(frozen=True)
class WaypointTemplate:
    """What a waypoint Deployment runs. ``image`` defaults to ``<hub>/waypoint:<tag>``.

    ``args`` are the waypoint launcher's arguments (none; upstream: ``proxy waypoint``); ``env`` is passed
    through (the launcher reads the xDS/CA address from ``XDS_ADDRESS``/``CA_ADDRESS``, as ztunnel does).
    """

    hub: str = "docker.io/istiopy"
    tag: str = "latest"
    image: str = ""
    args: tuple[str, ...] = ()  # the image entrypoint runs the launcher, which takes no arguments
    env: tuple[tuple[str, str], ...] = ()
    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = ""
    memory_limit: str = ""
    image_pull_policy: str = "IfNotPresent"

    @property
    def image_ref(self) -> str:
        return self.image or f"{self.hub}/waypoint:{self.tag}"

    def resources(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        requests = {k: v for k, v in (("cpu", self.cpu_request), ("memory", self.memory_request)) if v}
        limits = {k: v for k, v in (("cpu", self.cpu_limit), ("memory", self.memory_limit)) if v}
        if requests:
            out["requests"] = requests
        if limits:
            out["limits"] = limits
        return out


def _default_identity() -> str:
    """The pod name in a cluster (``POD_NAME`` from the downward API), else host and pid."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator needs besides the API client and the store."""

    # The control-plane namespace: Lease, CA Secret, istiod Service.
    namespace: str = "istio-system"
    identity: str = field(default_factory=_default_identity)
    # Leader election (coordination.k8s.io Lease): a standby takes over within lease_duration + retry.
    lease_name: str = "istiod-py-leader"
    lease_duration: float = 10.0
    renew_deadline: float = 8.0
    retry_period: float = 2.0
    # Watches: a silent stream is cut by the server after server_timeout and by us after client_timeout.
    watch_server_timeout: int = 60
    watch_client_timeout: int = 75
    # Validating admission webhook: served on every replica, configuration kept by the leader.
    webhook_enabled: bool = True
    webhook_address: str = "0.0.0.0"
    webhook_port: int = 15017
    webhook_name: str = "istiod-py-validator"
    # Where the API server sends reviews: a URL (tests: https://127.0.0.1:<port>/validate) or the Service.
    webhook_url: str = ""
    webhook_service: str = "istiod"
    webhook_failure_policy: str = "Auto"  # Ignore until verified reachable, then Fail (upstream's way)
    # Waypoints and GatewayClass
    waypoint: WaypointTemplate = field(default_factory=WaypointTemplate)
    waypoint_class: str = "istio-waypoint"
    controller_name: str = "istio.io/mesh-controller"
    manage_gateway_class: bool = True
    # Status writing (leader only)
    write_status: bool = True
    status_debounce: float = 0.2
    domain_suffix: str = "cluster.local"
    trust_domain: str = "cluster.local"
