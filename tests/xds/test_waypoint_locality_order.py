"""Locality failover order and when it applies (the waypoint EDS), without Envoy."""

from __future__ import annotations

from istiopy.mesh.resources.networking import TrafficPolicy
from istiopy.xds.waypoint.envoy import _failover_enabled, locality_priority

MINE = ("us-east", "us-east-1a", "rack-1")


def test_nearer_localities_come_first_and_failover_names_the_next_region() -> None:
    failover = {"us-east": "eu-west"}
    order = [
        locality_priority(MINE, loc, failover)
        for loc in (
            ("us-east", "us-east-1a", "rack-1"),
            ("us-east", "us-east-1a", "rack-2"),
            ("us-east", "us-east-1b", ""),
            ("eu-west", "eu-west-1a", ""),
            ("us-west", "us-west-2a", ""),
            None,  # a pod on a node without topology labels
        )
    ]
    assert order == [0, 1, 2, 3, 4, 4]
    assert locality_priority(MINE, ("eu-west", "z", ""), {}) == 4  # no failover rule: just "elsewhere"


def test_failover_needs_outlier_detection_and_yields_to_distribute_or_enabled_false() -> None:
    def policy(lb: dict[str, object] | None, outlier: bool = True) -> TrafficPolicy:
        doc: dict[str, object] = {"outlierDetection": {"consecutive5xxErrors": 1}} if outlier else {}
        if lb is not None:
            doc["loadBalancer"] = lb
        return TrafficPolicy.model_validate(doc)

    assert _failover_enabled(None) is None
    assert _failover_enabled(policy(None, outlier=False)) is None
    assert _failover_enabled(policy(None)) == {}
    fo = {"localityLbSetting": {"failover": [{"from": "us-east", "to": "eu-west"}]}}
    assert _failover_enabled(policy(fo)) == {"us-east": "eu-west"}
    assert _failover_enabled(policy({"localityLbSetting": {"enabled": False}})) is None
    dist = {"localityLbSetting": {"distribute": [{"from": "us-east/*", "to": {"us-east/*": 100}}]}}
    assert _failover_enabled(policy(dist)) is None


def test_locality_settings_waypoints_do_not_apply_are_reported() -> None:
    from istiopy.mesh.kinds import parse
    from istiopy.mesh.store import ConfigStore
    from istiopy.mesh.waypoint_diagnostics import waypoint_diagnostics

    store = ConfigStore()
    setting = {"distribute": [{"from": "us-east/*", "to": {"us-east/*": 80, "us-west/*": 20}}]}
    store.apply(
        parse(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {"name": "geo", "namespace": "shop"},
                "spec": {"host": "geo", "trafficPolicy": {"loadBalancer": {"localityLbSetting": setting}}},
            }
        )
    )
    [d] = waypoint_diagnostics(store)
    assert d.field == "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute"
    assert d.reason == "UnsupportedValue"
    assert "not applied" in d.message
