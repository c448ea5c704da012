"""Helpers for the chart tests: the real helm binary (built with the test cluster's tools) on the charts.

``helm lint`` and ``helm template`` need no cluster, so those tests run without one; helm's cache/config dirs
go to a temp dir so a developer's own helm repositories and plugins never leak into the results.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helm_helpers import ROOT, Helm

from istiopy.testing.cluster import find_binaries


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    """helm v3 from ``make k8s-tools``; MissingBinariesError says how to build it."""
    return find_binaries() / "helm"


@pytest.fixture(scope="session")
def helm(helm_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Run helm offline (lint/template); returns the CompletedProcess, never raises on a non-zero exit."""
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    env.pop("KUBECONFIG", None)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(helm_bin), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=120,
            check=False,
        )

    return run
