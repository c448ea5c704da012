"""Kubernetes core and Gateway API kinds: real documents load and round-trip; bad ones name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from istiopy.mesh.ambient import reference_permitted
from istiopy.mesh.errors import InvalidResource
from istiopy.mesh.indexes import (
    ENDPOINTSLICE_SERVICE,
    POD_IP,
    POD_NODE,
    SERVICE_HOST,
    SERVICE_VIP,
    install_indexes,
    services_by_host,
)
from istiopy.mesh.kinds import parse
from istiopy.mesh.resources.core import EndpointSlice, Node, Pod, Service
from istiopy.mesh.resources.gateway import Gateway, HTTPRoute, ReferenceGrant, gateway_duration_seconds
from istiopy.mesh.store import ConfigStore

DATA = Path(__file__).resolve().parent.parent / "data"
MINE = ("k8s-*.yaml", "gateway-*.yaml")


def _docs(pattern: str, folder: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for glob in MINE:
        for f in sorted((DATA / folder).glob(glob)):
            for i, doc in enumerate(yaml.safe_load_all(f.read_text())):
                if doc:
                    out.append((f"{f.name}#{i}", doc))
    return out


VALID = _docs("*", "valid")
INVALID = _docs("*", "invalid")


def test_enough_documents() -> None:
    assert len(VALID) >= 15
    assert len(INVALID) >= 10


@pytest.mark.parametrize(("name", "doc"), VALID, ids=[n for n, _ in VALID])
def test_valid_document_round_trips(name: str, doc: dict[str, Any]) -> None:
    res = parse(doc)
    again = parse(res.to_dict())
    assert again == res, name


@pytest.mark.parametrize(("name", "doc"), INVALID, ids=[n for n, _ in INVALID])
def test_invalid_document_names_the_field(name: str, doc: dict[str, Any]) -> None:
    expect = doc["metadata"]["annotations"]["test.istiopy.io/expect-error"]
    path, _, reason = expect.partition(": ")
    with pytest.raises(InvalidResource) as err:
        parse(doc)
    found = [(e.path, e.reason) for e in err.value.errors]
    assert any(p == path and reason in r for p, r in found), found


def _load(name: str) -> list[Any]:
    return [parse(d) for d in yaml.safe_load_all((DATA / "valid" / name).read_text()) if d]


def test_pod_fields_and_helpers() -> None:
    pod, host_pod = _load("k8s-pod.yaml")
    assert isinstance(pod, Pod)
    assert pod.ips == ["10.244.1.12", "fd00:10:244:1::c"]
    assert pod.spec.node_name == "worker-1"
    assert pod.service_account == "bookinfo-reviews"
    assert pod.ready
    assert pod.spec.containers[0].ports[0].container_port == 9080
    assert pod.metadata.owner_references[0].kind == "ReplicaSet"
    assert isinstance(host_pod, Pod)
    assert host_pod.spec.host_network
    assert not host_pod.ready
    assert host_pod.service_account == "default"
    # Unknown Kubernetes fields are ignored, not kept: the model holds only what the mesh reads.
    assert "image" not in pod.to_dict()["spec"]["containers"][0]


def test_service_fields_and_helpers() -> None:
    svc, headless, external = _load("k8s-service.yaml")
    assert isinstance(svc, Service)
    assert isinstance(headless, Service)
    assert isinstance(external, Service)
    assert svc.hostname() == "reviews.bookinfo.svc.cluster.local"
    assert svc.vips == ["10.96.14.7", "fd00:10:96::e07"]
    assert [p.effective_target_port for p in svc.spec.ports] == [9080, "admin"]
    assert svc.spec.ports[0].app_protocol == "http"
    assert svc.spec.traffic_distribution == "PreferClose"
    assert svc.to_dict()["spec"]["clusterIP"] == "10.96.14.7"
    assert headless.headless
    assert headless.vips == []
    assert external.spec.type == "ExternalName"
    assert external.spec.selector is None


def test_node_and_endpointslice() -> None:
    (node,) = _load("k8s-node.yaml")
    assert isinstance(node, Node)
    assert node.internal_ip == "172.18.0.3"
    assert node.key.namespace == ""
    (eps,) = _load("k8s-endpointslice.yaml")
    assert isinstance(eps, EndpointSlice)
    assert eps.service_name == "legacy"
    assert eps.endpoints[1].target_ref is not None
    assert eps.endpoints[1].target_ref.kind == "Pod"


def test_gateway_defaults() -> None:
    (wp,) = _load("gateway-waypoint.yaml")
    assert isinstance(wp, Gateway)
    assert wp.is_waypoint
    assert wp.waypoint_for == "service"
    assert wp.spec.listeners[0].allowed_routes.namespaces.from_ == "Same"
    (route,) = _load("gateway-httproute-v1beta1.yaml")
    assert isinstance(route, HTTPRoute)
    assert route.api_version == "gateway.networking.k8s.io/v1beta1"
    ref = route.spec.parent_refs[0]
    assert (ref.group, ref.kind) == ("gateway.networking.k8s.io", "Gateway")
    # No rules means one rule matching every path.
    match = route.spec.rules[0].matches[0]
    assert match.path is not None
    assert (match.path.type, match.path.value) == ("PathPrefix", "/")
    (canary,) = _load("gateway-httproute-canary.yaml")
    assert isinstance(canary, HTTPRoute)
    assert [b.weight for b in canary.spec.rules[0].backend_refs] == [90, 10]
    assert canary.spec.rules[0].backend_refs[0].kind == "Service"


def test_gateway_duration() -> None:
    assert gateway_duration_seconds("1h30m") == 5400
    assert gateway_duration_seconds("500ms") == 0.5


def test_gateway_is_strict() -> None:
    (wp,) = _load("gateway-waypoint.yaml")
    doc = wp.to_dict()
    doc["spec"]["listeners"][0]["bogus"] = 1
    with pytest.raises(InvalidResource) as err:
        parse(doc)
    assert [(e.path, e.reason) for e in err.value.errors] == [("spec.listeners[0].bogus", "unknown field")]


def test_reference_grants_permit_what_they_name_and_nothing_else() -> None:
    store = ConfigStore()
    for grant in _load("gateway-referencegrant.yaml"):
        assert isinstance(grant, ReferenceGrant)
        store.apply(grant)

    def may(from_ns: str, to_name: str, to_ns: str = "reviews", kind: str = "Service") -> bool:
        return reference_permitted(store, "HTTPRoute", from_ns, "", kind, to_ns, to_name)

    assert may("frontend", "reviews-v1")
    assert may("frontend", "anything")  # a grant naming no Service grants them all
    assert may("shop", "reviews-v2")
    assert not may("shop", "reviews-v1")  # one naming a Service grants that one only
    assert not may("elsewhere", "reviews-v2")  # a namespace no grant trusts
    assert not may("frontend", "reviews-v1", kind="ServiceEntry")  # a kind the grant does not name
    assert not may("frontend", "web", to_ns="frontend2")  # grants live in the target's namespace
    assert may("anywhere", "local", to_ns="anywhere")  # same namespace needs no grant
    core_group = reference_permitted(store, "HTTPRoute", "frontend", "core", "Service", "reviews", "x")
    assert core_group  # "core" and "" are the same group
    assert not reference_permitted(store, "GRPCRoute", "frontend", "", "Service", "reviews", "x")


def test_indexes() -> None:
    store = ConfigStore()
    install_indexes(store)
    for name in ("k8s-pod.yaml", "k8s-service.yaml", "k8s-endpointslice.yaml"):
        for res in _load(name):
            store.apply(res)
    assert [r.name for r in store.by_index(POD_IP, "fd00:10:244:1::c")] == ["reviews-v1-5b7f9c6d4-x2x9q"]
    assert {r.name for r in store.by_index(POD_NODE, "worker-1")} == {
        "reviews-v1-5b7f9c6d4-x2x9q",
        "node-exporter-abcde",
    }
    assert [r.name for r in store.by_index(SERVICE_HOST, "reviews.bookinfo.svc.cluster.local")] == ["reviews"]
    assert [r.name for r in services_by_host(store, "db.bookinfo.svc.cluster.local")] == ["db"]
    assert [r.name for r in store.by_index(SERVICE_VIP, "10.96.14.7")] == ["reviews"]
    assert store.by_index(SERVICE_VIP, "None") == []
    assert [r.name for r in store.by_index(ENDPOINTSLICE_SERVICE, "bookinfo/legacy")] == ["legacy-abc12"]
    # Updates move index entries.
    (pod, _) = _load("k8s-pod.yaml")
    moved = pod.model_copy(
        update={"status": pod.status.model_copy(update={"pod_ip": "10.0.0.9", "pod_ips": []})}
    )
    store.apply(moved)
    assert store.by_index(POD_IP, "10.244.1.12") == []
    assert [r.name for r in store.by_index(POD_IP, "10.0.0.9")] == ["reviews-v1-5b7f9c6d4-x2x9q"]


def test_serviceentry_hosts_are_indexed_with_services() -> None:
    store = ConfigStore()
    install_indexes(store)
    store.apply(
        parse(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {"name": "api", "namespace": "backend"},
                "spec": {
                    "hosts": ["api.example.com"],
                    "ports": [{"number": 443, "name": "https", "protocol": "TLS"}],
                    "resolution": "DNS",
                    "location": "MESH_EXTERNAL",
                },
            }
        )
    )
    (svc, _, _) = _load("k8s-service.yaml")
    store.apply(svc)
    assert [r.key.kind for r in services_by_host(store, "api.example.com")] == ["ServiceEntry"]
    assert [r.key.kind for r in services_by_host(store, "reviews.bookinfo.svc.cluster.local")] == ["Service"]
