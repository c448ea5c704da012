"""PeerAuthentication in ambient: STRICT -> the static deny-plaintext policy; port-level overrides -> a
converted per-workload DENY; and the references each workload carries."""

from __future__ import annotations

from google.protobuf import empty_pb2
from wds_helpers import pod, store_from

from istiopy.api.gen import authorization_pb2 as az
from istiopy.mesh.store import ConfigStore
from istiopy.xds.wads import generate_authorizations
from istiopy.xds.wds import generate_addresses

STATIC = "istio-system/istio_converted_static_strict"
PLAINTEXT = az.Match(not_principals=[az.StringMatch(presence=empty_pb2.Empty())])


def pa(name: str, ns: str, spec: str) -> str:
    return f"""
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: {name}, namespace: {ns}}}
spec: {spec}
"""


PODS = (
    pod("web", "a", "10.0.0.1", {"app": "web"})
    + pod("db", "a", "10.0.0.2", {"app": "db"})
    + pod("other", "b", "10.0.0.3", {"app": "web"})
)


def refs(store: ConfigStore) -> dict[str, list[str]]:
    return {
        f"{a.workload.namespace}/{a.workload.name}": list(a.workload.authorization_policies)
        for _, a in generate_addresses(store)
    }


def test_static_strict_policy_shape() -> None:
    store = store_from(pa("default", "istio-system", "{mtls: {mode: STRICT}}"))
    assert dict(generate_authorizations(store)) == {
        STATIC: az.Authorization(
            name="istio_converted_static_strict",
            namespace="istio-system",
            scope=az.WORKLOAD_SELECTOR,
            action=az.DENY,
            rules=[az.Rule(clauses=[az.Clause(matches=[PLAINTEXT])])],
        )
    }


def test_mesh_wide_strict_applies_everywhere() -> None:
    store = store_from(PODS + pa("default", "istio-system", "{mtls: {mode: STRICT}}"))
    assert refs(store) == {"a/web": [STATIC], "a/db": [STATIC], "b/other": [STATIC]}


def test_namespace_strict_and_namespace_override_of_mesh() -> None:
    store = store_from(PODS + pa("strict", "a", "{mtls: {mode: STRICT}}"))
    assert refs(store) == {"a/web": [STATIC], "a/db": [STATIC], "b/other": []}
    store = store_from(
        PODS
        + pa("default", "istio-system", "{mtls: {mode: STRICT}}")
        + pa("lax", "b", "{mtls: {mode: PERMISSIVE}}")
    )
    assert refs(store) == {"a/web": [STATIC], "a/db": [STATIC], "b/other": []}


def test_selector_strict_applies_to_selected_workloads_only() -> None:
    store = store_from(
        PODS + pa("web-strict", "a", "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}")
    )
    assert refs(store) == {"a/web": [STATIC], "a/db": [], "b/other": []}
    # The static policy is sent whenever any PeerAuthentication exists; nothing port-level here.
    assert list(dict(generate_authorizations(store))) == [STATIC]


def test_strict_workload_with_permissive_port_is_converted() -> None:
    store = store_from(
        PODS
        + pa(
            "web",
            "a",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT},"
            " portLevelMtls: {'8080': {mode: PERMISSIVE}}}",
        )
    )
    got = dict(generate_authorizations(store))
    assert got["a/converted_peer_authentication_web"] == az.Authorization(
        name="converted_peer_authentication_web",
        namespace="a",
        scope=az.WORKLOAD_SELECTOR,
        action=az.DENY,
        # deny when: no peer identity AND the port is not 8080
        rules=[
            az.Rule(
                clauses=[
                    az.Clause(matches=[PLAINTEXT]),
                    az.Clause(matches=[az.Match(not_destination_ports=[8080])]),
                ]
            )
        ],
    )
    # The converted policy replaces the static one for this workload.
    assert refs(store)["a/web"] == ["a/converted_peer_authentication_web"]
    assert refs(store)["a/db"] == []


def test_permissive_workload_with_strict_port_is_converted() -> None:
    store = store_from(
        PODS
        + pa(
            "web",
            "a",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE},"
            " portLevelMtls: {'9000': {mode: STRICT}}}",
        )
    )
    got = dict(generate_authorizations(store))
    assert list(got["a/converted_peer_authentication_web"].rules) == [
        az.Rule(
            clauses=[
                az.Clause(
                    matches=[
                        az.Match(
                            not_principals=[az.StringMatch(presence=empty_pb2.Empty())],
                            destination_ports=[9000],
                        )
                    ]
                )
            ]
        )
    ]
    assert refs(store)["a/web"] == ["a/converted_peer_authentication_web"]


def test_mesh_strict_with_unset_workload_and_permissive_port_merges_strict() -> None:
    store = store_from(
        PODS
        + pa("default", "istio-system", "{mtls: {mode: STRICT}}")
        + pa("web", "a", "{selector: {matchLabels: {app: web}}, portLevelMtls: {'8080': {mode: PERMISSIVE}}}")
    )
    got = dict(generate_authorizations(store))
    assert list(got["a/converted_peer_authentication_web"].rules) == [
        az.Rule(
            clauses=[
                az.Clause(matches=[az.Match(not_destination_ports=[8080])]),
                az.Clause(matches=[PLAINTEXT]),
            ]
        )
    ]
    assert refs(store) == {
        "a/web": ["a/converted_peer_authentication_web"],
        "a/db": [STATIC],
        "b/other": [STATIC],
    }


def test_all_strict_ports_need_no_conversion() -> None:
    store = store_from(
        PODS
        + pa(
            "web",
            "a",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT},"
            " portLevelMtls: {'8080': {mode: STRICT}}}",
        )
    )
    assert list(dict(generate_authorizations(store))) == [STATIC]
    assert refs(store)["a/web"] == [STATIC]
