"""Read YAML/JSON files into resources, one result per document, without ever stopping at a bad one.

A file is split at its ``---`` separators before parsing, so a document with broken YAML is reported
(``MalformedFile`` with the file's line number) while the documents around it still load; a document that
parses but is not a valid resource is an ``InvalidResource``; a kind the mesh does not read is an
``UnknownKind`` note. kubectl-style ``kind: List`` documents are expanded into their ``items``.

The file source, ``istioctl-py validate`` and ``istiod-py demo`` all read files through here, so they agree
on what is valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import istiopy.mesh.resources  # noqa: F401  (registers every kind)
from istiopy.mesh import kinds
from istiopy.mesh.errors import FieldError, InvalidResource, MalformedFile, MeshError, UnknownKind
from istiopy.mesh.meta import Resource, ResourceKey

__all__ = [
    "EXTENSIONS",
    "DocResult",
    "FileResult",
    "LoadResult",
    "find_files",
    "load_file",
    "load_path",
    "load_paths",
    "load_text",
]

EXTENSIONS = (".yaml", ".yml", ".json")
_SEPARATOR = re.compile(r"^---(?:\s|$)|^\.\.\.\s*$")


@dataclass(frozen=True)
class DocResult:
    """The outcome of one document: exactly one of ``resource``/``error``/``unknown``/``malformed`` is set,
    unless the document was empty (all None: nothing to load)."""

    source: str
    index: int  # 0-based document number in the file
    line: int  # 1-based line where the document starts
    item: int | None = None  # index within a ``kind: List``
    resource: Resource | None = None
    error: InvalidResource | None = None
    unknown: UnknownKind | None = None
    malformed: MalformedFile | None = None
    key: ResourceKey | None = None  # best effort, also for invalid documents (None when unreadable)

    @property
    def where(self) -> str:
        item = f" items[{self.item}]" if self.item is not None else ""
        return f"{self.source}:{self.line}{item}"

    @property
    def problem(self) -> MeshError | None:
        return self.error or self.malformed


@dataclass
class FileResult:
    """Every document of one file, in order."""

    path: str
    documents: list[DocResult] = field(default_factory=list)

    @property
    def resources(self) -> list[Resource]:
        return [d.resource for d in self.documents if d.resource is not None]

    @property
    def errors(self) -> list[InvalidResource]:
        return [d.error for d in self.documents if d.error is not None]

    @property
    def unknown(self) -> list[UnknownKind]:
        return [d.unknown for d in self.documents if d.unknown is not None]

    @property
    def malformed(self) -> list[MalformedFile]:
        return [d.malformed for d in self.documents if d.malformed is not None]

    @property
    def problems(self) -> list[MeshError]:
        """Invalid and malformed documents (unknown kinds are notes, not problems)."""
        return [p for d in self.documents if (p := d.problem) is not None]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class LoadResult:
    """Every file read from one or more paths; missing paths come out as ``MalformedFile``."""

    files: list[FileResult] = field(default_factory=list)

    @property
    def documents(self) -> list[DocResult]:
        return [d for f in self.files for d in f.documents]

    @property
    def resources(self) -> list[Resource]:
        return [r for f in self.files for r in f.resources]

    @property
    def errors(self) -> list[InvalidResource]:
        return [e for f in self.files for e in f.errors]

    @property
    def unknown(self) -> list[UnknownKind]:
        return [u for f in self.files for u in f.unknown]

    @property
    def malformed(self) -> list[MalformedFile]:
        return [m for f in self.files for m in f.malformed]

    @property
    def problems(self) -> list[MeshError]:
        return [p for f in self.files for p in f.problems]

    @property
    def ok(self) -> bool:
        return not self.problems


def _split(text: str) -> Iterator[tuple[int, str]]:
    """(0-based first line, text) of each YAML document; separator lines belong to no document."""
    lines = text.splitlines(keepends=True)
    start, chunk = 0, list[str]()
    for i, line in enumerate(lines):
        if _SEPARATOR.match(line):
            yield start, "".join(chunk)
            # ``--- {a: 1}`` carries content on the separator line itself.
            rest = line[3:] if line.startswith("---") else ""
            start, chunk = i, ([" " * 3 + rest] if rest.strip() and not rest.lstrip().startswith("#") else [])
            if not chunk:
                start = i + 1
        else:
            chunk.append(line)
    yield start, "".join(chunk)


def _first_content_line(text: str) -> int:
    """0-based offset of the first line that is not blank or a comment (where the document 'starts')."""
    for i, line in enumerate(text.splitlines()):
        s = line.strip()
        if s and not s.startswith("#") and not s.startswith("%"):
            return i
    return 0


def _key_of(doc: Mapping[str, Any], default_namespace: str) -> ResourceKey | None:
    """The store key a document would have, read leniently (for invalid ones too)."""
    meta = doc.get("metadata")
    kind = doc.get("kind")
    if not isinstance(meta, Mapping) or not isinstance(kind, str) or not isinstance(meta.get("name"), str):
        return None
    group = str(doc.get("apiVersion") or "").rpartition("/")[0]
    try:
        cls = kinds.kind_class(kind, group)
    except KeyError:
        return None
    ns = str(meta.get("namespace") or default_namespace) if cls.NAMESPACED else ""
    return ResourceKey(cls.KIND, ns, str(meta["name"]))


def _parse_one(
    doc: Any, source: str, index: int, line: int, item: int | None, default_namespace: str
) -> DocResult:
    where = f"{source}:{line}" + (f" items[{item}]" if item is not None else "")
    key = _key_of(doc, default_namespace) if isinstance(doc, Mapping) else None
    try:
        res = kinds.parse(doc, where, default_namespace)
    except InvalidResource as err:
        return DocResult(source, index, line, item, error=err, key=key)
    except UnknownKind as note:
        return DocResult(source, index, line, item, unknown=note)
    return DocResult(source, index, line, item, resource=res, key=res.key)


def _expand(doc: Any, source: str, index: int, line: int, default_namespace: str) -> list[DocResult]:
    if doc is None:
        return []
    if isinstance(doc, Mapping) and doc.get("kind") == "List" and "items" in doc:
        items = doc.get("items") or []
        if not isinstance(items, list):
            err = InvalidResource("List", [FieldError("items", "expected a list")], f"{source}:{line}")
            return [DocResult(source, index, line, error=err)]
        return [_parse_one(it, source, index, line, i, default_namespace) for i, it in enumerate(items)]
    return [_parse_one(doc, source, index, line, None, default_namespace)]


def load_text(text: str, source: str, default_namespace: str = "", json_format: bool = False) -> FileResult:
    """Every document of ``text`` (YAML, or JSON when ``json_format``), labelled with ``source``."""
    result = FileResult(source)
    if json_format:
        try:
            doc = json.loads(text) if text.strip() else None
        except json.JSONDecodeError as err:
            bad = MalformedFile(source, f"invalid JSON: {err.msg}", err.lineno)
            result.documents.append(DocResult(source, 0, err.lineno, malformed=bad))
            return result
        result.documents += _expand(doc, source, 0, 1, default_namespace)
        return result
    index = 0
    for start, chunk in _split(text):
        if not chunk.strip():
            continue
        line = start + _first_content_line(chunk) + 1
        try:
            doc = yaml.safe_load(chunk)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
            at = start + mark.line + 1 if mark is not None else line
            at = min(at, start + max(len(chunk.rstrip().splitlines()), 1))  # "end of stream" is past the text
            reason = " ".join(str(getattr(err, "problem", None) or err).split())
            bad = MalformedFile(source, f"invalid YAML: {reason}", at)
            result.documents.append(DocResult(source, index, at, malformed=bad))
            index += 1
            continue
        result.documents += _expand(doc, source, index, line, default_namespace)
        index += 1
    return result


def load_file(path: str | Path, default_namespace: str = "") -> FileResult:
    """Read one file; an unreadable file is one ``MalformedFile`` document."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return FileResult(str(p), [DocResult(str(p), 0, 1, malformed=MalformedFile(str(p), reason))])
    return load_text(text, str(p), default_namespace, json_format=p.suffix == ".json")


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(root).parts)


def find_files(path: str | Path) -> list[Path]:
    """YAML/JSON files under ``path`` (itself when a file), sorted; hidden files and folders are skipped
    (editor temporaries, ``..data`` folders of mounted ConfigMaps)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        return []
    return sorted(f for f in p.rglob("*") if f.suffix in EXTENSIONS and f.is_file() and not _hidden(f, p))


def load_path(path: str | Path, default_namespace: str = "") -> LoadResult:
    """Every document of a file or of every YAML/JSON file under a directory."""
    p = Path(path)
    if not p.exists():
        missing = MalformedFile(str(p), "no such file or directory")
        return LoadResult([FileResult(str(p), [DocResult(str(p), 0, 1, malformed=missing)])])
    return LoadResult([load_file(f, default_namespace) for f in find_files(p)])


def load_paths(paths: Iterable[str | Path], default_namespace: str = "") -> LoadResult:
    """``load_path`` over several paths, results concatenated in order."""
    out = LoadResult()
    for p in paths:
        out.files += load_path(p, default_namespace).files
    return out
