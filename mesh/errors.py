"""Errors of the model layer: every one names the resource and the field path.

Sources, the CLI and the operator turn these into log lines, CLI messages and status conditions; nothing
else needs to parse pydantic's error format.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FieldError:
    """One problem with one field: ``path`` is dotted with list indexes, e.g. ``spec.rules[0].from``."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}" if self.path else self.reason


class MeshError(Exception):
    """Base class of every error raised by istiopy's model layer."""


@dataclass
class InvalidResource(MeshError):
    """A document that is not a valid resource of its kind; ``resource`` is ``Kind/namespace/name``."""

    resource: str
    errors: list[FieldError] = field(default_factory=list)
    source: str = ""

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        details = "; ".join(str(e) for e in self.errors)
        return f"{self.resource}{where}: {details}"


@dataclass
class UnknownKind(MeshError):
    """A document whose apiVersion/kind the mesh does not read (e.g. a Deployment): skipped, not failed."""

    api_version: str
    kind: str
    resource: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.resource or self.kind}: kind {self.api_version}/{self.kind} is not a mesh resource"


@dataclass
class MalformedFile(MeshError):
    """A file that is not YAML at all; ``line`` is 1-based when the parser knows it."""

    source: str
    reason: str
    line: int | None = None

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        at = f":{self.line}" if self.line is not None else ""
        return f"{self.source}{at}: {self.reason}"
