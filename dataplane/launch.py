"""``ztunnel-py``'s entry point: decides, before asyncio loads, whether Python's ``ssl`` may load at all.

Why a module of its own: ``import asyncio`` imports ``ssl``, which maps the system libssl/libcrypto and
touches ~4.4 MB of them (measured) before any handshake, plus more once a handshake runs. On the C byte
path the node proxy does all of its TLS, the tunnels and the control-plane connections (xDS, CA, via
``fastpath.client_tls``), on the extension's own OpenSSL, so a second OpenSSL is pure overhead against
issue 8's 40 MB budget. This module imports no asyncio: it works out the byte path from the command line
and ``$ISTIOPY_BYTE_PATH`` exactly as ``cli`` will, loads the extension, and only if that works refuses
``ssl`` for the life of the process; then it hands over to :func:`istiopy.dataplane.cli.main`. The Python
byte path (or an unbuilt extension) leaves ``ssl`` alone.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from istiopy.dataplane.extension import BYTE_PATH_ENV, load_extension

REFUSED = frozenset({"ssl", "_ssl"})


class SslRefused(importlib.abc.MetaPathFinder):
    """Fails ``import ssl`` with a reason (asyncio and h2 treat a missing ``ssl`` as "no TLS support")."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in REFUSED:
            raise ImportError(
                f"{fullname} is not loaded by ztunnel-py on the C byte path: its TLS runs on the extension's "
                "own OpenSSL (use --byte-path python for Python's ssl)",
                name=fullname,
            )
        return None


def requested_byte_path(argv: Sequence[str]) -> str:
    """``--byte-path X`` / ``--byte-path=X`` from ``argv``, else ``$ISTIOPY_BYTE_PATH``, else ``c``
    (what ``cli`` resolves too; ``cli`` validates the value and reports a bad one)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == "--byte-path" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--byte-path="):
            value = arg.partition("=")[2]
    return (value or os.environ.get(BYTE_PATH_ENV) or "c").lower()


def refuse_ssl_if_c_path(argv: Sequence[str]) -> bool:
    """Install :class:`SslRefused` when the C path will run; True if it did. Too late once ``ssl`` loaded."""
    if "ssl" in sys.modules or requested_byte_path(argv) != "c":
        return False
    try:
        load_extension()
    except ImportError:
        return False  # cli falls back to the Python path, which needs ssl
    if not any(isinstance(f, SslRefused) for f in sys.meta_path):
        sys.meta_path.insert(0, SslRefused())
    return True


def build_parser() -> argparse.ArgumentParser:
    """``cli``'s parser, for tools that check a command line (it imports asyncio: not for starting up)."""
    from istiopy.dataplane import cli

    return cli.build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    refuse_ssl_if_c_path(args)
    from istiopy.dataplane import cli

    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
