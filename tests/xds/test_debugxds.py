"""The syncz debug answer (what ``istioctl proxy-status`` reads), without a server: per-type states, the
proxy filter, and who may ask."""

from __future__ import annotations

import json

from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2

from istiopy.xds.debugxds import SYNCZ, ProxySync, debug_refusal, syncz_response

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
WP = "waypoint~10.0.0.9~waypoint-7d.shop~shop.svc.cluster.local"
ZT = "ztunnel~10.0.0.1~ztunnel-a.istio-system~istio-system.svc.cluster.local"


def _decode(data: bytes) -> tuple[discovery_pb2.DiscoveryResponse, dict[str, dict[str, str]]]:
    resp = discovery_pb2.DiscoveryResponse.FromString(data)
    out = {}
    for any_ in resp.resources:
        cfg = csds_pb2.ClientConfig()
        assert any_.Unpack(cfg)
        out[cfg.node.id] = {
            c.type_url: csds_pb2.ConfigStatus.Name(c.config_status) for c in cfg.generic_xds_configs
        }
    return resp, out


def test_each_type_reports_synced_stale_error_or_not_sent() -> None:
    waypoint = ProxySync(
        WP,
        {"NAMESPACE": "shop", "CLUSTER_ID": "Kubernetes"},
        [
            {"type": CDS, "sent_nonce": "n1", "acked_nonce": "n1", "sent_version": "3", "acked_version": "3"},
            {"type": EDS, "sent_nonce": "n2", "acked_nonce": "", "sent_version": "3"},  # in flight
            {"type": LDS, "sent_nonce": "n3", "acked_nonce": "n0", "last_error": "bad listener"},  # NACKed
            {"type": RDS, "sent_nonce": ""},  # asked for, nothing sent yet
        ],
    )
    resp, got = _decode(syncz_response([waypoint], [], "istiod-1", nonce="x", version="7"))
    assert resp.type_url == SYNCZ
    assert resp.nonce == "x"
    assert json.loads(resp.control_plane.identifier)["ID"] == "istiod-1"
    assert got == {WP: {CDS: "SYNCED", EDS: "STALE", LDS: "ERROR", RDS: "NOT_SENT"}}


def test_names_select_proxies_by_pod_and_namespace() -> None:
    proxies = [ProxySync(WP, {}, []), ProxySync(ZT, {}, [])]
    _, everyone = _decode(syncz_response(proxies, [], "i", nonce="n", version="1"))
    assert sorted(everyone) == sorted([WP, ZT])
    _, one = _decode(syncz_response(proxies, ["waypoint-7d.shop"], "i", nonce="n", version="1"))
    assert list(one) == [WP]
    _, none = _decode(syncz_response(proxies, ["reviews-v1.shop"], "i", nonce="n", version="1"))
    assert none == {}


def test_only_istiods_namespace_may_read_debug_types() -> None:
    assert debug_refusal("spiffe://cluster.local/ns/istio-system/sa/istioctl", "istio-system") == ""
    assert debug_refusal(None, "istio-system") == ""  # a plaintext development listener
    refusal = debug_refusal("spiffe://cluster.local/ns/shop/sa/web", "istio-system")
    assert "istio-system" in refusal
    assert "ns/shop/sa/web" in refusal
    assert debug_refusal("spiffe://cluster.local/ns/istio-system", "istio-system")  # malformed: refused
