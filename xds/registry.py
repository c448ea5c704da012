"""The generator registry: which pure function produces which type URL for which proxy.

Shape (what other parts register; ``istiod`` wires them):

    registry = GeneratorRegistry()
    registry.register(Generator(
        type_url="type.googleapis.com/istio.workload.Address",
        generate=lambda store, proxy: [("ns/name", address_pb), ...],   # pure: (ConfigStore, Proxy) -> pairs
        affects=lambda change, proxy: change.key.kind in {"Pod", "Service"},  # may this change alter output?
        scope=lambda proxy: "all",  # proxies with equal scope get equal output: generated once per push
        proxy_kinds=frozenset({"ztunnel"}), # which node kinds it serves; empty = every kind
    ))

- ``generate`` must be pure and deterministic (same store content + proxy -> same messages), which is what
  makes content-hash versions and sharing across proxies valid. It reads the store, never writes it.
- ``affects`` is the cheap filter of the push pipeline: a change for which it returns False for every
  type a proxy watches sends that proxy nothing and costs no generation. When unsure, return True: the
  content hash still suppresses a resend of identical output.
- ``scope`` defaults to the proxy id (no sharing). Return one constant when output does not depend on the
  proxy, or e.g. the namespace when it depends only on that.
- Lookup for (proxy, type URL): a generator registered for the proxy's kind wins over one for every kind,
  as istiod's ``findGenerator`` prefers a proxy-type-specific generator.

Generators live outside ``xds`` too (the SDS generator in ``ca``), so the registry takes any callables and
imports nothing of theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from istiopy.mesh.store import Change, ConfigStore
from istiopy.xds.cache import CachedResource
from istiopy.xds.proxy import Proxy

# A generator yields (name, message) pairs, or ``CachedResource`` objects when it memoizes its output.
GenerateFn = Callable[[ConfigStore, Proxy], Iterable[tuple[str, Any] | CachedResource]]
AffectsFn = Callable[[Change, Proxy], bool]
ScopeFn = Callable[[Proxy], Hashable]


def always(change: Change, proxy: Proxy) -> bool:
    return True


def per_proxy(proxy: Proxy) -> Hashable:
    return ("proxy", proxy.id)


def shared(proxy: Proxy) -> Hashable:
    return "shared"


@dataclass(frozen=True)
class Generator:
    """A pure generator for one type URL (see the module docstring for each field's contract)."""

    type_url: str
    generate: GenerateFn
    affects: AffectsFn = always
    scope: ScopeFn = per_proxy
    proxy_kinds: frozenset[str] = field(default_factory=frozenset)
    name: str = ""

    def label(self) -> str:
        return self.name or getattr(self.generate, "__qualname__", repr(self.generate))


class UnknownType(LookupError):
    """No generator serves this type URL for this proxy."""


class GeneratorRegistry:
    """Generators by (proxy kind, type URL); registration after the server started takes effect at once."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], Generator] = {}

    def register(self, generator: Generator) -> Callable[[], None]:
        """Add (or replace) a generator; returns a function removing it again."""
        kinds = generator.proxy_kinds or frozenset({""})
        keys = [(kind, generator.type_url) for kind in kinds]
        for key in keys:
            self._by_key[key] = generator

        def unregister() -> None:
            for key in keys:
                if self._by_key.get(key) is generator:
                    del self._by_key[key]

        return unregister

    def find(self, type_url: str, proxy: Proxy) -> Generator:
        gen = self._by_key.get((proxy.kind, type_url)) or self._by_key.get(("", type_url))
        if gen is None:
            known = ", ".join(sorted({t for _, t in self._by_key})) or "none"
            raise UnknownType(
                f"no generator for type URL {type_url!r} (proxy kind {proxy.kind!r}; known: {known})"
            )
        return gen

    def type_urls(self) -> list[str]:
        return sorted({t for _, t in self._by_key})

    def generators(self) -> list[Generator]:
        seen: dict[int, Generator] = {}
        for gen in self._by_key.values():
            seen.setdefault(id(gen), gen)
        return list(seen.values())
