"""Lifecycle with a private waypoint: certificate rotation (the launcher re-certifies a new key at half-life
and pushes it over its local SDS; the running Envoy serves it on 15008 without a restart, traffic keeps
flowing), then a graceful stop that lets a request in flight finish."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from cryptography import x509
from wp_helpers import service
from wp_mesh import WAYPOINT_ID, WaypointMesh, eventually

from istiopy.api.identity import identity_of

pytestmark = [pytest.mark.envoy, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def short_lived(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WaypointMesh]:
    m = WaypointMesh(tmp_path_factory.mktemp("rotation"), cert_ttl_seconds=6)
    try:
        await m.start()
        yield m
    finally:
        await m.stop()


async def served_certificate(wmesh: WaypointMesh) -> x509.Certificate:
    """The leaf the waypoint presents on a fresh TLS connection to 15008."""
    _, writer = await asyncio.open_connection(wmesh.waypoint_ip, 15008, ssl=wmesh.client_ctx())
    try:
        obj = writer.get_extra_info("ssl_object")
        assert isinstance(obj, ssl.SSLObject)
        der = obj.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)
    finally:
        writer.close()


async def test_rotation_without_restart(short_lived: WaypointMesh) -> None:
    wmesh = short_lived
    await wmesh.add_pod("rot-1", "rot")
    await wmesh.apply(service("rot", wmesh.vip(70)))
    target = f"{wmesh.vip(70)}:80"
    assert wmesh.launcher is not None
    assert wmesh.launcher.proc is not None
    pid = wmesh.launcher.proc.pid
    first = await served_certificate(wmesh)
    assert identity_of(first) == WAYPOINT_ID
    assert (await wmesh.request(target, "/")).status == 200

    async def rotated() -> bool:
        return (await served_certificate(wmesh)).serial_number != first.serial_number

    await eventually(rotated, timeout=15, what="a new certificate on 15008")
    second = await served_certificate(wmesh)
    assert identity_of(second) == WAYPOINT_ID
    assert second.not_valid_after_utc > first.not_valid_after_utc
    assert wmesh.launcher.proc.pid == pid  # same Envoy, no restart
    assert wmesh.launcher.sds.version >= 2
    assert (await wmesh.request(target, "/")).status == 200


async def test_graceful_stop_finishes_requests_in_flight(short_lived: WaypointMesh) -> None:
    """Runs last in this module: it stops the module's waypoint."""
    wmesh = short_lived
    assert wmesh.launcher is not None
    target = f"{wmesh.vip(70)}:80"
    wmesh.launcher.opts.drain_seconds = 1.5
    slow = asyncio.create_task(wmesh.request(target, "/?delay=0.6"))
    await asyncio.sleep(0.2)  # the request is at the backend now
    await wmesh.launcher.stop()
    r = await slow
    assert r.status == 200
    with pytest.raises(OSError):
        await served_certificate(wmesh)  # and nothing listens any more
