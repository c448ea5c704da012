"""The operator against a real kube-apiserver: kubectl-applied documents reach the store, the webhook refuses
invalid ones naming the field, statuses explain ineffective configs, and user objects stay untouched."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
import yaml
from op_helpers import DATA, RunningOperator, eventually, new_namespace, operator_config

from istiopy.mesh.kinds import parse
from istiopy.mesh.meta import ResourceKey
from istiopy.operator.webhook import PROBE_NAME
from istiopy.testing.cluster import TestCluster, free_port

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

_DNS = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
APPLIED_KINDS = {
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
    "VirtualService",
    "DestinationRule",
    "ServiceEntry",
    "WorkloadEntry",
    "HTTPRoute",
    "Gateway",
    "Service",
    "ServiceAccount",
}


def valid_documents(namespace: str) -> list[dict[str, Any]]:
    """Every namespaced document of the foundation's valid set, moved into ``namespace``."""
    docs = []
    for f in sorted((DATA / "valid").glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if not d or d.get("kind") not in APPLIED_KINDS or not _DNS.fullmatch(d["metadata"]["name"]):
                continue
            d["metadata"]["namespace"] = namespace
            d["metadata"].pop("uid", None)
            d["metadata"].pop("resourceVersion", None)
            d.pop("status", None)
            if d["kind"] == "Service":  # the test cluster is single-stack and allocates its own IPs
                for f in ("ipFamilies", "ipFamilyPolicy", "clusterIP", "clusterIPs"):
                    d["spec"].pop(f, None)
            docs.append(d)
    return docs


def spec_of(doc: dict[str, Any]) -> Any:
    return {
        k: v for k, v in parse(doc).to_dict().items() if k not in ("metadata", "apiVersion", "kind", "status")
    }


def test_kubectl_applied_documents_reach_the_store(
    k8s: TestCluster, operator: RunningOperator, ns: str
) -> None:
    docs = valid_documents(ns)
    assert len(docs) > 20
    k8s.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in docs))
    for d in docs:
        key = parse(d).key
        want = spec_of(d)

        def stored(key: ResourceKey = key, want: Any = want) -> bool:
            res = operator.store.get(*key)
            if res is None:
                return False
            got = {
                k: v
                for k, v in res.to_dict().items()
                if k not in ("metadata", "apiVersion", "kind", "status")
            }
            if key.kind == "Service":  # the API server allocates the cluster IP and fills defaults
                ports = [(sp.get("name"), sp["port"]) for sp in got["spec"]["ports"]]
                return ports == [(sp.get("name"), sp["port"]) for sp in want["spec"]["ports"]]
            return bool(got == want)

        eventually(stored, timeout=10, what=f"{key} in the store")
        assert operator.store.source_of(key) == "kube"

    # Deleting removes it from the store.
    k8s.kubectl("delete", "authorizationpolicy", "--all", "-n", ns)
    eventually(lambda: not operator.store.list("AuthorizationPolicy", ns), what="policies to leave the store")
    # Read-only watches: no finalizers, no kopf annotations on user objects.
    for item in k8s.kubectl_json("get", "virtualservices,destinationrules,services", "-n", ns)["items"]:
        md = item["metadata"]
        assert not md.get("finalizers"), md
        assert not [a for a in md.get("annotations", {}) if "kopf" in a], md


@pytest.mark.parametrize(
    "name",
    [
        "authorizationpolicy-typo-field.yaml",
        "authorizationpolicy-selector-and-targetref.yaml",
        "virtualservice-route-and-redirect.yaml",
        "destinationrule-duplicate-subset.yaml",
        "peerauthentication-port-level-without-selector.yaml",
    ],
)
def test_webhook_refuses_invalid_documents_naming_the_field(
    k8s: TestCluster, operator: RunningOperator, ns: str, name: str
) -> None:
    text = (DATA / "invalid" / name).read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    expected = next(d["metadata"]["annotations"]["test.istiopy.io/expect-error"] for d in docs)
    for d in docs:
        d["metadata"]["namespace"] = ns
    out = k8s.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs), check=False)
    assert out.returncode != 0
    field = expected.split(":")[0]
    assert field in out.stderr, out.stderr
    assert operator.op.webhook is not None
    # Refused by the schema or, for semantic rules, by our webhook with parse's message.
    if "denied the request" in out.stderr:
        assert "validation.istio.io" in out.stderr
    assert not operator.store.list(docs[0]["kind"], ns)


def test_webhook_is_the_one_refusing_semantic_errors(
    k8s: TestCluster, operator: RunningOperator, ns: str
) -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "both", "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": "x"}},
            "targetRefs": [{"kind": "Service", "group": "", "name": "x"}],
        },
    }
    out = k8s.kubectl("apply", "-f", "-", input=json.dumps(doc), check=False)
    assert out.returncode != 0
    assert 'admission webhook "validation.istio.io" denied the request' in out.stderr, out.stderr
    assert "spec" in out.stderr
    assert operator.op.webhook is not None
    assert operator.op.webhook.reviews >= 1
    # The configuration carries the CA bundle of the serving certificate.
    cfg = k8s.kubectl_json("get", "validatingwebhookconfiguration", operator.op.config.webhook_name)
    assert cfg["webhooks"][0]["clientConfig"]["caBundle"]


def _failure_policy(k8s: TestCluster, name: str) -> str | None:
    out = k8s.kubectl("get", "validatingwebhookconfiguration", name, "-o", "json", check=False)
    return json.loads(out.stdout)["webhooks"][0]["failurePolicy"] if out.returncode == 0 else None


def test_webhook_failure_policy_auto_turns_to_fail_once_the_api_server_calls_it(
    k8s: TestCluster, ns: str
) -> None:
    """Upstream istiod's way: Ignore while the webhook may be unreachable, Fail once a dry-run of an invalid
    document came back refused by it. An unreachable webhook keeps Ignore (applies are not blocked)."""
    with RunningOperator(k8s, operator_config(webhook_failure_policy="Auto")) as running:
        assert running.op is not None
        name = running.config.webhook_name
        eventually(lambda: _failure_policy(k8s, name) == "Fail", what="failurePolicy Fail")
        assert running.op.webhook_verified
        assert running.op.webhook is not None
        assert running.op.webhook.reviews >= 1  # the probe reached it
        probe = k8s.kubectl(
            "get", "authorizationpolicy", PROBE_NAME, "-n", running.config.namespace, check=False
        )
        assert probe.returncode != 0  # a dry-run: nothing was stored
    # The webhook served elsewhere than where the API server is sent: never verified, stays Ignore.
    dead = operator_config(
        webhook_failure_policy="Auto", webhook_url=f"https://127.0.0.1:{free_port()}/validate"
    )
    with RunningOperator(k8s, dead) as running:
        assert running.op is not None
        eventually(lambda: _failure_policy(k8s, dead.webhook_name) == "Ignore", what="failurePolicy Ignore")
        time.sleep(5)  # a couple of 2 s checks
        assert not running.op.webhook_verified
        assert _failure_policy(k8s, dead.webhook_name) == "Ignore"
        doc = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "allowed-through", "namespace": ns},
            "spec": {"action": "ALLOW", "rules": [{}]},
        }
        assert k8s.kubectl("apply", "-f", "-", input=json.dumps(doc), check=False).returncode == 0


def _route_parents(k8s: TestCluster, ns: str, name: str) -> list[dict[str, Any]]:
    out = k8s.kubectl("get", "httproute", name, "-n", ns, "-o", "json", check=False)
    return list(json.loads(out.stdout).get("status", {}).get("parents") or []) if out.returncode == 0 else []


def _conditions(parent: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in parent["conditions"]}


def test_httproute_status_names_missing_parents_and_backends(
    k8s: TestCluster, operator: RunningOperator, ns: str
) -> None:
    """GAMMA routes get Gateway API status per Service parent: Accepted and ResolvedRefs, flipping as the
    Services appear; another controller's entry (an ingress Gateway's) is left as it was."""

    def svc(name: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": name}},
        }

    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "reviews", "namespace": ns},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "reviews", "port": 80},
                {"name": "ingress"},  # a Gateway: an ingress controller's business, not ours
            ],
            "rules": [
                {"backendRefs": [{"name": "reviews-v1", "port": 80}, {"name": "reviews-v2", "port": 80}]}
            ],
        },
    }
    k8s.kubectl("apply", "-f", "-", input=json.dumps(svc("reviews-v1")))
    k8s.kubectl("apply", "-f", "-", input=json.dumps(route))

    def ours() -> dict[str, Any] | None:
        parents = [
            p for p in _route_parents(k8s, ns, "reviews") if p["controllerName"] == "istio.io/mesh-controller"
        ]
        return parents[0] if parents else None

    first = eventually(ours, what="HTTPRoute status")
    assert first["parentRef"] == {"group": "", "kind": "Service", "name": "reviews", "port": 80}
    cond = _conditions(first)
    assert cond["Accepted"][:2] == ("False", "NoMatchingParent")
    assert f"Service {ns}/reviews" in cond["Accepted"][2]
    assert cond["ResolvedRefs"][:2] == ("False", "BackendNotFound")
    assert f"Service {ns}/reviews-v2" in cond["ResolvedRefs"][2]
    assert "reviews-v1" not in cond["ResolvedRefs"][2]
    assert len(_route_parents(k8s, ns, "reviews")) == 1  # no entry for the Gateway parent

    # Another controller reports on its Gateway parent; then our Services appear.
    other = {
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "ingress"},
        "controllerName": "example.com/ingress",
        "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "theirs",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}
        ],
    }  # fmt: skip
    k8s.kubectl(
        "patch", "httproute", "reviews", "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"parents": [first, other]}}),
    )  # fmt: skip
    k8s.kubectl("apply", "-f", "-", input=json.dumps(svc("reviews")))
    k8s.kubectl("apply", "-f", "-", input=json.dumps(svc("reviews-v2")))

    def resolved() -> bool:
        p = ours()
        return p is not None and {c[0] for c in _conditions(p).values()} == {"True"}

    eventually(resolved, what="Accepted and ResolvedRefs True")
    parents = _route_parents(k8s, ns, "reviews")
    assert [p["controllerName"] for p in parents] == ["istio.io/mesh-controller", "example.com/ingress"]
    assert parents[1] == other


def test_httproute_cross_namespace_backend_waits_for_a_reference_grant(
    k8s: TestCluster, operator: RunningOperator, ns: str
) -> None:
    """A backendRef into another namespace is RefNotPermitted until a ReferenceGrant there allows it, and
    again once the grant is deleted."""
    other = new_namespace(k8s)
    try:
        for name, where in (("reviews", ns), ("ratings", other)):
            k8s.kubectl("apply", "-f", "-", input=json.dumps({
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": where},
                "spec": {"ports": [{"name": "http", "port": 80}], "selector": {"app": name}},
            }))  # fmt: skip
        route = {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "reviews", "namespace": ns},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "reviews", "port": 80}],
                "rules": [{"backendRefs": [{"name": "ratings", "namespace": other, "port": 80}]}],
            },
        }
        grant = {
            "apiVersion": "gateway.networking.k8s.io/v1beta1",
            "kind": "ReferenceGrant",
            "metadata": {"name": "from-reviews", "namespace": other},
            "spec": {
                "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": ns}],
                "to": [{"group": "", "kind": "Service", "name": "ratings"}],
            },
        }
        k8s.kubectl("apply", "-f", "-", input=json.dumps(route))

        def resolved_refs() -> tuple[str, str, str] | None:
            parents = [
                p
                for p in _route_parents(k8s, ns, "reviews")
                if p["controllerName"] == "istio.io/mesh-controller"
            ]
            return _conditions(parents[0]).get("ResolvedRefs") if parents else None

        def reason_is(want: str) -> tuple[str, str, str] | None:
            c = resolved_refs()
            return c if c is not None and c[1] == want else None

        refused = eventually(lambda: reason_is("RefNotPermitted"), what="ResolvedRefs RefNotPermitted")
        assert refused[0] == "False"
        assert f"Service {other}/ratings" in refused[2]
        k8s.kubectl("apply", "-f", "-", input=json.dumps(grant))
        assert eventually(lambda: reason_is("ResolvedRefs"), what="the grant honoured")[0] == "True"
        k8s.kubectl("delete", "referencegrant", "from-reviews", "-n", other)
        eventually(lambda: reason_is("RefNotPermitted"), what="the grant revoked")
    finally:
        k8s.kubectl("delete", "namespace", other, "--wait=false", check=False)


L7_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: NS}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{to: [{operation: {paths: [/admin]}}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: NS}
spec: {selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: NS}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web, subset: v9}}]}]
"""


def test_status_names_field_and_reason_of_ineffective_config(
    k8s: TestCluster, operator: RunningOperator, ns: str
) -> None:
    k8s.kubectl("apply", "-f", "-", input=L7_POLICY.replace("NS", ns))

    def status(kind: str, name: str) -> dict[str, Any]:
        return dict(k8s.kubectl_json("get", kind, name, "-n", ns).get("status") or {})

    def ztunnel_condition() -> dict[str, Any] | None:
        conds = {c["type"]: c for c in (status("authorizationpolicy", "l7")).get("conditions", [])}
        return conds.get("ZtunnelAccepted")

    cond = eventually(ztunnel_condition, what="ZtunnelAccepted on the L7 policy")
    assert cond["reason"] == "UnsupportedValue"
    assert "spec.rules" in cond["message"]
    msgs = (status("authorizationpolicy", "l7"))["validationMessages"]
    assert any(m["field"].startswith("spec.rules") for m in msgs), msgs

    def subset_message() -> list[dict[str, Any]]:
        return [
            m
            for m in (status("virtualservice", "web")).get("validationMessages", [])
            if m["type"].get("code") == "IST0101"
        ]

    (msg,) = eventually(subset_message, what="IST0101 on the VirtualService")
    assert msg["field"] == "spec.http[0].route[0].destination.subset"
    assert msg["type"]["name"] == "ReferencedResourceNotFound"
    assert msg["level"] == "ERROR"
    assert "v9" in msg["message"]
    conds = {c["type"]: c for c in (status("virtualservice", "web"))["conditions"]}
    assert conds["Accepted"]["status"] == "True"

    # Fixing the cause clears the message (the subset now exists).
    k8s.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {"name": "web", "namespace": ns},
                "spec": {"host": "web", "subsets": [{"name": "v9", "labels": {"version": "v9"}}]},
            }
        ),
    )

    def cleared() -> bool:
        return not subset_message()

    eventually(cleared, what="IST0101 to clear")
    writes = operator.op.status.writes
    # No write loop: with nothing changing, the writer stays quiet.
    eventually(lambda: operator.op.reconciles > 0)
    time.sleep(1.5)
    assert operator.op.status.writes - writes <= 1


def test_invalid_object_gets_a_condition_and_keeps_last_good_version(k8s: TestCluster, ns: str) -> None:
    """Without the webhook (e.g. it was down), an invalid object reaches the watch: it is reported in its
    status, the last good version stays in force, and the other objects keep flowing."""
    with RunningOperator(k8s, operator_config(webhook_enabled=False)) as running:
        eventually(lambda: running.is_leader, what="leadership")
        good = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny", "namespace": ns},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["evil"]}}]}]},
        }
        k8s.kubectl("apply", "-f", "-", input=json.dumps(good))
        key = ResourceKey("AuthorizationPolicy", ns, "deny")
        eventually(lambda: running.store.get(*key), what="the good policy")
        bad = json.loads(json.dumps(good))
        bad["spec"]["targetRefs"] = [{"kind": "Service", "group": "", "name": "x"}]
        bad["spec"]["selector"] = {"matchLabels": {"app": "x"}}
        k8s.kubectl("apply", "-f", "-", input=json.dumps(bad))

        def accepted() -> dict[str, Any] | None:
            st = k8s.kubectl_json("get", "authorizationpolicy", "deny", "-n", ns).get("status") or {}
            conds = {c["type"]: c for c in st.get("conditions", [])}
            c = conds.get("Accepted")
            return c if c and c["status"] == "False" else None

        cond = eventually(accepted, what="Accepted=False on the invalid policy")
        assert cond["reason"] == "Invalid"
        assert "spec" in cond["message"]
        kept = running.store.get(*key)
        assert kept is not None
        assert kept.spec.target_refs == []
        # Others still flow.
        k8s.kubectl("create", "serviceaccount", "after", "-n", ns)
        eventually(lambda: running.store.get("ServiceAccount", ns, "after"), what="a later object")
