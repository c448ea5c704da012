"""``istioctl-py proxy-status`` (``ps``): which proxies istiod serves, and whether each holds what it was
sent.

It asks istiod the way upstream istioctl does, so it works against istiod-py and against upstream istiod
alike: an ADS stream of its own to the xDS port (``--xds-address``), authenticated by a client certificate
from ``--cert-dir`` (``cert-chain.pem``, ``key.pem``, ``root-cert.pem``: what ``istiod-py bootstrap-node``
writes; the identity must be in istiod's namespace), requesting the debug type ``istio.io/debug/syncz``.
The answer holds one ``ClientConfig`` per connected proxy with a state per xDS type: ``SYNCED`` (it
acknowledged what was sent), ``STALE`` (a response awaits its ACK), ``ERROR`` (it refused the last one),
``NOT SENT``.

Output: a table with one column per type any proxy subscribes to (``-o short``), or the raw answer
(``-o json``/``yaml``) in upstream's JSON shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

SHORT = {
    "type.googleapis.com/envoy.config.cluster.v3.Cluster": "CDS",
    "type.googleapis.com/envoy.config.listener.v3.Listener": "LDS",
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": "EDS",
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": "RDS",
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret": "SDS",
    "type.googleapis.com/istio.workload.Address": "WDS",
    "type.googleapis.com/istio.security.Authorization": "WADS",
}
ORDER = ["CDS", "LDS", "EDS", "RDS", "SDS", "WDS", "WADS"]
STATES = {0: "IGNORED", 1: "SYNCED", 2: "NOT SENT", 3: "STALE", 4: "ERROR"}


class StatusError(Exception):
    """istiod could not be asked, or refused; the message is shown as is."""


def fetch(args: argparse.Namespace) -> Any:
    """The ``DiscoveryResponse`` istiod answers a syncz request with."""
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
    from google.protobuf import struct_pb2

    from istiopy.xds.debugxds import SYNCZ

    certs = Path(args.cert_dir)
    try:
        creds = grpc.ssl_channel_credentials(
            (certs / "root-cert.pem").read_bytes(),
            (certs / "key.pem").read_bytes(),
            (certs / "cert-chain.pem").read_bytes(),
        )
    except OSError as e:
        raise StatusError(f"--cert-dir {args.cert_dir}: {e.strerror}: {e.filename}") from None
    ns = args.istio_namespace
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": ns, "GENERATOR": "event"})
    node = base_pb2.Node(id=f"istioctl~0.0.0.0~istioctl-py.{ns}~{ns}.svc.cluster.local", metadata=meta)
    request = discovery_pb2.DiscoveryRequest(type_url=SYNCZ, node=node, resource_names=args.name or [])
    options = [("grpc.ssl_target_name_override", args.xds_san or f"istiod.{ns}.svc")]
    answered = threading.Event()

    def requests() -> Iterator[Any]:
        yield request
        answered.wait()  # keep our side open until the answer is in: a half-close ends the stream

    with grpc.secure_channel(args.xds_address, creds, options=options) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources(requests(), timeout=args.timeout)
        try:
            for resp in call:
                if resp.type_url == SYNCZ:
                    return resp
        except grpc.RpcError as e:
            raise StatusError(f"{args.xds_address}: {e.code().name}: {e.details()}") from None
        finally:
            answered.set()
            call.cancel()
    raise StatusError(f"{args.xds_address}: no answer to {SYNCZ}")


def rows(resp: Any) -> tuple[list[str], list[list[str]]]:
    """Table header and rows: NAME, CLUSTER, ISTIOD, then one column per type any proxy subscribes to."""
    from envoy.service.status.v3 import csds_pb2

    istiod = json.loads(resp.control_plane.identifier or "{}").get("ID", "")
    proxies = []
    seen: set[str] = set()
    for packed in resp.resources:
        cfg = csds_pb2.ClientConfig()
        packed.Unpack(cfg)
        meta = dict(cfg.node.metadata.fields)
        cluster = meta["CLUSTER_ID"].string_value if "CLUSTER_ID" in meta else ""
        states = {}
        for c in cfg.generic_xds_configs:
            short = SHORT.get(c.type_url, c.type_url.rsplit("/", 1)[-1])
            states[short] = STATES.get(c.config_status, str(c.config_status))
            seen.add(short)
        proxies.append((cfg.node.id, cluster, states))
    types = [t for t in ORDER if t in seen] + sorted(seen - set(ORDER))
    header = ["NAME", "CLUSTER", "ISTIOD", *types]
    return header, [
        [node, cluster, istiod, *(states.get(t, "IGNORED") for t in types)]
        for node, cluster, states in sorted(proxies)
    ]


def _run(args: argparse.Namespace) -> int:
    try:
        resp = fetch(args)
    except StatusError as e:
        print(f"istioctl-py proxy-status: error: {e}", file=sys.stderr)
        return 1
    if args.output in ("json", "yaml"):
        from google.protobuf import json_format

        doc = json_format.MessageToDict(resp)
        sys.stdout.write(
            json.dumps(doc, indent=2) + "\n"
            if args.output == "json"
            else yaml.safe_dump(doc, sort_keys=False)
        )
        return 0
    header, table = rows(resp)
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for r in [header, *table]:
        print("   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return 0


def register(subparsers: Any) -> None:
    """Add ``proxy-status`` (alias ``ps``) to ``istioctl-py``."""
    p = subparsers.add_parser(
        "proxy-status", aliases=["ps"], help="which proxies istiod serves and whether they are in sync"
    )
    p.add_argument("name", nargs="*", help="only proxies whose id contains this (e.g. <pod>.<namespace>)")
    p.add_argument("--xds-address", required=True, help="istiod's xDS port, e.g. 127.0.0.1:15012")
    p.add_argument(
        "--cert-dir",
        required=True,
        help="cert-chain.pem, key.pem, root-cert.pem of an istiod-namespace identity",
    )
    p.add_argument("--xds-san", default="", help="istiod's serving name (default: istiod.<namespace>.svc)")
    p.add_argument(
        "-i", "--istio-namespace", default="istio-system", help="istiod's namespace (default: %(default)s)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default: %(default)s)")
    p.add_argument("-o", "--output", choices=["short", "json", "yaml"], default="short",
                   help="output format (default: %(default)s)")  # fmt: skip
    p.set_defaults(func=_run)
