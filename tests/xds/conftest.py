"""Fixtures of the xDS suite (helpers live in ``xds_harness``, importable by test modules)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from xds_harness import Harness, start_harness, stop_harness


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = await start_harness()
    try:
        yield h
    finally:
        await stop_harness(h)
        await asyncio.sleep(0)
