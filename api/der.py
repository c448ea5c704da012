"""A tiny DER reader for the few X.509 fields the node proxy needs: validity times, URI SANs, names.

Why not ``cryptography``: importing it costs ~9 MB of RSS per process, and ztunnel-py only *reads* its
certificates (signature checks happen in OpenSSL during every handshake and in the PKI backend when a
certificate arrives). This is parsing only, no cryptography: every length is bounds-checked against its
enclosing element, only definite minimal-length DER is accepted, and anything malformed raises
:class:`DerError` (a ``ValueError``) naming the field that is wrong.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime

# Universal tags (class bits included) and the context tags a certificate uses.
_BOOLEAN = 0x01
_INTEGER = 0x02
_BIT_STRING = 0x03
_OCTET_STRING = 0x04
_OID = 0x06
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_SEQUENCE = 0x30
_VERSION = 0xA0  # [0] EXPLICIT Version
_ISSUER_UID = 0x81  # [1] IMPLICIT UniqueIdentifier
_SUBJECT_UID = 0x82  # [2] IMPLICIT UniqueIdentifier
_EXTENSIONS = 0xA3  # [3] EXPLICIT Extensions
_GN_URI = 0x86  # GeneralName uniformResourceIdentifier [6] IMPLICIT IA5String

_SAN_OID = bytes([0x55, 0x1D, 0x11])  # 2.5.29.17 subjectAltName
_MAX_LENGTH_OCTETS = 4  # a certificate is far below 4 GiB; longer length fields are garbage

PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
PEM_END = "-----END CERTIFICATE-----"


class DerError(ValueError):
    """Malformed DER; the message names the element being read and what is wrong with it."""


@dataclass(frozen=True)
class CertInfo:
    """What the data plane reads from a certificate. Names are raw DER (compared byte for byte)."""

    serial_number: int
    issuer: bytes
    subject: bytes
    not_before: float  # POSIX seconds, UTC
    not_after: float
    uri_sans: tuple[str, ...]

    @property
    def self_issued(self) -> bool:
        return self.issuer == self.subject


@dataclass(frozen=True)
class _Tlv:
    tag: int
    head: int  # the tag byte
    start: int  # first content byte
    end: int  # one past the last content byte


class _Reader:
    """Reads consecutive TLVs from ``data[pos:end]``, never past ``end``."""

    def __init__(self, data: bytes, pos: int, end: int, what: str) -> None:
        self.data, self.pos, self.end, self.what = data, pos, end, what

    def at_end(self) -> bool:
        return self.pos >= self.end

    def peek_tag(self) -> int | None:
        return None if self.at_end() else self.data[self.pos]

    def read(self, field: str, tag: int | None = None) -> _Tlv:
        where = f"{self.what}.{field}"
        if self.pos + 2 > self.end:
            raise DerError(f"{where}: truncated (need a tag and a length at offset {self.pos})")
        t = self.data[self.pos]
        if t & 0x1F == 0x1F:
            raise DerError(f"{where}: high-tag-number form is not used in certificates")
        if tag is not None and t != tag:
            raise DerError(f"{where}: expected tag 0x{tag:02x}, got 0x{t:02x}")
        first = self.data[self.pos + 1]
        pos = self.pos + 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0:
                raise DerError(f"{where}: indefinite length is not DER")
            if n > _MAX_LENGTH_OCTETS:
                raise DerError(f"{where}: length field of {n} octets is too long")
            if pos + n > self.end:
                raise DerError(f"{where}: truncated length field")
            length = int.from_bytes(self.data[pos : pos + n], "big")
            if self.data[pos] == 0 or length < 0x80:
                raise DerError(f"{where}: length {length} is not minimally encoded")
            pos += n
        if pos + length > self.end:
            raise DerError(f"{where}: length {length} runs past the end of {self.what}")
        head, self.pos = self.pos, pos + length
        return _Tlv(t, head, pos, pos + length)

    def sub(self, tlv: _Tlv, what: str) -> _Reader:
        return _Reader(self.data, tlv.start, tlv.end, f"{self.what}.{what}")

    def done(self) -> None:
        if not self.at_end():
            raise DerError(f"{self.what}: {self.end - self.pos} unexpected trailing bytes")


def _time(data: bytes, tlv: _Tlv, where: str) -> float:
    raw = data[tlv.start : tlv.end]
    if tlv.tag == _UTC_TIME:
        form, size = "UTCTime YYMMDDHHMMSSZ", 13
    elif tlv.tag == _GENERALIZED_TIME:
        form, size = "GeneralizedTime YYYYMMDDHHMMSSZ", 15
    else:
        raise DerError(f"{where}: expected UTCTime or GeneralizedTime, got tag 0x{tlv.tag:02x}")
    digits = raw[:-1]
    if len(raw) != size or raw[-1:] != b"Z" or not (digits.isascii() and digits.isdigit()):
        raise DerError(f"{where}: expected {form}, got {raw!r}")
    if size == 13:
        year = int(digits[:2])
        year += 1900 if year >= 50 else 2000  # RFC 5280 4.1.2.5.1
        rest = digits[2:]
    else:
        year, rest = int(digits[:4]), digits[4:]
    try:
        ts = datetime(
            year, int(rest[0:2]), int(rest[2:4]), int(rest[4:6]), int(rest[6:8]), int(rest[8:10]), tzinfo=UTC
        )
    except ValueError as e:
        raise DerError(f"{where}: invalid time {raw!r}: {e}") from None
    return ts.timestamp()


def _uri_sans(data: bytes, tlv: _Tlv, where: str) -> list[str]:
    """URIs of a SubjectAltName extension value (GeneralNames); other name kinds are skipped."""
    names = _Reader(data, tlv.start, tlv.end, where)
    seq = names.read("GeneralNames", _SEQUENCE)
    names.done()
    r = names.sub(seq, "GeneralNames")
    out: list[str] = []
    if r.at_end():
        raise DerError(f"{where}: empty GeneralNames")
    while not r.at_end():
        gn = r.read("GeneralName")
        if gn.tag == _GN_URI:
            raw = data[gn.start : gn.end]
            if not raw.isascii():
                raise DerError(f"{where}: URI SAN is not IA5 (ASCII)")
            out.append(raw.decode("ascii"))
    return out


def parse_certificate(der: bytes) -> CertInfo:
    """Read an X.509 v1-v3 certificate's serial, names, validity and URI SANs (no signature check)."""
    top = _Reader(der, 0, len(der), "Certificate")
    cert = top.read("SEQUENCE", _SEQUENCE)
    top.done()
    c = _Reader(der, cert.start, cert.end, "Certificate")
    tbs_tlv = c.read("tbsCertificate", _SEQUENCE)
    c.read("signatureAlgorithm", _SEQUENCE)
    c.read("signatureValue", _BIT_STRING)
    c.done()
    tbs = c.sub(tbs_tlv, "tbsCertificate")
    if tbs.peek_tag() == _VERSION:
        tbs.read("version")
    serial = tbs.read("serialNumber", _INTEGER)
    if serial.start == serial.end:
        raise DerError("Certificate.tbsCertificate.serialNumber: empty INTEGER")
    tbs.read("signature", _SEQUENCE)
    issuer = tbs.read("issuer", _SEQUENCE)
    validity = tbs.read("validity", _SEQUENCE)
    subject = tbs.read("subject", _SEQUENCE)
    tbs.read("subjectPublicKeyInfo", _SEQUENCE)
    uris: list[str] = []
    for tag, name in ((_ISSUER_UID, "issuerUniqueID"), (_SUBJECT_UID, "subjectUniqueID")):
        if tbs.peek_tag() == tag:
            tbs.read(name)
    if tbs.peek_tag() == _EXTENSIONS:
        uris = _extensions(tbs, tbs.read("extensions"))
    tbs.done()
    v = tbs.sub(validity, "validity")
    not_before = _time(der, v.read("notBefore"), f"{v.what}.notBefore")
    not_after = _time(der, v.read("notAfter"), f"{v.what}.notAfter")
    v.done()
    return CertInfo(
        serial_number=int.from_bytes(der[serial.start : serial.end], "big", signed=True),
        issuer=der[issuer.head : issuer.end],
        subject=der[subject.head : subject.end],
        not_before=not_before,
        not_after=not_after,
        uri_sans=tuple(uris),
    )


def _extensions(tbs: _Reader, wrapper: _Tlv) -> list[str]:
    outer = tbs.sub(wrapper, "extensions")
    exts_tlv = outer.read("Extensions", _SEQUENCE)
    outer.done()
    exts = outer.sub(exts_tlv, "Extensions")
    uris: list[str] = []
    seen_san = False
    while not exts.at_end():
        ext = exts.sub(exts.read("Extension", _SEQUENCE), "Extension")
        oid = ext.read("extnID", _OID)
        if ext.peek_tag() == _BOOLEAN:
            ext.read("critical")
        value = ext.read("extnValue", _OCTET_STRING)
        ext.done()
        if ext.data[oid.start : oid.end] == _SAN_OID:
            if seen_san:
                raise DerError(f"{exts.what}: duplicate subjectAltName extension")
            seen_san = True
            uris = _uri_sans(ext.data, value, f"{ext.what}.subjectAltName")
    return uris


def pem_blocks(pem: str | bytes) -> list[bytes]:
    """The DER of every CERTIFICATE block in ``pem`` (text outside the blocks is ignored, as OpenSSL does)."""
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    out: list[bytes] = []
    pos = 0
    while (begin := text.find(PEM_BEGIN, pos)) >= 0:
        end = text.find(PEM_END, begin)
        if end < 0:
            raise DerError(f"PEM certificate #{len(out) + 1}: missing {PEM_END}")
        body = "".join(text[begin + len(PEM_BEGIN) : end].split())
        try:
            out.append(base64.b64decode(body, validate=True))
        except (binascii.Error, ValueError) as e:
            raise DerError(f"PEM certificate #{len(out) + 1}: invalid base64: {e}") from None
        pos = end + len(PEM_END)
    return out


def pem_to_der(pem: str | bytes) -> bytes:
    """The DER of a PEM holding exactly one certificate."""
    blocks = pem_blocks(pem)
    if len(blocks) != 1:
        raise DerError(f"expected one PEM certificate, found {len(blocks)}")
    return blocks[0]


def parse_pem_certificate(pem: str | bytes) -> CertInfo:
    return parse_certificate(pem_to_der(pem))
