"""The ztunnel rows of the scenario table, with real traffic through ztunnel-py (no waypoint anywhere):
mTLS only, namespace allow, IP block + port allow, and an L7 policy given to ztunnel by mistake.

Every policy is the YAML a user would apply; the mesh picks it up through istiod-py's file watch and the
test waits until every proxy acknowledged it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from istiopy.testing.mesh import Mesh

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: frontend, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: backend, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: old-1, namespace: legacy, labels: {app: old}}
spec: {nodeName: node-a, serviceAccountName: old, containers: [{name: o, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIP: 10.32.1.40}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.31.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.31.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: frontend, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: web, ports: [{containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.32.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: backend, labels: {app: api}}
spec:
  nodeName: node-b
  serviceAccountName: api
  containers: [{name: api, ports: [{containerPort: 8080}, {containerPort: 9090}]}]
status: {phase: Running, podIP: 10.32.2.20}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder-1, namespace: other, labels: {app: intruder}}
spec: {nodeName: node-a, serviceAccountName: intruder, containers: [{name: i, ports: [{containerPort: 80}]}]}
status: {phase: Running, podIP: 10.32.1.30}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: backend}
spec:
  clusterIP: 10.33.0.20
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 9090, targetPort: 9090}]
"""


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with Mesh(documents=MESH) as m:
        yield m


@pytest.fixture
def policy(mesh: Mesh) -> Iterator[Mesh]:
    """Each test's policies live in their own file, removed afterwards (the next test starts open)."""
    yield mesh
    mesh.remove("policy.yaml")


def test_mtls_only_plaintext_never_on_the_wire_and_identities_verified(mesh: Mesh) -> None:
    web, api = mesh.pod("frontend/web"), mesh.pod("backend/api")
    marker = "/plaintext-marker-7f3a91"
    assert mesh.topology is not None
    with mesh.topology.sniff() as cap:
        body = web.http("backend/api", 80, marker).json()
    assert body["pod"] == api.name
    assert body["path"] == marker
    assert body["peer"].split(":")[0] == web.ip  # the app sees the real client
    assert f"> {api.ip}.15008:" in cap.text  # HBONE to the destination pod
    assert f"{api.ip}.8080" not in cap.text  # never the app port in the clear
    assert marker not in cap.text  # the payload is encrypted
    seen = [
        m
        for m in mesh.tcp_metrics()
        if m["reporter"] == "destination" and m["destination_workload"].startswith("api")
    ]
    assert any(
        m["source_principal"] == web.spiffe_id
        and m["destination_principal"] == api.spiffe_id
        and m["connection_security_policy"] == "mutual_tls"
        for m in seen
    ), seen


def test_strict_mtls_refuses_plaintext_from_outside_the_mesh(policy: Mesh) -> None:
    mesh = policy
    old, web, api = mesh.pod("legacy/old"), mesh.pod("frontend/web"), mesh.pod("backend/api")
    assert not old.ambient
    assert old.reaches("backend/api-1", 8080)  # plaintext into the mesh is accepted until STRICT
    mesh.apply(
        """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: backend}
spec:
  mtls: {mode: STRICT}
""",
        "policy.yaml",
    )
    assert not old.reaches("backend/api-1", 8080)
    assert web.http("backend/api", 80).json()["pod"] == api.name  # mesh traffic is mTLS: unaffected


def test_allow_only_namespace_frontend_to_backend(policy: Mesh) -> None:
    mesh = policy
    web, intruder = mesh.pod("frontend/web"), mesh.pod("other/intruder")
    assert intruder.reaches("backend/api", 80)  # no policy yet: open
    mesh.apply(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: frontend-only, namespace: backend}
spec:
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [frontend]}}]
""",
        "policy.yaml",
    )
    assert web.http("backend/api", 80).status == 200
    assert not intruder.reaches("backend/api", 80)
    assert not intruder.reaches("backend/api", 9090)


def test_allow_by_ip_block_and_port_deny_everything_else(policy: Mesh) -> None:
    mesh = policy
    web, intruder = mesh.pod("frontend/web"), mesh.pod("other/intruder")
    mesh.apply(
        f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: web-ip-http-only, namespace: backend}}
spec:
  selector: {{matchLabels: {{app: api}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{ipBlocks: ["{web.ip}/32"]}}}}]
    to: [{{operation: {{ports: ["8080"]}}}}]
""",
        "policy.yaml",
    )
    assert web.http("backend/api", 80).status == 200  # service port 80 -> target port 8080: allowed
    assert not web.reaches("backend/api", 9090)  # the same client on another port: denied
    assert not intruder.reaches("backend/api", 80)  # another address: denied


def test_l7_policy_on_ztunnel_fails_closed_and_the_analyzer_says_why(policy: Mesh) -> None:
    mesh = policy
    web = mesh.pod("frontend/web")
    doc = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: get-only, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [frontend]}}]
    to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
"""
    mesh.apply(doc, "policy.yaml")
    # No waypoint: ztunnel cannot see methods or paths, so the ALLOW rule matches nothing - even the
    # request it was written to allow is refused (fail closed, never open).
    assert not web.reaches("backend/api", 80, "/api/items")
    istioctl = Path(sys.executable).parent / "istioctl-py"
    out = subprocess.run(
        [str(istioctl), "analyze", "-f", str(mesh.config), "-f", str(mesh.kit_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = out.stdout + out.stderr
    assert "get-only" in text
    assert "ztunnel does not support HTTP attributes" in text
    assert "paths" in text
