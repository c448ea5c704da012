"""Test helpers: a real xDS server (store + Envoy generators + pipeline + gRPC + debug HTTP) on free
loopback ports, and model objects to feed it."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from istiopy.mesh.kinds import parse
from istiopy.mesh.meta import Resource
from istiopy.mesh.store import ConfigStore
from istiopy.xds.debug import DebugServer
from istiopy.xds.envoygen import register_envoy_generators
from istiopy.xds.push import PushPipeline
from istiopy.xds.registry import GeneratorRegistry
from istiopy.xds.server import ServerOptions, XdsServer


def service(
    name: str,
    port: int = 80,
    target: int | str | None = None,
    ns: str = "default",
    vip: str = "10.96.0.10",
    selector: dict[str, str] | None = None,
    **annotations: str,
) -> Resource:
    return parse(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "annotations": annotations},
            "spec": {
                "clusterIP": vip,
                "selector": selector or {"app": name},
                "ports": [{"name": "http", "port": port, **({"targetPort": target} if target else {})}],
            },
        }
    )


def pod(name: str, ip: str, labels: dict[str, str], ns: str = "default") -> Resource:
    return parse(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip},
        }
    )


@dataclass
class Harness:
    store: ConfigStore
    registry: GeneratorRegistry
    pipeline: PushPipeline
    server: XdsServer
    debug: DebugServer
    port: int
    debug_port: int

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.debug_port}/metrics"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels or {})
        return float(value or 0.0)


async def start_harness(
    debounce: float = 0.05, resources: Iterable[Resource] = (), **options: Any
) -> Harness:
    """Everything on free ports; ``resources`` are in the store before the first client can connect."""
    store = ConfigStore()
    for res in resources:
        store.apply(res)
    registry = GeneratorRegistry()
    register_envoy_generators(registry)
    pipeline = PushPipeline(store, registry, debounce_after=debounce, debounce_max=2.0)
    opts = ServerOptions(**{"plaintext_address": "127.0.0.1:0", **options})
    server = XdsServer(pipeline, opts)
    await pipeline.start()
    ports = await server.start()
    debug = DebugServer(server, store, host="127.0.0.1", port=0)
    debug_port = await debug.start()
    return Harness(store, registry, pipeline, server, debug, ports["plaintext"], debug_port)


async def stop_harness(h: Harness) -> None:
    await h.debug.stop()
    await h.server.stop(0.1)
    await h.pipeline.stop()


@dataclass(frozen=True)
class Pki:
    """A throwaway CA with one server certificate (for 127.0.0.1 / istiod) and one SPIFFE client cert."""

    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_cert_pem: bytes
    client_key_pem: bytes
    client_id: str


def make_pki(client_id: str = "spiffe://cluster.local/ns/default/sa/client") -> Pki:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "istiopy-test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(k: ec.EllipticCurvePrivateKey, san: list[x509.GeneralName], usage: Any) -> bytes:
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(san), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    server_key, client_key = key(), key()
    server_cert = leaf(
        server_key,
        [
            x509.DNSName("istiod.istio-system.svc"),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ],
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    client_cert = leaf(
        client_key, [x509.UniformResourceIdentifier(client_id)], ExtendedKeyUsageOID.CLIENT_AUTH
    )
    return Pki(
        ca.public_bytes(serialization.Encoding.PEM),
        server_cert,
        pem_key(server_key),
        client_cert,
        pem_key(client_key),
        client_id,
    )
