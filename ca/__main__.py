"""Operator tool for standalone mode: ``python -m istiopy.ca <command>``.

Standalone node proxies need a credential before they can ask the CA for anything; this tool creates
them from the same root directory istiod uses:

* ``init --root-dir D [--key-type rsa-2048] [--bundle-out F]`` - create (or load) the root, print its
  subject and fingerprint, optionally write the trust bundle;
* ``bootstrap --root-dir D --identity ns/sa --node N --out DIR`` - a bootstrap client certificate
  (``cert-chain.pem``, ``key.pem``, ``root-cert.pem``) binding a node proxy to its node, for ztunnel-py's
  ``--ca-client-cert``/``--ca-client-key``;
* ``token --tokens-file F --identity ns/sa [--node N]`` - add a random bearer token to the token file the
  CA's ``StaticTokenAuthenticator`` reads, and print it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import hashes

from istiopy.api.identity import DEFAULT_TRUST_DOMAIN, SpiffeId
from istiopy.ca.authority import KeyType
from istiopy.ca.bundle import FileTrustBundlePublisher
from istiopy.ca.service import CaConfig, start_authority


def _identity(value: str, trust_domain: str) -> SpiffeId:
    if value.startswith("spiffe://"):
        return SpiffeId.parse(value)
    ns, _, sa = value.partition("/")
    return SpiffeId(trust_domain, ns, sa)


def _write(path: Path, data: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)


async def _init(args: argparse.Namespace) -> int:
    pubs = [FileTrustBundlePublisher(args.bundle_out)] if args.bundle_out else []
    ca = await start_authority(
        CaConfig(trust_domain=args.trust_domain, root_dir=args.root_dir, key_type=KeyType(args.key_type)),
        publishers=pubs,
    )
    root = ca.material.root
    print(f"root: {root.subject.rfc4514_string()}  sha256 {root.fingerprint(hashes.SHA256()).hex()}")
    print(f"valid until {root.not_valid_after_utc:%Y-%m-%d}")
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    ca = asyncio.run(start_authority(CaConfig(trust_domain=args.trust_domain, root_dir=args.root_dir)))
    ident = _identity(args.identity, args.trust_domain)
    bundle = ca.issue_bootstrap(ident, args.node, dt.timedelta(days=args.days))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "cert-chain.pem", bundle.served_chain_pem, 0o644)
    _write(out / "key.pem", bundle.key_pem, 0o600)
    _write(out / "root-cert.pem", bundle.roots_pem, 0o644)
    print(f"bootstrap credential for {ident} on node {args.node} in {out} (valid {args.days} days)")
    return 0


def _token(args: argparse.Namespace) -> int:
    path = Path(args.tokens_file)
    doc = (yaml.safe_load(path.read_text()) if path.exists() else None) or {}
    ident = _identity(args.identity, args.trust_domain)
    token = secrets.token_urlsafe(32)
    entry = {"token": token, "identity": ident.uri}
    if args.node:
        entry["node"] = args.node
    doc.setdefault("tokens", []).append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write(path, yaml.safe_dump(doc, sort_keys=False), 0o600)
    print(token)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m istiopy.ca", description="standalone CA credentials")
    p.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="create or load the root")
    i.add_argument("--root-dir", type=Path, required=True)
    i.add_argument("--key-type", choices=[k.value for k in KeyType], default=KeyType.EC_P256.value)
    i.add_argument("--bundle-out", type=Path)
    b = sub.add_parser("bootstrap", help="issue a node proxy bootstrap certificate")
    b.add_argument("--root-dir", type=Path, required=True)
    b.add_argument("--identity", required=True, help="ns/sa or spiffe://...")
    b.add_argument("--node", required=True)
    b.add_argument("--days", type=int, default=365)
    b.add_argument("--out", required=True)
    t = sub.add_parser("token", help="add a bearer token to a token file")
    t.add_argument("--tokens-file", required=True)
    t.add_argument("--identity", required=True, help="ns/sa or spiffe://...")
    t.add_argument("--node", default="")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "init":
        return asyncio.run(_init(args))
    if args.cmd == "bootstrap":
        return _bootstrap(args)
    return _token(args)


if __name__ == "__main__":
    sys.exit(main())
