"""Paths and types shared by the chart tests (a module of its own: every suite has a ``conftest``)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "charts"
GOLDEN = Path(__file__).resolve().parent / "golden"

Helm = Callable[..., subprocess.CompletedProcess[str]]
