"""Rotation: refresh at half lifetime, backoff on failure, old cert kept until expiry, no failed handshake."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from pathlib import Path

import pytest
from ca_helpers import APP, OTHER, ZTUNNEL, CaHarness, pod
from cryptography import x509

from istiopy.api.ca_client import CaClientError, CertificateManager
from istiopy.api.identity import SpiffeId
from istiopy.api.tls import CertBundle, client_context, load_bundle, peer_identity, server_context
from istiopy.ca.service import CaConfig, CertificateAuthority
from istiopy.mesh.store import ConfigStore


class FakeTime:
    """Wall clock and sleep under test control; blocks for good after ``budget`` sleeps."""

    def __init__(self, budget: int) -> None:
        self.now = float(int(time.time()))
        self.sleeps: list[float] = []
        self.budget = budget
        self.hooks: list[tuple[int, object]] = []
        self.exhausted = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 3))
        if len(self.sleeps) > self.budget:
            self.exhausted.set()
            await asyncio.Event().wait()  # park the worker; the test cancels it
        self.now += seconds
        await asyncio.sleep(0)


async def test_refresh_at_half_backoff_and_old_cert_kept_until_expiry(tmp_path: Path) -> None:
    ft = FakeTime(budget=14)
    from istiopy.ca.authority import DirectoryRootStore, load_or_create_root

    material = await load_or_create_root(DirectoryRootStore(tmp_path / "root"), "cluster.local")
    ca = CertificateAuthority(CaConfig(), material, clock=ft.clock)
    failing = False
    fetches: list[float] = []
    held: list[tuple[float, int | None]] = []  # (time, serial of current cert) at every sleep

    async def fetch(ident: SpiffeId) -> CertBundle:
        fetches.append(ft.now)
        if failing:
            raise ConnectionError("CA unreachable")
        return ca.issue_workload(ident, dt.timedelta(seconds=100))

    mgr = CertificateManager(fetch, clock=ft.clock, sleep=ft.sleep)
    events: list[tuple[SpiffeId, int | None]] = []
    mgr.subscribe(lambda i, b: events.append((i, b.leaf.serial_number if b else None)))
    orig_sleep = ft.sleep

    async def observing_sleep(seconds: float) -> None:
        cur = mgr.current(APP)
        held.append((ft.now, cur.leaf.serial_number if cur else None))
        nonlocal failing
        if len(ft.sleeps) == 0:
            failing = True  # the first refresh (at half lifetime) will fail
        if len(ft.sleeps) == 12:
            failing = False  # CA is back
        await orig_sleep(seconds)

    mgr._sleep = observing_sleep
    t0 = ft.now
    first = await mgr.get(APP)
    assert first.refresh_at == t0 + 50
    await asyncio.wait_for(ft.exhausted.wait(), 30)
    await mgr.close()

    # 50 s to the refresh point, then 500 ms doubling; the wait is cut short to drop the cert at expiry
    # (t0+100), then backoff continues to the 150 s cap; then the CA recovers and a refresh is 50 s away.
    assert ft.sleeps[:14] == [50, 0.5, 1, 2, 4, 8, 16, 18.5, 32, 64, 128, 150, 150, 50]
    serial = first.leaf.serial_number
    recovered = t0 + 100 + 32 + 64 + 128 + 150 + 150  # the first fetch after the CA came back
    assert recovered in fetches
    before_expiry = [s for t, s in held if t < t0 + 100]
    after_expiry = [s for t, s in held if t0 + 100 <= t < recovered]
    after_recovery = [s for t, s in held if t >= recovered]
    assert before_expiry
    assert all(s == serial for s in before_expiry)  # old cert kept while failing
    assert after_expiry
    assert all(s is None for s in after_expiry)  # never served after expiry
    assert after_recovery[0] not in (None, serial)
    assert [s is None for _, s in events[:3]] == [False, True, False]  # issued, expired, re-issued


async def test_get_raises_when_first_fetch_fails() -> None:
    async def fetch(ident: SpiffeId) -> CertBundle:
        raise ConnectionError("down")

    ft = FakeTime(budget=3)
    mgr = CertificateManager(fetch, clock=ft.clock, sleep=ft.sleep)
    with pytest.raises(CaClientError, match=r"no certificate for .*: down"):
        await mgr.get(APP)
    await mgr.close()


@pytest.mark.slow
async def test_ten_second_ttl_rotates_without_a_failed_handshake(
    harness: CaHarness, store: ConfigStore
) -> None:
    """Both peers rotate 10 s certificates through the real CA while connections are made every 200 ms."""
    store.apply(pod("other-2", "default", "other", "node-a"))
    server_client = harness.client_with_cert(
        harness.ca.issue_workload(SpiffeId("cluster.local", "default", "x"))
    )
    server_client.token_source = lambda: next(iter(harness.tokens))  # authenticates as APP
    node_proxy = harness.bootstrap_client(ZTUNNEL, "node-a")

    server_mgr = CertificateManager(lambda i: server_client.fetch(i, ttl_seconds=10))
    client_mgr = CertificateManager(lambda i: node_proxy.fetch(i, ttl_seconds=10, impersonate=True))
    s_first = await server_mgr.get(APP)
    c_first = await client_mgr.get(OTHER)
    s_ctx, c_ctx = server_context(s_first), client_context(c_first)
    server_mgr.subscribe(lambda i, b: load_bundle(s_ctx, b) if b else None)
    client_mgr.subscribe(lambda i, b: load_bundle(c_ctx, b) if b else None)

    client_serials: set[int] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = writer.get_extra_info("ssl_object")
        assert peer_identity(tls) == OTHER
        client_serials.add(x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number)
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=s_ctx)
    port = server.sockets[0].getsockname()[1]
    server_serials: set[int] = set()
    failures: list[str] = []
    handshakes = 0
    try:
        deadline = max(s_first.not_after, c_first.not_after) + 2.5
        while time.time() < deadline:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=c_ctx, server_hostname=""
                )
                tls = writer.get_extra_info("ssl_object")
                assert peer_identity(tls) == APP
                server_serials.add(
                    x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
                )
                writer.write(b"hi\n")
                if await reader.readline() != b"hi\n":
                    failures.append("no echo")
                writer.close()
                handshakes += 1
            except (ssl.SSLError, ConnectionError) as e:
                failures.append(repr(e))
            await asyncio.sleep(0.2)
    finally:
        server.close()
        await server.wait_closed()
        await server_mgr.close()
        await client_mgr.close()
    assert failures == []
    assert handshakes > 30
    assert len(server_serials) >= 2
    assert len(client_serials) >= 2
    assert s_first.leaf.serial_number in server_serials
