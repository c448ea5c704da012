"""Loading the C extension ``istiopy.dataplane._fastpath``, without importing asyncio (or ``ssl``).

Shared by :mod:`istiopy.dataplane.fastpath` and :mod:`istiopy.dataplane.launch`, which must decide before
asyncio loads whether the process will run on the extension's OpenSSL alone.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

BYTE_PATH_ENV = "ISTIOPY_BYTE_PATH"
SO_ENV = "ISTIOPY_FASTPATH_SO"
_MODULE = "istiopy.dataplane._fastpath"


def load_extension() -> Any:
    """The extension; ``$ISTIOPY_FASTPATH_SO`` names another build of it (``make test-asan`` loads the
    sanitizer build that way, leaving the normal in-place build alone for concurrent test runs). Raises
    ImportError when it is not built."""
    path = os.environ.get(SO_ENV)
    if not path:
        from istiopy.dataplane import _fastpath  # type: ignore[attr-defined]

        return _fastpath
    import sys

    if _MODULE in sys.modules:
        loaded = sys.modules[_MODULE]
        if loaded is None:  # hidden on purpose (tests of the fallback), as the normal import would see it
            raise ImportError(f"{_MODULE} is hidden (None in sys.modules)")
        return loaded
    spec = importlib.util.spec_from_file_location(_MODULE, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} (from ${SO_ENV})")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[_MODULE] = mod  # one instance per process (launch.py and fastpath.py share it)
    return mod
