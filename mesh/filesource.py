"""The file config source: a directory (or one file) of YAML kept in sync with a ``ConfigStore``.

Each file is one store *source* (``file:<absolute path>``), so editing a file replaces exactly the
resources that came from it and deleting it removes them. A bad edit must never open the mesh up: a file
whose YAML is broken keeps its last good resources until it is fixed, and a document that becomes invalid
keeps its last good version (a DENY policy does not vanish because of a typo). Both are reported once in
the log and listed in ``problems`` until fixed.

``run()`` watches with ``watchfiles`` (inotify, or polling where that is unavailable); ``ready`` is set once
the watcher is live and a full rescan has run, so no change made before it can be missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path

import watchfiles

from istiopy.mesh.errors import MeshError, UnknownKind
from istiopy.mesh.loader import EXTENSIONS, FileResult, LoadResult, find_files, load_file
from istiopy.mesh.meta import Resource, ResourceKey
from istiopy.mesh.store import ConfigStore

__all__ = ["SOURCE_PREFIX", "FileSource"]

log = logging.getLogger(__name__)

SOURCE_PREFIX = "file:"


class FileSource:
    """Load ``path`` into ``store`` and keep it in sync while ``run()`` is running."""

    def __init__(
        self,
        store: ConfigStore,
        path: str | Path,
        *,
        default_namespace: str = "default",
        debounce_ms: int = 50,
        force_polling: bool | None = None,
    ) -> None:
        self.store = store
        self.path = Path(path).resolve()
        self.default_namespace = default_namespace
        self.debounce_ms = debounce_ms
        self.force_polling = force_polling
        self.ready = asyncio.Event()
        self._problems: dict[Path, list[MeshError]] = {}
        self._notes: dict[Path, list[UnknownKind]] = {}
        # file -> the resources it last put in the store (its "last good" state)
        self._applied: dict[Path, dict[ResourceKey, Resource]] = {}

    # ------------------------------------------------------------------------------------------- public
    @property
    def problems(self) -> list[MeshError]:
        """Current invalid or malformed documents, by file name then position."""
        return [p for f in sorted(self._problems) for p in self._problems[f]]

    @property
    def notes(self) -> list[UnknownKind]:
        """Documents of kinds the mesh does not read (skipped)."""
        return [n for f in sorted(self._notes) for n in self._notes[f]]

    @staticmethod
    def source_name(file: Path) -> str:
        return f"{SOURCE_PREFIX}{file}"

    def load(self) -> LoadResult:
        """(Re)read every file now and drop the resources of files that are gone."""
        files = set(find_files(self.path))
        if not self.path.exists():
            log.warning("config path %s does not exist", self.path)
        result = LoadResult([self.reload_file(f) for f in sorted(files)])
        for gone in sorted(set(self._applied) - files):
            self._remove(gone)
        return result

    def reload_file(self, file: Path) -> FileResult:
        """Re-read one file and apply it; returns what was read (problems are also recorded)."""
        file = Path(file)
        if not file.is_file():
            self._remove(file)
            return FileResult(str(file))
        result = load_file(file, self.default_namespace)
        source = self.source_name(file)
        previous = self._applied.get(file, {})
        if result.malformed and file in self._applied:
            # Broken YAML: keep what the file last said rather than half of it.
            self._record(file, result, kept=True)
            return result
        wanted: list[Resource] = list(result.resources)
        for doc in result.documents:
            if doc.error is not None and doc.key is not None and doc.key in previous:
                wanted.append(previous[doc.key])  # keep the last good version of an invalid edit
        changes = self.store.replace_source(source, wanted)
        self._applied[file] = {r.key: r for r in wanted}
        self._record(file, result, kept=False)
        if changes:  # quiet during the initial load, which the caller summarises
            log.log(
                logging.INFO if self.ready.is_set() else logging.DEBUG, "%s: %d change(s)", file, len(changes)
            )
        return result

    async def run(self) -> None:
        """Watch until cancelled; every batch of changes is applied in one go after ``debounce_ms``."""
        watch_root = self.path if self.path.is_dir() else self.path.parent
        async for changes in watchfiles.awatch(
            watch_root,
            debounce=self.debounce_ms,
            step=min(self.debounce_ms, 50),
            rust_timeout=200,
            yield_on_timeout=True,
            force_polling=self.force_polling,
            watch_filter=None,
        ):
            if not self.ready.is_set():
                self.load()  # the watcher is live now: catch up with anything changed before it was
                self.ready.set()
                log.info("watching %s (%d files loaded)", self.path, len(self._applied))
            if changes:
                self._apply_changes(p for _, p in changes)

    # ------------------------------------------------------------------------------------------ private
    def _apply_changes(self, paths: Iterable[str]) -> None:
        touched: set[Path] = set()
        rescan = False
        for raw in paths:
            p = Path(raw)
            if self.path.is_file() and p != self.path:
                continue
            if p.suffix in EXTENSIONS or p in self._applied:
                touched.add(p)
            elif p.is_dir() or not p.suffix:
                rescan = True  # a folder appeared, vanished or was renamed
        if rescan:
            self.load()
            return
        for p in sorted(touched):
            if p not in self._applied and self._hidden(p):
                continue
            self.reload_file(p)

    def _hidden(self, p: Path) -> bool:
        """Editor temporaries and ConfigMap ``..data`` folders are not config (as in ``find_files``)."""
        try:
            parts = p.relative_to(self.path).parts
        except ValueError:
            parts = (p.name,)
        return any(part.startswith(".") for part in parts)

    def _remove(self, file: Path) -> None:
        changes = self.store.replace_source(self.source_name(file), [])
        self._applied.pop(file, None)
        self._problems.pop(file, None)
        self._notes.pop(file, None)
        if changes:
            log.info("%s: removed, %d resource(s) deleted", file, len(changes))

    def _record(self, file: Path, result: FileResult, kept: bool) -> None:
        before = {str(p) for p in self._problems.get(file, [])}
        problems = result.problems
        for p in problems:
            if str(p) not in before:
                suffix = " (keeping its last good resources)" if kept else ""
                log.warning("%s%s", p, suffix)
        if before and not problems:
            log.info("%s: fixed", file)
        if problems:
            self._problems[file] = problems
        else:
            self._problems.pop(file, None)
        self._notes[file] = result.unknown
