"""The node proxy's PKI backend: OpenSSL through the C extension (``_fastpath``), else ``cryptography``.

ztunnel-py makes a key and CSR per identity and checks each certificate the CA returns
(:class:`istiopy.api.pki.PkiBackend`). The extension does that on the OpenSSL its byte path links, so the
node proxy never imports ``cryptography`` (~9 MB RSS, issue 8). When the extension was not built (no
compiler or headers), the ``cryptography`` backend is used with a warning, as the byte path falls back to
Python. ``$ISTIOPY_FASTPATH_SO`` (``make test-asan``) swaps the build for both.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from istiopy.api.pki import CryptographyBackend, PkiBackend
from istiopy.api.tls import split_pem_chain
from istiopy.dataplane.extension import load_extension

log = logging.getLogger("istiopy.ztunnel.pki")


class OpenSslBackend:
    """:class:`PkiBackend` on the C extension's ``new_key_csr``/``verify_chain`` (dataplane/_c/pki.c)."""

    def __init__(self, module: Any) -> None:
        self._c = module

    def new_key_csr(self, uri: str) -> tuple[str, str]:
        key_pem, csr_pem = self._c.new_key_csr(uri)
        return str(key_pem), str(csr_pem)

    def verify_chain(self, chain_pems: Sequence[str], roots_pems: Sequence[str], key_pem: str) -> None:
        # The C side takes one certificate per item; callers may hand over concatenated PEM.
        chain = [p for item in chain_pems for p in split_pem_chain(item)] or list(chain_pems)
        roots = [p for item in roots_pems for p in split_pem_chain(item)] or list(roots_pems)
        self._c.verify_chain(chain, roots, key_pem)


def c_backend() -> OpenSslBackend | None:
    """The OpenSSL backend, or None when the extension is not importable."""
    try:
        return OpenSslBackend(load_extension())
    except ImportError:
        return None


def backend() -> PkiBackend:
    """What ztunnel-py uses: the C backend when built, else ``cryptography`` (with a warning)."""
    c = c_backend()
    if c is not None:
        return c
    log.warning("istiopy.dataplane._fastpath is not built; certificates use cryptography (+9 MB RSS)")
    return CryptographyBackend()
