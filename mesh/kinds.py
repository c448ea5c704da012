"""The kind registry: which apiVersion/kind maps to which resource class, and ``parse`` for documents.

``parse`` is the single door from untrusted dicts (YAML, Kubernetes events, admission requests) to the
model: schema errors from pydantic and semantic errors from each kind's ``semantic_errors`` hook come out
as one ``InvalidResource`` naming the resource and every field path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from istiopy.mesh.errors import FieldError, InvalidResource, UnknownKind
from istiopy.mesh.meta import Resource

R = TypeVar("R", bound=type[Resource])

# (group, kind) -> class; apiVersion strings -> class for fast lookup.
_BY_GROUP_KIND: dict[tuple[str, str], type[Resource]] = {}
_BY_API_KIND: dict[tuple[str, str], type[Resource]] = {}


def register(cls: R) -> R:
    """Class decorator: make a resource class known to ``parse`` under each of its apiVersions."""
    _BY_GROUP_KIND[(cls.GROUP, cls.KIND)] = cls
    for api_version in cls.api_versions():
        _BY_API_KIND[(api_version, cls.KIND)] = cls
    return cls


def registered() -> list[type[Resource]]:
    """Every known resource class, ordered by group then kind."""
    return [c for _, c in sorted(_BY_GROUP_KIND.items())]


def kind_class(kind: str, group: str | None = None) -> type[Resource]:
    """The class for a kind name (optionally within a group); KeyError when unknown or ambiguous."""
    found = [c for (g, k), c in _BY_GROUP_KIND.items() if k == kind and (group is None or g == group)]
    if len(found) != 1:
        raise KeyError(f"{'no' if not found else 'ambiguous'} kind {kind!r}")
    return found[0]


def format_loc(loc: Iterable[int | str]) -> str:
    """``('spec', 'rules', 0, 'from')`` -> ``spec.rules[0].from``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def describe(doc: Mapping[str, Any]) -> str:
    """``Kind/namespace/name`` of a raw document, as far as it can be read."""
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    assert isinstance(meta, Mapping)
    kind = str(doc.get("kind") or "<no kind>")
    name = str(meta.get("name") or "<no name>")
    ns = meta.get("namespace")
    return f"{kind}/{ns}/{name}" if ns else f"{kind}/{name}"


def _schema_errors(err: ValidationError) -> list[FieldError]:
    errors: list[FieldError] = []
    for e in err.errors(include_url=False):
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        errors.append(FieldError(format_loc(loc), msg))
    return errors


def parse(doc: Mapping[str, Any], source: str = "", default_namespace: str = "") -> Resource:
    """Turn one document into a validated resource.

    Raises ``UnknownKind`` for kinds the mesh does not read and ``InvalidResource`` (naming every bad
    field) for known kinds that are invalid. ``default_namespace`` fills a missing namespace, as
    ``kubectl apply -n`` does.
    """
    if not isinstance(doc, Mapping):
        raise InvalidResource(
            "<document>", [FieldError("", f"expected a mapping, got {type(doc).__name__}")], source
        )
    api_version = str(doc.get("apiVersion") or "")
    kind = str(doc.get("kind") or "")
    what = describe(doc)
    if not api_version or not kind:
        missing = "apiVersion" if not api_version else "kind"
        raise InvalidResource(what, [FieldError(missing, "required")], source)
    cls = _BY_API_KIND.get((api_version, kind))
    if cls is None:
        group = api_version.rpartition("/")[0]
        if (group, kind) in _BY_GROUP_KIND:
            known = ", ".join(_BY_GROUP_KIND[(group, kind)].api_versions())
            raise InvalidResource(
                what, [FieldError("apiVersion", f"unsupported version (known: {known})")], source
            )
        raise UnknownKind(api_version, kind, what, source)
    data = dict(doc)
    meta = dict(data.get("metadata") or {})
    if cls.NAMESPACED and not meta.get("namespace") and default_namespace:
        meta["namespace"] = default_namespace
    data["metadata"] = meta
    if "status" not in cls.model_fields:
        data.pop("status", None)  # status is written by controllers, not part of the desired state
    try:
        res = cls.model_validate(data)
    except ValidationError as err:
        raise InvalidResource(what, _schema_errors(err), source) from None
    problems: list[FieldError] = []
    if not res.metadata.name:
        problems.append(FieldError("metadata.name", "required"))
    if cls.NAMESPACED and not res.metadata.namespace:
        problems.append(FieldError("metadata.namespace", "required"))
    hook = getattr(res, "semantic_errors", None)
    if callable(hook):
        problems.extend(hook())
    if problems:
        raise InvalidResource(what, problems, source)
    return res
