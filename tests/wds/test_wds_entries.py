"""WDS for ServiceEntry and WorkloadEntry: uids, hosts as Services, inline and implicit endpoints."""

from __future__ import annotations

import ipaddress

from wds_helpers import pod, store_from

from istiopy.api.gen import workload_pb2 as wl
from istiopy.xds.wds import generate_addresses

NS = """
apiVersion: v1
kind: Namespace
metadata: {name: ext, labels: {istio.io/dataplane-mode: ambient}}
"""


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_service_entry_hosts_and_static_endpoints() -> None:
    store = store_from(
        NS
        + """
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: ext}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.1]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 443, name: https, protocol: TLS}
  - {number: 80, name: http, protocol: HTTP, targetPort: 8080}
  endpoints:
  - {address: 10.1.0.1, serviceAccount: vm-sa, ports: {https: 8443}, locality: us-east/zone-a, weight: 3}
  - {address: 10.1.0.2}
"""
    )
    got = dict(generate_addresses(store))
    assert sorted(got) == [
        "Kubernetes/networking.istio.io/ServiceEntry/ext/vms/10.1.0.1",
        "Kubernetes/networking.istio.io/ServiceEntry/ext/vms/10.1.0.2",
        "ext/api.example.com",
    ]
    assert got["ext/api.example.com"].service == wl.Service(
        name="vms",
        namespace="ext",
        hostname="api.example.com",
        addresses=[wl.NetworkAddress(address=ip("240.0.0.1"))],
        ports=[
            wl.Port(service_port=443, target_port=443, app_protocol=wl.TLS),
            wl.Port(service_port=80, target_port=8080, app_protocol=wl.HTTP11),
        ],
    )
    first = got["Kubernetes/networking.istio.io/ServiceEntry/ext/vms/10.1.0.1"].workload
    expected = wl.Workload(
        uid="Kubernetes/networking.istio.io/ServiceEntry/ext/vms/10.1.0.1",
        name="vms",
        namespace="ext",
        addresses=[ip("10.1.0.1")],
        service_account="vm-sa",
        canonical_name="vms",
        canonical_revision="latest",
        workload_type=wl.POD,
        workload_name="vms",
        cluster_id="Kubernetes",
        locality=wl.Locality(region="us-east", zone="zone-a"),
    )
    expected.capacity.value = 3
    ports = expected.services["ext/api.example.com"].ports
    ports.add(service_port=443, target_port=8443)  # the endpoint's named port
    ports.add(service_port=80, target_port=8080)
    assert first == expected


def test_dns_service_entry_without_endpoints_gets_one_hostname_workload_per_host() -> None:
    store = store_from(
        NS
        + """
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: ext}
spec:
  hosts: [a.example.com, b.example.com]
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
"""
    )
    got = dict(generate_addresses(store))
    w = got["Kubernetes/networking.istio.io/ServiceEntry/ext/web/b.example.com"].workload
    assert w.hostname == "b.example.com"
    assert list(w.addresses) == []
    assert list(w.services) == ["ext/b.example.com"]
    assert [(p.service_port, p.target_port) for p in w.services["ext/b.example.com"].ports] == [(443, 443)]


def test_workload_entry_joins_services_by_selector_and_named_ports() -> None:
    store = store_from(
        NS
        + """
---
apiVersion: v1
kind: Service
metadata: {name: billing, namespace: ext}
spec:
  clusterIP: 10.96.1.1
  selector: {app: billing}
  ports: [{name: http, port: 80, targetPort: web}, {name: x, port: 81, targetPort: other}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: vm-1
  namespace: ext
  labels: {app: billing}
  annotations: {ambient.istio.io/redirection: enabled}
spec: {address: 10.2.0.1, ports: {web: 9080}, serviceAccount: billing, network: vm-net}
"""
    )
    w = dict(generate_addresses(store))["Kubernetes/networking.istio.io/WorkloadEntry/ext/vm-1"].workload
    assert w.tunnel_protocol == wl.HBONE
    assert w.network == "vm-net"
    assert w.service_account == "billing"
    assert list(w.addresses) == [ip("10.2.0.1")]
    ports = w.services["ext/billing.ext.svc.cluster.local"].ports
    assert [(p.service_port, p.target_port) for p in ports] == [(80, 9080)]


def test_service_entry_workload_selector_adds_hosts_to_selected_pods() -> None:
    store = store_from(
        NS
        + """
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: internal, namespace: ext}
spec:
  hosts: [internal.example.com]
  addresses: [240.0.0.9]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  workloadSelector: {labels: {app: internal}}
"""
        + pod("internal-1", "ext", "10.0.0.9", {"app": "internal"})
    )
    got = dict(generate_addresses(store))
    w = got["Kubernetes//Pod/ext/internal-1"].workload
    ports = w.services["ext/internal.example.com"].ports
    assert [(p.service_port, p.target_port) for p in ports] == [(80, 8080)]
    assert "ext/internal.example.com" in got


def test_resolution_none_service_entry_passes_through() -> None:
    store = store_from(
        NS
        + """
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: egress, namespace: ext}
spec:
  hosts: [files.example.com]
  addresses: [203.0.113.0/24]
  resolution: NONE
  ports: [{number: 443, name: tls, protocol: TLS}]
"""
    )
    svc = dict(generate_addresses(store))["ext/files.example.com"].service
    assert svc.load_balancing == wl.LoadBalancing(
        mode=wl.LoadBalancing.PASSTHROUGH, health_policy=wl.LoadBalancing.ALLOW_ALL
    )
    assert list(svc.addresses) == [wl.NetworkAddress(address=ip("203.0.113.0"), length=24)]
    assert not svc.canonical
