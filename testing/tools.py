"""Binaries the test suites build once into the version-keyed cache (``tools/*/build.sh``).

Each build script prints where its binary lives (``--print-path``); ``make test`` runs the scripts first,
so a missing binary here means the set-up was skipped, and the error says which script builds it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from istiopy.testing.cluster import cache_dir


def built_tool(script: Path) -> Path:
    """The binary ``script`` builds (``bash script --print-path``), which must exist and be executable."""
    out = subprocess.run(
        ["bash", str(script), "--print-path"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "ISTIOPY_CACHE": str(cache_dir())},
    )
    path = Path(out.stdout.strip())
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is missing: run {script} (make test does)")
    return path
