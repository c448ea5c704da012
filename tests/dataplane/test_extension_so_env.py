"""``$ISTIOPY_FASTPATH_SO``: the node proxy's C extension loaded from another build (``make test-asan``
points it at the sanitizer build), for the byte path and the PKI backend alike, in a fresh interpreter each
time so the normal build is not already loaded."""

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
from istiopy.dataplane import fastpath, pki
b = pki.backend()
out = {"backend": type(b).__name__, "byte_path": fastpath.available()}
if isinstance(b, pki.OpenSslBackend):
    key, csr = b.new_key_csr("spiffe://cluster.local/ns/ns1/sa/a")
    out.update(file=b._c.__file__, same=fastpath._ext is b._c, key=key.startswith("-----BEGIN"),
               csr=csr.startswith("-----BEGIN CERTIFICATE REQUEST-----"))
print(json.dumps(out))
"""


def run_child(so: str) -> dict[str, object]:
    env = {**os.environ, "ISTIOPY_FASTPATH_SO": so}
    out = subprocess.run(
        [sys.executable, "-P", "-c", CHILD], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def built_extension() -> Path:
    found = sorted(Path(istiopy.dataplane.__file__).parent.glob("_fastpath*.so"))
    assert found, "istiopy.dataplane._fastpath is not built (setup.py build_ext --inplace)"
    return found[0]


def test_so_names_the_build_both_the_byte_path_and_pki_use(tmp_path: Path) -> None:
    copy = tmp_path / "_fastpath.so"
    shutil.copy2(built_extension(), copy)
    assert run_child(str(copy)) == {
        "backend": "OpenSslBackend",
        "byte_path": True,
        "file": str(copy),
        "same": True,  # one instance of the extension: one OpenSSL in the process
        "key": True,
        "csr": True,
    }


def test_so_that_does_not_load_falls_back_to_python_and_cryptography(tmp_path: Path) -> None:
    assert run_child(str(tmp_path / "missing.so")) == {"backend": "CryptographyBackend", "byte_path": False}
