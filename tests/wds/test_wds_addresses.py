"""WDS: Workload and Service messages from a real store built from YAML, asserted field by field."""

from __future__ import annotations

import ipaddress

from wds_helpers import apply, pod, store_from

from istiopy.api.gen import workload_pb2 as wl
from istiopy.mesh.ambient import AmbientIndex, MeshSettings, typed_list
from istiopy.mesh.resources.core import Pod
from istiopy.mesh.store import ConfigStore
from istiopy.xds.wds import ADDRESS_TYPE_URL, generate_addresses

NAMESPACES = """
apiVersion: v1
kind: Namespace
metadata: {name: amb, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
"""

WAYPOINT = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: %(name)s, namespace: %(ns)s, labels: {istio.io/waypoint-for: %(for)s}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
"""


def waypoint(name: str = "waypoint", ns: str = "amb", for_: str = "service") -> str:
    return "---\n" + WAYPOINT % {"name": name, "ns": ns, "for": for_}


def addresses(store: ConfigStore) -> dict[str, wl.Address]:
    return dict(generate_addresses(store))


def workload(store: ConfigStore, ns: str, name: str) -> wl.Workload:
    return addresses(store)[f"Kubernetes//Pod/{ns}/{name}"].workload


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_type_url_is_upstreams() -> None:
    assert ADDRESS_TYPE_URL == "type.googleapis.com/istio.workload.Address"


def test_ambient_pod_full_workload_message() -> None:
    store = store_from(
        NAMESPACES
        + """
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: amb}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http-alt}
  - {name: metrics, port: 9090, targetPort: 9091}
  - {name: admin, port: 8000, targetPort: admin}
"""
        + pod(
            "web-7d9f8-abcde",
            "amb",
            "10.0.0.5",
            {"app": "web", "version": "v2", "pod-template-hash": "7d9f8"},
            sa="web-sa",
            node="node-1",
            ports=[("http-alt", 8080)],
            owner=("ReplicaSet", "web-7d9f8"),
        )
    )
    expected = wl.Workload(
        uid="Kubernetes//Pod/amb/web-7d9f8-abcde",
        name="web-7d9f8-abcde",
        namespace="amb",
        addresses=[ip("10.0.0.5")],
        tunnel_protocol=wl.HBONE,
        service_account="web-sa",
        node="node-1",
        canonical_name="web",
        canonical_revision="v2",
        workload_type=wl.POD,
        workload_name="web",
        status=wl.HEALTHY,
        cluster_id="Kubernetes",
    )
    # The named target port resolves against the pod's container port; "admin" is not exposed: left out.
    expected.services["amb/web.amb.svc.cluster.local"].ports.add(service_port=80, target_port=8080)
    expected.services["amb/web.amb.svc.cluster.local"].ports.add(service_port=9090, target_port=9091)
    assert workload(store, "amb", "web-7d9f8-abcde") == expected


def test_service_message_and_resource_names() -> None:
    store = store_from(
        NAMESPACES
        + """
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: amb}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00::a"]
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: grpc-api, port: 9000, targetPort: 9000, appProtocol: grpc}
  - {name: tcp-db, port: 5432}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: plain}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: plain}
spec: {type: ExternalName, externalName: example.com}
"""
    )
    got = addresses(store)
    assert sorted(got) == ["amb/web.amb.svc.cluster.local", "plain/headless.plain.svc.cluster.local"]
    svc = got["amb/web.amb.svc.cluster.local"].service
    expected = wl.Service(
        name="web",
        namespace="amb",
        hostname="web.amb.svc.cluster.local",
        addresses=[
            wl.NetworkAddress(address=ip("10.96.0.10")),
            wl.NetworkAddress(address=ip("fd00::a")),
        ],
        ports=[
            wl.Port(service_port=80, target_port=0, app_protocol=wl.HTTP11),
            wl.Port(service_port=9000, target_port=9000, app_protocol=wl.GRPC),
            wl.Port(service_port=5432, target_port=5432, app_protocol=wl.TCP),
        ],
        ip_families=wl.DUAL,
        canonical=True,
    )
    assert svc == expected
    assert len(svc.addresses[1].address) == 16
    headless = got["plain/headless.plain.svc.cluster.local"].service
    assert list(headless.addresses) == []


def test_enrollment_combinations() -> None:
    store = store_from(
        NAMESPACES
        + pod("in-ambient-ns", "amb", "10.0.0.1")
        + pod("opted-out", "amb", "10.0.0.2", {"istio.io/dataplane-mode": "none"})
        + pod("sidecar", "amb", "10.0.0.3", annotations={"sidecar.istio.io/status": "{}"})
        + pod("opted-in", "plain", "10.0.0.4", {"istio.io/dataplane-mode": "ambient"})
        + pod("plain", "plain", "10.0.0.5")
        + pod("waypoint-x", "amb", "10.0.0.6", {"gateway.istio.io/managed": "istio.io-mesh-controller"})
    )
    index = AmbientIndex(store)
    enrolled = {p.name: index.pod_enrolled(p) for p in typed_list(store, Pod)}
    assert enrolled == {
        "in-ambient-ns": True,
        "opted-out": False,
        "sidecar": False,
        "opted-in": True,
        "plain": False,
        "waypoint-x": False,  # never captured: it terminates HBONE itself
    }
    protocols = {w.workload.name: w.workload.tunnel_protocol for w in addresses(store).values()}
    assert protocols == {
        "in-ambient-ns": wl.HBONE,
        "opted-out": wl.NONE,
        "sidecar": wl.NONE,
        "opted-in": wl.HBONE,
        "plain": wl.NONE,  # still sent: ztunnel reaches non-mesh pods in plaintext
        "waypoint-x": wl.NONE,  # no Gateway of that name here, so not a known waypoint either
    }


def test_pods_without_ip_or_terminated_are_not_sent_and_unready_is_unhealthy() -> None:
    store = store_from(
        NAMESPACES + pod("ready", "amb", "10.0.0.1") + pod("unready", "amb", "10.0.0.2", ready=False)
    )
    apply(
        store,
        """
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: amb}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: amb}
status: {phase: Succeeded, podIP: 10.0.0.9}
""",
    )
    got = {a.workload.name: a.workload.status for a in addresses(store).values()}
    assert got == {"ready": wl.HEALTHY, "unready": wl.UNHEALTHY}


def test_dual_stack_pod_sends_both_addresses_as_raw_bytes() -> None:
    store = store_from(
        NAMESPACES
        + """
---
apiVersion: v1
kind: Pod
metadata: {name: dual, namespace: amb}
status:
  phase: Running
  podIP: 10.0.0.7
  podIPs: [{ip: 10.0.0.7}, {ip: "fd00::7"}]
"""
    )
    w = workload(store, "amb", "dual")
    assert list(w.addresses) == [bytes([10, 0, 0, 7]), ip("fd00::7")]
    assert w.service_account == "default"


def test_settings_change_uid_trust_domain_and_network() -> None:
    store = store_from(NAMESPACES + pod("p", "amb", "10.0.0.1"))
    settings = MeshSettings(cluster_id="east", network="net1", trust_domain="example.org")
    (name, addr), *_ = generate_addresses(store, settings)
    assert name == "east//Pod/amb/p"
    assert addr.workload.trust_domain == "example.org"
    assert addr.workload.network == "net1"
    assert addr.workload.cluster_id == "east"


def test_canonical_labels_and_workload_names() -> None:
    store = store_from(
        NAMESPACES
        + pod(
            "a",
            "amb",
            "10.0.0.1",
            {
                "service.istio.io/canonical-name": "shop",
                "service.istio.io/canonical-revision": "r7",
                "app": "x",
            },
        )
        + pod("job-pod", "amb", "10.0.0.2", owner=("Job", "nightly-28912345"))
        + pod("sts-0", "amb", "10.0.0.3", owner=("StatefulSet", "db"))
        + pod("bare", "amb", "10.0.0.4")
    )
    got = {
        a.workload.name: (a.workload.workload_name, a.workload.canonical_name, a.workload.canonical_revision)
        for a in addresses(store).values()
    }
    assert got == {
        "a": ("a", "shop", "r7"),
        "job-pod": ("nightly", "nightly", "latest"),
        "sts-0": ("db", "db", "latest"),
        "bare": ("bare", "bare", "latest"),
    }


def test_selectorless_service_membership_via_endpointslice_target_ref() -> None:
    store = store_from(
        NAMESPACES
        + pod("p", "amb", "10.0.0.1")
        + """
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: amb}
spec: {clusterIP: 10.96.0.20, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: manual-1, namespace: amb, labels: {kubernetes.io/service-name: manual}}
addressType: IPv4
endpoints:
- addresses: [10.0.0.1]
  targetRef: {kind: Pod, name: p, namespace: amb}
ports: [{port: 8080}]
"""
    )
    w = workload(store, "amb", "p")
    assert list(w.services) == ["amb/manual.amb.svc.cluster.local"]
    assert [
        (p.service_port, p.target_port) for p in w.services["amb/manual.amb.svc.cluster.local"].ports
    ] == [(80, 8080)]


def test_prefer_close_traffic_distribution_sets_failover_locality() -> None:
    store = store_from(
        NAMESPACES
        + """
---
apiVersion: v1
kind: Service
metadata: {name: near, namespace: amb}
spec: {clusterIP: 10.96.0.30, trafficDistribution: PreferClose, ports: [{port: 80}]}
"""
    )
    lb = addresses(store)["amb/near.amb.svc.cluster.local"].service.load_balancing
    assert list(lb.routing_preference) == [
        wl.LoadBalancing.NETWORK,
        wl.LoadBalancing.REGION,
        wl.LoadBalancing.ZONE,
    ]
    assert lb.mode == wl.LoadBalancing.FAILOVER


def test_namespace_annotation_prefer_same_node_and_ip_families() -> None:
    store = store_from(
        """
apiVersion: v1
kind: Namespace
metadata: {name: edge, annotations: {networking.istio.io/traffic-distribution: PreferSameNode}}
---
apiVersion: v1
kind: Service
metadata: {name: v6, namespace: edge}
spec: {clusterIP: "fd00::10", ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: v4, namespace: edge}
spec: {clusterIP: 10.96.9.9, ports: [{port: 80}]}
"""
    )
    got = addresses(store)
    v6 = got["edge/v6.edge.svc.cluster.local"].service
    assert v6.ip_families == wl.IPV6_ONLY
    assert got["edge/v4.edge.svc.cluster.local"].service.ip_families == wl.IPV4_ONLY
    assert list(v6.load_balancing.routing_preference)[-1] == wl.LoadBalancing.NODE
    assert v6.load_balancing.mode == wl.LoadBalancing.FAILOVER


def test_generation_is_deterministic_byte_for_byte() -> None:
    docs = [
        NAMESPACES,
        waypoint(),
        """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: amb, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80}, {name: b, port: 81}]}
---
apiVersion: v1
kind: Service
metadata: {name: web2, namespace: amb}
spec: {clusterIP: 10.96.0.11, selector: {app: web}, ports: [{port: 82}]}
""",
    ] + [pod(f"web-{i}", "amb", f"10.0.0.{i}", {"app": "web"}) for i in range(1, 6)]
    forward = store_from("\n---\n".join(docs))
    backward = store_from("\n---\n".join(reversed(docs)))

    def serialize(store: ConfigStore) -> list[tuple[str, bytes]]:
        return [(n, m.SerializeToString(deterministic=True)) for n, m in generate_addresses(store)]

    first = serialize(forward)
    assert first == serialize(forward)
    assert first == serialize(backward)
    assert [n for n, _ in first] == sorted(n for n, _ in first)


def test_pod_locality_comes_from_its_node() -> None:
    store = store_from(
        NAMESPACES
        + """
---
apiVersion: v1
kind: Node
metadata:
  name: node-1
  labels:
    topology.kubernetes.io/region: eu
    topology.kubernetes.io/zone: eu-1a
    topology.istio.io/subzone: rack7
"""
        + pod("here", "amb", "10.0.0.1", node="node-1")
        + pod("elsewhere", "amb", "10.0.0.2", node="node-2")
    )
    assert workload(store, "amb", "here").locality == wl.Locality(region="eu", zone="eu-1a", subzone="rack7")
    assert not workload(store, "amb", "elsewhere").HasField("locality")
