"""End-to-end scenarios: the whole mesh (``istiopy.testing.mesh.Mesh``) built from the YAML a user would
``kubectl apply``, one mesh per module (bringing one up costs a few seconds on 2 cores)."""

from __future__ import annotations

import pytest

from istiopy.testing.mesh import requirements_missing


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    why = requirements_missing()
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.netns)
            item.add_marker(pytest.mark.slow)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))
