"""The ztunnel-py suites again, with the C byte path: the twin of the normal run (which uses the Python path).

Why a subprocess instead of parametrizing every fixture: the suites build ``ProxyConfig``/``Ztunnel`` (and
the ``ztunnel-py`` CLI) in many places; ``ISTIOPY_BYTE_PATH=c`` reaches all of them, unchanged, so the very
same tests assert the same behaviour (policy, metrics, half-close, resets, pooling) over the C engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from istiopy.dataplane import fastpath

ROOT = Path(__file__).resolve().parents[2]
SUITES = [
    "tests/dataplane/test_proxy.py",
    "tests/dataplane/test_proxy_integration.py",
    "tests/dataplane/test_proxy_waypoint.py",  # through a real Envoy waypoint
    "tests/dataplane/test_ztunnel_cli.py",
    "tests/dataplane/test_ztunnel_xds.py",
    "tests/dataplane/test_capture.py",
]


@pytest.mark.slow
@pytest.mark.netns
def test_ztunnel_suites_pass_on_the_c_byte_path() -> None:
    assert fastpath.available(), fastpath.import_error()
    if os.geteuid() != 0:
        pytest.skip("the ztunnel suites need root (network namespaces)")
    suites = [s for s in SUITES if (ROOT / s).exists()]
    if "asan" in os.environ.get("LD_PRELOAD", ""):  # make test-asan: Envoy cannot run with ASan preloaded
        suites = [s for s in suites if "waypoint" not in s]
    env = dict(os.environ, **{fastpath.BYTE_PATH_ENV: "c"})
    res = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *suites],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout
