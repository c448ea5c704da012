"""The standalone commands of ``istiod-py``: ``serve`` flags, ``bootstrap-node`` and ``up``.

Kept apart from ``cli.py`` (whose parser other modes extend too) so each mode's flags live with the code
that reads them.

``up`` brings a whole mesh up on this machine: pods as network namespaces, ztunnel-py processes, waypoint
Envoys. That machinery is the public testing kit (``istiopy.testing.up``), which sits *above* istiod in the
layering (it starts istiod), so ``up`` hands over to it by ``exec`` of ``python -m istiopy.testing.up``
rather than importing it: one process, same signals, and the import contract stays one-way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from istiopy.istiod.wiring import DEFAULT_STATE_DIR, IstiodOptions
from istiopy.istiod.wiring import serve as serve_istiod

__all__ = ["add_commands", "add_serve_flags", "exec_up", "serve"]

log = logging.getLogger("istiopy.istiod")


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def add_serve_flags(serve: argparse.ArgumentParser) -> None:
    g = serve.add_argument_group("standalone serving")
    g.add_argument(
        "--extra-config-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="more YAML to load and watch into the same model (repeatable)",
    )
    g.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="CA root, trust bundle (root-cert.pem), token file (default: %(default)s)",
    )
    g.add_argument("--listen-host", default="127.0.0.1", help="address of every port (default: %(default)s)")
    g.add_argument("--xds-port", type=_port, default=15012, help="TLS xDS + CA (default: %(default)s)")
    g.add_argument(
        "--plaintext-port",
        type=_port,
        default=None,
        help="also serve plaintext xDS here (15010 upstream; off unless given; no identities)",
    )
    g.add_argument(
        "--monitoring-port", type=_port, default=15014, help="/metrics, /debug (default: %(default)s)"
    )
    g.add_argument(
        "--allow-tokens",
        action="store_true",
        help="accept bearer tokens from <state-dir>/tokens.yaml; 15012 then asks for no client certificate",
    )


def options_from(args: argparse.Namespace) -> IstiodOptions:
    return IstiodOptions(
        config_dirs=[args.config_dir, *args.extra_config_dir],
        state_dir=args.state_dir,
        namespace=args.namespace,
        host=args.listen_host,
        tls_port=args.xds_port,
        plaintext_port=args.plaintext_port,
        monitoring_port=args.monitoring_port,
        allow_tokens=args.allow_tokens,
        serving_ips=sorted({"127.0.0.1", args.listen_host} - {"0.0.0.0", "::"}),
    )


def serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM/SIGINT; a port already in use is one line, not a traceback."""
    for extra in args.extra_config_dir:
        if not Path(extra).exists():
            print(f"istiod-py: error: --extra-config-dir {extra}: no such file or directory", file=sys.stderr)
            return 2
    options = options_from(args)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve_istiod(options)

    try:
        asyncio.run(main())
    except RuntimeError as e:  # grpc: "Failed to bind to address"
        print(f"istiod-py: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"istiod-py: error: {e}", file=sys.stderr)
        return 1
    log.info("control plane stopped")
    return 0


def cmd_bootstrap_node(args: argparse.Namespace) -> int:
    """A node proxy's CA/xDS client credential from the root ``serve`` uses (``python -m istiopy.ca`` too)."""
    from istiopy.api.identity import SpiffeId
    from istiopy.ca.service import CaConfig, start_authority

    root = args.state_dir / "ca"
    if not root.exists():
        print(
            f"istiod-py: note: no CA root in {root} yet; creating it (serve will reuse it)", file=sys.stderr
        )
    ca = asyncio.run(start_authority(CaConfig(root_dir=root)))
    ns, _, sa = args.identity.partition("/")
    ident = SpiffeId(ca.config.trust_domain, ns, sa)
    bundle = ca.issue_bootstrap(ident, args.node, dt.timedelta(days=args.days))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text, mode in (
        ("cert-chain.pem", bundle.full_chain_pem, 0o644),
        ("key.pem", bundle.key_pem, 0o600),
        ("root-cert.pem", ca.roots_pem, 0o644),
    ):
        fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    print(f"bootstrap credential for {ident} on node {args.node} in {out}")
    print(
        f"  ztunnel-py --node-name {args.node} --root-cert {out}/root-cert.pem "
        f"--ca-client-cert {out}/cert-chain.pem --ca-client-key {out}/key.pem --xds-address 127.0.0.1:15012"
    )
    return 0


def add_up_flags(p: argparse.ArgumentParser, *, default_hold: bool) -> None:
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="(default: %(default)s)")
    p.add_argument("--rounds", type=int, default=None, help="traffic rounds before exiting (default: 1)")
    if default_hold:
        p.add_argument("--once", action="store_true", help="one traffic round, report, tear down, exit")
    else:
        p.add_argument("--hold", action="store_true", help="keep the mesh running (Ctrl-C tears it down)")


def add_commands(sub: Any) -> None:
    boot = sub.add_parser(
        "bootstrap-node",
        help="issue a node proxy's bootstrap credential",
        description="Issue a ztunnel-py bootstrap certificate bound to NODE from the CA root in --state-dir.",
    )
    boot.add_argument("node")
    boot.add_argument("--out", required=True, metavar="DIR")
    boot.add_argument("--identity", default="istio-system/ztunnel", help="ns/sa (default: %(default)s)")
    boot.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="(default: %(default)s)")
    boot.add_argument("--days", type=int, default=365)
    boot.set_defaults(func=cmd_bootstrap_node)

    up = sub.add_parser(
        "up",
        help="run a whole mesh on this machine from a config directory (needs root)",
        description=(
            "Bring up istiod-py, a ztunnel-py per Node, the Pods as network namespaces and a waypoint Envoy "
            "per waypoint Gateway, then drive traffic and report. Edits to the directory apply live; "
            "Ctrl-C tears everything down."
        ),
    )
    up.add_argument("--config-dir", required=True, metavar="DIR")
    add_up_flags(up, default_hold=True)
    up.set_defaults(func=lambda a: exec_up(a, hold=not a.once))


def exec_up(args: argparse.Namespace, *, hold: bool) -> int:
    """Replace this process with the testing kit's runner (see the module docstring for why).

    ``-P``: the working directory is often the repository root, whose ``xds/`` folder would shadow the
    ``xds`` protobuf package if it were put on ``sys.path``."""
    if not Path(args.config_dir).exists():
        print(f"istiod-py: error: --config-dir {args.config_dir}: no such file or directory", file=sys.stderr)
        return 2
    if os.geteuid() != 0:  # checked here too: the message must not depend on the runner being reachable
        print(
            "istiod-py up: this needs root (network namespaces and iptables); run it with sudo or as root.\n"
            "The config alone can be inspected without it: istiod-py demo --config-only --config-dir DIR"
        )
        return 1
    argv = [sys.executable, "-P", "-m", "istiopy.testing.up", "--config-dir", str(args.config_dir)]
    argv += ["--state-dir", str(args.state_dir)]
    if getattr(args, "namespace", None):
        argv += ["--namespace", args.namespace]
    if args.rounds is not None:
        argv += ["--rounds", str(args.rounds)]
    if hold:
        argv.append("--hold")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, argv)
    except OSError as e:
        print(f"istiod-py: error: cannot start the mesh runner ({sys.executable}): {e}", file=sys.stderr)
        return 1
    return 0  # not reached: execv replaced this process
