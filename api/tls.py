"""Mesh mTLS for Python peers: certificate bundles and ``ssl.SSLContext`` factories.

The rules follow HBONE (ambient.md 3.1): TLS 1.3 only, ALPN ``h2``, the client sends no SNI and does not
resume sessions, both sides present a certificate chained to the mesh root, and the peer is identified by
the SPIFFE URI SAN of its certificate, not by a host name. Hostname checking is therefore off and the
caller checks the peer's identity after the handshake with :func:`peer_identity` /
:func:`verify_peer_identity`.

Python's ``ssl`` only loads keys from files; :func:`load_bundle` feeds it through anonymous in-memory files
(``memfd``) so private keys never touch a disk, and can be called again on a live context to rotate the
certificate for every later handshake without rebuilding listeners.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING

from istiopy.api.der import CertInfo, parse_certificate, pem_to_der
from istiopy.api.identity import InvalidSpiffeId, SpiffeId, identity_from_uris, identity_of_der

if TYPE_CHECKING:  # only the control plane's accessors need it, and they import it when called
    import ssl
    import tempfile

    from cryptography import x509

ALPN_H2 = "h2"


class PeerIdentityError(ConnectionError):
    """The handshake succeeded but the peer is not who we accept (no SPIFFE id, wrong id or trust domain).

    A ``ConnectionError`` rather than an ``ssl.SSLError``: the C byte path raises it too, in a process that
    never imports ``ssl`` (``ssl`` is imported by the context factories below, when they are called)."""


def split_pem_chain(pem: str | bytes) -> list[str]:
    """Split concatenated PEM certificates into one PEM string each (with trailing newline)."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    out: list[str] = []
    marker = "-----END CERTIFICATE-----"
    for part in text.split(marker):
        begin = part.find("-----BEGIN CERTIFICATE-----")
        if begin >= 0:
            out.append(part[begin:] + marker + "\n")
    return out


@dataclass(frozen=True)
class CertBundle:
    """A workload's credentials: private key, certificate chain (leaf first, root last) and trust roots.

    ``chain_pem`` is exactly what the CA returned, so it ends with the root; ``roots_pem`` holds the
    anchors this holder trusts for its peers (normally the same root, possibly several during a root
    migration).
    """

    key_pem: str
    chain_pem: tuple[str, ...]
    roots_pem: str

    def __post_init__(self) -> None:
        if not self.chain_pem:
            raise ValueError("empty certificate chain")

    @cached_property
    def infos(self) -> tuple[CertInfo, ...]:
        """What the data plane reads from each certificate (validity, SANs, names), via :mod:`api.der`."""
        return tuple(parse_certificate(pem_to_der(p)) for p in self.chain_pem)

    @cached_property
    def certificates(self) -> list[x509.Certificate]:
        """``cryptography`` objects for control-plane callers (imports cryptography on first use)."""
        from cryptography import x509

        return [x509.load_pem_x509_certificate(p.encode()) for p in self.chain_pem]

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]

    @property
    def identity(self) -> SpiffeId:
        return identity_from_uris(self.infos[0].uri_sans)

    @property
    def not_before(self) -> float:
        return self.infos[0].not_before

    @property
    def not_after(self) -> float:
        return self.infos[0].not_after

    @property
    def refresh_at(self) -> float:
        """Half way through the lifetime, as ztunnel and the sidecar agent rotate."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def expired(self, now: float) -> bool:
        return now >= self.not_after

    @property
    def served_chain_pem(self) -> str:
        """Leaf and intermediates, without a self-signed root: what a peer is sent during the handshake."""
        keep = list(self.chain_pem)
        if len(keep) > 1 and self.infos[-1].self_issued:
            keep = keep[:-1]
        return "".join(keep)

    @property
    def full_chain_pem(self) -> str:
        return "".join(self.chain_pem)

    @classmethod
    def from_pem(cls, key_pem: str | bytes, chain_pem: str | bytes, roots_pem: str | bytes) -> CertBundle:
        k = key_pem.decode() if isinstance(key_pem, bytes) else key_pem
        r = roots_pem.decode() if isinstance(roots_pem, bytes) else roots_pem
        return cls(k, tuple(split_pem_chain(chain_pem)), r)


@contextlib.contextmanager
def _memory_files(*contents: str) -> Iterator[list[str]]:
    """Paths that read back ``contents`` without them being written to a file system, where possible."""
    fds: list[int] = []
    paths: list[str] = []
    tmpdir: tempfile.TemporaryDirectory[str] | None = None
    try:
        for i, text in enumerate(contents):
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create(f"istiopy-tls-{i}", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, text.encode())
                paths.append(f"/proc/self/fd/{fd}")
            else:  # pragma: no cover - non-Linux fallback: a private directory removed at once
                if tmpdir is None:
                    # imported here: tempfile pulls in shutil, bz2, lzma and random, and a node proxy on
                    # Linux never comes here (issue 8)
                    import tempfile

                    tmpdir = tempfile.TemporaryDirectory(prefix="istiopy-tls-")
                p = os.path.join(tmpdir.name, f"{i}.pem")
                with open(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
                    fh.write(text)
                paths.append(p)
        yield paths
    finally:
        for fd in fds:
            os.close(fd)
        if tmpdir is not None:  # pragma: no cover
            tmpdir.cleanup()


def load_bundle(ctx: ssl.SSLContext, bundle: CertBundle) -> None:
    """Install ``bundle``'s key and chain on ``ctx``; later handshakes use it, live ones are unaffected.

    The trust roots are *added*: OpenSSL cannot remove anchors from a context, so a root change needs a
    new context (build one with :func:`server_context` / :func:`client_context`).
    """
    with _memory_files(bundle.served_chain_pem, bundle.key_pem) as (chain_path, key_path):
        ctx.load_cert_chain(chain_path, key_path)
    ctx.load_verify_locations(cadata=bundle.roots_pem)


def _base_context(purpose: int, bundle: CertBundle, alpn: Collection[str]) -> ssl.SSLContext:
    import ssl

    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identities are SPIFFE URIs, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    load_bundle(ctx, bundle)
    return ctx


def server_context(bundle: CertBundle, *, alpn: Collection[str] = (ALPN_H2,)) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate chained to the mesh roots."""
    import ssl

    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, bundle, alpn)
    ctx.num_tickets = 0  # no resumption: every connection proves its identity afresh
    return ctx


def client_context(bundle: CertBundle, *, alpn: Collection[str] = (ALPN_H2,)) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting ``bundle`` and verifying the server against the mesh roots.

    Connect with ``server_hostname=""`` (asyncio) or ``server_hostname=None`` (``wrap_socket``) so no SNI
    is sent, then check the server with :func:`verify_peer_identity`.
    """
    import ssl

    return _base_context(ssl.PROTOCOL_TLS_CLIENT, bundle, alpn)


def peer_identity(tls: ssl.SSLObject | ssl.SSLSocket, trust_domain: str | None = None) -> SpiffeId:
    """The SPIFFE id in the peer's (already verified) certificate; optionally pinned to a trust domain."""
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    try:
        ident = identity_of_der(der)
    except InvalidSpiffeId as e:
        raise PeerIdentityError(f"peer certificate has no usable SPIFFE identity: {e}") from e
    if trust_domain is not None and ident.trust_domain != trust_domain:
        raise PeerIdentityError(f"peer {ident} is outside trust domain {trust_domain!r}")
    return ident


def verify_peer_identity(tls: ssl.SSLObject | ssl.SSLSocket, allowed: Collection[SpiffeId]) -> SpiffeId:
    """The peer's SPIFFE id if it is one of ``allowed`` (ztunnel's full-SAN check), else raise."""
    ident = peer_identity(tls)
    if ident not in allowed:
        want = ", ".join(sorted(str(a) for a in allowed))
        raise PeerIdentityError(f"peer identity {ident} is not one of the expected [{want}]")
    return ident


def cert_not_after(pem: str) -> datetime:
    """Expiry of a PEM certificate (UTC), for logs and status output."""
    return datetime.fromtimestamp(parse_certificate(pem_to_der(pem)).not_after, UTC)


def private_key_pem(key: object) -> str:
    """PKCS#8 PEM of a ``cryptography`` private key, unencrypted (it stays in memory)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"unsupported key type {type(key).__name__}")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
