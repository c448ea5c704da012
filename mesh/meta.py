"""The base of every resource: object metadata, the kind registry hooks and resource keys.

Resource classes carry the upstream field names as camelCase aliases (``targetRefs``) and snake_case
attributes (``target_refs``), so Istio YAML loads unchanged and Python code reads naturally.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class ResourceKey(NamedTuple):
    """Identity of a resource in the store: kind (e.g. ``AuthorizationPolicy``), namespace, name."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}" if self.namespace else f"{self.kind}/{self.name}"


class Model(BaseModel):
    """Base of every spec object: camelCase aliases, unknown fields refused (as Istio's CRD schemas do)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        serialize_by_alias=True,
    )

    def to_dict(self) -> dict[str, Any]:
        """The YAML/JSON shape: camelCase keys, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class LenientModel(Model):
    """Base of Kubernetes core objects: the mesh reads a subset of their fields and ignores the rest."""

    model_config = ConfigDict(extra="ignore")


class OwnerReference(LenientModel):
    api_version: str = ""
    kind: str = ""
    name: str = ""
    uid: str = ""
    controller: bool | None = None


class ObjectMeta(LenientModel):
    name: str = ""
    namespace: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str = ""
    resource_version: str = ""
    generation: int | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    owner_references: list[OwnerReference] = Field(default_factory=list)


class Resource(Model):
    """A top-level object. Subclasses set KIND, GROUP, VERSIONS (first = preferred) and NAMESPACED."""

    KIND: ClassVar[str] = ""
    GROUP: ClassVar[str] = ""
    VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)
    NAMESPACED: ClassVar[bool] = True
    PLURAL: ClassVar[str] = ""

    api_version: str = Field(default="", alias="apiVersion")
    kind: str = ""
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.KIND, self.metadata.namespace if self.NAMESPACED else "", self.metadata.name)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def labels(self) -> dict[str, str]:
        return self.metadata.labels

    @classmethod
    def api_versions(cls) -> tuple[str, ...]:
        """Every accepted ``apiVersion`` string, preferred first."""
        return tuple(f"{cls.GROUP}/{v}" if cls.GROUP else v for v in cls.VERSIONS)


class LenientResource(Resource):
    """A Kubernetes core object: unknown fields are ignored rather than refused."""

    model_config = ConfigDict(extra="ignore")
