"""The node proxy's PKI backend: OpenSSL through the small ``_pki`` extension, else ``cryptography``.

ztunnel-py makes a key and CSR per identity and checks each certificate the CA returns
(:class:`istiopy.api.pki.PkiBackend`). The C extension does that on the libcrypto the ``ssl`` module has
already mapped, so the node proxy never imports ``cryptography`` (~9 MB RSS, issue 8). When the extension
was not built (no compiler or headers), the ``cryptography`` backend is used with a warning, as the byte
path falls back to Python.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from istiopy.api.pki import CryptographyBackend, PkiBackend
from istiopy.api.tls import split_pem_chain

log = logging.getLogger("istiopy.ztunnel.pki")

PKI_SO_ENV = "ISTIOPY_PKI_SO"
_MODULE = "istiopy.dataplane._pki"


class OpenSslBackend:
    """:class:`PkiBackend` on ``istiopy.dataplane._pki`` (C on libcrypto)."""

    def __init__(self, module: ModuleType) -> None:
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
        return OpenSslBackend(_load())
    except ImportError:
        return None


def _load() -> ModuleType:
    """The extension; ``$ISTIOPY_PKI_SO`` names another build of it (``make test-asan`` loads the sanitizer
    build that way, leaving the normal in-place build alone for concurrent test runs). That build is
    registered under the extension's own name, so later imports (and a test that hides the module through
    ``sys.modules``) see the same thing as with the normal build."""
    path = os.environ.get(PKI_SO_ENV)
    if path and _MODULE not in sys.modules:
        spec = importlib.util.spec_from_file_location(_MODULE, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path} (from ${PKI_SO_ENV})")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[_MODULE] = mod
    from istiopy.dataplane import _pki  # type: ignore[attr-defined]

    return _pki  # type: ignore[no-any-return]


def backend() -> PkiBackend:
    """What ztunnel-py uses: the C backend when built, else ``cryptography`` (with a warning)."""
    c = c_backend()
    if c is not None:
        return c
    log.warning("istiopy.dataplane._pki is not built; certificates use the cryptography backend (+9 MB RSS)")
    return CryptographyBackend()
