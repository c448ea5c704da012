"""pytest fixtures for testing your mesh policies with ``istiopy.testing.mesh.Mesh`` (public testing kit).

Enable in your ``conftest.py``::

    pytest_plugins = ["istiopy.testing.fixtures"]

Fixtures:

* ``mesh_factory`` - call it with a config directory (or ``documents=`` YAML text) to get a started
  :class:`~istiopy.testing.mesh.Mesh`; every mesh it made is torn down when the test ends, pass or fail.
  Tests using it are skipped with the reason when the machine cannot run a mesh (not root, no iptables).
* ``mesh`` - one mesh per module from the module's ``MESH_CONFIG`` (a path, relative to the module) or
  ``MESH_DOCUMENTS`` (YAML text) attribute: bringing a mesh up takes seconds, so share it between the
  tests of a module and let each test ``mesh.apply(...)`` / ``mesh.remove(...)`` its own policies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from istiopy.testing.mesh import Mesh, requirements_missing

__all__ = ["mesh", "mesh_factory"]


def _require() -> None:
    why = requirements_missing()
    if why:
        pytest.skip(f"istiopy mesh {why}")


@pytest.fixture
def mesh_factory() -> Iterator[Callable[..., Mesh]]:
    made: list[Mesh] = []

    def make(config: str | Path | None = None, **kwargs: Any) -> Mesh:
        _require()
        m = Mesh(config, **kwargs)
        made.append(m)
        return m.__enter__()

    try:
        yield make
    finally:
        for m in reversed(made):
            m.close()


@pytest.fixture(scope="module")
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    _require()
    module = request.module
    config = getattr(module, "MESH_CONFIG", None)
    documents = getattr(module, "MESH_DOCUMENTS", None)
    if config is None and documents is None:
        raise pytest.UsageError(f"{module.__name__}: set MESH_CONFIG (a path) or MESH_DOCUMENTS (YAML text)")
    if config is not None and not Path(config).is_absolute():
        config = Path(str(request.path)).parent / config  # relative to the test module
    with Mesh(config, documents=documents) as m:
        yield m
