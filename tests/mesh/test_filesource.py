"""The file source on a real directory: add, edit, delete, break and fix files while they are watched."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from istiopy.mesh.filesource import FileSource
from istiopy.mesh.resources.core import Service
from istiopy.mesh.store import Change, ConfigStore

SVC = "apiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: default}\nspec: {ports: [{port: %d}]}\n"


async def eventually(check: Callable[[], bool], within: float = 20.0) -> None:
    """Poll ``check`` until it holds: file events arrive asynchronously, after the watcher's debounce."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def port(store: ConfigStore, name: str) -> int | None:
    svc = store.get_typed(Service, "default", name)
    return svc.spec.ports[0].port if svc else None


@pytest.fixture
async def watched(tmp_path: Path) -> AsyncIterator[tuple[FileSource, ConfigStore, list[Change]]]:
    (tmp_path / "a.yaml").write_text(SVC % ("a", 80))
    store = ConfigStore()
    changes: list[Change] = []
    store.subscribe(changes.append)
    source = FileSource(store, tmp_path, debounce_ms=20)
    task = asyncio.create_task(source.run())
    await asyncio.wait_for(source.ready.wait(), 30)
    yield source, store, changes
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_initial_load_without_watching(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(SVC % ("a", 80) + "---\n" + SVC % ("bad", 0))
    store = ConfigStore()
    source = FileSource(store, tmp_path)
    result = source.load()
    assert [r.name for r in result.resources] == ["a"]
    assert [r.name for r in store] == ["a"]
    assert store.source_of(store.list("Service")[0].key) == f"file:{tmp_path / 'a.yaml'}"
    (problem,) = source.problems
    assert "Service/default/bad" in str(problem)


async def test_add_edit_delete(watched: tuple[FileSource, ConfigStore, list[Change]], tmp_path: Path) -> None:
    source, store, changes = watched
    assert port(store, "a") == 80
    # add a file with two resources
    (tmp_path / "b.yaml").write_text(SVC % ("b", 81) + "---\n" + SVC % ("c", 82))
    await eventually(lambda: port(store, "c") == 82)
    assert port(store, "b") == 81
    # edit: change one resource, drop the other
    (tmp_path / "b.yaml").write_text(SVC % ("b", 91))
    await eventually(lambda: port(store, "b") == 91)
    await eventually(lambda: port(store, "c") is None)
    # a file in a new sub-folder
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.yaml").write_text(SVC % ("d", 83))
    await eventually(lambda: port(store, "d") == 83)
    # delete: exactly that file's resources go
    (tmp_path / "b.yaml").unlink()
    await eventually(lambda: port(store, "b") is None)
    assert port(store, "a") == 80
    assert port(store, "d") == 83
    assert {(c.op, c.key.name) for c in changes} >= {
        ("add", "b"),
        ("update", "b"),
        ("delete", "c"),
        ("delete", "b"),
    }
    assert source.problems == []


async def test_break_and_fix(watched: tuple[FileSource, ConfigStore, list[Change]], tmp_path: Path) -> None:
    source, store, _ = watched
    # Broken YAML: the file's last good resources stay.
    (tmp_path / "a.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: a\n")
    await eventually(lambda: bool(source.problems))
    (problem,) = source.problems
    assert "invalid YAML" in str(problem)
    assert str(tmp_path / "a.yaml") in str(problem)
    assert port(store, "a") == 80
    # An invalid edit of a resource keeps its last good version; valid neighbours apply.
    (tmp_path / "a.yaml").write_text(SVC % ("a", 70000) + "---\n" + SVC % ("e", 84))
    await eventually(lambda: port(store, "e") == 84)
    assert port(store, "a") == 80
    (problem,) = source.problems
    assert "Service/default/a" in str(problem)
    assert "spec.ports[0].port" in str(problem)
    # Fixing the file recovers and clears the problem.
    (tmp_path / "a.yaml").write_text(SVC % ("a", 8080))
    await eventually(lambda: port(store, "a") == 8080)
    await eventually(lambda: port(store, "e") is None)
    assert source.problems == []


async def test_new_broken_file_loads_its_valid_documents(
    watched: tuple[FileSource, ConfigStore, list[Change]], tmp_path: Path
) -> None:
    source, store, _ = watched
    (tmp_path / "n.yaml").write_text(SVC % ("n", 85) + "---\nkind: [\n")
    await eventually(lambda: port(store, "n") == 85)
    assert len(source.problems) == 1


async def test_watch_a_single_file(tmp_path: Path) -> None:
    f = tmp_path / "one.yaml"
    f.write_text(SVC % ("one", 80))
    (tmp_path / "other.yaml").write_text(SVC % ("other", 80))
    store = ConfigStore()
    source = FileSource(store, f, debounce_ms=20)
    task = asyncio.create_task(source.run())
    try:
        await asyncio.wait_for(source.ready.wait(), 30)
        assert [r.name for r in store] == ["one"]
        f.write_text(SVC % ("one", 81))
        (tmp_path / "other.yaml").write_text(SVC % ("other", 81))
        await eventually(lambda: port(store, "one") == 81)
        assert port(store, "other") is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
