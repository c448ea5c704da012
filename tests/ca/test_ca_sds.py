"""SDS: Secret protos for waypoints, and real Envoy taking its certificate over ADS, serving mTLS with it and
switching to a rotated certificate without a restart."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import time
from collections.abc import Iterable
from typing import Any

import pytest
from ca_helpers import APP, TD
from cryptography import x509
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from istiopy.api.identity import SpiffeId
from istiopy.api.tls import CertBundle, client_context, peer_identity, split_pem_chain
from istiopy.ca.auth import StaticTokenAuthenticator, TokenEntry, stream_authenticator
from istiopy.ca.authority import generate_root
from istiopy.ca.sds import (
    ROOT_SECRET,
    SECRET_TYPE_URL,
    WORKLOAD_SECRET,
    WaypointSecrets,
    generator_fields,
    rotation_change,
    secret_resources,
)
from istiopy.ca.service import CaConfig, CertificateAuthority
from istiopy.mesh.store import ConfigStore
from istiopy.testing.envoy import EnvoyProcess, HttpBackend, ads_bootstrap, free_port, wait_until
from istiopy.xds import types
from istiopy.xds.proxy import Proxy
from istiopy.xds.push import PushPipeline
from istiopy.xds.registry import Generator, GeneratorRegistry
from istiopy.xds.server import AuthenticationError, ServerOptions, TlsConfig, XdsServer

WAYPOINT = SpiffeId(TD, "default", "waypoint")
WAYPOINT_NODE = "waypoint~127.0.0.1~waypoint-7f9.default~default.svc.cluster.local"


def test_secret_protos_carry_chain_key_and_roots(ca: CertificateAuthority) -> None:
    bundle = ca.issue_workload(WAYPOINT)
    (n1, default), (n2, rootca) = secret_resources(bundle)
    assert (n1, n2) == (WORKLOAD_SECRET, ROOT_SECRET)
    assert isinstance(default, secret_pb2.Secret)
    chain = default.tls_certificate.certificate_chain.inline_bytes.decode()
    assert [x509.load_pem_x509_certificate(p.encode()) for p in split_pem_chain(chain)] == [bundle.leaf]
    assert default.tls_certificate.private_key.inline_bytes.decode() == bundle.key_pem
    assert rootca.validation_context.trusted_ca.inline_bytes.decode() == ca.roots_pem
    # Round trip through the wire format, as the xDS server sends it.
    again = secret_pb2.Secret.FromString(default.SerializeToString())
    assert again.name == "default"


def test_waypoint_secrets_identity_cache_and_rotation(ca: CertificateAuthority) -> None:
    now = [time.time()]
    secrets = WaypointSecrets(ca, ttl=dt.timedelta(seconds=100), clock=lambda: now[0])
    rotated: list[SpiffeId] = []
    secrets.subscribe(rotated.append)
    proxy = Proxy(WAYPOINT_NODE, "waypoint", namespace="default", identity=WAYPOINT.uri)
    first = secrets.generate(ConfigStore(), proxy)
    scope1 = secrets.scope(proxy)
    assert secrets.generate(ConfigStore(), proxy)[0][1] == first[0][1]  # stable between rotations
    assert secrets.affects(rotation_change(WAYPOINT), proxy)
    assert not secrets.affects(rotation_change(APP), proxy)
    now[0] += 51  # past half of the 100 s lifetime
    assert secrets.rotate_due() == [WAYPOINT]
    assert rotated == [WAYPOINT]
    assert secrets.scope(proxy) != scope1  # a new cache key for the push pipeline
    assert secrets.generate(ConfigStore(), proxy)[0][1] != first[0][1]
    # Unauthenticated proxies get nothing unless metadata is explicitly trusted.
    anon = Proxy(WAYPOINT_NODE, "waypoint", namespace="default", metadata={"SERVICE_ACCOUNT": "waypoint"})
    assert secrets.generate(ConfigStore(), anon) == []
    trusting = WaypointSecrets(ca, trust_node_metadata=True)
    assert trusting.identity_of(anon) == WAYPOINT


# ------------------------------------------------------------------------------------------ real Envoy
def _pack(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(ads={}, resource_api_version=config_source_pb2.V3)


def mtls_listener(port: int) -> listener_pb2.Listener:
    """A TLS 1.3 listener requiring client certs, with its certificate and roots from SDS over ADS."""
    tls13 = common_pb2.TlsParameters.TLSv1_3
    ctx = tls_pb2.DownstreamTlsContext(
        require_client_certificate=wrappers_pb2.BoolValue(value=True),
        common_tls_context=tls_pb2.CommonTlsContext(
            tls_params=common_pb2.TlsParameters(
                tls_minimum_protocol_version=tls13, tls_maximum_protocol_version=tls13
            ),
            tls_certificate_sds_secret_configs=[
                secret_pb2.SdsSecretConfig(name=WORKLOAD_SECRET, sds_config=_ads())
            ],
            validation_context_sds_secret_config=secret_pb2.SdsSecretConfig(
                name=ROOT_SECRET, sds_config=_ads()
            ),
        ),
    )
    return listener_pb2.Listener(
        name="mtls",
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.tcp_proxy",
                        typed_config=_pack(tcp_proxy_pb2.TcpProxy(stat_prefix="mtls", cluster="backend")),
                    )
                ],
                transport_socket=base_pb2.TransportSocket(
                    name="envoy.transport_sockets.tls", typed_config=_pack(ctx)
                ),
            )
        ],
    )


def backend_cluster(port: int) -> cluster_pb2.Cluster:
    addr = address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port))
    return cluster_pb2.Cluster(
        name="backend",
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=1),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name="backend",
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(address=addr)
                        )
                    ]
                )
            ],
        ),
    )


async def fetch_through(port: int, bundle: CertBundle) -> tuple[SpiffeId, int, bytes]:
    """mTLS to Envoy, then HTTP/1.1 through its TCP proxy: (Envoy's identity, its cert serial, response)."""
    ctx = client_context(bundle, alpn=())
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="")
    try:
        tls: ssl.SSLObject = writer.get_extra_info("ssl_object")
        ident = peer_identity(tls)
        serial = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
        writer.write(b"GET /sds HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        await writer.drain()
        body = await asyncio.wait_for(reader.read(), 5)
        return ident, serial, body
    finally:
        writer.close()


async def refused(port: int, bundle: CertBundle) -> bool:
    """Envoy refuses the client certificate: under TLS 1.3 that shows as an error or an empty read."""
    try:
        _, _, body = await fetch_through(port, bundle)
    except (ssl.SSLError, ConnectionError):
        return True
    return body == b""


@pytest.mark.envoy
async def test_envoy_gets_cert_over_sds_serves_mtls_and_rotates_without_restart(
    ca: CertificateAuthority,
) -> None:
    secrets = WaypointSecrets(ca, ttl=dt.timedelta(hours=1))
    listener_port = free_port()
    token = "waypoint-token-0123456789abcdef"

    with HttpBackend("backend") as backend:
        store = ConfigStore()
        registry = GeneratorRegistry()
        registry.register(Generator(**generator_fields(secrets)))

        def listeners(store: ConfigStore, proxy: Proxy) -> Iterable[tuple[str, Any]]:
            return [("mtls", mtls_listener(listener_port))]

        def clusters(store: ConfigStore, proxy: Proxy) -> Iterable[tuple[str, Any]]:
            return [("backend", backend_cluster(backend.port))]

        registry.register(Generator(types.LISTENER, listeners, proxy_kinds=frozenset({"waypoint"})))
        registry.register(Generator(types.CLUSTER, clusters, proxy_kinds=frozenset({"waypoint"})))
        pipeline = PushPipeline(store, registry, debounce_after=0.02, debounce_max=1.0)
        serving = ca.issue_serving()
        server = XdsServer(
            pipeline,
            ServerOptions(
                tls=TlsConfig(serving.served_chain_pem.encode(), serving.key_pem.encode()),
                tls_address="127.0.0.1:0",
            ),
            authenticate=stream_authenticator(
                [StaticTokenAuthenticator({token: TokenEntry(WAYPOINT)})], AuthenticationError
            ),
        )
        await pipeline.start()
        ports = await server.start()
        bootstrap = ads_bootstrap(WAYPOINT_NODE, ports["tls"], tls_ca_pem=ca.roots_pem.encode())
        bootstrap["dynamic_resources"]["ads_config"]["grpc_services"][0]["initial_metadata"] = [
            {"key": "authorization", "value": f"Bearer {token}"}
        ]
        envoy = EnvoyProcess(bootstrap)
        try:
            await asyncio.to_thread(envoy.start)
            client = ca.issue_workload(APP)

            async def serving_mtls() -> bool:
                try:
                    await fetch_through(listener_port, client)
                    return True
                except (TimeoutError, OSError, ssl.SSLError):
                    return False

            await wait_until(serving_mtls, timeout=30, what="Envoy serving mTLS with its SDS certificate")
            ident, serial1, body = await fetch_through(listener_port, client)
            assert ident == WAYPOINT
            assert body.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200"))
            assert body.endswith(b"backend /sds")
            assert serial1 == secrets.bundle_for(WAYPOINT).leaf.serial_number

            # A client whose certificate is not from the mesh root is refused by Envoy.
            stranger = CertificateAuthority(CaConfig(), generate_root("evil")).issue_workload(APP)
            stranger = CertBundle(stranger.key_pem, stranger.chain_pem, ca.roots_pem)
            assert await refused(listener_port, stranger)

            # Rotation (forced here; rotate_due does the same at half lifetime): the CA re-issues, istiod's
            # listener pushes, and Envoy switches certificates without a restart.
            pid = envoy.proc.pid if envoy.proc else None
            pushes: list[asyncio.Future[Any]] = []
            secrets.subscribe(
                lambda ident: pushes.append(asyncio.ensure_future(pipeline.push([rotation_change(ident)])))
            )
            serial2 = secrets.rotate(WAYPOINT).leaf.serial_number
            assert serial2 != serial1

            async def rotated() -> bool:
                try:
                    return (await fetch_through(listener_port, client))[1] == serial2
                except (TimeoutError, OSError, ssl.SSLError):
                    return False

            await wait_until(rotated, timeout=30, what="Envoy serving the rotated certificate")
            assert envoy.proc is not None
            assert envoy.proc.pid == pid
            assert envoy.proc.poll() is None

            def sds_acked() -> bool:
                sds = [t for c in server.syncz() for t in c["types"] if t["type"] == SECRET_TYPE_URL]
                return (
                    bool(sds) and sds[0]["nacks"] == 0 and sds[0]["sent_version"] == sds[0]["acked_version"]
                )

            await wait_until(sds_acked, timeout=30, what="Envoy ACKed the rotated secrets without NACKs")
        finally:
            await asyncio.to_thread(envoy.stop)
            await server.stop(0.1)
            await pipeline.stop()


async def test_rotation_task_reissues_at_half_lifetime(ca: CertificateAuthority) -> None:
    secrets = WaypointSecrets(ca, ttl=dt.timedelta(seconds=2))
    rotated: asyncio.Queue[SpiffeId] = asyncio.Queue()
    secrets.subscribe(rotated.put_nowait)
    task = asyncio.create_task(secrets.run())
    try:
        first = secrets.bundle_for(WAYPOINT)  # wakes the task, which sleeps until first.refresh_at
        # Due within a second; the deadline only bounds a hang (a starved 2-core CI box can stall the loop
        # for seconds), the timing itself is asserted below against the certificate.
        assert await asyncio.wait_for(rotated.get(), 30) == WAYPOINT
        second = secrets.bundle_for(WAYPOINT)
        assert second.leaf.serial_number != first.leaf.serial_number
        assert time.time() >= first.refresh_at
    finally:
        task.cancel()
        # Bounded: a task that swallowed the cancellation (3.11's wait_for could) fails here, not at the
        # suite-wide 300 s timeout.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
