"""Who is on the other end of a stream: the proxy's node (id, metadata) plus its authenticated identity.

Istio node ids have the shape ``<type>~<ip>~<pod>.<namespace>~<namespace>.svc.<domain>`` (``sidecar``,
``router``, ``ztunnel``, ``waypoint``); anything else is taken as an opaque id of kind ``unknown`` so that a
plain Envoy with ``id: test`` still gets config. Only the authenticated identity is trustworthy: the node
is whatever the client claims.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

NODE_KINDS = frozenset({"sidecar", "router", "ztunnel", "waypoint"})


@dataclass(frozen=True)
class Proxy:
    """One connected proxy. ``identity`` is set by the server's authenticator (e.g. a SPIFFE id)."""

    id: str
    kind: str = "unknown"
    ip: str = ""
    namespace: str = ""
    cluster: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    identity: str | None = None

    def meta(self, key: str, default: str = "") -> str:
        """A metadata value as a string (Istio metadata values are strings)."""
        value = self.metadata.get(key, default)
        return value if isinstance(value, str) else str(value)

    @classmethod
    def from_node(cls, node: Any, identity: str | None = None) -> Proxy:
        """Build from an ``envoy.config.core.v3.Node``; tolerant of missing or odd fields, never raises."""
        node_id = str(getattr(node, "id", "") or "")
        metadata: dict[str, Any] = {}
        if node is not None and node.HasField("metadata"):
            metadata = json_format.MessageToDict(node.metadata)
        kind, ip, namespace = "unknown", "", ""
        parts = node_id.split("~")
        if len(parts) == 4 and parts[0] in NODE_KINDS:
            kind, ip = parts[0], parts[1]
            namespace = parts[3].split(".", 1)[0]
        namespace = str(metadata.get("NAMESPACE") or namespace)
        cluster = str(getattr(node, "cluster", "") or metadata.get("CLUSTER_ID") or "")
        return cls(node_id, kind, ip, namespace, cluster, metadata, identity)
