"""Every generated waypoint config passes ``envoy --mode validate``: one store exercising every feature,
inlined into the launcher's real bootstrap; plus generator-level facts (only bound services are served)."""

from __future__ import annotations

from typing import Any

import pytest
from wp_helpers import envoy_validate, gateway, istio, namespace, pod, service, validation_bootstrap

from istiopy.dataplane.waypoint import WaypointOptions, bootstrap
from istiopy.mesh.kinds import parse
from istiopy.mesh.store import ConfigStore
from istiopy.xds.proxy import Proxy
from istiopy.xds.waypoint import generate_clusters, generate_listeners, generate_routes

pytestmark = [pytest.mark.envoy]


def _jwks() -> str:
    import base64
    import json

    from cryptography.hazmat.primitives.asymmetric import rsa

    n = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers().n
    b64n = base64.urlsafe_b64encode(n.to_bytes(256, "big")).rstrip(b"=").decode()
    return json.dumps({"keys": [{"kty": "RSA", "kid": "k", "alg": "RS256", "e": "AQAB", "n": b64n}]})


JWKS = _jwks()


def proxy() -> Proxy:
    return Proxy(
        "waypoint~10.0.0.9~waypoint-0.default~default.svc.cluster.local",
        "waypoint",
        "10.0.0.9",
        "default",
        metadata={"LABELS": {"gateway.networking.k8s.io/gateway-name": "waypoint"}},
    )


def full_store() -> ConfigStore:
    s = ConfigStore()
    res: list[Any] = [
        namespace(),
        gateway(waypoint_for="all"),
        service("web", "10.96.0.10"),
        pod("solo-1", "10.1.0.9", {"app": "solo", "istio.io/use-waypoint": "waypoint"}),
        parse(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {
                    "name": "ext",
                    "namespace": "default",
                    "labels": {"istio.io/use-waypoint": "waypoint"},
                },
                "spec": {
                    "hosts": ["api.example.com"],
                    "addresses": ["240.0.0.1"],
                    "ports": [{"number": 443, "name": "http-tls", "protocol": "HTTP", "targetPort": 443}],
                    "resolution": "DNS",
                },
            }
        ),
        istio(
            "DestinationRule",
            "ext",
            {
                "host": "api.example.com",
                "trafficPolicy": {
                    "tls": {
                        "mode": "SIMPLE",
                        "sni": "api.example.com",
                        "subjectAltNames": ["api.example.com"],
                    },
                    "connectionPool": {"tcp": {"maxConnections": 5}},
                },
            },
        ),
        parse(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "db",
                    "namespace": "default",
                    "labels": {"istio.io/use-waypoint": "waypoint"},
                },
                "spec": {
                    "clusterIP": "10.96.0.13",
                    "selector": {"app": "db"},
                    "ports": [{"name": "tcp-db", "port": 5432}],
                },
            }
        ),
        service("api", "10.96.0.11"),
        service("plain", "10.96.0.12", waypoint=None),
        pod("web-1", "10.1.0.1", {"app": "web", "version": "v1"}),
        pod("web-2", "10.1.0.2", {"app": "web", "version": "v2"}),
        pod("api-1", "10.1.0.3", {"app": "api"}),
        istio(
            "DestinationRule",
            "web",
            {
                "host": "web",
                "trafficPolicy": {
                    "loadBalancer": {
                        "consistentHash": {"httpCookie": {"name": "sess", "path": "/", "ttl": "60s"}}
                    },
                    "connectionPool": {
                        "tcp": {"maxConnections": 10, "connectTimeout": "2s", "maxConnectionDuration": "1h"},
                        "http": {
                            "http1MaxPendingRequests": 5,
                            "http2MaxRequests": 20,
                            "maxRetries": 3,
                            "maxRequestsPerConnection": 100,
                            "idleTimeout": "30s",
                        },
                    },
                    "outlierDetection": {
                        "consecutive5xxErrors": 3,
                        "consecutiveGatewayErrors": 2,
                        "interval": "5s",
                        "baseEjectionTime": "30s",
                        "maxEjectionPercent": 50,
                        "minHealthPercent": 20,
                    },
                },
                "subsets": [
                    {
                        "name": "v1",
                        "labels": {"version": "v1"},
                        "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
                    },
                    {
                        "name": "v2",
                        "labels": {"version": "v2"},
                        "trafficPolicy": {
                            "loadBalancer": {
                                "consistentHash": {"maglev": {"tableSize": 65537}, "useSourceIp": True}
                            }
                        },
                    },
                ],
            },
        ),
        istio(
            "VirtualService",
            "web",
            {
                "hosts": ["web"],
                "http": [
                    {
                        "match": [
                            {
                                "uri": {"regex": "/r/[a-z]+"},
                                "ignoreUriCase": True,
                                "headers": {"x-a": {"prefix": "p"}, "x-b": {}},
                                "withoutHeaders": {"x-c": {"exact": "no"}},
                                "queryParams": {"q": {"regex": "[0-9]+"}},
                                "method": {"exact": "GET"},
                                "authority": {"prefix": "web"},
                            },
                        ],
                        "route": [
                            {
                                "destination": {"host": "web", "subset": "v1"},
                                "weight": 80,
                                "headers": {
                                    "request": {"set": {"x-s": "1"}},
                                    "response": {"add": {"x-r": "2"}},
                                },
                            },
                            {"destination": {"host": "web", "subset": "v2"}, "weight": 20},
                        ],
                        "timeout": "3s",
                        "retries": {
                            "attempts": 2,
                            "perTryTimeout": "1s",
                            "retryOn": "gateway-error,503,connect-failure",
                            "backoff": "50ms",
                        },
                        "fault": {
                            "delay": {"fixedDelay": "1s", "percentage": {"value": 0.5}},
                            "abort": {"grpcStatus": "UNAVAILABLE", "percentage": {"value": 1}},
                        },
                        "mirrors": [{"destination": {"host": "api"}, "percentage": {"value": 10}}],
                        "corsPolicy": {
                            "allowOrigins": [{"regex": "https://.*\\.example"}],
                            "allowMethods": ["GET"],
                            "allowHeaders": ["a"],
                            "exposeHeaders": ["b"],
                            "maxAge": "1m",
                            "allowCredentials": True,
                        },
                        "headers": {"request": {"remove": ["x-d"]}, "response": {"set": {"x-e": "f"}}},
                    },
                    {
                        "match": [{"uri": {"prefix": "/rw"}}],
                        "rewrite": {"uriRegexRewrite": {"match": "^/rw/(.*)$", "rewrite": "/\\1"}},
                        "route": [{"destination": {"host": "api", "port": {"number": 80}}}],
                        "mirror": {"host": "api"},
                    },
                    {
                        "match": [{"uri": {"exact": "/r"}}],
                        "redirect": {"uri": "/x", "scheme": "https", "port": 8443, "redirectCode": 302},
                    },
                    {
                        "match": [{"uri": {"exact": "/d"}}],
                        "directResponse": {"status": 503, "body": {"string": "down"}},
                    },
                    {"route": [{"destination": {"host": "web"}}]},
                ],
            },
        ),
        parse(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": "api", "namespace": "default"},
                "spec": {
                    "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
                    "rules": [
                        {
                            "matches": [
                                {
                                    "path": {"type": "RegularExpression", "value": "/v[0-9]"},
                                    "method": "GET",
                                    "queryParams": [{"name": "a", "value": "b"}],
                                }
                            ],
                            "filters": [
                                {
                                    "type": "URLRewrite",
                                    "urlRewrite": {
                                        "hostname": "api.internal",
                                        "path": {"type": "ReplaceFullPath", "replaceFullPath": "/x"},
                                    },
                                },
                                {
                                    "type": "RequestMirror",
                                    "requestMirror": {
                                        "backendRef": {"name": "web", "port": 80},
                                        "percent": 5,
                                    },
                                },
                                {
                                    "type": "ResponseHeaderModifier",
                                    "responseHeaderModifier": {"add": [{"name": "x", "value": "y"}]},
                                },
                            ],
                            "backendRefs": [
                                {"name": "api", "port": 80, "weight": 3},
                                {"name": "web", "port": 80, "weight": 1},
                            ],
                            "timeouts": {"request": "10s", "backendRequest": "2s"},
                        },
                        {
                            "matches": [{"path": {"type": "PathPrefix", "value": "/gone"}}],
                            "filters": [
                                {
                                    "type": "RequestRedirect",
                                    "requestRedirect": {
                                        "path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"}
                                    },
                                }
                            ],
                        },
                        {"matches": [{"path": {"type": "Exact", "value": "/empty"}}]},
                        {
                            "matches": [{"path": {"type": "PathPrefix", "value": "/pre"}}],
                            "filters": [
                                {
                                    "type": "URLRewrite",
                                    "urlRewrite": {
                                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/y"}
                                    },
                                }
                            ],
                            "backendRefs": [{"name": "api", "port": 80}],
                        },
                    ],
                },
            }
        ),
        istio(
            "AuthorizationPolicy",
            "allow",
            {
                "targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "principals": ["cluster.local/ns/default/sa/a", "*-suffix"],
                                    "notNamespaces": ["bad*"],
                                    "requestPrincipals": ["https://iss/*"],
                                    "ipBlocks": ["10.0.0.0/8"],
                                    "notRemoteIpBlocks": ["1.2.3.4"],
                                }
                            }
                        ],
                        "to": [
                            {
                                "operation": {
                                    "hosts": ["web.default.svc.cluster.local", "*.example"],
                                    "notPorts": ["81"],
                                    "methods": ["GET", "POST"],
                                    "notPaths": ["*/private"],
                                }
                            }
                        ],
                        "when": [
                            {"key": "request.auth.claims[groups][0]", "values": ["a"]},
                            {"key": "request.auth.audiences", "notValues": ["x"]},
                            {"key": "destination.port", "values": ["80"]},
                            {"key": "source.namespace", "values": ["default"]},
                            {"key": "request.headers[x-k]", "values": ["*"]},
                        ],
                    },
                    {
                        "from": [
                            {"source": {"serviceAccounts": ["default/x"], "notTrustDomains": ["evil.td"]}}
                        ]
                    },
                    {},
                ],
            },
            group="security.istio.io/v1",
        ),
        istio(
            "AuthorizationPolicy",
            "deny",
            {
                "targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
            },
            group="security.istio.io/v1",
        ),
        istio(
            "AuthorizationPolicy",
            "audit",
            {
                "targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "action": "AUDIT",
                "rules": [{}],
            },
            group="security.istio.io/v1",
        ),
        istio(
            "AuthorizationPolicy",
            "custom",
            {
                "targetRefs": [{"group": "", "kind": "Service", "name": "api"}],
                "action": "CUSTOM",
                "provider": {"name": "x"},
                "rules": [{}],
            },
            group="security.istio.io/v1",
        ),
        istio(
            "RequestAuthentication",
            "jwt",
            {
                "targetRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "jwtRules": [
                    {
                        "issuer": "https://iss",
                        "audiences": ["web"],
                        "jwks": JWKS,
                        "fromHeaders": [{"name": "x-t", "prefix": "T "}],
                        "fromParams": ["t"],
                        "outputPayloadToHeader": "x-p",
                        "forwardOriginalToken": True,
                        "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}],
                    },
                    {"issuer": "https://remote", "jwksUri": "https://keys.example.com:8443/jwks.json"},
                ],
            },
            group="security.istio.io/v1",
        ),
    ]
    for r in res:
        s.apply(r)
    return s


def test_full_config_passes_envoy_validate(tmp_path: Any) -> None:
    store = full_store()
    base = bootstrap(
        WaypointOptions("waypoint", "default", "127.0.0.1:15012", xds_roots_pem="x"), str(tmp_path / "s")
    )
    config = validation_bootstrap(store, proxy(), base)
    ok, out = envoy_validate(config)
    assert ok, out[-4000:]
    routes = dict(generate_routes(store, proxy()))
    web = routes["inbound-vip|80|http|web.default.svc.cluster.local"]
    assert len(web.virtual_hosts[0].routes) == 5  # every VirtualService rule made it


def test_unloadable_jwks_keys_are_reported() -> None:
    from istiopy.mesh.waypoint_diagnostics import jwks_problem

    assert jwks_problem(JWKS) == ""
    assert "even" in jwks_problem('{"keys":[{"kty":"RSA","e":"AQAB","n":"' + "u" * 342 + '"}]}')
    assert "not JSON" in jwks_problem("{nope")
    assert "crv" in jwks_problem('{"keys":[{"kty":"EC","x":"AA","y":"AA"}]}')


def test_clashing_addresses_are_not_nacked(tmp_path: Any) -> None:
    """One VIP:port claimed twice (a duplicated clusterIP; a ServiceEntry with two hosts on one address)
    would be identical filter-chain matches, which Envoy rejects: the first keeps it, the config loads."""
    store = full_store()
    store.apply(service("twin", "10.96.0.10"))  # web's VIP
    store.apply(
        parse(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {
                    "name": "multi",
                    "namespace": "default",
                    "labels": {"istio.io/use-waypoint": "waypoint"},
                },
                "spec": {
                    "hosts": ["a.example.com", "b.example.com"],
                    "addresses": ["240.0.0.2"],
                    "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                    "resolution": "DNS",
                },
            }
        )
    )
    base = bootstrap(WaypointOptions("waypoint", "default", "127.0.0.1:15012"), str(tmp_path / "s"))
    ok, out = envoy_validate(validation_bootstrap(store, proxy(), base))
    assert ok, out[-3000:]
    chains = [c.name for c in dict(generate_listeners(store, proxy()))["main_internal"].filter_chains]
    assert "inbound-vip|80|http|a.example.com" in chains
    assert "inbound-vip|80|http|b.example.com" not in chains


def test_only_bound_services_are_served() -> None:
    store = full_store()
    clusters = {n for n, _ in generate_clusters(store, proxy())}
    assert "inbound-vip|80|http|web.default.svc.cluster.local" in clusters
    assert "inbound-vip|80|v1|web.default.svc.cluster.local" in clusters
    assert "jwks|keys.example.com|8443" in clusters
    assert not any("plain" in c for c in clusters)
    listeners = dict(generate_listeners(store, proxy()))
    chains = [c.name for c in listeners["main_internal"].filter_chains]
    assert chains == [
        "inbound-vip|80|http|api.default.svc.cluster.local",
        "inbound-vip|5432|tcp|db.default.svc.cluster.local",
        "inbound-vip|80|http|web.default.svc.cluster.local",
        "inbound-vip|443|http|api.example.com",
        "direct-http|default/solo-1",
    ]
    # a proxy of another waypoint (or not a waypoint at all) gets nothing from these generators
    other = Proxy("sidecar~10.0.0.1~a.default~default.svc.cluster.local", "sidecar", namespace="default")
    assert list(generate_listeners(store, other)) == []


def test_regex_limits_match_envoy(tmp_path: Any) -> None:
    """A pattern Envoy's default RE2 limit would refuse is accepted (the launcher raises the limit as Istio
    does) and one beyond that limit is left out and reported instead of NACKed."""
    from istiopy.mesh.waypoint_diagnostics import regex_problem

    big = "/[a-z]{1,200}/(a|b|c|d|e|f|g|h|i|j){1,50}"
    huge = "/(y{1,1000}){1,40}"
    assert regex_problem(big) == ""
    assert "exceeds" in regex_problem(huge)
    store = full_store()
    store.apply(service("rx", "10.96.0.20"))
    store.apply(
        istio(
            "VirtualService",
            "rx",
            {
                "hosts": ["rx"],
                "http": [
                    {"match": [{"uri": {"regex": big}}], "route": [{"destination": {"host": "rx"}}]},
                    {"match": [{"uri": {"regex": huge}}], "route": [{"destination": {"host": "rx"}}]},
                ],
            },
        )
    )
    base = bootstrap(WaypointOptions("waypoint", "default", "127.0.0.1:15012"), str(tmp_path / "s"))
    ok, out = envoy_validate(validation_bootstrap(store, proxy(), base))
    assert ok, out[-3000:]
    rx = dict(generate_routes(store, proxy()))["inbound-vip|80|http|rx.default.svc.cluster.local"]
    assert [r.match.safe_regex.regex for r in rx.virtual_hosts[0].routes] == [big]
