"""The standalone operator tool: a bootstrap credential and a token it creates work against the real CA."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ca_helpers import APP, ZTUNNEL, make_store
from prometheus_client import CollectorRegistry

from istiopy.api.ca_client import CaClient
from istiopy.ca.__main__ import main
from istiopy.ca.auth import StaticTokenAuthenticator
from istiopy.ca.server import serve
from istiopy.ca.service import CaConfig, start_authority


async def test_cli_credentials_authenticate_to_the_ca(tmp_path: Path) -> None:
    root_dir, boot, tokens = tmp_path / "root", tmp_path / "boot", tmp_path / "tokens.yaml"
    await asyncio.to_thread(
        main, ["init", "--root-dir", str(root_dir), "--bundle-out", str(tmp_path / "b.pem")]
    )
    await asyncio.to_thread(
        main,
        [
            "bootstrap",
            "--root-dir",
            str(root_dir),
            "--identity",
            "istio-system/ztunnel",
            "--node",
            "node-a",
            "--out",
            str(boot),
        ],
    )
    await asyncio.to_thread(
        main,
        ["token", "--tokens-file", str(tokens), "--identity", "istio-system/ztunnel", "--node", "node-a"],
    )
    token = (await asyncio.to_thread(tokens.read_text)).split("token: ", 1)[1].split("\n", 1)[0]

    ca = await start_authority(CaConfig(root_dir=root_dir))
    assert (tmp_path / "b.pem").read_text() == ca.roots_pem
    servicer = ca.servicer(
        [StaticTokenAuthenticator(path=tokens), ca.client_cert_authenticator()],
        make_store(),
        CollectorRegistry(),
    )
    serving = ca.issue_serving()
    server, port = await serve(
        servicer, serving.served_chain_pem, serving.key_pem, ca.roots_pem, require_client_cert=True
    )
    roots = (boot / "root-cert.pem").read_text()
    cert = ((boot / "cert-chain.pem").read_text(), (boot / "key.pem").read_text())
    by_cert = CaClient.connect(f"127.0.0.1:{port}", roots, client_cert=cert)
    by_token = CaClient.connect(f"127.0.0.1:{port}", roots, client_cert=cert, token_source=lambda: token)
    try:
        assert (await by_cert.fetch(APP, impersonate=True)).identity == APP
        assert (await by_token.fetch(ZTUNNEL)).identity == ZTUNNEL
    finally:
        await by_cert.close()
        await by_token.close()
        await server.stop(None)
