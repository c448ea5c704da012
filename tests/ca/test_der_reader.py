"""api.der, the node proxy's certificate reader, agrees with cryptography and refuses malformed DER."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from istiopy.api.der import DerError, parse_certificate, parse_pem_certificate, pem_blocks, pem_to_der
from istiopy.api.identity import InvalidSpiffeId, SpiffeId, identity_of, identity_of_der
from istiopy.api.tls import CertBundle, cert_not_after, private_key_pem
from istiopy.ca.authority import generate_root
from istiopy.ca.service import CaConfig, CertificateAuthority

APP = SpiffeId("cluster.local", "default", "app")
LONG_URI = "https://example.com/" + "x" * 300  # > 255 bytes: a two-octet long-form length inside the SAN


def make_cert(
    sans: list[x509.GeneralName] | None,
    *,
    not_before: dt.datetime = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    not_after: dt.datetime = dt.datetime(2034, 5, 6, 7, 8, 9, tzinfo=dt.UTC),
    rsa_key: bool = False,
    serial: int = 0x1234_5678_9ABC_DEF0_1234,
) -> x509.Certificate:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    )
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "der-test")])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256())


def der_of(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def assert_agrees(cert: x509.Certificate) -> None:
    info = parse_certificate(der_of(cert))
    assert info.not_before == cert.not_valid_before_utc.timestamp()
    assert info.not_after == cert.not_valid_after_utc.timestamp()
    assert info.serial_number == cert.serial_number
    assert info.issuer == cert.issuer.public_bytes()
    assert info.subject == cert.subject.public_bytes()
    try:
        want = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = want.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    assert list(info.uri_sans) == uris


@pytest.mark.parametrize(
    "sans",
    [
        None,
        [x509.UniformResourceIdentifier(APP.uri)],
        [  # several kinds and several URIs, in order, including a long one (long-form lengths)
            x509.DNSName("app.default.svc"),
            x509.UniformResourceIdentifier(APP.uri),
            x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
            x509.RFC822Name("ops@example.com"),
            x509.UniformResourceIdentifier(LONG_URI),
            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/b/sa/c"),
        ],
        [x509.DNSName("only-dns.example")],
    ],
    ids=["no-san", "one-uri", "mixed", "dns-only"],
)
def test_reader_agrees_with_cryptography(sans: list[x509.GeneralName] | None) -> None:
    assert_agrees(make_cert(sans))


def test_generalized_time_rsa_and_negative_serial_agree() -> None:
    # notAfter from 2050 on is a GeneralizedTime; an RSA key makes the SPKI (and whole cert) long-form.
    late = make_cert(
        [x509.UniformResourceIdentifier(APP.uri)],
        not_before=dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
        not_after=dt.datetime(2051, 2, 3, 4, 5, 6, tzinfo=dt.UTC),
        rsa_key=True,
        serial=1,
    )
    assert_agrees(late)
    y2k_eve = dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)  # UTCTime, 19xx century
    assert parse_certificate(der_of(late)).not_before == y2k_eve.timestamp()


def test_mesh_certificates_from_the_real_ca() -> None:
    ca = CertificateAuthority(CaConfig(), generate_root("cluster.local"))
    bundle = ca.issue_workload(APP)
    for cert in bundle.certificates:
        assert_agrees(cert)
    assert bundle.identity == APP == identity_of(bundle.leaf)
    assert bundle.not_after == bundle.leaf.not_valid_after_utc.timestamp()
    assert cert_not_after(bundle.chain_pem[0]) == bundle.leaf.not_valid_after_utc
    assert identity_of_der(der_of(bundle.leaf)) == APP
    # the self-signed root is not sent to peers; the served chain is the leaf alone
    assert bundle.infos[-1].self_issued
    assert bundle.served_chain_pem == bundle.chain_pem[0]


def test_identity_needs_exactly_one_spiffe_uri() -> None:
    two = make_cert([x509.UniformResourceIdentifier(APP.uri), x509.UniformResourceIdentifier(APP.uri)])
    with pytest.raises(InvalidSpiffeId, match="2 spiffe URI SANs"):
        identity_of_der(der_of(two))
    with pytest.raises(InvalidSpiffeId, match="0 spiffe URI SANs"):
        identity_of_der(der_of(make_cert([x509.DNSName("a.example")])))
    with pytest.raises(InvalidSpiffeId, match="unreadable certificate"):
        identity_of_der(b"\x30\x03\x02\x01")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = make_cert([x509.DNSName("x")]).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(InvalidSpiffeId):
        _ = CertBundle(private_key_pem(key), (pem,), pem).identity


def test_every_truncation_is_refused_with_a_der_error() -> None:
    der = der_of(make_cert([x509.UniformResourceIdentifier(APP.uri), x509.DNSName("a.example")]))
    for n in range(len(der)):
        with pytest.raises(DerError):
            parse_certificate(der[:n])


def test_random_corruption_never_escapes_as_another_exception() -> None:
    """Flipped bytes either still parse (they hit a signature or key) or raise DerError, never IndexError."""
    sans = [x509.UniformResourceIdentifier(APP.uri), x509.UniformResourceIdentifier(LONG_URI)]
    der = der_of(make_cert(sans))
    rng = random.Random(8)
    refused = 0
    for _ in range(3000):
        buf = bytearray(der)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        try:
            parse_certificate(bytes(buf))
        except DerError:
            refused += 1
    assert refused > 300  # the corruption did reach the structure, not just opaque bytes
    for _ in range(500):
        junk = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        with pytest.raises(DerError):
            parse_certificate(junk)


@pytest.mark.parametrize(
    ("der", "message"),
    [
        (b"", r"Certificate\.SEQUENCE: truncated"),
        (b"\x30\x80\x00\x00", "indefinite length is not DER"),
        (b"\x30\x81\x05" + b"\x00" * 5, "not minimally encoded"),
        (b"\x30\x82\x00\x05" + b"\x00" * 5, "not minimally encoded"),
        (b"\x30\x85\x01\x00\x00\x00\x00", "length field of 5 octets is too long"),
        (b"\x30\x05\x00", "runs past the end"),
        (b"\x30\x00\x00", "1 unexpected trailing bytes"),
        (b"\x31\x00", "expected tag 0x30, got 0x31"),
        (b"\x1f\x00", "high-tag-number form"),
        (b"\x30\x00", r"tbsCertificate: truncated"),
    ],
)
def test_malformed_structures_name_what_is_wrong(der: bytes, message: str) -> None:
    with pytest.raises(DerError, match=message):
        parse_certificate(der)


def _with_validity(der: bytes, old: bytes, new: bytes) -> bytes:
    assert der.count(old) == 1
    assert len(old) == len(new)
    return der.replace(old, new)


def test_bad_validity_times_are_refused() -> None:
    der = der_of(make_cert(None))
    ok = b"240102030405Z"
    with pytest.raises(DerError, match=r"validity\.notBefore: expected UTCTime"):
        parse_certificate(_with_validity(der, ok, b"24010203040+Z"))
    with pytest.raises(DerError, match=r"validity\.notBefore: invalid time"):
        parse_certificate(_with_validity(der, ok, b"241302030405Z"))  # month 13
    with pytest.raises(DerError, match=r"validity\.notBefore: expected UTCTime"):
        parse_certificate(_with_validity(der, ok, b"2401020304050"))  # no Z


def test_pem_helpers() -> None:
    cert = make_cert([x509.UniformResourceIdentifier(APP.uri)])
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    assert pem_to_der(pem) == der_of(cert)
    assert parse_pem_certificate("junk before\n" + pem).uri_sans == (APP.uri,)
    assert pem_blocks(pem + pem) == [der_of(cert)] * 2
    with pytest.raises(DerError, match="found 2"):
        pem_to_der(pem + pem)
    with pytest.raises(DerError, match="found 0"):
        pem_to_der("no certificate here")
    with pytest.raises(DerError, match="missing -----END CERTIFICATE-----"):
        pem_blocks(pem.split("-----END")[0])
    body = base64.b64encode(b"\x30\x00").decode()
    with pytest.raises(DerError, match="invalid base64"):
        pem_blocks(f"-----BEGIN CERTIFICATE-----\n{body}!!\n-----END CERTIFICATE-----\n")
