"""``ztunnel-py``'s entry point keeps Python's ``ssl`` (and the system OpenSSL) out of the C-path process.

Each case runs in a fresh interpreter: the decision is made once, before asyncio is imported.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from istiopy.dataplane import fastpath
from istiopy.dataplane.launch import requested_byte_path

PROBE = """
import sys
from istiopy.dataplane import launch
refused = launch.refuse_ssl_if_c_path(sys.argv[1:])
import asyncio  # imports ssl if it may
print("refused" if refused else "allowed", "ssl" in sys.modules)
try:
    import ssl
except ImportError as e:
    print("import ssl:", e)
"""


def _probe(*argv: str, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(
        [sys.executable, "-P", "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    return res.stdout


@pytest.mark.skipif(not fastpath.available(), reason="the C extension is not built")
def test_c_path_refuses_ssl_with_a_reason() -> None:
    out = _probe("--byte-path", "c")
    assert out.startswith("refused False\n"), out  # asyncio loaded without ssl
    assert "import ssl: ssl is not loaded by ztunnel-py on the C byte path" in out


def test_python_path_keeps_ssl() -> None:
    out = _probe("--byte-path=python")
    assert out.strip() == "allowed True", out


def test_byte_path_comes_from_the_flag_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ISTIOPY_BYTE_PATH", raising=False)
    assert requested_byte_path([]) == "c"
    assert requested_byte_path(["--byte-path", "Python"]) == "python"
    monkeypatch.setenv("ISTIOPY_BYTE_PATH", "python")
    assert requested_byte_path(["--log-level", "debug"]) == "python"
    assert requested_byte_path(["--byte-path=c"]) == "c"
