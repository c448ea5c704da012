"""Where a channel dials (``parse_target``) and the TLS client context it dials with."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl


@contextlib.contextmanager
def memory_file(text: str) -> Iterator[str]:
    """A path reading back ``text`` (``ssl`` loads keys only from files): an anonymous memfd on Linux."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("istiopy-grpc-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode())
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    import tempfile  # pragma: no cover - non-Linux fallback: a private directory removed at once

    with tempfile.TemporaryDirectory(prefix="istiopy-grpc-") as d:  # pragma: no cover
        p = os.path.join(d, "f.pem")
        with open(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fh.write(text)
        yield p


def client_ssl_context(
    roots_pem: str | bytes | None = None, *, client_cert: tuple[str, str] | None = None
) -> ssl.SSLContext:
    """A TLS client context for gRPC: verifies the server against ``roots_pem`` (system roots when None)
    and its host name (see ``Channel(server_name=...)``), offers ALPN ``h2``, and presents
    ``client_cert = (chain_pem, key_pem)`` when given (mutual TLS). ``ssl`` is imported here, not at module
    load: the node proxy's C path brings its own TLS client (``tls_stream.TlsClient``)."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if roots_pem:
        ctx.load_verify_locations(cadata=roots_pem.decode() if isinstance(roots_pem, bytes) else roots_pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # Accept what grpc (BoringSSL) accepts: Python 3.13+ turns on OpenSSL's strict X.509 checks by default.
    ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
    ctx.set_alpn_protocols(["h2"])
    if client_cert is not None:
        chain_pem, key_pem = client_cert
        with memory_file(chain_pem) as chain_path, memory_file(key_pem) as key_path:
            ctx.load_cert_chain(chain_path, key_path)
    return ctx


# ------------------------------------------------------------------------------------------------ target
@dataclass(frozen=True)
class Target:
    """Where a channel dials (TCP ``host``/``port`` or Unix socket ``path``) and its ``:authority``."""

    host: str
    port: int
    path: str
    authority: str


def parse_target(target: str) -> Target:
    """``host:port``, ``[v6]:port``, ``dns:///host:port``, ``ipv4:``/``ipv6:`` prefixes or ``unix:path``
    (the forms gRPC accepts that we use); the port defaults to 443 as in gRPC."""
    t = target
    if t.startswith(("unix://", "unix:")):
        path = t.removeprefix("unix://") if t.startswith("unix://") else t.removeprefix("unix:")
        if not path:
            raise ValueError(f"target {target!r}: empty unix socket path")
        return Target("", 0, path, "localhost")
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(prefix):
            t = t.removeprefix(prefix)
            break
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"target {target!r}: bad bracketed IPv6 address")
        port_s = rest[1:] if rest else "443"
        authority = t if rest else f"[{host}]:443"
    elif t.count(":") == 1:
        host, port_s = t.split(":")
        authority = t
    elif ":" in t:  # a bare IPv6 address
        host, port_s, authority = t, "443", f"[{t}]:443"
    else:
        host, port_s, authority = t, "443", f"{t}:443"
    if not host:
        raise ValueError(f"target {target!r}: empty host")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"target {target!r}: port {port_s!r} is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"target {target!r}: port {port} out of range")
    return Target(host, port, "", authority)
