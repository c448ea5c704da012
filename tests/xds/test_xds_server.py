"""The gRPC server on its own: TLS and authentication, and what malformed or hostile clients get."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import grpc
import h2.config
import h2.connection
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from grpc import aio
from xds_harness import Harness, make_pki, pod, service, start_harness, stop_harness

from istiopy.api.grpc_h2 import client_ssl_context
from istiopy.api.xds_client import DeltaXdsClient
from istiopy.testing.envoy import EnvoyProcess, HttpBackend, ads_bootstrap, free_port, http_get, wait_until
from istiopy.xds import types
from istiopy.xds.server import AuthenticationError, AuthRequest, ServerOptions, TlsConfig, XdsServer

DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
NODE = base_pb2.Node(id="sidecar~127.0.0.1~x.default~default.svc.cluster.local")


def raw_call(channel: aio.Channel, method: str = DELTA, response: Any = None) -> Any:
    return channel.stream_stream(
        method,
        request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
        response_deserializer=response or discovery_pb2.DeltaDiscoveryResponse.FromString,
    )()


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    """Read until the server ends the call; its status code and details."""
    try:
        while True:
            resp = await call.read()
            if resp is aio.EOF:
                break
    except grpc.RpcError:
        pass
    return await call.code(), await call.details()


async def healthy_client(h: Harness) -> DeltaXdsClient:
    client = DeltaXdsClient(f"127.0.0.1:{h.port}", NODE)
    client.subscribe(types.CLUSTER)
    await client.start()
    async with asyncio.timeout(10):
        await client.wait_for(lambda c: bool(c.resources(types.CLUSTER)))
    return client


# ------------------------------------------------------------------------------------------- malformed
async def test_malformed_requests_get_clear_errors_and_other_streams_continue(harness: Harness) -> None:
    harness.store.apply(service("a", 80, 8080))
    good = await healthy_client(harness)
    try:
        async with aio.insecure_channel(f"127.0.0.1:{harness.port}") as ch, asyncio.timeout(20):
            # Unknown type URL.
            call = raw_call(ch)
            await call.write(
                discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url="type.googleapis.com/no.Such")
            )
            code, details = await status_of(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "no generator for type URL 'type.googleapis.com/no.Such'" in details

            # No node at all, then a node with no id.
            for req in (
                discovery_pb2.DeltaDiscoveryRequest(type_url=types.CLUSTER),
                discovery_pb2.DeltaDiscoveryRequest(node=base_pb2.Node(cluster="x"), type_url=types.CLUSTER),
            ):
                call = raw_call(ch)
                await call.write(req)
                code, details = await status_of(call)
                assert code == grpc.StatusCode.INVALID_ARGUMENT
                assert "node.id" in details

            # Missing type URL on SotW.
            call = raw_call(ch, SOTW, discovery_pb2.DiscoveryResponse.FromString)
            await call.write(discovery_pb2.DiscoveryRequest(node=NODE))
            code, details = await status_of(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "type_url" in details

            # Bytes that are not a protobuf message.
            call = raw_call(ch)
            await call.write(b"\xff\xff\xff\xff garbage")
            code, _ = await status_of(call)
            assert code != grpc.StatusCode.OK

            # A garbage node (odd id, deep odd metadata) is just a proxy of unknown kind: it is served.
            weird = base_pb2.Node(id="~~~\x00~" + "x" * 10_000, cluster="\u2603")
            weird.metadata.update(
                {"NAMESPACE": 7, "deep": {"a": [1, {"b": None}]}, "ISTIOPY_LISTENER_PORT": "x"}
            )
            call = raw_call(ch)
            await call.write(discovery_pb2.DeltaDiscoveryRequest(node=weird, type_url=types.LISTENER))
            resp = await call.read()
            assert [r.name for r in resp.resources] == ["http"]
            call.cancel()

            # A huge resource name list is refused with the limit named, not buffered.
            call = raw_call(ch)
            names = [f"name-{i}" for i in range(200_000)]
            await call.write(
                discovery_pb2.DeltaDiscoveryRequest(
                    node=NODE, type_url=types.ENDPOINT, resource_names_subscribe=names
                )
            )
            code, details = await status_of(call)
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "200000 resource names" in details
            assert "limit 100000" in details

        # The well-behaved stream saw none of it and still follows changes.
        harness.store.apply(service("b", 80, 8080, vip="10.96.0.20"))
        async with asyncio.timeout(10):
            await good.wait_for(lambda c: len(c.resources(types.CLUSTER)) == 2)
        assert harness.metric("istiopy_xds_stream_errors_total", {"reason": "invalid_argument"}) >= 5
    finally:
        await good.stop()


def _grpc_frame(msg: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(msg)) + msg


async def test_client_that_never_reads_is_cut_off_and_others_are_fine() -> None:
    """A raw HTTP/2 client that opens a stream, subscribes to everything and never reads (nor grants flow
    control window): the server's write blocks, times out, and the stream is closed; memory stays bounded
    because at most one response per connection is ever in flight."""
    h = await start_harness(send_timeout=1.0)
    try:
        for i in range(300):  # a response well over the 64 KiB initial HTTP/2 window
            h.store.apply(service(f"svc-{i}", 80, 8080, vip=f"10.97.{i // 250}.{i % 250 + 1}"))
        good = await healthy_client(h)
        _reader, writer = await asyncio.open_connection("127.0.0.1", h.port)
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", DELTA),
                (":authority", f"127.0.0.1:{h.port}"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ],
        )
        req = discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=types.CLUSTER)
        conn.send_data(sid, _grpc_frame(req.SerializeToString()))
        writer.write(conn.data_to_send())
        await writer.drain()
        try:
            async with asyncio.timeout(20):
                await wait_until(
                    lambda: h.metric("pilot_xds_write_timeout_total") >= 1,
                    timeout=15,
                    what="write timeout of the stalled stream",
                )
                await wait_until(lambda: h.metric("pilot_xds") == 1, what="stalled stream closed")
                h.store.apply(service("late", 80, 8080, vip="10.98.0.1"))
                await good.wait_for(
                    lambda c: "outbound|80||late.default.svc.cluster.local" in c.resources(types.CLUSTER)
                )
        finally:
            writer.close()
            await good.stop()
    finally:
        await stop_harness(h)


# ------------------------------------------------------------------------------------------ TLS + auth
async def spiffe_from_cert(request: AuthRequest) -> str | None:
    """Test authenticator: the identity is the client certificate's URI SAN; no certificate, no entry."""
    from cryptography import x509

    if request.peer_cert_pem is None:
        raise AuthenticationError("no client certificate")
    cert = x509.load_pem_x509_certificate(request.peer_cert_pem)
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    if request.metadata.get("x-deny") == "yes":
        raise AuthenticationError(f"{uris[0]} is denied by policy")
    return str(uris[0])


async def test_tls_with_client_cert_identity_and_rejection() -> None:
    pki = make_pki()
    tls = TlsConfig(pki.server_cert_pem, pki.server_key_pem, pki.ca_pem, require_client_cert=True)
    h = await start_harness(tls=tls, tls_address="127.0.0.1:0")
    h.server.authenticate = spiffe_from_cert
    h.store.apply(service("a", 80, 8080))
    port = h.server.ports["tls"]
    ctx = client_ssl_context(
        pki.ca_pem, client_cert=(pki.client_cert_pem.decode(), pki.client_key_pem.decode())
    )
    opts: dict[str, Any] = {"ssl_context": ctx, "server_name": "istiod.istio-system.svc"}
    client = DeltaXdsClient(f"127.0.0.1:{port}", NODE, **opts)
    client.subscribe(types.CLUSTER)
    denied = DeltaXdsClient(
        f"127.0.0.1:{port}",
        NODE,
        **opts,
        metadata=[("x-deny", "yes")],
        backoff_initial=5,
    )
    denied.subscribe(types.CLUSTER)
    try:
        async with asyncio.timeout(15):
            await client.start()
            await client.wait_for(lambda c: bool(c.resources(types.CLUSTER)))
            [conn] = h.server.syncz()
            assert conn["identity"] == pki.client_id
            await denied.start()
            await wait_until(lambda: "UNAUTHENTICATED" in denied.last_stream_error, what="denied stream")
            assert "is denied by policy" in denied.last_stream_error
            assert not denied.resources(types.CLUSTER)
            # The node may not claim a namespace its certificate does not back.
            other = base_pb2.Node(id="sidecar~127.0.0.1~x.other~other.svc.cluster.local")
            impostor = DeltaXdsClient(f"127.0.0.1:{port}", other, **opts, backoff_initial=5)
            impostor.subscribe(types.CLUSTER)
            await impostor.start()
            try:
                await wait_until(
                    lambda: "UNAUTHENTICATED" in impostor.last_stream_error, what="impostor refused"
                )
                assert "may not claim namespace 'other'" in impostor.last_stream_error
            finally:
                await impostor.stop()
        # Plaintext is not served unless enabled.
        assert "plaintext" in h.server.ports  # the harness enables it explicitly ...
        bare = XdsServer(h.pipeline, ServerOptions())
        with pytest.raises(ValueError, match="explicitly enabled plaintext"):
            await bare.start()  # ... a bare server refuses to start
    finally:
        await client.stop()
        await denied.stop()
        await stop_harness(h)


@pytest.mark.envoy
async def test_envoy_over_mutual_tls() -> None:
    pki = make_pki()
    tls = TlsConfig(pki.server_cert_pem, pki.server_key_pem, pki.ca_pem, require_client_cert=True)
    h = await start_harness(tls=tls, tls_address="127.0.0.1:0")
    h.server.authenticate = spiffe_from_cert
    listener = free_port()
    with HttpBackend("tls-backend") as backend:
        h.store.apply(service("web", 80, backend.port))
        h.store.apply(pod("web-1", "127.0.0.1", {"app": "web"}))
        envoy = EnvoyProcess(
            ads_bootstrap(
                NODE.id,
                h.server.ports["tls"],
                delta=True,
                tls_ca_pem=pki.ca_pem,
                tls_cert_pem=pki.client_cert_pem,
                tls_key_pem=pki.client_key_pem,
                metadata={"ISTIOPY_LISTENER_PORT": str(listener), "ISTIOPY_LISTENER_ADDRESS": "127.0.0.1"},
            )
        )
        try:
            await asyncio.to_thread(envoy.start)
            await wait_until(
                lambda: (
                    http_get(f"http://127.0.0.1:{listener}/t", "web.default.svc.cluster.local")
                    == (200, "tls-backend /t")
                ),
                timeout=15,
                what="traffic through an Envoy configured over mTLS",
            )
            assert h.server.syncz()[0]["identity"] == pki.client_id
        finally:
            await asyncio.to_thread(envoy.stop)
            await stop_harness(h)


async def test_xds_service_component_runs_until_cancelled() -> None:
    """The shape istiod uses: ``XdsService.run`` as a control-plane component."""
    import urllib.request

    from istiopy.mesh.store import ConfigStore
    from istiopy.xds.service import XdsService

    store = ConfigStore()
    store.apply(service("a", 80, 8080))
    xds = XdsService(
        store,
        options=ServerOptions(plaintext_address="127.0.0.1:0"),
        monitoring_host="127.0.0.1",
        monitoring_port=0,
    )
    task = asyncio.create_task(xds.run())
    client: DeltaXdsClient | None = None
    try:
        await wait_until(lambda: "monitoring" in xds.ports, what="service started")
        client = DeltaXdsClient(f"127.0.0.1:{xds.ports['plaintext']}", NODE)
        client.subscribe(types.CLUSTER)
        await client.start()
        async with asyncio.timeout(10):
            await client.wait_for(lambda c: bool(c.resources(types.CLUSTER)))
        url = f"http://127.0.0.1:{xds.ports['monitoring']}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert "pilot_xds 1.0" in text
        assert 'pilot_xds_pushes{type="cds"} 1.0' in text
        assert "# TYPE pilot_xds_pushes counter" in text
        assert "pilot_proxy_convergence_time_bucket{le=" in text
        assert "_created" not in text
    finally:
        if client is not None:
            await client.stop()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert xds.server.connections == {}


async def test_snapshot_set_in_cache_reaches_the_proxy_and_is_dropped_on_disconnect(harness: Harness) -> None:
    """The go-control-plane usage: ``cache.set_snapshot(node_id, snapshot)`` without any store change."""
    from envoy.config.cluster.v3 import cluster_pb2

    from istiopy.xds.cache import Snapshot, TypedResources

    harness.store.apply(service("a", 80, 8080))
    client = await healthy_client(harness)
    try:
        cache = harness.pipeline.cache
        assert cache.keys() == [NODE.id]
        manual = TypedResources.build(types.CLUSTER, [("manual", cluster_pb2.Cluster(name="manual"))])
        current = cache.get_snapshot(NODE.id)
        assert current is not None
        cache.set_snapshot(NODE.id, current.with_types([manual]))
        async with asyncio.timeout(10):
            await client.wait_for(lambda c: sorted(c.resources(types.CLUSTER)) == ["manual"])
        with pytest.raises(Exception, match="missing"):
            cache.set_snapshot(
                NODE.id,
                Snapshot.of(
                    [
                        TypedResources.build(
                            types.CLUSTER,
                            [("x", cluster_pb2.Cluster(name="x", type=cluster_pb2.Cluster.EDS))],
                        )
                    ]
                ),
                check=True,
            )
    finally:
        await client.stop()
    await wait_until(
        lambda: harness.pipeline.cache.keys() == [], what="snapshot dropped with the last stream"
    )


async def test_snapshot_set_from_another_thread_is_delivered(harness: Harness) -> None:
    from envoy.config.cluster.v3 import cluster_pb2

    from istiopy.xds.cache import TypedResources

    client = await healthy_client_with(harness, "a")
    try:
        cache = harness.pipeline.cache
        current = cache.get_snapshot(NODE.id)
        assert current is not None
        manual = TypedResources.build(types.CLUSTER, [("threaded", cluster_pb2.Cluster(name="threaded"))])
        await asyncio.to_thread(cache.set_snapshot, NODE.id, current.with_types([manual]))
        async with asyncio.timeout(10):
            await client.wait_for(lambda c: sorted(c.resources(types.CLUSTER)) == ["threaded"])
    finally:
        await client.stop()


async def healthy_client_with(h: Harness, *services: str) -> DeltaXdsClient:
    for i, name in enumerate(services):
        h.store.apply(service(name, 80, 8080, vip=f"10.96.3.{i + 1}"))
    return await healthy_client(h)
