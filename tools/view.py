"""Build ``.build/view/istiopy``: the import package laid out as Python expects it on disk.

The root folders are mapped onto ``istiopy.*`` by setuptools' ``package-dir``; the editable install resolves
that at run time with an import hook, but static tools (mypy, import-linter) walk directories. This view is
a tree of real folders holding symlinks to the real files (grimp does not follow folder links), rebuilt on
every lint run, so the tools see ``istiopy/xds/...`` while the files stay where the design card puts them.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(dest: Path = ROOT / ".build" / "view") -> Path:
    mapping = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    if dest.exists():
        shutil.rmtree(dest)
    top = dest / "istiopy"
    top.mkdir(parents=True)
    for name, folder in mapping.items():
        target = top.joinpath(*name.split(".")[1:])
        src = ROOT / folder
        for f in src.rglob("*"):
            if "__pycache__" in f.parts or not (f.suffix in {".py", ".pyi"} or f.name == "py.typed"):
                continue
            rel = f.relative_to(src)
            if name == "istiopy" and len(rel.parts) > 1:
                continue
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.symlink_to(f)
    return dest


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / ".build" / "view"))
