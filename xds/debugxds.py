"""Debug types on the ADS stream: ``istio.io/debug/syncz``, which ``istioctl proxy-status`` asks for.

Upstream istioctl does not scrape istiod's HTTP port for proxy status; it opens an ADS stream of its own
(``--xds-address``, a client certificate from ``--cert-dir`` or a token) and asks for the type
``istio.io/debug/syncz``. The answer is one ``envoy.service.status.v3.ClientConfig`` per connected proxy:
its node (id and Istio metadata) and, per xDS type it subscribes to, whether what it holds is what was
sent (``SYNCED``), a response is still unacknowledged (``STALE``), it refused the last one (``ERROR``) or
nothing was sent yet (``NOT_SENT``). ``control_plane.identifier`` names this istiod instance as JSON.

This is server state, not mesh config, so it is built here from the server's connections rather than by a
generator; the request is answered directly and never cached or pushed. The node and per-type states come
in as plain values so the answer is testable without a server. Only callers in istiod's own namespace
(istioctl's identity, the mesh admins') or, on a plaintext development listener, callers with no identity,
may ask: the answer lists every proxy in the mesh.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from istiopy import __version__

__all__ = ["DEBUG_TYPES", "SYNCZ", "ProxySync", "debug_refusal", "instance_id", "syncz_response"]

SYNCZ = "istio.io/debug/syncz"
DEBUG_TYPES = frozenset({SYNCZ})

# envoy.service.status.v3.ConfigStatus
_SYNCED, _NOT_SENT, _STALE, _ERROR = 1, 2, 3, 4


@dataclass(frozen=True)
class ProxySync:
    """What syncz reports of one connected proxy: its node and its per-type stream state
    (``SotwStream.status()`` entries: ``type``, ``sent_version``, ``acked_version``, ``sent_nonce``,
    ``acked_nonce``, ``nacks``, ``last_error``)."""

    node_id: str
    metadata: Mapping[str, Any]
    types: Sequence[Mapping[str, Any]]


def debug_refusal(identity: str | None, system_namespace: str) -> str:
    """Why a caller may not read debug types, or '' when it may."""
    if identity is None:
        return ""  # only a plaintext development listener lets a stream in without an identity
    parts = identity.removeprefix("spiffe://").split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[2] == system_namespace:
        return ""
    return f"debug types are for identities in namespace {system_namespace!r}; {identity!r} is not"


def _status(t: Mapping[str, Any]) -> int:
    if not t.get("sent_nonce"):
        return _NOT_SENT
    if t.get("last_error") and t.get("acked_nonce") != t.get("sent_nonce"):
        return _ERROR
    if t.get("acked_nonce") != t.get("sent_nonce"):
        return _STALE
    return _SYNCED


def _selected(node_id: str, names: Iterable[str]) -> bool:
    """``istioctl proxy-status <pod>.<ns>`` names one proxy: match its id or the ``<pod>.<ns>`` in it."""
    wanted = [n for n in names if n]
    return not wanted or any(n in node_id for n in wanted)


def syncz_response(
    proxies: Iterable[ProxySync], names: Sequence[str], instance: str, nonce: str, version: str
) -> bytes:
    """The serialized ``DiscoveryResponse`` answering a syncz request for ``names`` (all when empty)."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.status.v3 import csds_pb2
    from google.protobuf import any_pb2, struct_pb2

    resources = []
    for p in sorted(proxies, key=lambda p: p.node_id):
        if not _selected(p.node_id, names):
            continue
        meta = struct_pb2.Struct()
        meta.update(
            {k: v for k, v in p.metadata.items() if isinstance(v, (str, int, float, bool, dict, list))}
        )
        cfg = csds_pb2.ClientConfig(node=base_pb2.Node(id=p.node_id, metadata=meta))
        for t in p.types:
            cfg.generic_xds_configs.add(
                type_url=str(t["type"]),
                version_info=str(t.get("acked_version") or t.get("sent_version") or ""),
                config_status=_status(t),
            )
        packed = any_pb2.Any()
        packed.Pack(cfg)
        resources.append(packed)
    identifier = {"Component": "istiod", "ID": instance, "Info": {"version": __version__}}
    resp = discovery_pb2.DiscoveryResponse(
        version_info=version,
        type_url=SYNCZ,
        nonce=nonce,
        resources=resources,
        control_plane=base_pb2.ControlPlane(identifier=json.dumps(identifier)),
    )
    data: bytes = resp.SerializeToString()
    return data


def instance_id(server_instance: str) -> str:
    """istiod's pod name when it runs in one (``POD_NAME``), else a host-and-instance name."""
    return os.environ.get("POD_NAME") or f"istiod-py-{os.uname().nodename}-{server_instance}"
