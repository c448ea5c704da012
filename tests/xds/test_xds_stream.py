"""The sans-I/O protocol core: every rule exercised with plain calls, no sockets, no clocks."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from istiopy.xds import types
from istiopy.xds.cache import Snapshot, TypedResources
from istiopy.xds.stream import DeltaResponse, DeltaStream, Kind, ProtocolError, SotwResponse, SotwStream

CDS = types.CLUSTER
EDS = types.ENDPOINT


def clusters(**timeouts: int) -> TypedResources:
    """Clusters named by the keywords; the value changes the content (and so the version)."""
    return TypedResources.build(
        CDS, [(n, cluster_pb2.Cluster(name=n, connect_timeout={"seconds": t})) for n, t in timeouts.items()]
    )


def sotw_req(
    type_url: str = CDS,
    names: tuple[str, ...] = (),
    version: str = "",
    nonce: str = "",
    error: str | None = None,
) -> Any:
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url,
        resource_names=list(names),
        version_info=version,
        response_nonce=nonce,
        node=base_pb2.Node(id="n1"),
    )
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def delta_req(
    type_url: str = CDS,
    sub: tuple[str, ...] = (),
    unsub: tuple[str, ...] = (),
    nonce: str = "",
    initial: dict[str, str] | None = None,
    error: str | None = None,
) -> Any:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=list(sub),
        resource_names_unsubscribe=list(unsub),
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def names(resp: SotwResponse | DeltaResponse) -> list[str]:
    return [r.name for r in resp.resources]


# ------------------------------------------------------------------------------------------------ SotW
def test_sotw_legacy_wildcard_gets_everything_and_ack_records_version() -> None:
    s = SotwStream()
    s.set_snapshot(Snapshot.of([clusters(a=1, b=1)]))
    out = s.handle_request(sotw_req(), now=0.0)
    assert out.kind is Kind.INITIAL
    [resp] = s.responses(now=1.0)
    assert isinstance(resp, SotwResponse)
    assert names(resp) == ["a", "b"]
    proto = resp.to_proto()
    assert [cluster_pb2.Cluster.FromString(a.value).name for a in proto.resources] == ["a", "b"]
    assert proto.version_info == resp.version
    assert proto.nonce == resp.nonce
    ack = s.handle_request(sotw_req(version=resp.version, nonce=resp.nonce), now=2.0)
    assert ack.kind is Kind.ACK
    assert s.types[CDS].acked_version == resp.version
    assert s.responses(now=3.0) == []  # nothing changed, nothing owed


def test_sotw_removal_is_omission_and_unchanged_content_sends_nothing() -> None:
    s = SotwStream()
    s.set_snapshot(Snapshot.of([clusters(a=1, b=1)]))
    s.handle_request(sotw_req(), 0)
    first = s.responses(0)[0]
    s.set_snapshot(Snapshot.of([clusters(a=1, b=1)]))  # regenerated, equal content
    assert s.responses(1) == []
    s.set_snapshot(Snapshot.of([clusters(a=1)]))
    [resp] = s.responses(2)
    assert names(resp) == ["a"]
    assert resp.version != first.version


def test_sotw_named_subscription_and_stale_nonce_ignored() -> None:
    eds = TypedResources.build(EDS, [(n, cluster_pb2.Cluster(name=n)) for n in ("x", "y", "z")])
    s = SotwStream()
    s.set_snapshot(Snapshot.of([eds]))
    s.handle_request(sotw_req(EDS, names=("x",)), 0)
    r1 = s.responses(0)[0]
    assert names(r1) == ["x"]
    # The client changes its subscription quoting the current nonce: answered with the new set.
    s.handle_request(sotw_req(EDS, names=("x", "y"), version=r1.version, nonce=r1.nonce), 1)
    r2 = s.responses(1)[0]
    assert names(r2) == ["x", "y"]
    # A request quoting the older nonce is stale: ignored entirely, subscription included.
    out = s.handle_request(sotw_req(EDS, names=("z",), version=r1.version, nonce=r1.nonce), 2)
    assert out.kind is Kind.STALE
    assert s.types[EDS].names == {"x", "y"}
    assert s.responses(2) == []


def test_sotw_explicit_wildcard_and_end_of_legacy_wildcard() -> None:
    s = SotwStream()
    s.set_snapshot(Snapshot.of([clusters(a=1, b=1)]))
    s.handle_request(sotw_req(names=("*",)), 0)
    r = s.responses(0)[0]
    assert names(r) == ["a", "b"]
    assert s.types[CDS].wildcard
    s2 = SotwStream()
    s2.set_snapshot(Snapshot.of([clusters(a=1, b=1)]))
    s2.handle_request(sotw_req(), 0)
    r = s2.responses(0)[0]
    s2.handle_request(sotw_req(names=("b",), version=r.version, nonce=r.nonce), 1)
    assert not s2.types[CDS].wildcard
    assert names(s2.responses(1)[0]) == ["b"]


def test_sotw_nack_keeps_acked_version_and_is_not_resent_until_a_change() -> None:
    s = SotwStream()
    s.set_snapshot(Snapshot.of([clusters(a=1)]))
    s.handle_request(sotw_req(), 0)
    good = s.responses(0)[0]
    s.handle_request(sotw_req(version=good.version, nonce=good.nonce), 1)
    s.set_snapshot(Snapshot.of([clusters(a=2)]))
    bad = s.responses(2)[0]
    out = s.handle_request(sotw_req(version=good.version, nonce=bad.nonce, error="bad cluster a"), 3)
    assert out.kind is Kind.NACK
    assert out.error == "bad cluster a"
    assert out.version == bad.version
    st = s.types[CDS]
    assert st.acked_version == good.version
    assert st.nacks == 1
    assert st.last_error == "bad cluster a"
    assert s.responses(4) == []  # the rejected version is not pushed again
    s.set_snapshot(Snapshot.of([clusters(a=3)]))
    fixed = s.responses(5)[0]
    s.handle_request(sotw_req(version=fixed.version, nonce=fixed.nonce), 6)
    assert st.acked_version == fixed.version


def test_sotw_reconnect_with_current_version_is_not_answered_again() -> None:
    snap = Snapshot.of([clusters(a=1)])
    s = SotwStream()
    s.set_snapshot(snap)
    s.handle_request(sotw_req(version=snap.version(CDS)), 0)
    assert s.responses(0) == []
    s.set_snapshot(Snapshot.of([clusters(a=9)]))
    assert len(s.responses(1)) == 1


def test_ads_order_and_missing_types() -> None:
    eds = TypedResources.build(EDS, [])
    lds = TypedResources.build(types.LISTENER, [])
    s = SotwStream()
    for t in (types.LISTENER, types.ADDRESS, EDS, CDS):
        s.handle_request(sotw_req(t), 0)
    assert s.missing_types() == [CDS, EDS, types.LISTENER, types.ADDRESS]
    s.set_snapshot(Snapshot.of([lds, eds, clusters(a=1)]))
    assert [r.type_url for r in s.responses(0)] == [CDS, EDS, types.LISTENER]
    assert s.missing_types() == [types.ADDRESS]


def test_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="type_url"):
        SotwStream().handle_request(discovery_pb2.DiscoveryRequest(), 0)
    with pytest.raises(ProtocolError, match="limit 10"):
        SotwStream(max_names=10).handle_request(sotw_req(names=tuple(str(i) for i in range(11))), 0)
    with pytest.raises(ProtocolError, match="limit 10"):
        DeltaStream(max_names=10).handle_request(delta_req(sub=tuple(str(i) for i in range(11))), 0)


# ----------------------------------------------------------------------------------------------- delta
def test_delta_wildcard_sends_changes_and_removals_only() -> None:
    s = DeltaStream()
    s.set_snapshot(Snapshot.of([clusters(a=1, b=1)]))
    s.handle_request(delta_req(), 0)
    r1 = s.responses(0)[0]
    assert isinstance(r1, DeltaResponse)
    assert names(r1) == ["a", "b"]
    assert r1.removed == ()
    proto = r1.to_proto()
    assert [r.name for r in proto.resources] == ["a", "b"]
    assert proto.resources[0].version == r1.resources[0].version
    s.handle_request(delta_req(nonce=r1.nonce), 1)
    s.set_snapshot(Snapshot.of([clusters(a=2, c=1)]))
    r2 = s.responses(2)[0]
    assert names(r2) == ["a", "c"]
    assert r2.removed == ("b",)
    s.set_snapshot(Snapshot.of([clusters(a=2, c=1)]))
    assert s.responses(3) == []


def test_delta_reconnect_with_initial_versions_resends_nothing_unchanged() -> None:
    snap = Snapshot.of([clusters(a=1, b=1)])
    versions = {n: r.version for n, r in snap.resources[CDS].items.items()}
    s = DeltaStream()
    s.set_snapshot(snap)
    s.handle_request(delta_req(initial={**versions, "gone": "v0", "b": "old"}), 0)
    [resp] = s.responses(0)
    assert names(resp) == ["b"]
    assert resp.removed == ("gone",)
    s2 = DeltaStream()
    s2.set_snapshot(snap)
    s2.handle_request(delta_req(initial=versions), 0)
    [empty] = s2.responses(0)  # the initial request is always answered, here with nothing
    assert empty.resources == ()
    assert empty.removed == ()


def test_delta_named_subscribe_unsubscribe_and_absent_told_once() -> None:
    s = DeltaStream()
    s.set_snapshot(Snapshot.of([clusters(a=1, b=1)]))
    s.handle_request(delta_req(sub=("a", "nope")), 0)
    r1 = s.responses(0)[0]
    assert names(r1) == ["a"]
    assert r1.removed == ("nope",)
    s.handle_request(delta_req(nonce=r1.nonce), 1)
    s.handle_request(delta_req(sub=("b",)), 2)
    r2 = s.responses(2)[0]
    assert names(r2) == ["b"]
    assert r2.removed == ()
    s.handle_request(delta_req(unsub=("a",), nonce=r2.nonce), 3)
    assert s.types[CDS].names == {"b", "nope"}
    s.set_snapshot(Snapshot.of([clusters(a=5, b=1)]))  # a changed but is no longer wanted
    assert s.responses(4) == []
    s.set_snapshot(Snapshot.of([clusters(a=5, b=1, nope=1)]))  # the absent one appears
    assert names(s.responses(5)[0]) == ["nope"]
    s.handle_request(delta_req(sub=("a",)), 6)  # resubscribing sends it again
    assert names(s.responses(6)[0]) == ["a"]


def test_delta_ondemand_subscribe_to_nothing() -> None:
    s = DeltaStream()
    s.set_snapshot(Snapshot.of([clusters(a=1)]))
    s.handle_request(delta_req(sub=("*",), unsub=("*",)), 0)
    [r] = s.responses(0)
    assert r.resources == ()
    assert not s.types[CDS].wildcard


def test_delta_nack_rolls_back_view_and_recovers() -> None:
    s = DeltaStream()
    s.set_snapshot(Snapshot.of([clusters(a=1, b=1)]))
    s.handle_request(delta_req(), 0)
    r1 = s.responses(0)[0]
    s.handle_request(delta_req(nonce=r1.nonce), 1)
    acked = s.types[CDS].acked_version
    s.set_snapshot(Snapshot.of([clusters(a=2, b=1)]))
    bad = s.responses(2)[0]
    out = s.handle_request(delta_req(nonce=bad.nonce, error="a is bad"), 3)
    assert out.kind is Kind.NACK
    assert out.error == "a is bad"
    st = s.types[CDS]
    assert st.acked_version == acked
    assert st.nacks == 1
    assert s.responses(4) == []  # not resent until the snapshot changes
    s.set_snapshot(Snapshot.of([clusters(a=3, b=1)]))
    fixed = s.responses(5)[0]
    assert names(fixed) == ["a"]
    s.handle_request(delta_req(nonce=fixed.nonce), 6)
    assert st.acked_version == fixed.system_version
    assert st.pending == []


def test_delta_stale_nonce_voids_ack_but_keeps_subscription() -> None:
    s = DeltaStream()
    s.set_snapshot(Snapshot.of([clusters(a=1, b=1)]))
    s.handle_request(delta_req(sub=("a",)), 0)
    r1 = s.responses(0)[0]
    s.handle_request(delta_req(nonce=r1.nonce), 1)
    out = s.handle_request(delta_req(sub=("b",), nonce=r1.nonce), 2)
    assert out.kind is Kind.STALE
    assert names(s.responses(3)[0]) == ["b"]


def test_delta_client_that_never_acks_is_refused_not_buffered() -> None:
    s = DeltaStream()
    s.max_pending = 3
    s.handle_request(delta_req(), 0)
    for i in range(3):
        s.set_snapshot(Snapshot.of([clusters(a=i)]))
        assert len(s.responses(i)) == 1
    s.set_snapshot(Snapshot.of([clusters(a=99)]))
    with pytest.raises(ProtocolError, match="not acknowledged 3 cds responses"):
        s.responses(9)


def test_sotw_named_reconnect_is_answered_even_at_the_current_version() -> None:
    eds = TypedResources.build(EDS, [(n, cluster_pb2.Cluster(name=n)) for n in ("x", "y")])
    s = SotwStream()
    s.set_snapshot(Snapshot.of([eds]))
    s.handle_request(sotw_req(EDS, names=("x", "y"), version=eds.version), 0)
    [resp] = s.responses(0)
    assert names(resp) == ["x", "y"]


# ------------------------------------------------------------------------------- EDS after a CDS update
def eds_clusters(static: int = 1, extra: tuple[Any, ...] = (), **timeouts: int) -> TypedResources:
    """EDS clusters (``b`` reads the assignment ``svc-b``, the others their own name), a STATIC cluster
    ``s`` with connect timeout ``static``, and ``extra`` clusters as given."""
    msgs = [
        cluster_pb2.Cluster(
            name=n,
            type=cluster_pb2.Cluster.EDS,
            eds_cluster_config={"service_name": "svc-b" if n == "b" else ""},
            connect_timeout={"seconds": t},
        )
        for n, t in timeouts.items()
    ]
    msgs.append(
        cluster_pb2.Cluster(name="s", type=cluster_pb2.Cluster.STATIC, connect_timeout={"seconds": static})
    )
    return TypedResources.build(CDS, [(m.name, m) for m in (*msgs, *extra)])


def assignments(*cla_names: str) -> TypedResources:
    return TypedResources.build(
        EDS, [(n, endpoint_pb2.ClusterLoadAssignment(cluster_name=n)) for n in cla_names]
    )


def _delta_synced(eds_names: tuple[str, ...]) -> DeltaStream:
    s = DeltaStream()
    s.set_snapshot(Snapshot.of([eds_clusters(a=1, b=1), assignments("a", "svc-b", "x")]))
    s.handle_request(delta_req(CDS), now=0.0)
    s.handle_request(delta_req(EDS, sub=eds_names), now=0.0)
    for resp in s.responses(now=1.0):
        s.handle_request(delta_req(resp.type_url, nonce=resp.nonce), now=2.0)
    return s


def test_delta_changed_eds_cluster_gets_its_unchanged_assignment_again() -> None:
    s = _delta_synced(("a", "svc-b"))
    # The traffic policy of ``a`` and ``b`` changes, endpoints do not: both assignments go out again.
    s.set_snapshot(s.snapshot.with_types([eds_clusters(a=2, b=2)]))
    cds, eds = s.responses(now=3.0)
    assert isinstance(eds, DeltaResponse)
    assert (cds.type_url, names(cds)) == (CDS, ["a", "b"])
    assert (eds.type_url, names(eds), eds.removed) == (EDS, ["a", "svc-b"], ())
    for resp in (cds, eds):
        s.handle_request(delta_req(resp.type_url, nonce=resp.nonce), now=4.0)
    # Only the changed cluster's assignment; a STATIC cluster's change owes nothing.
    s.set_snapshot(s.snapshot.with_types([eds_clusters(a=3, b=2)]))
    cds, eds = s.responses(now=5.0)
    assert (names(cds), names(eds)) == (["a"], ["a"])
    for resp in (cds, eds):
        s.handle_request(delta_req(resp.type_url, nonce=resp.nonce), now=6.0)
    s.set_snapshot(s.snapshot.with_types([eds_clusters(static=9, a=3, b=2)]))
    [cds] = s.responses(now=7.0)
    assert names(cds) == ["s"]
    # Nothing changed: nothing is sent.
    s.handle_request(delta_req(CDS, nonce=cds.nonce), now=8.0)
    assert s.responses(now=9.0) == []


def test_delta_resend_only_to_subscribed_names_and_for_a_new_cluster_sharing_one() -> None:
    s = _delta_synced(("a",))  # ``svc-b`` not subscribed: it is never pushed, even when ``b`` changes
    s.set_snapshot(s.snapshot.with_types([eds_clusters(a=1, b=2)]))
    [cds] = s.responses(now=3.0)
    assert names(cds) == ["b"]
    s.handle_request(delta_req(CDS, nonce=cds.nonce), now=4.0)
    # A new cluster reading an assignment the client already holds still needs it to warm.
    shared = cluster_pb2.Cluster(
        name="a2", type=cluster_pb2.Cluster.EDS, eds_cluster_config={"service_name": "a"}
    )
    grown = eds_clusters(extra=(shared,), a=1, b=2)
    s.set_snapshot(s.snapshot.with_types([grown]))
    cds, eds = s.responses(now=5.0)
    assert (names(cds), names(eds)) == (["a2"], ["a"])


def test_sotw_changed_eds_cluster_gets_the_eds_response_again() -> None:
    s = SotwStream()
    s.set_snapshot(Snapshot.of([eds_clusters(a=1, b=1), assignments("a", "svc-b")]))
    s.handle_request(sotw_req(CDS), now=0.0)
    s.handle_request(sotw_req(EDS, names=("a", "svc-b")), now=0.0)
    subscribed = {CDS: (), EDS: ("a", "svc-b")}  # a SotW request always names its whole subscription

    def ack(resp: SotwResponse | DeltaResponse, now: float) -> None:
        assert isinstance(resp, SotwResponse)
        s.handle_request(sotw_req(resp.type_url, subscribed[resp.type_url], resp.version, resp.nonce), now)

    for resp in s.responses(now=1.0):
        ack(resp, 2.0)
    eds_version = s.types[EDS].sent_version
    s.set_snapshot(s.snapshot.with_types([eds_clusters(a=2, b=1)]))
    cds, eds = s.responses(now=3.0)
    assert isinstance(eds, SotwResponse)
    assert (cds.type_url, eds.type_url, names(eds), eds.version) == (CDS, EDS, ["a", "svc-b"], eds_version)
    for resp in (cds, eds):
        ack(resp, 4.0)
    # CDS answered again with the same content (a changed subscription): no cluster changed, no EDS owed.
    s.handle_request(sotw_req(CDS, names=("a", "b", "s"), version=cds.version, nonce=cds.nonce), now=5.0)
    [cds2] = s.responses(now=6.0)
    assert cds2.type_url == CDS
