"""The byte paths share ``tunnel``: the C path's node proxy never loads the Python HBONE stack, and both
paths hand around the very same classes."""

from __future__ import annotations

import json
import subprocess
import sys

from istiopy.dataplane import fastpath, hbone, tunnel

CHILD = r"""
import json, sys
import istiopy.dataplane.cli
from istiopy.dataplane.proxy import ProxyConfig
print(json.dumps({
    "hbone": "istiopy.dataplane.hbone" in sys.modules,
    "tunnel": "istiopy.dataplane.tunnel" in sys.modules,
    "default": ProxyConfig().byte_path,
}))
"""


def test_node_proxy_on_the_c_path_does_not_import_hbone() -> None:
    out = subprocess.run(
        [sys.executable, "-P", "-c", CHILD],
        env={"ISTIOPY_BYTE_PATH": "c", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout) == {"hbone": False, "tunnel": True, "default": "c"}


def test_hbone_and_fastpath_use_the_shared_types() -> None:
    for name in tunnel.__all__:
        assert getattr(hbone, name) is getattr(tunnel, name), name
    assert fastpath.TcpStream is tunnel.TcpStream
    assert fastpath.RelayResult is tunnel.RelayResult
    headers = dict(tunnel.hbone_headers(("10.0.0.4", 51234), host="svc"))
    assert headers["forwarded"] == 'for="10.0.0.4:51234";host=svc'
    version, trace, span, flags = headers["traceparent"].split("-")
    assert (version, len(trace), len(span), flags) == ("00", 32, 16, "00")
    int(trace + span, 16)  # hex
