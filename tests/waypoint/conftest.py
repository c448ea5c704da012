"""Fixtures of the waypoint suite (the kit lives in ``wp_mesh``, importable by test modules by name)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from wp_mesh import WaypointMesh


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def wmesh(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WaypointMesh]:
    """One real waypoint (CA, xDS over mTLS, launcher + Envoy) per test module, torn down on failure."""
    m = WaypointMesh(tmp_path_factory.mktemp("waypoint"))
    try:
        await m.start()
        yield m
    finally:
        await m.stop()
