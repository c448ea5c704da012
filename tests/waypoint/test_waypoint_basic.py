"""The core path: HBONE in -> real Envoy waypoint (config from our xDS server, certificate from our CA over
the launcher's local SDS) -> HBONE out to the pod; plus envoy --mode validate of the generated config."""

from __future__ import annotations

import pytest
from conftest import WaypointMesh
from wp_helpers import service

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]


async def test_http_through_waypoint(wmesh: WaypointMesh) -> None:
    web1 = await wmesh.add_pod("web-1", "web")
    await wmesh.apply(service("web", wmesh.vip(10)))
    resp = await wmesh.request(f"{wmesh.vip(10)}:80", "/hello")
    assert resp.status == 200, resp
    assert resp.text == "web-1 /hello"
    assert web1.hits == 1
    assert not wmesh.nacks
