"""Fixtures for tests against the real test cluster (kube-apiserver + etcd + controller-manager).

One cluster per session: start-up costs several seconds on 2 cores, and tests isolate themselves by
using their own namespaces. Tests that break the cluster on purpose (restarts) start their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from istiopy.testing.cluster import TestCluster
from istiopy.testing.kubelet import KubeletStandIn


@pytest.fixture(scope="session")
def k8s_cluster() -> Iterator[TestCluster]:
    """A running cluster; raises MissingBinariesError (run `make k8s-tools`) if the binaries are absent."""
    with TestCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def k8s_kubelet(k8s_cluster: TestCluster) -> Iterator[KubeletStandIn]:
    """The kubelet stand-in on node `node-0` of the session cluster (it also schedules pods there)."""
    with KubeletStandIn(k8s_cluster.kubeconfig, "node-0") as kubelet:
        yield kubelet
