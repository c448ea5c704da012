"""Fixtures for the operator against the session's real kube-apiserver (``k8s_cluster`` in tests/conftest.py).

Each test gets its own operator in the test's event loop and its own namespaces; the CRDs are installed once.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from op_helpers import RunningOperator, eventually, install_crds, new_namespace

from istiopy.testing.cluster import TestCluster


@pytest.fixture(scope="session")
def k8s(k8s_cluster: TestCluster) -> TestCluster:
    """The session cluster with our CRDs installed and the control-plane namespace present."""
    install_crds(k8s_cluster)
    k8s_cluster.kubectl("create", "namespace", "istio-system", check=False)
    return k8s_cluster


@pytest.fixture
def operator(k8s: TestCluster) -> Iterator[RunningOperator]:
    with RunningOperator(k8s) as running:
        eventually(lambda: running.is_leader, what="the only operator to lead")
        yield running


@pytest.fixture
def ns(k8s: TestCluster) -> Iterator[str]:
    name = new_namespace(k8s)
    yield name
    k8s.kubectl("delete", "namespace", name, "--wait=false", check=False)
