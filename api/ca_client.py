"""Client side of the mesh CA: key + CSR generation, the ``CreateCertificate`` call and a rotating holder.

Used by ztunnel-py (which requests certificates for the pods on its node with ``ImpersonatedIdentity``)
and by the waypoint launcher. It lives in the wire layer because the data plane may import nothing else.

Behaviour follows ztunnel (ambient.md section 2): ECDSA P-256 keys, a CSR whose only content is one
critical URI SAN, ``validity_duration`` = the requested TTL, and the returned leaf must carry exactly the
identity we asked for. :class:`CertificateManager` refreshes at half of the lifetime, backs off 500 ms
doubling to 150 s on failure, and keeps serving the old certificate until it actually expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from istiopy.api.der import parse_pem_certificate
from istiopy.api.gen import ca_pb2
from istiopy.api.grpc_h2 import Channel, RpcError, StatusCode, client_ssl_context
from istiopy.api.identity import InvalidSpiffeId, SpiffeId, identity_from_uris
from istiopy.api.pki import CryptographyBackend, PkiBackend, verify_signatures
from istiopy.api.tls import CertBundle, private_key_pem, split_pem_chain
from istiopy.api.tls_stream import TlsFactory

if TYPE_CHECKING:  # the helpers below import cryptography when called; the node proxy never calls them
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 24 * 3600
DEFAULT_CA_SERVER_NAME = "istiod.istio-system.svc"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 150.0

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class CaClientError(Exception):
    """The CA refused the request or returned something we will not use (wrong identity, bad chain)."""


# ------------------------------------------------------------------------------------------------ keys/CSR
# CaClient goes through its ``pki`` backend (api.pki); these helpers serve callers holding cryptography
# objects (control-plane tests, tools) and import cryptography only when called.
def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key: what ztunnel uses, and cheap to generate on every rotation."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, identity: SpiffeId) -> str:
    """A PEM CSR with an empty subject and a single critical URI SAN naming ``identity``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]), critical=True
        )
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def verify_chain(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> None:
    """Each certificate is signed by the next and the last one is (or is signed by) a trusted root."""
    try:
        verify_signatures(chain, roots)
    except ValueError as e:
        raise CaClientError(str(e)) from e


# ------------------------------------------------------------------------------------------------- client
TokenSource = Callable[[], str | None]


def token_file_source(path: str | Path) -> TokenSource:
    """Re-read the token on every request: projected tokens are rotated in place by the kubelet."""
    p = Path(path)

    def read() -> str | None:
        try:
            return p.read_text().strip() or None
        except FileNotFoundError:
            return None

    return read


@dataclass
class CaClient:
    """Calls ``IstioCertificateService/CreateCertificate`` on an existing channel.

    The channel is :class:`istiopy.api.grpc_h2.Channel` (an h2-based gRPC client), not grpcio's: the node
    proxy is the main user and grpcio would cost it ~9 MB RSS. ``roots_pem`` are the anchors we expect the
    returned chain to end at (the mesh root); when empty, the last certificate the CA returns is taken as
    the root (trust on first use, only for tests).
    """

    channel: Channel
    roots_pem: str = ""
    token_source: TokenSource | None = None
    cluster_id: str = ""
    timeout: float = 10.0
    pki: PkiBackend = field(default_factory=CryptographyBackend)  # the node proxy plugs in OpenSSL's

    @classmethod
    def connect(
        cls,
        address: str,
        roots_pem: str,
        *,
        server_name: str = DEFAULT_CA_SERVER_NAME,
        client_cert: tuple[str, str] | None = None,
        token_source: TokenSource | None = None,
        cluster_id: str = "",
        tls: TlsFactory = client_ssl_context,
    ) -> CaClient:
        """A TLS channel to the CA at ``address`` verifying its serving cert for ``server_name``.

        ``client_cert`` is ``(chain_pem, key_pem)`` of a bootstrap credential (standalone mode);
        ``token_source`` yields a bearer token (Kubernetes projected token or an operator-issued one).
        """
        ctx = tls(roots_pem, client_cert=client_cert)
        channel = Channel(address, ssl_context=ctx, server_name=server_name)
        return cls(channel, roots_pem, token_source, cluster_id)

    async def close(self) -> None:
        await self.channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        md: list[tuple[str, str]] = []
        if self.token_source is not None and (tok := self.token_source()):
            md.append(("authorization", f"Bearer {tok}"))
        if self.cluster_id:
            md.append(("clusterid", self.cluster_id))
        return md

    async def create_certificate(
        self, request: ca_pb2.IstioCertificateRequest
    ) -> ca_pb2.IstioCertificateResponse:
        """The bare call with our metadata and deadline; raises :class:`~istiopy.api.grpc_h2.RpcError`."""
        reply = await self.channel.unary_unary(
            CREATE_CERTIFICATE, request.SerializeToString(), metadata=self._metadata(), timeout=self.timeout
        )
        try:
            return ca_pb2.IstioCertificateResponse.FromString(reply)
        except DecodeError as e:
            raise RpcError(StatusCode.INTERNAL, f"unparsable CreateCertificate response: {e}") from e

    async def fetch(
        self,
        identity: SpiffeId,
        *,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        impersonate: bool = False,
    ) -> CertBundle:
        """A new key and certificate for ``identity``; ``impersonate`` asks as a node proxy on its behalf."""
        key, csr = self.pki.new_key_csr(identity.uri)
        request = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl_seconds)
        if impersonate:
            meta = struct_pb2.Struct()
            meta.update({IMPERSONATED_IDENTITY: identity.uri})
            request.metadata.CopyFrom(meta)
        try:
            response = await self.create_certificate(request)
        except RpcError as e:
            raise CaClientError(f"CA refused {identity}: {e.code.name}: {e.details}") from e
        return self._bundle(key, identity, list(response.cert_chain))

    def _bundle(self, key: str | object, identity: SpiffeId, chain_pem: list[str]) -> CertBundle:
        """Check the CA's answer (parsable, our identity, our key, chained to the roots) and bundle it.

        ``key`` is the PKCS#8 PEM the backend made (or a ``cryptography`` key, for control-plane callers).
        """
        key_pem = key if isinstance(key, str) else private_key_pem(key)
        pems = [p for item in chain_pem for p in split_pem_chain(item)]
        if not pems:
            raise CaClientError("CA returned an empty certificate chain")
        try:
            leaf = parse_pem_certificate(pems[0])
        except ValueError as e:
            raise CaClientError(f"CA returned an unparsable certificate: {e}") from e
        try:
            got = identity_from_uris(leaf.uri_sans)
        except InvalidSpiffeId as e:
            raise CaClientError(f"CA returned a certificate without a usable identity: {e}") from e
        if got != identity:
            raise CaClientError(f"CA returned a certificate for {got}, requested {identity}")
        roots_pem = self.roots_pem or pems[-1]
        try:
            self.pki.verify_chain(pems, split_pem_chain(roots_pem), key_pem)
        except ValueError as e:
            raise CaClientError(f"CA returned a certificate we cannot use: {e}") from e
        return CertBundle(key_pem, tuple(pems), roots_pem)


# -------------------------------------------------------------------------------------------- rotation
Fetcher = Callable[[SpiffeId], Awaitable[CertBundle]]
Listener = Callable[[SpiffeId, CertBundle | None], None]


@dataclass
class _Slot:
    bundle: CertBundle | None = None
    task: asyncio.Task[None] | None = None
    attempted: asyncio.Event = field(default_factory=asyncio.Event)
    last_error: BaseException | None = None
    failures: int = 0


class CertificateManager:
    """Holds one rotating certificate per identity.

    Each tracked identity has a task that fetches, sleeps until :attr:`CertBundle.refresh_at`, and
    fetches again. A failed fetch is retried after ``initial_backoff`` seconds, doubling up to
    ``max_backoff``; meanwhile the previous certificate is still handed out until it expires, because a
    CA outage must not break traffic that an unexpired certificate can still carry.

    ``clock`` (wall seconds, since certificate validity is wall time) and ``sleep`` are injectable so tests
    can drive hours of rotation in milliseconds. ``listeners`` hear every new certificate and every
    expiry (``None``), e.g. to reload an ``SSLContext`` or push SDS.
    """

    def __init__(
        self,
        fetcher: Fetcher,
        *,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        initial_backoff: float = INITIAL_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self._fetch = fetcher
        self._clock = clock
        self._sleep = sleep
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self._slots: dict[SpiffeId, _Slot] = {}
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def current(self, identity: SpiffeId) -> CertBundle | None:
        """The certificate to use now, or None when there is none or it has expired."""
        slot = self._slots.get(identity)
        if slot is None or slot.bundle is None:
            return None
        if slot.bundle.expired(self._clock()):
            return None
        return slot.bundle

    def track(self, identity: SpiffeId) -> None:
        """Start fetching and rotating ``identity`` in the background (ztunnel's low-priority prefetch)."""
        slot = self._slots.setdefault(identity, _Slot())
        if slot.task is None or slot.task.done():
            slot.task = asyncio.get_running_loop().create_task(
                self._run(identity, slot), name=f"cert-rotation {identity}"
            )

    async def get(self, identity: SpiffeId) -> CertBundle:
        """A valid certificate for ``identity``, fetching now if there is none (raises if that fails)."""
        if (b := self.current(identity)) is not None:
            return b
        self.track(identity)
        slot = self._slots[identity]
        slot.attempted.clear()
        while True:
            if (b := self.current(identity)) is not None:
                return b
            await slot.attempted.wait()
            slot.attempted.clear()
            if (b := self.current(identity)) is not None:
                return b
            if slot.last_error is not None:
                raise CaClientError(f"no certificate for {identity}: {slot.last_error}") from slot.last_error

    async def forget(self, identity: SpiffeId) -> None:
        """Stop rotating ``identity`` and drop its certificate (the workload left the node)."""
        slot = self._slots.pop(identity, None)
        if slot is not None and slot.task is not None:
            slot.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await slot.task

    async def close(self) -> None:
        for ident in list(self._slots):
            await self.forget(ident)

    def identities(self) -> list[SpiffeId]:
        return sorted(self._slots)

    def _notify(self, identity: SpiffeId, bundle: CertBundle | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(identity, bundle)
            except Exception:
                log.exception("certificate listener failed for %s", identity)

    async def _run(self, identity: SpiffeId, slot: _Slot) -> None:
        backoff = self.initial_backoff
        while True:
            now = self._clock()
            if slot.bundle is not None and slot.bundle.expired(now):
                log.warning("certificate for %s expired at %s", identity, slot.bundle.not_after)
                slot.bundle = None
                self._notify(identity, None)
            if slot.bundle is not None and now < slot.bundle.refresh_at:
                await self._sleep(slot.bundle.refresh_at - now)
                continue
            try:
                bundle = await self._fetch(identity)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                slot.failures += 1
                slot.last_error = e
                slot.attempted.set()
                delay = backoff
                if slot.bundle is not None:  # wake up in time to drop it when it expires
                    delay = min(delay, max(0.0, slot.bundle.not_after - self._clock()))
                cut_short = delay < backoff
                log.warning(
                    "certificate fetch for %s failed (attempt %d), retry in %.1fs: %s",
                    identity,
                    slot.failures,
                    delay,
                    e,
                )
                await self._sleep(delay)
                if not cut_short:  # a wait shortened to drop an expiring cert is not a backoff step
                    backoff = min(backoff * 2, self.max_backoff)
                continue
            slot.bundle = bundle
            slot.last_error = None
            slot.failures = 0
            backoff = self.initial_backoff
            slot.attempted.set()
            log.info(
                "certificate for %s issued, valid until %s, refresh at %s",
                identity,
                bundle.not_after,
                bundle.refresh_at,
            )
            self._notify(identity, bundle)
