"""Build hooks that pyproject.toml cannot express: protobuf generation (and, later, C extensions)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _generate_protos() -> None:
    spec = importlib.util.spec_from_file_location("_genproto", ROOT / "api" / "genproto.py")
    assert spec and spec.loader
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


setup(packages=_packages(), cmdclass={"build_py": BuildPy}, package_data={"istiopy.api.gen": ["*.pyi", "py.typed"]})
