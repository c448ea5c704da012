"""Fixtures for the CA tests: a real CA on disk, a config store with pods, and a real gRPC CA server."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ca_helpers import APP, CaHarness, make_store
from prometheus_client import CollectorRegistry

from istiopy.ca.auth import StaticTokenAuthenticator, TokenEntry
from istiopy.ca.server import serve
from istiopy.ca.service import CaConfig, CertificateAuthority, start_authority
from istiopy.mesh.store import ConfigStore


@pytest.fixture
async def ca(tmp_path: Path) -> CertificateAuthority:
    return await start_authority(CaConfig(root_dir=tmp_path / "root"))


@pytest.fixture
def store() -> ConfigStore:
    return make_store()


@pytest.fixture
async def harness(ca: CertificateAuthority, store: ConfigStore) -> AsyncIterator[CaHarness]:
    """CA server requiring client certificates (standalone mode) with token and bootstrap-cert auth.

    The token authenticator goes first: a bearer token is the more explicit credential when a caller
    presents both."""
    registry = CollectorRegistry()
    token = secrets.token_hex(16)
    servicer = ca.servicer(
        [StaticTokenAuthenticator({token: TokenEntry(APP)}), ca.client_cert_authenticator()], store, registry
    )
    serving = ca.issue_serving(["istiod.istio-system.svc"], ["127.0.0.1"])
    server, port = await serve(
        servicer, serving.served_chain_pem, serving.key_pem, ca.roots_pem, require_client_cert=True
    )
    h = CaHarness(ca, registry, port, {token: APP})
    try:
        yield h
    finally:
        for c in h.clients:
            await c.close()
        await server.stop(None)
