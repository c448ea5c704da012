"""The push pipeline: store changes -> debounce -> regenerate what they affect -> push to affected proxies.

Shape (after istiod's ``debounce`` / ``Push`` / ``pushConnection``, see anchors.md section 4):

1. ``ConfigStore`` listeners feed every ``Change`` into a ``Debouncer``; a push starts once no change arrived
   for ``debounce_after`` seconds, or ``debounce_max`` after the first one, whichever is first. Pushes never
   overlap: changes arriving during one are merged into the next.
2. For every connected proxy and every type it watches, the generator's ``affects(change, proxy)`` decides
   whether any change of the batch may alter its output. Unaffected (proxy, type) pairs are left alone: a
   change that touches no proxy sends nothing and costs no generation.
3. Affected pairs are regenerated once per (type URL, generator scope) and store version, and shared by
   every proxy of that scope; the new ``TypedResources`` replace the old ones in the proxy's snapshot.
4. Each connection's writer computes what its client is owed (content-hash versions suppress identical
   output) and sends it; writers hold a semaphore, so at most ``concurrency`` proxies are being pushed
   to at any time.

Connections are anything satisfying ``PushTarget``; the gRPC server's connections do, and so do test doubles
driving the sans-I/O core directly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Protocol

from istiopy.mesh.store import Change, ConfigStore
from istiopy.xds.cache import SnapshotCache, TypedResources
from istiopy.xds.monitoring import XdsMetrics
from istiopy.xds.proxy import Proxy
from istiopy.xds.registry import GeneratorRegistry
from istiopy.xds.types import in_push_order

log = logging.getLogger(__name__)


class Debouncer:
    """Sans-I/O debounce: collects items, says when the batch is due, hands the batch over.

    Due at ``min(last + quiet, first + max_wait)``: a steady trickle of changes cannot postpone a push for
    longer than ``max_wait``.
    """

    def __init__(self, quiet: float = 0.1, max_wait: float = 10.0) -> None:
        self.quiet = quiet
        self.max_wait = max_wait
        self._items: list[Change] = []
        self._first: float | None = None
        self._last: float | None = None

    def add(self, item: Change, now: float) -> None:
        if self._first is None:
            self._first = now
        self._last = now
        self._items.append(item)

    def deadline(self) -> float | None:
        if self._first is None or self._last is None:
            return None
        return min(self._last + self.quiet, self._first + self.max_wait)

    def due(self, now: float) -> bool:
        d = self.deadline()
        return d is not None and now >= d

    def take(self) -> tuple[list[Change], float | None]:
        """The batch and the time its first item arrived; the debouncer is empty afterwards."""
        items, first = self._items, self._first
        self._items, self._first, self._last = [], None, None
        return items, first

    def __len__(self) -> int:
        return len(self._items)


class PushTarget(Protocol):
    """What the pipeline needs of a connection."""

    @property
    def proxy(self) -> Proxy | None: ...

    def watched_types(self) -> list[str]: ...

    def update(self, typed: list[TypedResources], trigger_time: float | None) -> None: ...


@dataclass
class PushStats:
    """Figures of the last push, for logs, /debug and the benchmark."""

    changes: int = 0
    proxies_affected: int = 0
    generations: int = 0
    started: float = 0.0
    duration: float = 0.0


class PushPipeline:
    """Owns generation and fan-out; the gRPC server attaches and detaches connections."""

    def __init__(
        self,
        store: ConfigStore,
        registry: GeneratorRegistry,
        *,
        debounce_after: float = 0.1,
        debounce_max: float = 10.0,
        concurrency: int = 100,
        metrics: XdsMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.registry = registry
        self.metrics = metrics or XdsMetrics()
        self.clock = clock
        self.debouncer = Debouncer(debounce_after, debounce_max)
        self.push_semaphore = asyncio.Semaphore(concurrency)
        self.targets: dict[int, PushTarget] = {}
        # Per-proxy snapshots by node id (go-control-plane's SnapshotCache): connections watch their entry,
        # so a snapshot set here from outside reaches them as well.
        self.cache = SnapshotCache()
        self.last_push = PushStats()
        self.pushes = 0
        self._cache: dict[tuple[str, Hashable], tuple[int, TypedResources]] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Subscribe to the store and run the debounce loop in the current event loop."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._unsubscribe = self.store.subscribe(self._on_change)
        self._task = asyncio.create_task(self._run(), name="xds-push")

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def attach(self, target: PushTarget) -> None:
        self.targets[id(target)] = target

    def detach(self, target: PushTarget) -> None:
        self.targets.pop(id(target), None)

    # -------------------------------------------------------------------------------------- changes
    def notify(self, change: Change) -> None:
        """Feed a change that is not store content (e.g. a certificate rotation, ``ca.sds.rotation_change``)
        through the same debounce and push as store changes; callable from any thread."""
        self._on_change(change)

    def _on_change(self, change: Change) -> None:
        """Store listener: may run in a source's thread, so hop onto the loop when it does."""
        if threading.get_ident() == self._loop_thread:
            self._enqueue(change)
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self._enqueue, change)

    def _enqueue(self, change: Change) -> None:
        self.debouncer.add(change, self.clock())
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (deadline := self.debouncer.deadline()) is not None:
                delay = deadline - self.clock()
                if delay > 0:
                    try:
                        await asyncio.wait_for(self._wake.wait(), delay)
                        self._wake.clear()
                    except TimeoutError:
                        pass
                    continue
                changes, first = self.debouncer.take()
                if first is not None:
                    self.metrics.debounce_time.observe(self.clock() - first)
                try:
                    await self.push(changes, first)
                except Exception:
                    log.exception("push of %d changes failed", len(changes))
            if not len(self.debouncer):
                self._idle.set()

    async def settled(self) -> None:
        """Wait until every change seen so far has been pushed (test and benchmark helper)."""
        await self._idle.wait()

    # ------------------------------------------------------------------------------------ generation
    def generate(self, type_url: str, proxy: Proxy) -> TypedResources:
        """The resources of one type for one proxy, shared by scope and cached per store version.

        Raises ``UnknownType`` when no generator serves the type; generator errors propagate.
        """
        gen = self.registry.find(type_url, proxy)
        key = (type_url, gen.scope(proxy))
        version = self.store.version
        hit = self._cache.get(key)
        if hit is not None and hit[0] == version:
            return hit[1]
        t0 = time.perf_counter()
        typed = TypedResources.build(type_url, gen.generate(self.store, proxy))
        self.metrics.generate_time.labels(self.metrics.label(type_url)).observe(time.perf_counter() - t0)
        self._cache[key] = (version, typed)
        self.last_push.generations += 1
        return typed

    def affected_types(self, target: PushTarget, changes: Iterable[Change]) -> list[str]:
        """Watched types of ``target`` whose generator says some change may alter its output."""
        proxy = target.proxy
        if proxy is None:
            return []
        out = []
        batch = list(changes)
        for type_url in target.watched_types():
            try:
                gen = self.registry.find(type_url, proxy)
            except LookupError:
                continue
            if any(gen.affects(c, proxy) for c in batch):
                out.append(type_url)
        return out

    async def push(self, changes: list[Change], trigger_time: float | None = None) -> PushStats:
        """Regenerate and hand new snapshots to every target the batch affects."""
        stats = PushStats(changes=len(changes), started=self.clock())
        self.last_push = stats
        if len(self._cache) > 4 * max(1, len(self.targets)) * max(1, len(self.registry.type_urls())):
            self._cache.clear()  # scopes of departed proxies; cheap to rebuild
        for target in list(self.targets.values()):
            affected = self.affected_types(target, changes)
            proxy = target.proxy
            if not affected or proxy is None:
                continue
            typed = []
            for type_url in in_push_order(affected):
                try:
                    typed.append(self.generate(type_url, proxy))
                except Exception:
                    log.exception(
                        "generating %s for proxy %s failed; keeping its previous config", type_url, proxy.id
                    )
            stats.proxies_affected += 1
            target.update(typed, trigger_time)
            await asyncio.sleep(0)  # let writers and readers run between proxies
        stats.duration = self.clock() - stats.started
        self.pushes += 1
        log.debug(
            "push: %d changes, %d proxies affected, %d generations, %.3fs",
            stats.changes,
            stats.proxies_affected,
            stats.generations,
            stats.duration,
        )
        return stats
