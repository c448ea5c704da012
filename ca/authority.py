"""The root of trust: the signing key and certificate chain the CA issues from, and where they persist.

Two sources, as in Istio:

* **Self-signed** (default): on first start a root is generated (ECDSA P-256, or RSA 2048) with a ten-year
  lifetime and saved through a :class:`RootStore`; every later start, and every replica, loads the same
  one, so certificates issued before a restart keep verifying. Standalone mode stores it in a directory
  (:class:`DirectoryRootStore`); Kubernetes mode stores it in the Secret ``istio-ca-secret`` (a
  :class:`RootStore` the Kubernetes integration provides).
* **Plug-in** (``cacerts``): an operator-provided intermediate (``ca-cert.pem``, ``ca-key.pem``) with its
  chain (``cert-chain.pem``) and root (``root-cert.pem``); we sign as the intermediate and serve the whole
  chain so peers can build the path to the shared root.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import fcntl
import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from istiopy.api.tls import split_pem_chain

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

ROOT_TTL = dt.timedelta(days=3650)
# Secret ``istio-ca-secret`` keys, reused as file names in the standalone directory so the two are
# interchangeable (``kubectl get secret istio-ca-secret -o yaml`` maps onto the directory 1:1).
CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
ROOT_CERT_FILE = "root-cert.pem"


class KeyType(enum.StrEnum):
    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"


class CaMaterialError(ValueError):
    """The stored or plugged-in CA files are missing, unreadable or do not belong together."""


def generate_signing_key(kind: KeyType) -> SigningKey:
    if kind is KeyType.RSA_2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def hash_for(key: SigningKey) -> hashes.SHA256 | hashes.SHA384:
    """SHA-256 for P-256 and RSA 2048; SHA-384 for bigger EC curves (strength matched to the key)."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass(frozen=True)
class CaMaterial:
    """What the CA signs with.

    ``signing_cert``/``signing_key`` issue leaves; ``chain`` is every certificate above the signing cert up
    to and including the root (empty when the signing cert is itself the root); ``roots`` are the trust
    anchors published to the mesh.
    """

    signing_cert: x509.Certificate
    signing_key: SigningKey
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    plugged_in: bool = False

    @property
    def root(self) -> x509.Certificate:
        return self.roots[0]

    @property
    def roots_pem(self) -> str:
        return "".join(cert_to_pem(c) for c in self.roots)

    @property
    def issuer_chain_pem(self) -> list[str]:
        """The chain a leaf is served with after itself: signing cert, intermediates, root last."""
        certs = [self.signing_cert, *self.chain]
        if certs[-1] not in self.roots:  # a cert-chain.pem that stops below the root
            certs.append(self.root)
        return [cert_to_pem(c) for c in certs]

    def validate(self) -> None:
        """Refuse material whose parts do not belong together, before a single bad leaf is issued."""
        if self.signing_cert.public_key() != self.signing_key.public_key():
            raise CaMaterialError("CA key does not match CA certificate")
        bc = _basic_constraints(self.signing_cert)
        if bc is None or not bc.ca:
            raise CaMaterialError("CA certificate is not a CA (basicConstraints CA:TRUE missing)")
        path = [self.signing_cert, *self.chain]
        for child, parent in itertools.pairwise(path):
            try:
                child.verify_directly_issued_by(parent)
            except Exception as e:
                raise CaMaterialError(f"cert chain broken at {child.subject.rfc4514_string()!r}: {e}") from e
        top = path[-1]
        if not any(top == r for r in self.roots):
            ok = False
            for r in self.roots:
                try:
                    top.verify_directly_issued_by(r)
                    ok = True
                    break
                except Exception:
                    continue
            if not ok:
                raise CaMaterialError("cert chain does not lead to root-cert.pem")


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _ca_builder(
    subject: x509.Name, issuer: x509.Name, key: SigningKey, ttl: dt.timedelta
) -> x509.CertificateBuilder:
    """What every CA certificate we make carries (roots and intermediates differ only in issuer and AKI)."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def generate_root(
    trust_domain: str, kind: KeyType = KeyType.EC_P256, ttl: dt.timedelta = ROOT_TTL, org: str = ""
) -> CaMaterial:
    """A fresh self-signed root. Its subject carries the trust domain as O (as Istio's does) for humans."""
    key = generate_signing_key(kind)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org or trust_domain)])
    cert = _ca_builder(name, name, key, ttl).sign(key, hash_for(key))
    return CaMaterial(cert, key, (), (cert,))


def generate_intermediate(
    parent: CaMaterial, name: str, kind: KeyType = KeyType.EC_P256, ttl: dt.timedelta = ROOT_TTL
) -> CaMaterial:
    """An intermediate CA under ``parent`` (for plug-in CA set-ups and tests of them)."""
    key = generate_signing_key(kind)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)])
    cert = (
        _ca_builder(subject, parent.signing_cert.subject, key, ttl)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.signing_key.public_key()),
            critical=False,
        )
        .sign(parent.signing_key, hash_for(parent.signing_key))
    )
    return CaMaterial(cert, key, (parent.signing_cert, *parent.chain), parent.roots)


# ------------------------------------------------------------------------------------------- persistence
class RootStore(Protocol):
    """Where a self-signed root lives across restarts and replicas.

    ``load`` returns the stored material or None when there is none yet. ``create`` stores ``material``
    only if nothing is stored yet and returns what is stored afterwards: when two replicas race on first
    start, both end up using the winner's root. (Kubernetes mode: create the Secret ``istio-ca-secret``
    with keys ca-cert.pem / ca-key.pem / cert-chain.pem / root-cert.pem; on AlreadyExists, read it back.)
    """

    async def load(self) -> CaMaterial | None: ...

    async def create(self, material: CaMaterial) -> CaMaterial: ...


def material_to_files(material: CaMaterial) -> dict[str, bytes]:
    """The four ``istio-ca-secret`` / ``cacerts`` entries for ``material``."""
    return {
        CA_CERT_FILE: cert_to_pem(material.signing_cert).encode(),
        CA_KEY_FILE: key_to_pem(material.signing_key),
        CERT_CHAIN_FILE: "".join(cert_to_pem(c) for c in material.chain).encode(),
        ROOT_CERT_FILE: material.roots_pem.encode(),
    }


def material_from_files(files: dict[str, bytes], *, plugged_in: bool = False) -> CaMaterial:
    """Parse and check the four entries (``cert-chain.pem`` may be empty or absent for a root)."""
    try:
        cert_pem, key_pem = files[CA_CERT_FILE], files[CA_KEY_FILE]
    except KeyError as e:
        raise CaMaterialError(f"missing {e.args[0]}") from e
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as e:
        raise CaMaterialError(f"unreadable CA certificate or key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaMaterialError(f"unsupported CA key type {type(key).__name__}")
    chain = tuple(
        x509.load_pem_x509_certificate(p.encode()) for p in split_pem_chain(files.get(CERT_CHAIN_FILE, b""))
    )
    root_pem = files.get(ROOT_CERT_FILE, b"")
    roots = tuple(x509.load_pem_x509_certificate(p.encode()) for p in split_pem_chain(root_pem)) or (cert,)
    # cert-chain.pem in upstream cacerts usually starts with ca-cert.pem itself; drop that repetition.
    if chain and chain[0] == cert:
        chain = chain[1:]
    material = CaMaterial(cert, key, chain, roots, plugged_in)
    material.validate()
    return material


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Atomic write: a half-written key after a crash would brick the next start."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DirectoryRootStore:
    """Standalone mode: the root in a directory (same four file names as ``istio-ca-secret``).

    Creation holds an exclusive ``flock`` so processes (or tasks) starting together agree on one root.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    async def load(self) -> CaMaterial | None:
        d = self.directory
        if not (d / CA_CERT_FILE).exists():
            return None
        files = {
            n: (d / n).read_bytes()
            for n in (CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE)
            if (d / n).exists()
        }
        return material_from_files(files)

    async def create(self, material: CaMaterial) -> CaMaterial:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        # flock, not an O_EXCL marker file: the kernel drops the lock if a start crashes half way.
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.02)
            existing = await self.load()
            if existing is not None:  # another process (or task) won the race: use its root
                return existing
            files = material_to_files(material)
            # The certificate is written last: its presence is what ``load`` treats as "stored".
            for name in (CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE, CA_CERT_FILE):
                _write_private(self.directory / name, files[name], 0o600 if name == CA_KEY_FILE else 0o644)
            return material
        finally:
            os.close(fd)  # releases the lock


def load_plugin_cacerts(directory: str | Path) -> CaMaterial:
    """Read an operator's ``cacerts`` directory (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem)."""
    d = Path(directory)
    files: dict[str, bytes] = {}
    for name in (CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE):
        p = d / name
        if p.exists():
            files[name] = p.read_bytes()
        elif name != CERT_CHAIN_FILE:
            raise CaMaterialError(f"plug-in CA directory {d} lacks {name}")
    return material_from_files(files, plugged_in=True)


def write_cacerts(material: CaMaterial, directory: str | Path) -> None:
    """Write ``material`` as a ``cacerts`` directory (tools and tests that prepare a plug-in CA)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = material_to_files(material)
    files[CERT_CHAIN_FILE] = "".join(
        cert_to_pem(c) for c in (material.signing_cert, *material.chain)
    ).encode()
    for name, data in files.items():
        _write_private(d / name, data, 0o600 if name == CA_KEY_FILE else 0o644)


async def load_or_create_root(
    store: RootStore, trust_domain: str, kind: KeyType = KeyType.EC_P256, ttl: dt.timedelta = ROOT_TTL
) -> CaMaterial:
    """The stored root, or a new one created through ``store`` on first start."""
    existing = await store.load()
    if existing is not None:
        return existing
    return await store.create(generate_root(trust_domain, kind, ttl))
