"""Diagnostics (mesh.analysis) and the ``istioctl-py analyze`` command over real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from wds_helpers import pod, store_from

from istiopy.istioctl.cli import main
from istiopy.mesh.analysis import Diagnostic, analyze
from istiopy.mesh.meta import ResourceKey

CONFIG = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: nowhere}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wl-only, namespace: default, labels: {istio.io/waypoint-for: workload}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: default}
spec:
  rules: [{to: [{operation: {paths: [/api]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: default}
spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: for-nobody, namespace: default}
spec: {selector: {matchLabels: {app: ghost}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: at-reviews, namespace: default}
spec: {targetRefs: [{kind: Service, group: "", name: reviews}], rules: [{}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default, labels: {istio.io/use-waypoint: wl-only}}
spec: {clusterIP: 10.96.0.5, selector: {app: reviews}, ports: [{port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 50}
    - {destination: {host: reviews, subset: v3}, weight: 25}
    - {destination: {host: ratings}, weight: 25}
""" + pod("reviews-v1", "default", "10.0.0.1", {"app": "reviews", "version": "v1"})

HTTP_MESSAGE = (
    "ztunnel does not support HTTP attributes (found: paths). In ambient mode you must use a waypoint "
    "proxy to enforce HTTP rules."
)


def by_resource(found: list[Diagnostic]) -> dict[str, list[tuple[str, str, str]]]:
    out: dict[str, list[tuple[str, str, str]]] = {}
    for d in found:
        out.setdefault(str(d.resource), []).append((d.severity, d.code, d.reason))
    return out


def test_analysis_finds_each_problem_once() -> None:
    found = analyze(store_from(CONFIG))
    assert by_resource(found) == {
        "AuthorizationPolicy/default/allow-get": [("Warning", "", "UnsupportedValue")],
        "AuthorizationPolicy/default/at-reviews": [("Warning", "IST0167", "AncestorNotBound")],
        "AuthorizationPolicy/default/ext": [("Warning", "", "UnsupportedValue")],
        "AuthorizationPolicy/default/for-nobody": [("Warning", "IST0127", "NoMatchingWorkloadsFound")],
        "DestinationRule/default/reviews": [("Warning", "IST0173", "DestinationRuleSubsetNotSelectPods")],
        "Namespace/default": [("Warning", "", "WaypointNotFound")],
        "Service/default/reviews": [("Warning", "", "UnsupportedTrafficType")],
        "VirtualService/default/reviews": [
            ("Error", "IST0101", "ReferencedResourceNotFound"),
            ("Error", "IST0101", "ReferencedResourceNotFound"),
        ],
    }
    messages = {str(d.resource): d for d in found}
    assert messages["AuthorizationPolicy/default/allow-get"].message.startswith(HTTP_MESSAGE)
    assert messages["AuthorizationPolicy/default/allow-get"].field == "spec.rules[0]"
    assert messages["AuthorizationPolicy/default/ext"].message == "ztunnel does not support the CUSTOM action"
    vs = sorted(d.message for d in found if d.resource == ResourceKey("VirtualService", "default", "reviews"))
    assert vs == [
        'Referenced host not found: "ratings"',
        'Referenced host+subset in destinationrule not found: "reviews+v3"',
    ]


def test_analyze_command_prints_upstream_shaped_lines_and_exit_79(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mesh.yaml").write_text(CONFIG)
    assert main(["analyze", "-f", str(tmp_path)]) == 79
    out = capsys.readouterr().out.splitlines()
    assert f"Warning (AuthorizationPolicy default/allow-get) {HTTP_MESSAGE}" in [
        line[: len(f"Warning (AuthorizationPolicy default/allow-get) {HTTP_MESSAGE}")] for line in out
    ]
    assert (
        "Error [IST0101] (VirtualService default/reviews) Referenced host+subset in destinationrule not "
        'found: "reviews+v3"'
    ) in out


def test_analyze_command_json_suppress_and_thresholds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mesh.yaml").write_text(CONFIG)
    rc = main(["analyze", "-f", str(tmp_path), "-o", "json", "-S", "IST0101=VirtualService reviews.default"])
    assert rc == 0  # only warnings remain, below the default failure threshold
    items = json.loads(capsys.readouterr().out)
    assert {i["origin"] for i in items} >= {"AuthorizationPolicy default/allow-get", "Namespace default"}
    assert all(i["level"] == "Warning" for i in items)
    assert (
        main(
            ["analyze", "-f", str(tmp_path), "--failure-threshold", "Warning", "--output-threshold", "Error"]
        )
        == 79
    )
    shown = capsys.readouterr().out.splitlines()
    assert shown
    assert all(line.startswith("Error [IST0101]") for line in shown)


def test_analyze_clean_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ok.yaml").write_text(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l4, namespace: shop}
spec: {rules: [{from: [{source: {namespaces: [shop]}}]}]}
"""
    )
    assert main(["analyze", "-f", str(tmp_path)]) == 0
    assert (
        capsys.readouterr().out.strip() == "\u2714 No validation issues found when analyzing namespace: shop."
    )


def test_waypoint_generator_findings_are_reported_once() -> None:
    store = store_from(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: reviews}]
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec: {clusterIP: 10.96.0.5, selector: {app: reviews}, ports: [{port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v9}}]}]
"""
    )
    found = analyze(store)
    ext = [d for d in found if d.resource == ResourceKey("AuthorizationPolicy", "default", "ext")]
    assert ("spec.action", "UnsupportedValue") in [(d.field, d.reason) for d in ext]
    vs = [d for d in found if d.resource == ResourceKey("VirtualService", "default", "reviews")]
    assert [(d.code, d.field) for d in vs] == [("IST0101", "spec.http[0].route[0].destination.subset")]


ROUTES = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.7, selector: {app: reviews}, ports: [{port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: team-b}
spec: {clusterIP: 10.96.0.8, selector: {app: ratings}, ports: [{port: 9080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs:
    - {name: reviews, port: 9080}
    - {name: ratings, namespace: team-b, port: 9080}
    - {name: gone, port: 9080}
    - {group: example.com, kind: Bucket, name: b}
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: ratings, namespace: team-b, port: 9080}}
"""

GRANT = """
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: shop-routes, namespace: team-b}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: shop}]
  to: [{group: "", kind: Service}]
"""


def test_httproute_backends_the_mesh_cannot_use_are_errors_naming_the_field() -> None:
    found = [(d.field, d.reason, d.message, d.severity) for d in analyze(store_from(ROUTES))]
    assert found == [
        ("spec.rules[0].backendRefs[1]", "RefNotPermitted",
         "no ReferenceGrant in the backend's namespace lets this route use Service team-b/ratings", "Error"),
        ("spec.rules[0].backendRefs[2]", "BackendNotFound", "backend not found: Service shop/gone", "Error"),
        ("spec.rules[0].backendRefs[3]", "InvalidKind",
         "backendRef of a kind the mesh cannot route to: example.com/Bucket shop/b", "Error"),
        ("spec.rules[0].filters[0].requestMirror.backendRef", "RefNotPermitted",
         "no ReferenceGrant in the backend's namespace lets this route use Service team-b/ratings", "Error"),
    ]  # fmt: skip
    granted = [(d.field, d.reason) for d in analyze(store_from(ROUTES + "---" + GRANT))]
    assert granted == [
        ("spec.rules[0].backendRefs[2]", "BackendNotFound"),
        ("spec.rules[0].backendRefs[3]", "InvalidKind"),
    ]
