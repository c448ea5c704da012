"""The store indexes every part of the mesh looks things up by: pod IP, service hostname, VIP, node.

The store's indexes are per kind, so hostnames come from two indexes (``service-host`` for Services,
``serviceentry-host`` for ServiceEntries); ``services_by_host`` asks both. Index names are module constants
so a typo is an import error, not an empty result.
"""

from __future__ import annotations

from collections.abc import Iterable

from istiopy.mesh.kinds import kind_class
from istiopy.mesh.meta import Resource
from istiopy.mesh.resources.core import SERVICE_NAME_LABEL, EndpointSlice, Pod, Service
from istiopy.mesh.store import ConfigStore

__all__ = [
    "DEFAULT_DOMAIN",
    "ENDPOINTSLICE_SERVICE",
    "POD_IP",
    "POD_NODE",
    "SERVICEENTRY_HOST",
    "SERVICE_HOST",
    "SERVICE_VIP",
    "install_indexes",
    "services_by_host",
]

DEFAULT_DOMAIN = "cluster.local"

POD_IP = "pod-ip"  # Pod -> each of its IPs
POD_NODE = "pod-node"  # Pod -> spec.nodeName
SERVICE_HOST = "service-host"  # Service -> <name>.<ns>.svc.<domain>
SERVICEENTRY_HOST = "serviceentry-host"  # ServiceEntry -> each of spec.hosts
SERVICE_VIP = "service-vip"  # Service -> each cluster IP
ENDPOINTSLICE_SERVICE = "endpointslice-service"  # EndpointSlice -> <ns>/<service name>


def _pod_ips(res: Resource) -> Iterable[str]:
    return res.ips if isinstance(res, Pod) else ()


def _pod_node(res: Resource) -> Iterable[str]:
    return [res.spec.node_name] if isinstance(res, Pod) and res.spec.node_name else []


def _service_vips(res: Resource) -> Iterable[str]:
    return res.vips if isinstance(res, Service) else ()


def _slice_service(res: Resource) -> Iterable[str]:
    if isinstance(res, EndpointSlice) and res.labels.get(SERVICE_NAME_LABEL):
        return [f"{res.namespace}/{res.labels[SERVICE_NAME_LABEL]}"]
    return []


def _entry_hosts(res: Resource) -> Iterable[str]:
    # ServiceEntry is defined by the networking module; read it structurally so this module does not
    # depend on that class's exact shape.
    hosts = getattr(getattr(res, "spec", None), "hosts", None) or []
    return [h for h in hosts if isinstance(h, str)]


def install_indexes(store: ConfigStore, domain: str = DEFAULT_DOMAIN) -> None:
    """Register every index on ``store`` (idempotent: re-registering rebuilds an index)."""

    def service_host(res: Resource) -> Iterable[str]:
        return [res.hostname(domain)] if isinstance(res, Service) else []

    store.add_index(POD_IP, Pod.KIND, _pod_ips)
    store.add_index(POD_NODE, Pod.KIND, _pod_node)
    store.add_index(SERVICE_HOST, Service.KIND, service_host)
    store.add_index(SERVICE_VIP, Service.KIND, _service_vips)
    store.add_index(ENDPOINTSLICE_SERVICE, EndpointSlice.KIND, _slice_service)
    try:
        entry = kind_class("ServiceEntry")
    except KeyError:
        return
    store.add_index(SERVICEENTRY_HOST, entry.KIND, _entry_hosts)


def services_by_host(store: ConfigStore, host: str) -> list[Resource]:
    """Services and ServiceEntries answering to ``host`` (Services first)."""
    found = store.by_index(SERVICE_HOST, host)
    try:
        found += store.by_index(SERVICEENTRY_HOST, host)
    except KeyError:
        pass
    return found
