"""Suite-wide fixtures for tests that build real network namespaces (marker ``netns``).

Only netns-related fixtures live here; each topology is unique to the test (names carry the pid and a
counter, and the fabric is private), so concurrent runs on one machine cannot collide.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from istiopy.testing.certs import TestCA
from istiopy.testing.netns import Topology


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@pytest.fixture
def topology() -> Iterator[Topology]:
    """An empty started Topology (add nodes and pods in the test); torn down even if the test fails."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    with Topology() as topo:
        yield topo


@pytest.fixture(scope="session")
def mesh_ca() -> TestCA:
    """A throwaway mesh root that issues SPIFFE workload certificates (real X.509, real TLS)."""
    return TestCA()
