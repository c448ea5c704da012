"""Suite-wide fixtures: real network namespaces (marker ``netns``) and the real test cluster (``k8s``).

Each netns topology is unique to the test (names carry the pid and a counter, and the fabric is private), so
concurrent runs on one machine cannot collide. The Kubernetes cluster is one per session, shared by every
suite that needs one (``tests/k8s``, ``tests/operator``): start-up costs several seconds on 2 cores, and
tests isolate themselves by using their own namespaces; tests that break a cluster on purpose (restarts)
start their own.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from istiopy.testing.certs import TestCA
from istiopy.testing.netns import Topology

if TYPE_CHECKING:
    from istiopy.testing.cluster import TestCluster
    from istiopy.testing.kubelet import KubeletStandIn


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


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[TestCluster]:
    """A running cluster; raises MissingBinariesError (run `make k8s-tools`) if the binaries are absent."""
    from istiopy.testing.cluster import TestCluster

    with TestCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def k8s_kubelet(k8s_cluster: TestCluster) -> Iterator[KubeletStandIn]:
    """The kubelet stand-in on node `node-0` of the session cluster (it also schedules pods there)."""
    from istiopy.testing.kubelet import KubeletStandIn

    with KubeletStandIn(k8s_cluster.kubeconfig, "node-0") as kubelet:
        yield kubelet
