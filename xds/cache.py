"""Immutable snapshots and the snapshot cache, in the manner of go-control-plane's ``pkg/cache/v3``.

A ``Snapshot`` holds, per type URL, one ``TypedResources``: an immutable name -> ``CachedResource`` map plus a
version for the whole collection. A ``CachedResource`` serializes its message once, deterministically, and
derives everything a response needs from those bytes: the per-resource version (sha256, used by delta), and
the pre-encoded entries of a SotW ``DiscoveryResponse`` and of a ``DeltaDiscoveryResponse``. Because a
protobuf message is the concatenation of its fields, a response for one proxy is its header bytes followed by
the shared entries of the resources it is owed: N proxies holding equal config share one serialization.

The collection version is a hash of the (name, resource version) pairs, so equal content always gets an equal
version, across pushes and across server restarts: a reconnecting SotW client that already holds the current
version is not sent it again, and a push that regenerates identical content sends nothing.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Any

from google.protobuf import any_pb2

from istiopy.xds import types

# Envoy and xds-protos protobuf classes carry no type stubs: they are handled as Any-typed messages.
Message = Any


def _discovery() -> Any:
    from envoy.service.discovery.v3 import discovery_pb2

    return discovery_pb2


class InconsistentSnapshot(ValueError):
    """A snapshot references resources it does not hold (e.g. a cluster's EDS name with no endpoints)."""


class CachedResource:
    """One named resource, serialized once; every derived encoding is computed lazily and kept.

    Why lazily: a SotW-only fleet never needs the delta entry and vice versa, and the version hash is only
    needed for delta and for the collection version.
    """

    __slots__ = ("__dict__", "name", "type_url")

    def __init__(self, name: str, message: Message, type_url: str | None = None) -> None:
        self.name = name
        self.__dict__["message"] = message
        self.type_url = type_url or types.PREFIX + message.DESCRIPTOR.full_name

    @classmethod
    def from_serialized(cls, name: str, message_class: Any, data: bytes) -> CachedResource:
        """From bytes a generator assembled itself (deterministically, e.g. by concatenating cached
        sub-message encodings); the message is parsed only if someone asks for it."""
        res = cls.__new__(cls)
        res.name = name
        res.type_url = types.PREFIX + message_class.DESCRIPTOR.full_name
        res.__dict__["serialized"] = data
        res.__dict__["_message_class"] = message_class
        return res

    @cached_property
    def message(self) -> Message:
        return self.__dict__["_message_class"].FromString(self.serialized)

    @cached_property
    def serialized(self) -> bytes:
        """Deterministic bytes: equal messages give equal bytes (map fields sorted)."""
        data: bytes = self.message.SerializeToString(deterministic=True)
        return data

    @cached_property
    def version(self) -> str:
        """Per-resource version for delta: sha256 hex of the deterministic serialization."""
        return hashlib.sha256(self.serialized).hexdigest()

    @cached_property
    def any(self) -> any_pb2.Any:
        return any_pb2.Any(type_url=self.type_url, value=self.serialized)

    @cached_property
    def sotw_entry(self) -> bytes:
        """The bytes of field ``resources`` of a DiscoveryResponse holding just this resource."""
        data: bytes = _discovery().DiscoveryResponse(resources=[self.any]).SerializeToString()
        return data

    @cached_property
    def delta_entry(self) -> bytes:
        """The bytes of field ``resources`` of a DeltaDiscoveryResponse holding just this resource."""
        d = _discovery()
        res = d.Resource(name=self.name, version=self.version, resource=self.any)
        data: bytes = d.DeltaDiscoveryResponse(resources=[res]).SerializeToString()
        return data

    @cached_property
    def eds_names(self) -> frozenset[str]:
        """The ClusterLoadAssignment names a Cluster reads its endpoints from over EDS (empty for a cluster
        of another discovery type, and for any other resource type). Kept: streams ask it of every cluster
        they send changed, and proxies share the resource object."""
        if self.type_url != types.CLUSTER:
            return frozenset()
        return frozenset(_cluster_eds_names(self.message))

    def __repr__(self) -> str:
        return f"CachedResource({self.name!r}, {self.type_url.rsplit('/', 1)[-1]})"


def collection_version(resources: Iterable[CachedResource]) -> str:
    """Content version of a set of resources: equal sets give equal versions whatever their order."""
    h = hashlib.sha256()
    for res in sorted(resources, key=lambda r: r.name):
        h.update(res.name.encode())
        h.update(b"\0")
        h.update(res.version.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TypedResources:
    """All resources of one type for one proxy (or group of proxies), with the collection version."""

    type_url: str
    items: Mapping[str, CachedResource]
    version: str
    _diffs: dict[int, tuple[TypedResources, tuple[str, ...], tuple[str, ...]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def build(
        cls, type_url: str, resources: Iterable[tuple[str, Message] | CachedResource]
    ) -> TypedResources:
        """From (name, message) pairs or cached resources; duplicate names are an error (Envoy would NACK)."""
        items: dict[str, CachedResource] = {}
        for entry in resources:
            res = entry if isinstance(entry, CachedResource) else CachedResource(entry[0], entry[1], type_url)
            if res.name in items:
                raise ValueError(f"duplicate {types.short_name(type_url)} resource name {res.name!r}")
            items[res.name] = res
        return cls(
            type_url, MappingProxyType(dict(sorted(items.items()))), collection_version(items.values())
        )

    def __len__(self) -> int:
        return len(self.items)

    def names(self) -> frozenset[str]:
        return frozenset(self.items)

    def diff_from(self, old: TypedResources) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(changed or added names, removed names) going from ``old`` to this, computed once per pair.

        Why: after a push most proxies move from the same old collection to the same new one; the diff is
        then one pass shared by all of them instead of one per proxy. Unchanged resources are usually the
        very same objects (generators memoize), so the identity test avoids even the version lookup.
        """
        hit = self._diffs.get(id(old))
        if hit is not None and hit[0] is old:
            return hit[1], hit[2]
        olds = old.items
        changed = tuple(
            n
            for n, r in self.items.items()
            if (o := olds.get(n)) is None or (o is not r and o.version != r.version)
        )
        removed = tuple(n for n in olds if n not in self.items)
        if len(self._diffs) >= 4:
            self._diffs.clear()
        self._diffs[id(old)] = (old, changed, removed)
        return changed, removed


@dataclass(frozen=True)
class Snapshot:
    """An immutable set of ``TypedResources`` keyed by type URL.

    ``trigger_time`` is when the oldest config change folded into it happened (monotonic seconds), so the
    time from change to ACK (convergence) can be measured by whoever receives the ACK.
    """

    resources: Mapping[str, TypedResources] = field(default_factory=dict)
    trigger_time: float | None = None

    @classmethod
    def of(cls, typed: Iterable[TypedResources], trigger_time: float | None = None) -> Snapshot:
        return cls(MappingProxyType({t.type_url: t for t in typed}), trigger_time)

    def get(self, type_url: str) -> TypedResources | None:
        return self.resources.get(type_url)

    def version(self, type_url: str) -> str:
        typed = self.resources.get(type_url)
        return typed.version if typed is not None else ""

    def with_types(self, typed: Iterable[TypedResources], trigger_time: float | None = None) -> Snapshot:
        """A new snapshot with some types replaced; the rest are shared, not copied."""
        merged = dict(self.resources)
        for t in typed:
            merged[t.type_url] = t
        when = self.trigger_time if trigger_time is None else trigger_time
        return Snapshot(MappingProxyType(merged), when)

    def type_urls(self) -> list[str]:
        """Held type URLs in ADS push order."""
        return types.in_push_order(self.resources)

    def references(self) -> dict[str, set[str]]:
        """EDS names referenced by clusters and RDS names referenced by listeners, by type URL."""
        refs: dict[str, set[str]] = {types.ENDPOINT: set(), types.ROUTE: set()}
        clusters = self.resources.get(types.CLUSTER)
        if clusters is not None:
            for res in clusters.items.values():
                refs[types.ENDPOINT] |= _cluster_eds_names(res.message)
        listeners = self.resources.get(types.LISTENER)
        if listeners is not None:
            for res in listeners.items.values():
                refs[types.ROUTE] |= _listener_rds_names(res.message)
        return refs

    def consistency_errors(self) -> list[str]:
        """Every reference that does not resolve, as readable sentences (empty when consistent).

        As go-control-plane's ``Consistent``: the names referenced must be present in the referenced type;
        extra resources are allowed (a stale endpoint set does no harm), missing ones are not.
        """
        errors = []
        for type_url, names in self.references().items():
            if not names:
                continue
            held = self.resources.get(type_url)
            have = held.names() if held is not None else frozenset()
            for name in sorted(names - have):
                errors.append(f"{types.short_name(type_url)} resource {name!r} is referenced but missing")
        return errors

    def consistent(self) -> None:
        """Raise ``InconsistentSnapshot`` naming every dangling reference."""
        errors = self.consistency_errors()
        if errors:
            raise InconsistentSnapshot("; ".join(errors))


def _cluster_eds_names(cluster: Message) -> set[str]:
    # Cluster.DiscoveryType.EDS == 3; the EDS name defaults to the cluster name.
    if cluster.WhichOneof("cluster_discovery_type") != "type" or cluster.type != 3:
        return set()
    name = cluster.eds_cluster_config.service_name or cluster.name
    return {str(name)}


def _listener_rds_names(listener: Message) -> set[str]:
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

    names: set[str] = set()
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for flt in chain.filters:
            if not flt.HasField("typed_config"):
                continue
            hcm = http_connection_manager_pb2.HttpConnectionManager()
            if not flt.typed_config.Unpack(hcm):
                continue
            if hcm.WhichOneof("route_specifier") == "rds":
                names.add(str(hcm.rds.route_config_name))
    return names


Watcher = Callable[[str, Snapshot], None]


class SnapshotCache:
    """The latest snapshot per node key (a proxy id or a group key), with watchers called on change.

    Thread-safe for setters; watchers are called synchronously, outside the lock, in the setter's thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: dict[str, list[Watcher]] = {}

    def set_snapshot(self, key: str, snapshot: Snapshot, check: bool = False) -> None:
        """Store ``snapshot`` under ``key`` (after the consistency check when ``check``) and notify."""
        if check:
            snapshot.consistent()
        with self._lock:
            self._snapshots[key] = snapshot
            watchers = list(self._watchers.get(key, ()))
        for w in watchers:
            w(key, snapshot)

    def get_snapshot(self, key: str) -> Snapshot | None:
        with self._lock:
            return self._snapshots.get(key)

    def clear_snapshot(self, key: str) -> None:
        with self._lock:
            self._snapshots.pop(key, None)

    def watch(self, key: str, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher(key, snapshot)`` on every ``set_snapshot(key, ...)``; returns a cancel function."""
        with self._lock:
            self._watchers.setdefault(key, []).append(watcher)

        def cancel() -> None:
            with self._lock:
                lst = self._watchers.get(key, [])
                if watcher in lst:
                    lst.remove(watcher)
                if not lst:
                    self._watchers.pop(key, None)

        return cancel

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._snapshots)

    def __iter__(self) -> Iterator[tuple[str, Snapshot]]:
        with self._lock:
            return iter(sorted(self._snapshots.items()))
