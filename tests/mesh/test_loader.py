"""The loader: one result per document, and no bad document stops the ones around it."""

from __future__ import annotations

import json
from pathlib import Path

from istiopy.mesh.loader import find_files, load_file, load_path, load_paths, load_text

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: %s}\n"
SVC = "apiVersion: v1\nkind: Service\nmetadata: {name: %s, namespace: default}\nspec: {ports: [{port: %d}]}\n"


def test_multi_document_with_every_kind_of_problem() -> None:
    text = (
        "# leading comment\n"
        + NS % "one"
        + "---\n"
        + "apiVersion: v1\nkind: Service\nmetadata: {name: broken\n  namespace: x}\n"  # bad YAML, lines 6-9
        + "---\n"
        + SVC % ("bad-port", 0)
        + "---\n"
        + "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\n"
        + "---\n"
        + "---\n"  # empty document
        + SVC % ("good", 80)
    )
    result = load_text(text, "f.yaml")
    assert [r.key for r in result.resources] == [("Namespace", "", "one"), ("Service", "default", "good")]
    (bad,) = result.malformed
    assert bad.source == "f.yaml"
    assert bad.line == 9
    assert "invalid YAML" in bad.reason
    (invalid,) = result.errors
    assert invalid.resource == "Service/default/bad-port"
    assert [str(e) for e in invalid.errors] == [
        "spec.ports[0].port: Input should be greater than or equal to 1"
    ]
    (note,) = result.unknown
    assert note.kind == "Deployment"
    assert [d.line for d in result.documents] == [2, 9, 11, 16, 21]
    assert not result.ok


def test_list_items_and_default_namespace() -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"type": "Bogus"}},
        ],
    }
    result = load_text(json.dumps(doc), "l.json", default_namespace="shop", json_format=True)
    assert [r.key for r in result.resources] == [("ServiceAccount", "shop", "sa")]
    first, second = result.documents
    assert first.item == 0
    assert second.where == "l.json:1 items[1]"
    assert second.key == ("Service", "shop", "s")  # known for invalid documents too
    assert second.error is not None


def test_bad_json_has_a_line() -> None:
    result = load_text('{\n  "kind": "Namespace",\n  oops\n}', "x.json", json_format=True)
    (bad,) = result.malformed
    assert bad.line == 3


def test_non_mapping_and_missing_kind() -> None:
    result = load_text("- a\n- b\n---\nmetadata: {name: x}\n", "odd.yaml")
    assert [str(e.errors[0]) for e in result.errors] == [
        "expected a mapping, got list",
        "apiVersion: required",
    ]


def test_directory_walk(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a.yaml").write_text(NS % "a")
    (tmp_path / "sub" / "b.yml").write_text(NS % "b")
    (tmp_path / "sub" / "c.json").write_text(
        json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "c"}})
    )
    (tmp_path / "notes.txt").write_text("not config")
    (tmp_path / ".hidden" / "d.yaml").write_text(NS % "d")
    (tmp_path / ".#a.yaml").write_text(NS % "e")
    assert [p.name for p in find_files(tmp_path)] == ["a.yaml", "b.yml", "c.json"]
    result = load_path(tmp_path)
    assert [r.name for r in result.resources] == ["a", "b", "c"]
    assert result.ok
    assert [r.name for r in load_paths([tmp_path / "a.yaml", tmp_path / "sub"]).resources] == ["a", "b", "c"]


def test_missing_and_unreadable(tmp_path: Path) -> None:
    (missing,) = load_path(tmp_path / "nope").malformed
    assert "no such file" in missing.reason
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    assert load_file(tmp_path / "bin.yaml").malformed
