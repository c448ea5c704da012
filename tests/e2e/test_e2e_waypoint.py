"""The waypoint rows of the scenario table, with real traffic: pod -> ztunnel-py -> waypoint (real Envoy) ->
ztunnel-py -> pod. Path and header routing, the 90/10 canary, an admin role header, JWT, retries, timeouts,
circuit breaking, mirroring, header rewrites, metrics on both proxies, and a namespace without a waypoint
keeping the direct L4 path.

Each test applies its own YAML (VirtualService, DestinationRule, AuthorizationPolicy, RequestAuthentication)
as a user would, and removes it afterwards.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from istiopy.testing.mesh import Mesh

pytestmark = [pytest.mark.envoy]

REVIEWS = "shop/reviews"
HOST = "reviews.shop.svc.cluster.local"
ISSUER = "https://issuer.example"

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: frontend, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.41.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.41.0.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: frontend, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: web, ports: [{containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.42.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1-a, namespace: shop, labels: {app: reviews, version: v1}}
spec: {nodeName: node-a, serviceAccountName: reviews, containers: [{name: r, ports: [{containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.42.1.20}
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v2-b, namespace: shop, labels: {app: reviews, version: v2}}
spec: {nodeName: node-b, serviceAccountName: reviews, containers: [{name: r, ports: [{containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.42.2.21}
---
apiVersion: v1
kind: Pod
metadata: {name: admin-1, namespace: shop, labels: {app: admin}}
spec: {nodeName: node-b, serviceAccountName: admin, containers: [{name: a, ports: [{containerPort: 9090}]}]}
status: {phase: Running, podIP: 10.42.2.30}
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-0
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: waypoint}
spec: {nodeName: node-b, serviceAccountName: waypoint, containers: [{name: istio-proxy}]}
status: {phase: Running, podIP: 10.42.2.40}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: service}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: waypoint, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec:
  clusterIP: 10.43.0.40
  selector: {gateway.networking.k8s.io/gateway-name: waypoint}
  ports: [{name: mesh, port: 15008}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.43.0.20
  selector: {app: reviews}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-shadow, namespace: shop}
spec:
  clusterIP: 10.43.0.21
  selector: {app: reviews, version: v2}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: admin, namespace: shop}
spec:
  clusterIP: 10.43.0.30
  selector: {app: admin}
  ports: [{name: http, port: 9090, targetPort: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: frontend}
spec:
  clusterIP: 10.43.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""

SUBSETS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with Mesh(documents=MESH) as m:
        m.apply(SUBSETS, "subsets.yaml")  # in the kit's directory, so a test may replace it
        yield m


@pytest.fixture
def config(mesh: Mesh) -> Iterator[Mesh]:
    yield mesh
    mesh.remove("scenario.yaml")
    mesh.apply(SUBSETS, "subsets.yaml")


def _version(mesh: Mesh, pod: str) -> str:
    return mesh.pod(f"shop/{pod}").labels["version"]


def _served(mesh: Mesh, path: str, n: int, headers: dict[str, str] | None = None) -> collections.Counter[str]:
    web = mesh.pod("frontend/web")
    out: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        r = web.http(REVIEWS, 8080, path, headers=headers)
        assert r.status == 200, r.text
        assert r.via_waypoint
        out[_version(mesh, r.json()["pod"])] += 1
    return out


def _stat(text: str, pattern: str) -> int:
    return sum(int(v) for k, v in re.findall(r"^(\S+): (\d+)$", text, re.M) if re.search(pattern, k))


def test_path_routing_api_v1_to_v1_and_api_v2_to_v2(config: Mesh) -> None:
    mesh = config
    mesh.apply(
        f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [{HOST}]
  http:
  - match: [{{uri: {{prefix: /api/v1}}}}]
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
  - match: [{{uri: {{prefix: /api/v2}}}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
""",
        "scenario.yaml",
    )
    assert _served(mesh, "/api/v1/items", 10) == {"v1": 10}
    assert _served(mesh, "/api/v2/items", 10) == {"v2": 10}


def test_header_routing_and_90_10_weighted_canary(config: Mesh) -> None:
    mesh = config
    mesh.apply(
        f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [{HOST}]
  http:
  - match: [{{headers: {{x-canary: {{exact: "true"}}}}}}]
    route: [{{destination: {{host: {HOST}, subset: v2}}}}]
  - route:
    - {{destination: {{host: {HOST}, subset: v1}}, weight: 90}}
    - {{destination: {{host: {HOST}, subset: v2}}, weight: 10}}
""",
        "scenario.yaml",
    )
    assert _served(mesh, "/", 10, {"x-canary": "true"}) == {"v2": 10}
    split = _served(mesh, "/", 200)
    # 10% of 200 is 20 (standard deviation ~4.2): a wide band that a broken split (0, 100, 200) cannot hit.
    assert 5 <= split["v2"] <= 45, split
    assert split["v1"] + split["v2"] == 200


def test_admin_paths_require_the_admin_role_header(config: Mesh) -> None:
    mesh = config
    web = mesh.pod("frontend/web")
    mesh.apply(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: admin-role, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: admin}]
  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/admin/*"]}}]
    when: [{key: "request.headers[x-user-role]", values: [admin]}]
""",
        "scenario.yaml",
    )
    ok = web.http("shop/admin", 9090, "/admin/users", headers={"x-user-role": "admin"})
    assert ok.status == 200
    assert ok.json()["headers"]["x-user-role"] == "admin"
    assert web.http("shop/admin", 9090, "/admin/users").status == 403
    assert web.http("shop/admin", 9090, "/admin/users", headers={"x-user-role": "guest"}).status == 403
    assert web.http("shop/admin", 9090, "/public", headers={"x-user-role": "admin"}).status == 403


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Issuer:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> str:
        pub = self.key.public_key().public_numbers()
        n = pub.n.to_bytes((pub.n.bit_length() + 7) // 8, "big")
        e = pub.e.to_bytes((pub.e.bit_length() + 7) // 8, "big")
        return json.dumps({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "n": _b64(n), "e": _b64(e)}]})

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "sub": "alice", "aud": "shop", "iat": now, "exp": now + 600, **claims}
        head = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "k1"}).encode())
        signing_input = f"{head}.{_b64(json.dumps(payload).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(sig)}"


def test_jwt_required(config: Mesh) -> None:
    mesh = config
    web = mesh.pod("frontend/web")
    issuer = _Issuer()
    mesh.apply(
        f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: admin-jwt, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: "", name: admin}}]
  jwtRules:
  - issuer: {ISSUER}
    audiences: [shop]
    jwks: '{issuer.jwks()}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: admin-needs-jwt, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: "", name: admin}}]
  action: ALLOW
  rules:
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
""",
        "scenario.yaml",
    )
    good = {"authorization": f"Bearer {issuer.token()}"}
    assert web.http("shop/admin", 9090, "/orders", headers=good).status == 200
    assert web.http("shop/admin", 9090, "/orders").status == 403  # no token: no request principal
    forged = {"authorization": f"Bearer {_Issuer().token()}"}
    assert web.http("shop/admin", 9090, "/orders", headers=forged).status == 401
    expired = {"authorization": f"Bearer {issuer.token(exp=int(time.time()) - 600)}"}  # beyond 60 s skew
    assert web.http("shop/admin", 9090, "/orders", headers=expired).status == 401


def test_header_rewrite_and_timeout(config: Mesh) -> None:
    mesh = config
    web = mesh.pod("frontend/web")
    mesh.apply(
        f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [{HOST}]
  http:
  - match: [{{uri: {{prefix: /old}}}}]
    rewrite: {{uri: /new}}
    headers:
      request: {{set: {{x-tenant: blue}}, remove: [x-debug]}}
      response: {{add: {{x-rewritten: "yes"}}}}
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
  - timeout: 0.5s
    route: [{{destination: {{host: {HOST}, subset: v1}}}}]
""",
        "scenario.yaml",
    )
    r = web.http(REVIEWS, 8080, "/old/page", headers={"x-debug": "1"})
    seen = r.json()
    assert seen["path"] == "/new/page"
    assert seen["headers"]["x-tenant"] == "blue"
    assert "x-debug" not in seen["headers"]
    assert r.headers["x-rewritten"] == "yes"
    slow = web.http(REVIEWS, 8080, "/slow?delay=3")
    assert slow.status == 504
    assert slow.text == "upstream request timeout"


def test_retries_circuit_breaker_and_mirroring(config: Mesh) -> None:
    mesh = config
    web = mesh.pod("frontend/web")
    wp = mesh.waypoint("shop")
    mesh.apply(
        f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [{HOST}]
  http:
  - route: [{{destination: {{host: {HOST}, subset: v1}}}}]
    retries: {{attempts: 2, retryOn: 5xx}}
    mirror: {{host: reviews-shadow.shop.svc.cluster.local}}
    mirrorPercentage: {{value: 100}}
""",
        "scenario.yaml",
    )
    mesh.apply(
        f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: shop}}
spec:
  host: {HOST}
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 1}}
      http: {{http1MaxPendingRequests: 1, http2MaxRequests: 1}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
""",
        "subsets.yaml",  # replaces the module's DestinationRule (one per host)
    )
    # Retries: an app that always answers 503 is asked three times (1 + 2 retries) per request.
    before = _stat(wp.stats("upstream_rq_retry"), r"\|v1\|reviews.*\.upstream_rq_retry$")
    assert web.http(REVIEWS, 8080, "/?status=503").status == 503
    after = _stat(wp.stats("upstream_rq_retry"), r"\|v1\|reviews.*\.upstream_rq_retry$")
    assert after - before == 2
    # Mirroring: the client only ever sees v1; the shadow service (v2) gets copies.
    mirrored_before = _stat(wp.stats("reviews-shadow"), r"reviews-shadow.*\.upstream_rq_completed$")
    assert _served(mesh, "/", 5) == {"v1": 5}
    deadline = time.monotonic() + 10
    while (
        _stat(wp.stats("reviews-shadow"), r"reviews-shadow.*\.upstream_rq_completed$") < mirrored_before + 5
    ):
        assert time.monotonic() < deadline, wp.stats("reviews-shadow")
        time.sleep(0.1)
    # Circuit breaker: one request at a time, one waiting; the rest overflow with 503 at once.
    # Eight at once, each held 2 s by the app: however slowly the threads start, several overlap.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: web.http(REVIEWS, 8080, "/?delay=2", timeout=30), range(8)))
    codes = sorted(r.status for r in results)
    assert 200 in codes, codes
    assert 503 in codes, codes
    assert all(r.headers.get("x-envoy-overloaded") == "true" for r in results if r.status == 503)


def test_tcp_metrics_at_ztunnel_and_http_metrics_at_the_waypoint(mesh: Mesh) -> None:
    web, wp = mesh.pod("frontend/web"), mesh.waypoint("shop")

    def served_to_web() -> float:
        return sum(
            float(m["value"])
            for m in mesh.http_metrics(settle=5.0)
            if m["destination_service"] == HOST
            and m["response_code"] == "200"
            and m["source_principal"] == web.spiffe_id
        )

    before = served_to_web()
    for _ in range(3):
        assert web.http(REVIEWS, 8080, "/metrics-check").status == 200
    # Settled, the waypoint has counted exactly the requests just made (Envoy flushes access logs late);
    # they may sit in several series (one per destination workload the route picked).
    assert served_to_web() - before == 3
    tcp = mesh.tcp_metrics()
    assert any(
        m["reporter"] == "source"
        and m["source_principal"] == web.spiffe_id
        and m["destination_principal"] == wp.pod.spiffe_id
        for m in tcp
    ), tcp
    assert any(
        m["reporter"] == "destination"
        and m["source_principal"] == wp.pod.spiffe_id
        and m["destination_workload_namespace"] == "shop"
        for m in tcp
    ), tcp


def test_namespace_without_waypoint_keeps_the_l4_path(mesh: Mesh) -> None:
    reviews, web, wp = mesh.pod("shop/reviews-v1"), mesh.pod("frontend/web"), mesh.waypoint("shop")
    assert mesh.topology is not None
    with mesh.topology.sniff() as cap:
        r = reviews.http("frontend/web", 80, "/direct")
        via = web.http(REVIEWS, 8080, "/through-waypoint")
    assert r.status == 200
    assert not r.via_waypoint
    assert r.json()["peer"].split(":")[0] == reviews.ip  # straight from the client pod
    assert f"{reviews.ip}" in cap.text
    assert f"> {web.ip}.15008:" in cap.text  # HBONE directly to the destination pod
    direct = [ln for ln in cap.text.splitlines() if f"{reviews.ip}." in ln and f"{web.ip}." in ln]
    assert direct
    assert not any(wp.pod.ip in ln for ln in direct)
    # ... while the namespace with a waypoint goes through it.
    assert via.via_waypoint
    assert f"> {wp.pod.ip}.15008:" in cap.text
