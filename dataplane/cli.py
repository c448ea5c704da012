"""``ztunnel-py``: the node proxy's command line.

Flags mirror upstream ztunnel's environment (in brackets in ``--help``) so a DaemonSet can be configured
the same way; every flag also reads its environment variable as the default. Bad flags end in exactly one
line on stderr and exit status 2, which is what a crash-looping pod's log should show.

Pods come from the node agent over ZDS (``--zds-socket``); ``--pod`` declares pods statically
(``uid,name,namespace,service_account,/path/to/netns``) for standalone runs and tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import istiopy
from istiopy.api.ca_client import CaClient, token_file_source
from istiopy.api.grpc_h2 import client_ssl_context
from istiopy.api.xds_client import DeltaXdsClient
from istiopy.dataplane import fastpath, sockets
from istiopy.dataplane.admin import LocalWorkloadInfo
from istiopy.dataplane.identity import SecretManager, ca_fetcher
from istiopy.dataplane.proxy import ProxyConfig, Ztunnel, build_node
from istiopy.dataplane.zds import ZdsClient

log = logging.getLogger("istiopy.ztunnel")

DEFAULT_ROOT_CERT = "./var/run/secrets/istio/root-cert.pem"
DEFAULT_TOKEN = "./var/run/secrets/tokens/istio-token"
DEFAULT_ZDS = "/var/run/ztunnel/ztunnel.sock"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {port}")
    return port


def _address(value: str) -> str:
    """``https://host:port`` or ``host:port`` -> ``host:port`` (the gRPC target)."""
    target = value.split("://", 1)[1] if "://" in value else value
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port, got {value!r}")
    return target


def _static_pod(value: str) -> tuple[LocalWorkloadInfo, str]:
    parts = value.split(",")
    if len(parts) != 5 or not all(parts):
        raise argparse.ArgumentTypeError(f"expected uid,name,namespace,service_account,netns_path: {value!r}")
    uid, name, ns, sa, path = parts
    return LocalWorkloadInfo(uid, name, ns, sa), path


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ztunnel-py", description="istiopy's ambient node proxy (Istio ztunnel compatible).")
    p.add_argument("--version", action="version", version=f"%(prog)s {istiopy.__version__}")
    x = p.add_argument_group("control plane")
    x.add_argument(
        "--xds-address",
        type=_address,
        default=_address(_env("XDS_ADDRESS", "localhost:15012")),
        help="istiod xDS endpoint [XDS_ADDRESS] (default: %(default)s)",
    )
    x.add_argument(
        "--ca-address",
        type=_address,
        default=None,
        help="CA endpoint [CA_ADDRESS] (default: the xDS address)",
    )
    x.add_argument("--xds-insecure", action="store_true", help="plaintext xDS (development control planes)")
    x.add_argument(
        "--server-name",
        default=_env("ISTIOD_SAN", "istiod.istio-system.svc"),
        help="name istiod's serving certificate is checked for (default: %(default)s)",
    )
    x.add_argument("--root-cert", default=_env("ROOT_CERT", DEFAULT_ROOT_CERT), help="mesh root PEM")
    x.add_argument(
        "--token-file",
        default=_env("TOKEN_FILE", DEFAULT_TOKEN),
        help="bearer token for istiod and the CA, re-read on each call",
    )
    x.add_argument("--ca-client-cert", default="", help="standalone bootstrap certificate chain (PEM)")
    x.add_argument("--ca-client-key", default="", help="key of --ca-client-cert (PEM)")
    x.add_argument("--cluster-id", default=_env("CLUSTER_ID", "Kubernetes"), help="[CLUSTER_ID]")
    x.add_argument("--trust-domain", default=_env("TRUST_DOMAIN", "cluster.local"))
    x.add_argument(
        "--secret-ttl",
        type=int,
        default=int(_env("SECRET_TTL_SECONDS", "86400")),
        help="requested workload certificate lifetime in seconds [SECRET_TTL]",
    )
    n = p.add_argument_group("this proxy")
    n.add_argument("--node-name", default=_env("NODE_NAME", ""), help="[NODE_NAME]")
    n.add_argument("--pod-name", default=_env("POD_NAME", "ztunnel"), help="[POD_NAME]")
    n.add_argument("--pod-namespace", default=_env("POD_NAMESPACE", "istio-system"), help="[POD_NAMESPACE]")
    n.add_argument("--instance-ip", default=_env("INSTANCE_IP", "127.0.0.1"), help="[INSTANCE_IP]")
    n.add_argument("--network", default=_env("NETWORK", ""))
    n.add_argument(
        "--byte-path",
        choices=("c", "python"),
        default=None,
        help="established-tunnel byte path: the C extension or the pure-Python twin [ISTIOPY_BYTE_PATH] "
        "(default: c when built)",
    )
    n.add_argument(
        "--zds-socket",
        default=_env("INPOD_UDS", DEFAULT_ZDS),
        help="unix socket the node agent hands pods over [INPOD_UDS] (default: %(default)s)",
    )
    n.add_argument("--no-zds", action="store_true", help="serve only --pod pods, no node agent")
    n.add_argument(
        "--pod",
        type=_static_pod,
        action="append",
        default=[],
        metavar="UID,NAME,NS,SA,NETNS",
        help="serve this pod (repeatable), without a node agent",
    )
    a = p.add_argument_group("local endpoints")
    a.add_argument("--admin-address", default="127.0.0.1", help="admin bind address (default: %(default)s)")
    a.add_argument("--admin-port", type=_port, default=15000, help="(default: %(default)s)")
    a.add_argument("--metrics-address", default="0.0.0.0", help="(default: %(default)s)")
    a.add_argument("--metrics-port", type=_port, default=15020, help="(default: %(default)s)")
    a.add_argument("--readiness-port", type=_port, default=15021, help="(default: %(default)s)")
    a.add_argument(
        "--log-level",
        default=_env("RUST_LOG", "info").split(",")[0],
        choices=["debug", "info", "warning", "error"],
        help="(default: %(default)s)",
    )
    return p


def _read(path: str, what: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise SystemExit(f"ztunnel-py: cannot read {what} {path}: {e.strerror}") from None


def load_files(args: argparse.Namespace) -> None:
    """Read the credentials up front (before the event loop), failing with one clear line if missing."""
    args.roots_pem = _read(args.root_cert, "root certificate")
    args.token = token_file_source(args.token_file) if Path(args.token_file).exists() else None
    args.client_cert = None
    if args.ca_client_cert or args.ca_client_key:
        args.client_cert = (
            _read(args.ca_client_cert, "CA client certificate"),
            _read(args.ca_client_key, "CA client key"),
        )


async def run(args: argparse.Namespace) -> int:
    roots: str = args.roots_pem
    token = args.token
    client_cert: tuple[str, str] | None = args.client_cert
    config = ProxyConfig(
        node_name=args.node_name,
        pod_name=args.pod_name,
        pod_namespace=args.pod_namespace,
        instance_ip=args.instance_ip,
        cluster_id=args.cluster_id,
        trust_domain=args.trust_domain,
        network=args.network,
        byte_path=fastpath.byte_path(args.byte_path),
    )
    # The C path's control-plane TLS runs on the extension's OpenSSL too: no second OpenSSL (launch.py).
    tls = fastpath.client_tls if config.byte_path == "c" else client_ssl_context
    ca = CaClient.connect(
        args.ca_address or args.xds_address,
        roots,
        server_name=args.server_name,
        client_cert=client_cert,
        token_source=token,
        cluster_id=args.cluster_id,
        tls=tls,
    )
    secrets = SecretManager(ca_fetcher(ca, ttl_seconds=args.secret_ttl))
    # The handlers copy what they need into ProxyState; held Anys would keep whole WDS responses alive.
    metadata = [("clusterid", args.cluster_id)]
    if token is not None and (tok := token()):
        metadata.append(("authorization", f"Bearer {tok}"))
    if args.xds_insecure:
        xds = DeltaXdsClient(args.xds_address, build_node(config), metadata=metadata, keep_resources=False)
    else:
        xds = DeltaXdsClient.connect(
            args.xds_address,
            build_node(config),
            roots,
            server_name=args.server_name,
            client_cert=client_cert,
            tls=tls,
            metadata=metadata,
            keep_resources=False,
        )
    zt = Ztunnel(
        config,
        secrets,
        admin_addr=(args.admin_address, args.admin_port),
        metrics_addr=(args.metrics_address, args.metrics_port),
        readiness_addr=(args.metrics_address, args.readiness_port),
    )
    zt.attach_xds(xds)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(zt.stop()))
    try:
        await zt.start()
        for info, path in args.pod:
            fd = sockets.open_netns(path)
            try:
                await zt.add_pod(info, fd)
            finally:
                os.close(fd)
        zds: ZdsClient | None = None
        zds_task: asyncio.Task[None] | None = None
        if not args.no_zds:
            zds = ZdsClient(zt, args.zds_socket)  # the node agent hands pods over; reconnects forever
            zds_task = asyncio.create_task(zds.run(), name="zds")
        log.info(
            "ztunnel-py %s started: node %s, xDS %s", istiopy.__version__, config.node_name, args.xds_address
        )
        await zt.stopped.wait()
        if zds is not None and zds_task is not None:
            with contextlib.suppress(Exception):
                await zds.stop()  # deletes its workloads: the pods' listeners close
            zds_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await zds_task
    finally:
        await zt.stop()
        await ca.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    load_files(args)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
