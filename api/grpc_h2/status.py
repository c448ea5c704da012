"""gRPC status codes, :class:`RpcError`, and the headers carrying metadata, deadlines and the status."""

from __future__ import annotations

import base64
import contextlib
import enum
import math
import urllib.parse
from collections.abc import Sequence

from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple

# Never put these in the HPACK table (RFC 7541 7.1.3): a credential must not outlive its request there.
SENSITIVE = frozenset({"authorization", "proxy-authorization", "cookie"})
Header = tuple[str, str] | NeverIndexedHeaderTuple


class StatusCode(enum.IntEnum):
    """gRPC status codes, with their standard numbers."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


Metadata = Sequence[tuple[str, str | bytes]]


class RpcError(Exception):
    """A call ended with a status other than OK: ``code``, the server's ``details`` and its trailers."""

    def __init__(self, code: StatusCode, details: str = "", trailers: Metadata = ()) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details
        self.trailers: tuple[tuple[str, str | bytes], ...] = tuple(trailers)


# HTTP status -> gRPC code when the response carries no grpc-status (gRPC's http-grpc-status-mapping).
HTTP_TO_GRPC = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}

# RST_STREAM error code -> gRPC code (gRPC's HTTP/2 transport mapping).
RESET_TO_GRPC = {
    ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    ErrorCodes.CANCEL: StatusCode.CANCELLED,
    ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}


def encode_timeout(seconds: float) -> str:
    """The ``grpc-timeout`` value: at most 8 digits and a unit, rounded up so the server never cuts early."""
    micros = max(1, math.ceil(seconds * 1_000_000))
    for value, unit in (
        (micros, "u"),
        (math.ceil(micros / 1000), "m"),
        (math.ceil(micros / 1_000_000), "S"),
        (math.ceil(micros / 60_000_000), "M"),
    ):
        if value < 100_000_000:
            return f"{value}{unit}"
    return f"{min(99_999_999, math.ceil(micros / 3_600_000_000))}H"


def metadata_headers(metadata: Metadata) -> list[Header]:
    out: list[Header] = []
    for key, value in metadata:
        k = key.lower()
        if k.startswith(":") or k in ("content-type", "te", "grpc-timeout"):
            raise ValueError(f"metadata key {key!r} is reserved")
        if k.endswith("-bin"):
            raw = value if isinstance(value, bytes) else value.encode()
            out.append((k, base64.b64encode(raw).decode().rstrip("=")))
        elif isinstance(value, bytes):
            raise ValueError(f"metadata {key!r}: bytes values need a key ending in '-bin'")
        elif k in SENSITIVE:
            out.append(NeverIndexedHeaderTuple(k, value))
        else:
            out.append((k, value))
    return out


def received_metadata(headers: Sequence[tuple[bytes, bytes]]) -> tuple[tuple[str, str | bytes], ...]:
    out: list[tuple[str, str | bytes]] = []
    for k, v in headers:
        key = k.decode("ascii", "replace")
        if key.startswith(":"):
            continue
        if key.endswith("-bin"):
            raw = v + b"=" * (-len(v) % 4)
            with contextlib.suppress(ValueError):
                out.append((key, base64.b64decode(raw)))
                continue
        out.append((key, v.decode("utf-8", "replace")))
    return tuple(out)


def status_from(headers: Sequence[tuple[bytes, bytes]], http_status: int) -> RpcError:
    """The final status from the trailers (or trailers-only headers); OK is an RpcError with code OK."""
    md = dict(headers)
    meta = received_metadata(headers)
    raw = md.get(b"grpc-status")
    if raw is None:
        if http_status != 200:
            code = HTTP_TO_GRPC.get(http_status, StatusCode.UNKNOWN)
            return RpcError(code, f"HTTP status {http_status} without grpc-status", meta)
        return RpcError(StatusCode.INTERNAL, "the server ended the call without grpc-status", meta)
    try:
        code = StatusCode(int(raw))
    except ValueError:
        code = StatusCode.UNKNOWN
    details = urllib.parse.unquote(md.get(b"grpc-message", b"").decode("ascii", "replace"), errors="replace")
    return RpcError(code, details, meta)
