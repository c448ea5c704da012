"""Build a real ConfigStore from YAML text through the model's one parsing door."""

from __future__ import annotations

from typing import Any

import yaml

import istiopy.mesh.resources  # noqa: F401  (registers every kind)
from istiopy.mesh.kinds import parse
from istiopy.mesh.store import ConfigStore


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def store_from(text: str) -> ConfigStore:
    store = ConfigStore()
    for doc in docs(text):
        store.apply(parse(doc, source="test"), source="test")
    return store


def apply(store: ConfigStore, text: str) -> None:
    for doc in docs(text):
        store.apply(parse(doc, source="test"), source="test")


def pod(
    name: str,
    ns: str,
    ip: str,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    sa: str = "",
    node: str = "node-0",
    ready: bool = True,
    ports: list[tuple[str, int]] | None = None,
    owner: tuple[str, str] | None = None,
) -> str:
    """A Pod document as YAML (kubectl shape), small enough to read in a test."""
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "app", "ports": [{"name": n, "containerPort": p} for n, p in (ports or [])]}
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }
    if sa:
        doc["spec"]["serviceAccountName"] = sa
    if owner:
        doc["metadata"]["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1], "uid": "u", "controller": True}
        ]
    return "---\n" + yaml.safe_dump(doc)
