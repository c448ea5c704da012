"""Build hooks that pyproject.toml cannot express: protobuf generation (and, later, C extensions)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _generate_protos() -> None:
    spec = importlib.util.spec_from_file_location("_genproto", ROOT / "api" / "genproto.py")
    assert spec
    assert spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.generate()


class BuildPy(build_py):
    """Generate the wire layer's protobuf modules before copying packages."""

    def run(self) -> None:
        _generate_protos()
        super().run()


def _packages() -> list[str]:
    """Every package below each ``package-dir`` root (auto-discovery cannot follow the mapping)."""
    import tomllib

    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found: list[str] = []
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in sorted(base.rglob("__init__.py")):
            rel = init.parent.relative_to(base)
            if any(part.startswith((".", "_")) and part != "__pycache__" for part in rel.parts):
                continue
            if "__pycache__" in rel.parts:
                continue
            found.append(".".join([name, *rel.parts]) if rel.parts else name)
    return sorted(set(found))


def _fastpath_extension() -> Extension:
    """ztunnel-py's C extension (dataplane/_c): the byte path, the control-plane TLS client (memtls.c) and
    the key/CSR/chain operations (pki.c), all on one OpenSSL. ISTIOPY_FASTPATH_SANITIZE=1 builds it with
    ASan+UBSan.

    It links a private, static OpenSSL (tools/openssl/build.sh: a newer one with the AVX-512 AES-GCM code,
    issue 8) from ``$ISTIOPY_OPENSSL_DIR`` (default: that script's cache dir) when it is built, with its
    symbols hidden (--exclude-libs), so a process that also loads the ssl module keeps the system libssl.so
    beside it, as the cryptography wheel does (the C-path node proxy does not load ssl at all). Otherwise,
    and for the sanitizer build, it links the system OpenSSL (libssl-dev)."""
    import re

    flags = ["-O2", "-g", "-Wall", "-Wextra", "-Werror=implicit-function-declaration", "-std=gnu11"]
    link: list[str] = []
    libraries = ["ssl", "crypto", "nghttp2", "pthread"]
    include_dirs: list[str] = []
    objects: list[str] = []
    if os.environ.get("ISTIOPY_FASTPATH_SANITIZE") == "1":
        flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined"]
        flags += ["-Wall", "-Wextra", "-Werror"]
        link = ["-fsanitize=address,undefined"]
    else:
        script = ROOT / "tools" / "openssl" / "build.sh"
        found = re.search(r"^OPENSSL_VERSION=(\S+)", script.read_text(), re.M) if script.exists() else None
        cache = os.environ.get("ISTIOPY_CACHE") or os.path.expanduser("~/.cache/istiopy")
        default = os.path.join(cache, "openssl", found.group(1)) if found else ""
        ossl = os.environ.get("ISTIOPY_OPENSSL_DIR") or default
        static = [os.path.join(ossl, "lib", n) for n in ("libssl.a", "libcrypto.a")]
        if ossl and all(os.path.isfile(a) for a in static):
            include_dirs = [os.path.join(ossl, "include")]
            objects = static  # after the extension's objects: libssl before libcrypto
            libraries = ["nghttp2", "pthread", "dl"]
            link = ["-Wl,--exclude-libs,ALL", "-Wl,--gc-sections"]  # its per-function sections
        elif not getattr(_fastpath_extension, "warned", False):
            _fastpath_extension.warned = True  # type: ignore[attr-defined]
            print(
                f"WARNING: no static OpenSSL in {ossl or '(unset)'} (make setup builds it: "
                "tools/openssl/build.sh); the C byte path links the system OpenSSL (slower AES-GCM)"
            )
    return Extension(
        "istiopy.dataplane._fastpath",
        sources=[
            "dataplane/_c/engine.c",
            "dataplane/_c/module.c",
            "dataplane/_c/memtls.c",
            "dataplane/_c/pki.c",
        ],
        depends=["dataplane/_c/engine.h", "dataplane/_c/memtls.h", *objects],
        include_dirs=include_dirs,
        extra_objects=objects,
        libraries=libraries,
        extra_compile_args=flags,
        extra_link_args=link,
    )


class OptionalBuildExt(build_ext):
    """A missing compiler or header must not break ``pip install -e .`` for everyone: warn and let
    istiopy.dataplane.fastpath fall back to the pure-Python byte path and istiopy.dataplane.pki to the
    ``cryptography`` backend (tests/fastpath and tests/dataplane/test_pki.py assert the extension
    import, so ``make test`` still fails loudly)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # any build failure degrades to the Python path
            self._warn(e)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            self._warn(e)

    def copy_file(self, infile: str, outfile: str, *args: object, **kwargs: object) -> tuple[str, bool]:  # type: ignore[override]
        """Put the built .so in place by rename: concurrent test runs that have the old one mapped keep
        their copy (an in-place overwrite would crash them with SIGBUS)."""
        import shutil

        tmp = f"{outfile}.tmp-{os.getpid()}"
        shutil.copy2(infile, tmp)
        os.replace(tmp, outfile)
        return outfile, True

    @staticmethod
    def _warn(e: Exception) -> None:
        print(
            f"WARNING: an istiopy C extension was not built ({e}); ztunnel-py falls back to Python "
            "(byte path: pure Python; certificates: the cryptography backend)"
        )


setup(
    packages=_packages(),
    cmdclass={"build_py": BuildPy, "build_ext": OptionalBuildExt},
    package_data={"istiopy.api.gen": ["*.pyi", "py.typed"]},
    ext_modules=[_fastpath_extension()],
)
