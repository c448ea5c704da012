"""Pure parts of the operator, without a cluster: admission answers match the model's messages, Gateway
status moves from Pending to Programmed with stable transition times, and the leader's status comparison
ignores timestamps (so it never loops on its own writes)."""

from __future__ import annotations

from pathlib import Path

import yaml

from istiopy.mesh.errors import InvalidResource
from istiopy.mesh.kinds import parse
from istiopy.mesh.resources.core import Service
from istiopy.mesh.resources.gateway import Gateway
from istiopy.operator.sources import watched_kinds
from istiopy.operator.waypoints import comparable, gateway_status
from istiopy.operator.webhook import review, self_signed, webhook_configuration

INVALID = Path(__file__).resolve().parents[1] / "data" / "invalid"


def test_review_refuses_with_the_models_message() -> None:
    doc = yaml.safe_load((INVALID / "authorizationpolicy-selector-and-targetref.yaml").read_text())
    try:
        parse(doc)
    except InvalidResource as e:
        expected = "; ".join(str(x) for x in e.errors)
    answer = review({"uid": "1", "operation": "CREATE", "object": doc, "namespace": "default"})
    assert answer["allowed"] is False
    assert answer["uid"] == "1"
    assert answer["status"]["message"] == f"configuration is invalid: {expected}"
    assert doc["metadata"]["annotations"]["test.istiopy.io/expect-error"].split(":")[0] in expected
    # Deletes and kinds the mesh does not read are always allowed.
    assert review({"uid": "2", "operation": "DELETE", "object": doc})["allowed"] is True
    other = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}}
    assert review({"uid": "3", "operation": "CREATE", "object": other})["allowed"] is True


def test_webhook_configuration_by_url_or_service() -> None:
    cert = self_signed(["istiod.istio-system.svc"])
    by_url = webhook_configuration("v", cert.ca_bundle_pem, url="https://127.0.0.1:1/validate")
    hook = by_url["webhooks"][0]
    assert hook["clientConfig"]["url"] == "https://127.0.0.1:1/validate"
    assert hook["failurePolicy"] == "Ignore"
    assert {r["apiGroups"][0] for r in hook["rules"]} == {"networking.istio.io", "security.istio.io"}
    by_svc = webhook_configuration("v", cert.ca_bundle_pem, service=("istio-system", "istiod"))
    assert by_svc["webhooks"][0]["clientConfig"]["service"]["path"] == "/validate"


def test_gateway_status_pending_then_programmed() -> None:
    gw = parse(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "wp", "namespace": "shop", "generation": 2},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        }
    )
    svc = parse(
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "wp", "namespace": "shop"},
         "spec": {"clusterIP": "10.96.0.7", "ports": [{"name": "mesh", "port": 15008}]}}
    )  # fmt: skip
    assert isinstance(gw, Gateway)
    assert isinstance(svc, Service)
    pending = gateway_status(gw, svc, {"status": {}}, {})
    conds = {c["type"]: c for c in pending["conditions"]}
    assert conds["Programmed"]["status"] == "False"
    assert conds["Programmed"]["reason"] == "Pending"
    assert conds["Accepted"]["observedGeneration"] == 2
    available = {"status": {"conditions": [{"type": "Available", "status": "True"}]}}
    done = gateway_status(gw, svc, available, pending)
    conds2 = {c["type"]: c for c in done["conditions"]}
    assert conds2["Programmed"]["status"] == "True"
    assert conds2["Accepted"]["lastTransitionTime"] == conds["Accepted"]["lastTransitionTime"]
    assert done["addresses"] == [
        {"type": "IPAddress", "value": "10.96.0.7"},
        {"type": "Hostname", "value": "wp.shop.svc.cluster.local"},
    ]
    # Same content, later time: nothing to write.
    assert comparable(gateway_status(gw, svc, available, done)) == comparable(done)


def test_watched_kinds_cover_core_istio_and_gateway_api() -> None:
    kinds = {w.kind: w for w in watched_kinds()}
    assert {"Namespace", "Pod", "Service", "EndpointSlice", "ServiceAccount", "Node"} <= set(kinds)
    assert {"AuthorizationPolicy", "PeerAuthentication", "VirtualService", "DestinationRule"} <= set(kinds)
    assert {"Gateway", "HTTPRoute", "GatewayClass"} <= set(kinds)
    assert kinds["AuthorizationPolicy"].list_path() == "/apis/security.istio.io/v1/authorizationpolicies"
    assert kinds["Pod"].object_path("a", "b", "status") == "/api/v1/namespaces/a/pods/b/status"
    assert kinds["Node"].object_path("ignored", "n1") == "/api/v1/nodes/n1"
