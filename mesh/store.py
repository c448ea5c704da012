"""The config store: every resource the mesh knows, indexed and versioned, with a change stream.

Pure data, no I/O: sources (files, Kubernetes) write into it, generators read from it, and the push
pipeline subscribes to its changes. Resources are immutable pydantic objects, so a reader can hold one
without copying while the store moves on.
"""

from __future__ import annotations

import builtins
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from istiopy.mesh.meta import Resource, ResourceKey

R = TypeVar("R", bound=Resource)

Op = Literal["add", "update", "delete"]
Indexer = Callable[[Resource], Iterable[str]]
Listener = Callable[["Change"], None]


@dataclass(frozen=True)
class Change:
    """One applied change. ``old`` is None for an add, ``new`` is None for a delete."""

    op: Op
    key: ResourceKey
    old: Resource | None
    new: Resource | None
    version: int
    source: str = ""

    @property
    def resource(self) -> Resource:
        """The resource as it is now, or as it was before a delete."""
        res = self.new if self.new is not None else self.old
        assert res is not None
        return res


def selector_matches(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes ``matchLabels`` semantics: every selector pair is present; an empty selector matches all."""
    if not selector:
        return True
    return all(labels.get(k) == v for k, v in selector.items())


class ConfigStore:
    """Typed, indexed, versioned resources with a synchronous change stream.

    ``version`` grows by one per applied change, so a consumer can tell whether it has seen everything.
    Applying an equal resource again is not a change (no version bump, no event): sources may re-list freely.
    Indexes are named functions from a resource to string keys (e.g. ``pod-ip``), registered per kind.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._by_kind: dict[str, dict[ResourceKey, Resource]] = defaultdict(dict)
        self._indexers: dict[str, tuple[str, Indexer]] = {}
        self._indexes: dict[str, dict[str, set[ResourceKey]]] = defaultdict(lambda: defaultdict(set))
        self._sources: dict[ResourceKey, str] = {}
        self._listeners: list[Listener] = []
        self.version = 0

    # ----------------------------------------------------------------------------------------- indexes
    def add_index(self, name: str, kind: str, indexer: Indexer) -> None:
        """Register an index; existing resources of ``kind`` are indexed at once."""
        with self._lock:
            self._indexers[name] = (kind, indexer)
            index = self._indexes[name]
            index.clear()
            for key, res in self._by_kind.get(kind, {}).items():
                for value in indexer(res):
                    index[value].add(key)

    def by_index(self, name: str, value: str) -> list[Resource]:
        """Resources whose index ``name`` yields ``value``, in key order."""
        with self._lock:
            if name not in self._indexers:
                raise KeyError(f"no index named {name!r}")
            kind = self._indexers[name][0]
            keys = sorted(self._indexes[name].get(value, ()))
            return [self._by_kind[kind][k] for k in keys]

    def _reindex(self, key: ResourceKey, old: Resource | None, new: Resource | None) -> None:
        for name, (kind, indexer) in self._indexers.items():
            if kind != key.kind:
                continue
            index = self._indexes[name]
            if old is not None:
                for value in indexer(old):
                    bucket = index.get(value)
                    if bucket is not None:
                        bucket.discard(key)
                        if not bucket:
                            del index[value]
            if new is not None:
                for value in indexer(new):
                    index[value].add(key)

    # ------------------------------------------------------------------------------------------ writes
    def apply(self, resource: Resource, source: str = "") -> Change | None:
        """Add or replace a resource; returns the change, or None when it is equal to what is stored."""
        key = resource.key
        with self._lock:
            old = self._by_kind[key.kind].get(key)
            if old is not None and old == resource:
                self._sources[key] = source or self._sources.get(key, "")
                return None
            self._by_kind[key.kind][key] = resource
            self._sources[key] = source
            self._reindex(key, old, resource)
            self.version += 1
            change = Change("add" if old is None else "update", key, old, resource, self.version, source)
        self._emit(change)
        return change

    def delete(self, key: ResourceKey) -> Change | None:
        """Remove a resource; returns the change, or None when it was not stored."""
        with self._lock:
            old = self._by_kind.get(key.kind, {}).pop(key, None)
            if old is None:
                return None
            source = self._sources.pop(key, "")
            self._reindex(key, old, None)
            self.version += 1
            change = Change("delete", key, old, None, self.version, source)
        self._emit(change)
        return change

    def replace_source(self, source: str, resources: Iterable[Resource]) -> list[Change]:
        """Make the resources that came from ``source`` exactly ``resources`` (a re-list or file reload)."""
        wanted = {r.key: r for r in resources}
        changes: list[Change] = []
        with self._lock:
            stale = [k for k, s in self._sources.items() if s == source and k not in wanted]
        for key in sorted(stale):
            if (c := self.delete(key)) is not None:
                changes.append(c)
        for res in wanted.values():
            if (c := self.apply(res, source)) is not None:
                changes.append(c)
        return changes

    # ------------------------------------------------------------------------------------------- reads
    def get(self, kind: str, namespace: str, name: str) -> Resource | None:
        with self._lock:
            return self._by_kind.get(kind, {}).get(ResourceKey(kind, namespace, name))

    def get_typed(self, cls: type[R], namespace: str, name: str) -> R | None:
        res = self.get(cls.KIND, namespace if cls.NAMESPACED else "", name)
        return res if isinstance(res, cls) else None

    def list(
        self, kind: str, namespace: str | None = None, selector: Mapping[str, str] | None = None
    ) -> list[Resource]:
        """Resources of a kind, optionally in one namespace and matching a label selector, in key order."""
        with self._lock:
            items = sorted(self._by_kind.get(kind, {}).items())
        return [
            r
            for k, r in items
            if (namespace is None or k.namespace == namespace) and selector_matches(selector, r.labels)
        ]

    def list_typed(
        self, cls: type[R], namespace: str | None = None, selector: Mapping[str, str] | None = None
    ) -> builtins.list[R]:
        return [r for r in self.list(cls.KIND, namespace, selector) if isinstance(r, cls)]

    def kinds(self) -> builtins.list[str]:
        with self._lock:
            return sorted(k for k, v in self._by_kind.items() if v)

    def source_of(self, key: ResourceKey) -> str:
        with self._lock:
            return self._sources.get(key, "")

    def __iter__(self) -> Iterator[Resource]:
        with self._lock:
            everything = [r for kind in sorted(self._by_kind) for _, r in sorted(self._by_kind[kind].items())]
        return iter(everything)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._by_kind.values())

    # ---------------------------------------------------------------------------------------- listeners
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` after every change; returns a function that unsubscribes it."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)

        return unsubscribe

    def _emit(self, change: Change) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            listener(change)
