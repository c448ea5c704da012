"""The README's "Testing your policies" example, as a user's test module would be written: the kit's pytest
plugin, ``MESH_CONFIG`` relative to the module, one mesh shared by the module's tests."""

from __future__ import annotations

import pytest

from istiopy.testing.mesh import Mesh

pytest_plugins = ["istiopy.testing.fixtures"]
pytestmark = [pytest.mark.envoy]

MESH_CONFIG = "../../examples"


def test_only_the_frontend_reaches_the_backend_through_the_waypoint(mesh: Mesh) -> None:
    r = mesh.pod("frontend/frontend").http("backend/backend", 8080, "/api/v1")
    assert r.status == 200
    assert r.via_waypoint
    assert r.json()["pod"].startswith("backend-v")
    # The admin API addressed directly (no Service, so no waypoint): ztunnel's L4 policy on the backend pods
    # lets only the frontend and the waypoint in.
    assert not mesh.pod("backend/admin-api").reaches("backend/backend-v1", 8080)
    assert mesh.pod("frontend/frontend").reaches("backend/backend-v1", 8080)


def test_the_admin_api_wants_a_token_and_the_operator_role(mesh: Mesh) -> None:
    r = mesh.pod("frontend/frontend").http(
        "backend/admin-api", 9090, "/admin/users", headers={"x-role": "operator"}
    )
    assert r.status == 403  # no JWT: no request principal
