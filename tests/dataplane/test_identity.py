"""SecretManager: per-local-workload certificates, prefetch, rotation, dump states, TLS contexts."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Callable

import pytest

from istiopy.api.identity import SpiffeId
from istiopy.api.tls import CertBundle, peer_identity
from istiopy.ca.authority import generate_root
from istiopy.ca.service import CaConfig, CertificateAuthority
from istiopy.dataplane.identity import SecretManager

A = SpiffeId("cluster.local", "ns1", "a")
B = SpiffeId("cluster.local", "ns1", "b")


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority(CaConfig(), generate_root("cluster.local"))


async def _until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(30):
        while not cond():  # noqa: ASYNC110 - polls state owned by background tasks
            await asyncio.sleep(0.02)


async def test_prefetch_shares_identities_and_forgets_unused(authority: CertificateAuthority) -> None:
    asked: list[SpiffeId] = []

    async def fetch(ident: SpiffeId) -> CertBundle:
        asked.append(ident)
        return authority.issue_workload(ident)

    sm = SecretManager(fetch)
    try:
        sm.set_local([("uid-1", A), ("uid-2", A), ("uid-3", B)])
        await _until(lambda: sm.current(A) is not None and sm.current(B) is not None)
        assert sorted(asked) == [A, B]  # two pods with one identity: one certificate
        bundle = await sm.fetch(A)
        assert bundle.identity == A
        assert "BEGIN PRIVATE KEY" in bundle.key_pem
        assert bundle.roots_pem == authority.roots_pem
        dump = {d["identity"]: d for d in sm.dump()}
        assert dump[str(A)]["state"] == "Available"
        chain = dump[str(A)]["certChain"]
        assert isinstance(chain, list)
        assert chain[0]["pem"] == bundle.chain_pem[0]
        assert chain[0]["expirationTime"].endswith("Z")
        sm.remove_local("uid-3")
        await _until(lambda: sm.current(B) is None)
        assert str(B) not in {d["identity"] for d in sm.dump()}
        sm.remove_local("uid-1")
        await asyncio.sleep(0.05)
        assert sm.current(A) is not None  # uid-2 still needs it
    finally:
        await sm.close()


async def test_rotation_at_half_life_reloads_contexts(authority: CertificateAuthority) -> None:
    serials: list[int] = []

    async def fetch(ident: SpiffeId) -> CertBundle:
        b = authority.issue_workload(ident, ttl=dt.timedelta(seconds=3))
        serials.append(b.leaf.serial_number)
        return b

    sm = SecretManager(fetch)
    try:
        server_ctx = await sm.server_context(A)
        client_ctx = await sm.client_context(A)
        assert server_ctx.verify_mode == ssl.CERT_REQUIRED
        assert server_ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        first = sm.current(A)
        assert first is not None
        # Half of 3 s later the manager fetches a new certificate and the same context objects carry it.
        await _until(lambda: len(serials) >= 2)
        assert sm.current(A) is not None
        assert sm.current(A).leaf.serial_number == serials[-1] != first.leaf.serial_number  # type: ignore[union-attr]
        assert await sm.server_context(A) is server_ctx
        assert await sm.client_context(A) is client_ctx
        # A real handshake with the reloaded contexts proves both sides present the rotated identity.
        got: list[SpiffeId] = []

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            got.append(peer_identity(w.get_extra_info("ssl_object")))
            w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = srv.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="")
        assert peer_identity(w.get_extra_info("ssl_object")) == A
        await r.read()
        w.close()
        srv.close()
        await srv.wait_closed()
        assert got == [A]
    finally:
        await sm.close()


async def test_ca_failure_shows_unavailable_and_get_raises() -> None:
    async def fetch(ident: SpiffeId) -> CertBundle:
        raise RuntimeError("CA is down")

    sm = SecretManager(fetch, initial_backoff=0.05, max_backoff=0.1)
    try:
        assert sm.dump() == []
        sm.set_local([("uid-1", A)])
        assert sm.dump()[0]["state"] in ("Initializing", "Unavailable: CA is down")
        with pytest.raises(Exception, match="CA is down"):
            await sm.fetch(A)
        assert sm.dump() == [{"identity": str(A), "state": "Unavailable: CA is down", "certChain": []}]
    finally:
        await sm.close()
