"""Istio's own CRD validation vectors: what upstream accepts we accept, what it refuses we refuse.

The vectors (istio/istio ``pkg/config/validation/testdata/crds``) are shared reference data outside the
repository. Each ``*-invalid.yaml`` document carries ``_err``, a substring of upstream's message; our
wording may differ, so the check is loose: either that text appears in one of our errors, or the field
path it names is the path of one of ours. Every error we raise must name a field path either way.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import istiopy.mesh.resources  # noqa: F401  (registers the kinds)
from istiopy.mesh.errors import FieldError, InvalidResource
from istiopy.mesh.kinds import parse

VECTORS = Path(__file__).resolve().parents[2].parent / "shared/reference/upstream-validation"


def _load(suffix: str) -> list[Any]:
    if not VECTORS.is_dir():
        # Fail, don't skip: a missing directory would otherwise pass silently with zero cases.
        return [pytest.param(None, None, id=f"vectors-missing{suffix}")]
    out: list[Any] = []
    for f in sorted(VECTORS.glob(f"*{suffix}")):
        for i, doc in enumerate(yaml.safe_load_all(f.read_text())):
            if doc:
                name = (doc.get("metadata") or {}).get("name", "")
                out.append(pytest.param(f.name, doc, id=f"{f.stem}#{i}-{name}"))
    return out


VALID = _load("-valid.yaml")
INVALID = _load("-invalid.yaml")

_PATH_PREFIX = re.compile(r"^([A-Za-z0-9_.\[\]]+)(?::| in body)")


def _matches(expected: str, errors: list[FieldError]) -> bool:
    """Loose comparison with upstream's message (see module docstring)."""
    want = expected.strip().lower()
    if any(want in str(e).lower() for e in errors):
        return True
    m = _PATH_PREFIX.match(expected.strip())
    if m and ("." in m.group(1) or "[" in m.group(1) or m.group(1) == "spec"):
        path = m.group(1)
        return any(e.path == path or e.path.endswith("." + path) for e in errors)
    return False


def _require_vectors(doc: Any) -> dict[str, Any]:
    if doc is None:
        pytest.fail(f"upstream validation vectors not found at {VECTORS}")
    assert isinstance(doc, dict)
    return dict(doc)


def test_vector_counts() -> None:
    assert VECTORS.is_dir(), f"upstream validation vectors not found at {VECTORS}"
    # As of the snapshot in /work/shared: 19 valid and 50 invalid documents across 6 kinds.
    assert len(VALID) >= 19
    assert len(INVALID) >= 40


@pytest.mark.parametrize(("file", "doc"), VALID)
def test_upstream_valid_vector_parses(file: str, doc: Any) -> None:
    data = _require_vectors(doc)
    data.pop("_err", None)
    res = parse(data, source=file, default_namespace="default")
    assert parse(res.to_dict()) == res


@pytest.mark.parametrize(("file", "doc"), INVALID)
def test_upstream_invalid_vector_is_refused(file: str, doc: Any) -> None:
    data = _require_vectors(doc)
    expected = str(data.pop("_err"))
    with pytest.raises(InvalidResource) as err:
        parse(data, source=file, default_namespace="default")
    errors = err.value.errors
    assert errors, "InvalidResource without errors"
    assert all(e.path for e in errors), [str(e) for e in errors]
    assert _matches(expected, errors), f"expected something like {expected!r}, got {[str(e) for e in errors]}"
