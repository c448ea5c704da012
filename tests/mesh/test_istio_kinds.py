"""Istio security and networking kinds: Istio-docs documents load and round-trip; bad ones name the field."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

import istiopy.mesh.resources  # noqa: F401  (registers the kinds)
from istiopy.mesh.errors import InvalidResource
from istiopy.mesh.kinds import kind_class, parse, registered
from istiopy.mesh.meta import Resource
from istiopy.mesh.resources.common import duration_seconds, is_fqdn, parse_duration
from istiopy.mesh.resources.networking import (
    DestinationRule,
    HTTPRoute,
    Resolution,
    ServiceEntry,
    SimpleLB,
    VirtualService,
    WorkloadEntry,
)
from istiopy.mesh.resources.security import (
    Action,
    AuthorizationPolicy,
    MtlsMode,
    PeerAuthentication,
    RequestAuthentication,
    is_valid_condition_key,
)

DATA = Path(__file__).resolve().parent.parent / "data"
KINDS = (
    "authorizationpolicy",
    "peerauthentication",
    "requestauthentication",
    "virtualservice",
    "destinationrule",
    "serviceentry",
    "workloadentry",
)


def _docs(folder: str) -> list[Any]:
    out: list[Any] = []
    for prefix in KINDS:
        for f in sorted((DATA / folder).glob(f"{prefix}-*.yaml")):
            for i, doc in enumerate(yaml.safe_load_all(f.read_text())):
                if doc:
                    out.append(pytest.param(doc, id=f"{f.stem}#{i}"))
    return out


VALID = _docs("valid")
INVALID = _docs("invalid")


def _json(value: Any) -> Any:
    """The JSON view of YAML data (int map keys become strings, as the apiserver stores them)."""
    return json.loads(json.dumps(value))


def _is_subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _is_subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(_is_subset, small, big))
    return bool(small == big)


def test_enough_documents() -> None:
    assert len(VALID) >= 30
    assert len(INVALID) >= 15
    kinds = {d.values[0]["kind"] for d in VALID}
    assert kinds == {
        "AuthorizationPolicy",
        "PeerAuthentication",
        "RequestAuthentication",
        "VirtualService",
        "DestinationRule",
        "ServiceEntry",
        "WorkloadEntry",
    }
    versions = {d.values[0]["apiVersion"] for d in VALID}
    assert {
        "security.istio.io/v1beta1",
        "networking.istio.io/v1beta1",
        "networking.istio.io/v1alpha3",
    } <= versions


@pytest.mark.parametrize("doc", VALID)
def test_valid_document_round_trips(doc: dict[str, Any]) -> None:
    res = parse(doc)
    out = res.to_dict()
    assert parse(out) == res
    want = _json(doc.get("spec") or {})
    # What was written comes back unchanged (camelCase keys, durations as written); unset fields stay
    # out of an exclude_unset dump and to_dict only adds defaults.
    assert res.model_dump(by_alias=True, exclude_unset=True, mode="json").get("spec", {}) == want
    assert _is_subset(want, out.get("spec", {}))


@pytest.mark.parametrize("doc", INVALID)
def test_invalid_document_names_the_field(doc: dict[str, Any]) -> None:
    expect = doc["metadata"]["annotations"]["test.istiopy.io/expect-error"]
    path, _, reason = expect.partition(": ")
    with pytest.raises(InvalidResource) as err:
        parse(doc)
    found = [(e.path, e.reason) for e in err.value.errors]
    assert any(p == path and reason in r for p, r in found), found
    assert all(p for p, _ in found), found


def _valid(kind: str, name: str) -> Resource:
    """The one document of ``tests/data/valid`` with this kind and name, parsed."""
    (doc,) = [
        d.values[0] for d in VALID if d.values[0]["kind"] == kind and d.values[0]["metadata"]["name"] == name
    ]
    return parse(doc)


def _one(text: str) -> Resource:
    return parse(yaml.safe_load(text), default_namespace="default")


def _errors(text: str) -> list[str]:
    with pytest.raises(InvalidResource) as err:
        _one(text)
    return [str(e) for e in err.value.errors]


# --- registry -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "plural", "versions"),
    [
        (AuthorizationPolicy, "authorizationpolicies", ("v1", "v1beta1")),
        (PeerAuthentication, "peerauthentications", ("v1", "v1beta1")),
        (RequestAuthentication, "requestauthentications", ("v1", "v1beta1")),
        (VirtualService, "virtualservices", ("v1", "v1beta1", "v1alpha3")),
        (DestinationRule, "destinationrules", ("v1", "v1beta1", "v1alpha3")),
        (ServiceEntry, "serviceentries", ("v1", "v1beta1", "v1alpha3")),
        (WorkloadEntry, "workloadentries", ("v1", "v1beta1", "v1alpha3")),
    ],
)
def test_registry(cls: type[Resource], plural: str, versions: tuple[str, ...]) -> None:
    assert cls in registered()
    assert kind_class(cls.KIND, cls.GROUP) is cls
    assert plural == cls.PLURAL
    assert versions == cls.VERSIONS
    assert cls.NAMESPACED


def test_unknown_version_is_named() -> None:
    errors = _errors("apiVersion: security.istio.io/v2\nkind: AuthorizationPolicy\nmetadata: {name: a}\n")
    assert errors[0].startswith("apiVersion: unsupported version")


def test_status_is_dropped() -> None:
    res = _one(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n"
        "spec: {}\nstatus: {conditions: [{type: WaypointAccepted}]}\n"
    )
    assert "status" not in res.to_dict()


# --- AuthorizationPolicy --------------------------------------------------------------------------------


def test_authorization_policy_attributes() -> None:
    res = _one(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a}
spec:
  targetRef: {kind: Service, group: "", name: a}
  targetRefs: []
  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["10.0.0.0/8"], notRequestPrincipals: ["*"]}}]
    to: [{operation: {notPorts: ["80"]}}]
    when: [{key: "request.headers[x-a]", notValues: ["b"]}]
"""
    )
    assert isinstance(res, AuthorizationPolicy)
    assert res.spec.action is Action.DENY
    rule = res.spec.rules[0]
    src = rule.from_[0].source
    assert src is not None
    assert src.ip_blocks == ["10.0.0.0/8"]
    assert src.not_request_principals == ["*"]
    assert rule.to[0].operation is not None
    assert rule.to[0].operation.not_ports == ["80"]
    assert res.uses_target_refs
    assert [r.name for r in res.target_refs] == ["a"]
    assert res.to_dict()["spec"]["rules"][0]["from"][0]["source"]["ipBlocks"] == ["10.0.0.0/8"]


def test_authorization_policy_defaults() -> None:
    res = _one("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n")
    assert isinstance(res, AuthorizationPolicy)
    assert res.spec.action is Action.ALLOW
    assert res.spec.rules == []
    assert not res.uses_target_refs


@pytest.mark.parametrize(
    "key",
    [
        "request.headers[User-Agent]",
        "source.ip",
        "remote.ip",
        "source.namespace",
        "source.principal",
        "source.serviceAccount",
        "source.trustDomain",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims[iss]",
        "request.auth.claims[a][b]",
        "destination.ip",
        "destination.port",
        "connection.sni",
        "experimental.envoy.filters.network.mysql_proxy[db.table]",
    ],
)
def test_condition_keys_accepted(key: str) -> None:
    assert is_valid_condition_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "request.headers",
        "request.headers[]",
        "source.ips",
        "request.auth.claims",
        "destination.name",
        "",
        "experimental.envoy.filters.http.jwt_authn",  # the [path] is required
        "experimental.envoy.filters.http.jwt_authn[]",
    ],
)
def test_condition_keys_refused(key: str) -> None:
    assert not is_valid_condition_key(key)


def test_target_ref_kind_and_namespace_rules() -> None:
    errors = _errors(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a}
spec:
  targetRefs:
  - {kind: Deployment, group: apps, name: a}
  - {kind: Service, group: "", name: b, namespace: other}
  rules: [{}]
"""
    )
    assert any(e.startswith("spec.targetRefs[0]: Support kinds are") for e in errors), errors
    assert "spec.targetRefs[1].namespace: cross namespace referencing is not currently supported" in errors


def test_custom_without_rules() -> None:
    errors = _errors(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n"
        "spec: {action: CUSTOM, provider: {name: x}}\n"
    )
    assert errors == [
        "spec.rules: CUSTOM action without `rules` is meaningless as it will never be triggered, "
        "add an empty rule `{}` if you want it be triggered for every request"
    ]


def test_audit_without_rules_and_empty_lists_are_accepted() -> None:
    """As upstream: only DENY and CUSTOM need rules, and ``from: []`` reads like an absent list."""
    res = _one(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n"
        "spec: {action: AUDIT, rules: [{from: [], when: []}]}\n"
    )
    assert isinstance(res, AuthorizationPolicy)
    assert res.spec.rules[0].from_ == []
    errors = _errors(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n"
        "spec: {rules: [{to: [{operation: {}}]}]}\n"
    )
    assert errors == [
        "spec.rules[0].to[0].operation: `to.operation` must not be empty (set at least one field)"
    ]


def test_custom_restrictions() -> None:
    errors = _errors(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a}
spec:
  action: CUSTOM
  provider: {name: ext}
  rules:
  - from: [{source: {principals: [a], ipBlocks: [10.0.0.0/8]}}]
    when: [{key: "request.auth.claims[iss]", values: [x]}, {key: source.ip, values: [10.0.0.1]}]
"""
    )
    assert errors == [
        "spec.rules[0].from[0].source.principals: principals is not supported with CUSTOM action",
        "spec.rules[0].when[0].key: request.auth.claims[iss] is not supported with CUSTOM action",
    ]


@pytest.mark.parametrize(
    ("paths", "ok"),
    [
        (["/a/{*}/b", "/{**}/x", "/a/{**}", "/prefix*", "*"], True),
        (["/a/{**}/{*}"], False),
        (["/a/{x}"], False),
        (["/a/*/{*}"], False),
    ],
)
def test_path_templates(paths: list[str], ok: bool) -> None:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "a", "namespace": "d"},
        "spec": {"rules": [{"to": [{"operation": {"paths": paths}}]}]},
    }
    if ok:
        parse(doc)
    else:
        with pytest.raises(InvalidResource, match=r"spec\.rules\[0\]\.to\[0\]\.operation\.paths\[0\]"):
            parse(doc)


def test_operation_ports_must_be_numbers() -> None:
    errors = _errors(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\n"
        "spec: {rules: [{to: [{operation: {ports: ['http', '70000']}}]}]}\n"
    )
    assert [e.split(":")[0] for e in errors] == [
        "spec.rules[0].to[0].operation.ports[0]",
        "spec.rules[0].to[0].operation.ports[1]",
    ]


# --- PeerAuthentication / RequestAuthentication ----------------------------------------------------------


def test_peer_authentication_port_modes() -> None:
    res = _one(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a}\n"
        "spec: {selector: {matchLabels: {app: a}}, portLevelMtls: {8080: {mode: DISABLE}, '9090': {}}}\n"
    )
    assert isinstance(res, PeerAuthentication)
    assert res.port_modes() == {8080: MtlsMode.DISABLE, 9090: MtlsMode.UNSET}
    assert res.spec.mtls is None  # unset: inherits from namespace / mesh
    assert res.to_dict()["spec"]["portLevelMtls"] == {"8080": {"mode": "DISABLE"}, "9090": {"mode": "UNSET"}}


def test_request_authentication_jwks_uri_only_is_valid() -> None:
    res = _one(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: a}\n"
        "spec: {jwtRules: [{jwksUri: 'https://example.com/jwks', timeout: 1m30s}]}\n"
    )
    assert isinstance(res, RequestAuthentication)
    rule = res.spec.jwt_rules[0]
    assert rule.issuer == ""
    assert rule.timeout is not None
    assert duration_seconds(rule.timeout) == 90.0


def test_request_authentication_jwks_uri_scheme() -> None:
    errors = _errors(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: a}\n"
        "spec: {jwtRules: [{issuer: a, jwksUri: 'ftp://example.com/jwks'}]}\n"
    )
    assert errors == ["spec.jwtRules[0].jwksUri: url scheme must be http or https: 'ftp://example.com/jwks'"]


# --- durations ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("100ms", 0.1),
        ("1.5h", 5400.0),
        ("0s", 0.0),
        ("0", 0.0),
        ("250us", 2.5e-4),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "5", "", "s", "1m30", "1 s", "5s5", "apple"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_duration_seconds_default() -> None:
    assert duration_seconds(None, 15.0) == 15.0


# --- VirtualService / DestinationRule --------------------------------------------------------------------


def test_virtual_service_fields() -> None:
    vs = _valid("VirtualService", "ratings-full")
    assert isinstance(vs, VirtualService)
    route: HTTPRoute = vs.spec.http[0]
    assert route.match[0].uri is not None
    assert route.match[0].uri.prefix == "/wpcatalog"
    assert route.match[0].query_params["debug"].exact == "1"
    assert route.match[0].ignore_uri_case
    assert route.route[0].destination.port is not None
    assert route.route[0].destination.port.number == 9080
    assert route.retries is not None
    assert route.retries.attempts == 3
    assert route.retries.per_try_timeout == "2s"
    assert route.mirror_percentage is not None
    assert route.mirror_percentage.value == 12.5
    assert route.cors_policy is not None
    assert route.cors_policy.allow_origins[0].exact == "https://example.com"
    assert route.timeout is not None
    assert duration_seconds(route.timeout) == 10.0
    assert not vs.is_delegate


def test_delegate_virtual_service() -> None:
    vs = _valid("VirtualService", "productpage")
    assert isinstance(vs, VirtualService)
    assert vs.is_delegate
    errors = _errors(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\n"
        "spec: {gateways: [gw], tls: [{match: [{sniHosts: [a.com]}], route: [{destination: {host: a}}]}]}\n"
    )
    assert errors[:2] == [
        "spec.gateways: delegate VirtualService (no hosts) must have no gateways",
        "spec.tls: delegate VirtualService (no hosts) must have no tls routes",
    ]


def test_virtual_service_needs_routes() -> None:
    errors = _errors(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: [a]}\n"
    )
    assert errors == ["spec: http, tcp or tls must be provided in virtual service"]


def test_fault_percentage_range() -> None:
    errors = _errors(
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a}
spec:
  hosts: [a]
  http:
  - fault: {abort: {httpStatus: 503, percentage: {value: 101}}}
    route: [{destination: {host: a}}]
"""
    )
    assert errors == ["spec.http[0].fault.abort.percentage: percentage must be in range 0..100, got 101.0"]


def test_destination_rule_fields() -> None:
    dr = _valid("DestinationRule", "httpbin")
    assert isinstance(dr, DestinationRule)
    tp = dr.spec.traffic_policy
    assert tp is not None
    assert tp.outlier_detection is not None
    assert tp.outlier_detection.consecutive_5xx_errors == 7
    assert tp.connection_pool is not None
    assert tp.connection_pool.http is not None
    assert tp.connection_pool.http.http1_max_pending_requests == 1
    assert dr.to_dict()["spec"]["trafficPolicy"]["outlierDetection"]["consecutive5xxErrors"] == 7
    subsets = _valid("DestinationRule", "reviews")
    assert isinstance(subsets, DestinationRule)
    v2 = subsets.subset("v2")
    assert v2 is not None
    assert v2.traffic_policy is not None
    assert v2.traffic_policy.load_balancer is not None
    assert v2.traffic_policy.load_balancer.simple is SimpleLB.ROUND_ROBIN
    assert subsets.subset("v9") is None


def test_empty_traffic_policy_and_port_level() -> None:
    errors = _errors(
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a}
spec:
  host: a
  trafficPolicy:
    portLevelSettings:
    - loadBalancer: {simple: RANDOM}
    - port: {number: 80}
      tls: {mode: MUTUAL}
    - port: {number: 81}
  subsets:
  - name: v1
    trafficPolicy: {}
"""
    )
    pl = "spec.trafficPolicy.portLevelSettings"
    assert errors == [
        f"{pl}[0].port: portTrafficPolicy must have valid port",
        f"{pl}[1].tls.clientCertificate: client certificate required for mutual tls",
        f"{pl}[1].tls.privateKey: private key required for mutual tls",
        f"{pl}[2]: port traffic policy must have at least one field",
        "spec.subsets[0].trafficPolicy: traffic policy must have at least one field",
    ]


def test_maglev_and_tunnel() -> None:
    errors = _errors(
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a}
spec:
  host: a
  trafficPolicy:
    loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 1000}}}
    connectionPool: {http: {h2UpgradePolicy: UPGRADE, useClientProtocol: true}}
  subsets:
  - name: v1
    trafficPolicy: {tunnel: {protocol: CONNECT, targetHost: proxy, targetPort: 3128}, proxyProtocol: {}}
"""
    )
    assert errors == [
        "spec.trafficPolicy.connectionPool.http.useClientProtocol: use client protocol must not be true when "
        "H2UpgradePolicy is UPGRADE",
        "spec.trafficPolicy.loadBalancer.consistentHash.maglev.tableSize: "
        "tableSize must be a prime number for maglev",
        "spec.subsets[0].trafficPolicy: tunnel and proxyProtocol must not be set together",
    ]


def test_export_to_rules() -> None:
    errors = _errors(
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a, namespace: shop}
spec:
  host: a
  exportTo: [".", "shop", "*"]
  workloadSelector: {matchLabels: {app: a}}
"""
    )
    assert errors == [
        'spec.exportTo[1]: Duplicate value: "shop"',
        "spec.exportTo: cannot have both public (*) and non-public exportTo values",
        "spec.exportTo: destination rule with workload selector cannot have exportTo beyond current "
        "namespace",
    ]


# --- ServiceEntry / WorkloadEntry ------------------------------------------------------------------------


def test_service_entry_fields() -> None:
    se = _valid("ServiceEntry", "external-svc-mongocluster")
    assert isinstance(se, ServiceEntry)
    assert se.spec.resolution is Resolution.STATIC
    assert se.spec.endpoints[1].ports == {"mongodb": 27019}
    assert se.spec.endpoints[2].is_uds


def test_service_entry_endpoint_port_must_be_declared() -> None:
    errors = _errors(
        """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: a}
spec:
  hosts: [a.example.com]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 1.1.1.1, ports: {grpc: 90}}]
"""
    )
    assert errors == [
        "spec.endpoints[0].ports[grpc]: endpoint port 'grpc' is not defined by the service entry"
    ]


def test_ipv6_in_yaml_flow_list() -> None:
    res = _one(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\n"
        "spec: {hosts: [a.com], addresses: [1.2.3.4, 2001:db8::]}\n"
    )
    assert isinstance(res, ServiceEntry)
    assert res.spec.addresses == ["1.2.3.4", "2001:db8::"]


def test_workload_entry_fields() -> None:
    we = _valid("WorkloadEntry", "details-svc-vm1")
    assert isinstance(we, WorkloadEntry)
    assert we.spec.service_account == "details-legacy"
    assert we.spec.ports == {"http": 8080}
    assert we.spec.weight == 10
    assert not we.spec.is_uds


@pytest.mark.parametrize(
    ("host", "ok"),
    [("example.com", True), ("*.example.com", True), ("reviews", True), ("a..b", False), ("-a.com", False)],
)
def test_fqdn(host: str, ok: bool) -> None:
    assert is_fqdn(host, allow_wildcard=True) is ok


# --- robustness --------------------------------------------------------------------------------------------

_ODD_VALUES: list[Any] = [None, 0, -1, 70000, "", "*", "5x", "1.2.3.4/99", [], {}, [None], {"a": None}, True]
_ODD_VALUES += [1.5, "unix://", ":authority", "{**}", "a" * 2000, {"": ""}, ["*"], "0s"]


def _paths(obj: Any, prefix: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def test_mutated_documents_never_crash_the_parser() -> None:
    """Random damage to real documents yields InvalidResource (never another exception), and whatever
    is accepted still round-trips: the validators cope with every shape pydantic lets through."""
    rng = random.Random(20261130)
    docs = [d.values[0] for d in VALID + INVALID]
    for _ in range(3000):
        doc = copy.deepcopy(rng.choice(docs))
        spec_paths = [p for p in _paths(doc.get("spec") or {}, ("spec",)) if len(p) > 1]
        if not spec_paths:
            continue
        path = rng.choice(spec_paths)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.3 and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(_ODD_VALUES))
        try:
            res = parse(doc)
        except InvalidResource as err:
            unnamed = [str(e) for e in err.errors if not e.path]
        else:
            unnamed = []
            assert parse(res.to_dict()) == res
        assert not unnamed, unnamed
