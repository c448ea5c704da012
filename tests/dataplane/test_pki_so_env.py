"""``$ISTIOPY_PKI_SO``: the node proxy's PKI extension loaded from another build (``make test-asan`` points
it at the sanitizer build), in a fresh interpreter each time so the normal build is not already loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import istiopy.dataplane

CHILD = r"""
import json, sys
from istiopy.dataplane import pki
from istiopy.api.pki import CryptographyBackend
b = pki.backend()
out = {"backend": type(b).__name__}
if isinstance(b, pki.OpenSslBackend):
    from istiopy.dataplane import _pki
    key, csr = b.new_key_csr("spiffe://cluster.local/ns/ns1/sa/a")
    out.update(file=b._c.__file__, same=_pki is b._c, key=key.startswith("-----BEGIN"),
               csr=csr.startswith("-----BEGIN CERTIFICATE REQUEST-----"))
print(json.dumps(out))
"""


def run_child(so: str) -> dict[str, object]:
    env = {**os.environ, "ISTIOPY_PKI_SO": so}
    out = subprocess.run(
        [sys.executable, "-P", "-c", CHILD], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def built_pki() -> Path:
    found = sorted(Path(istiopy.dataplane.__file__).parent.glob("_pki*.so"))
    assert found, "istiopy.dataplane._pki is not built (setup.py build_ext --inplace)"
    return found[0]


def test_pki_so_names_the_build_that_is_loaded(tmp_path: Path) -> None:
    copy = tmp_path / "_pki.so"
    shutil.copy2(built_pki(), copy)
    assert run_child(str(copy)) == {
        "backend": "OpenSslBackend",
        "file": str(copy),
        "same": True,  # later ``from istiopy.dataplane import _pki`` gets that build too
        "key": True,
        "csr": True,
    }


def test_pki_so_that_does_not_load_falls_back_to_cryptography(tmp_path: Path) -> None:
    assert run_child(str(tmp_path / "missing.so")) == {"backend": "CryptographyBackend"}
