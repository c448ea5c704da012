"""CRDs: the committed files are what the models generate; each is a structural CRD the API server accepts."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from istiopy.mesh.crdgen import HEADER, crd_for, crd_kinds, generate, openapi_schema, structural_errors, write
from istiopy.mesh.meta import Model, Resource

CRDS = Path(__file__).resolve().parents[2] / "crds"
_DNS = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
GENERATED = generate()


def test_every_istio_and_gateway_kind_has_a_crd() -> None:
    kinds = {(c.GROUP, c.KIND) for c in crd_kinds()}
    assert {
        ("gateway.networking.k8s.io", "Gateway"),
        ("gateway.networking.k8s.io", "HTTPRoute"),
        ("gateway.networking.k8s.io", "GatewayClass"),
    } <= kinds
    assert all(g.endswith("istio.io") or g == "gateway.networking.k8s.io" for g, _ in kinds)
    assert not any(k in {"Pod", "Service", "EndpointSlice"} for _, k in kinds)
    assert len(GENERATED) == len(kinds)


def test_committed_crds_match_the_models() -> None:
    committed = {p.name: p.read_text() for p in CRDS.glob("*.yaml") if p.read_text().startswith(HEADER)}
    stale = sorted(set(committed) - set(GENERATED))
    missing = sorted(set(GENERATED) - set(committed))
    changed = sorted(n for n in set(GENERATED) & set(committed) if GENERATED[n] != committed[n])
    drift = stale or missing or changed
    assert not drift, (
        f"crds/ is out of date (stale {stale}, missing {missing}, changed {changed}): run make crds"
    )


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_crd_is_structural(name: str) -> None:
    crd = yaml.safe_load(GENERATED[name])
    assert structural_errors(crd) == []
    versions = crd["spec"]["versions"]
    assert [v["storage"] for v in versions] == [True] + [False] * (len(versions) - 1)
    assert all(v["served"] for v in versions)
    status = versions[0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True


def test_versions_and_scope() -> None:
    by_kind = {c.KIND: c for c in crd_kinds()}
    ap = crd_for(by_kind["AuthorizationPolicy"])
    assert ap["metadata"]["name"] == "authorizationpolicies.security.istio.io"
    assert [v["name"] for v in ap["spec"]["versions"]] == ["v1", "v1beta1"]
    gc = crd_for(by_kind["GatewayClass"])
    assert gc["spec"]["scope"] == "Cluster"


def test_gateway_schema_carries_model_limits() -> None:
    schema = openapi_schema(next(c for c in crd_kinds() if c.KIND == "HTTPRoute"))
    rule = schema["properties"]["spec"]["properties"]["rules"]["items"]
    backend = rule["properties"]["backendRefs"]["items"]
    assert backend["properties"]["weight"] == {"type": "integer", "minimum": 0, "maximum": 1000000}
    path_type = rule["properties"]["matches"]["items"]["properties"]["path"]["properties"]["type"]
    assert path_type["enum"] == ["Exact", "PathPrefix", "RegularExpression"]
    assert "default" not in path_type


class _Inner(Model):
    port: int | str
    maybe: str | None = None
    anything: Any = None
    tags: dict[str, str] = {}
    blob: dict[str, Any] = {}
    either: int | list[str] = 0


class _Tree(Model):
    name: str
    children: list[_Tree] = []


class _Synthetic(Resource):
    KIND: ClassVar[str] = "Synthetic"
    GROUP: ClassVar[str] = "test.istiopy.io"
    PLURAL: ClassVar[str] = "synthetics"

    spec: _Inner
    tree: _Tree | None = None


def test_conversion_of_awkward_types() -> None:
    schema = openapi_schema(_Synthetic)
    spec = schema["properties"]["spec"]["properties"]
    assert spec["port"] == {"x-kubernetes-int-or-string": True}
    assert spec["maybe"] == {"type": "string"}
    assert spec["anything"] == {"x-kubernetes-preserve-unknown-fields": True}
    assert spec["tags"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert spec["blob"] == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    assert spec["either"] == {"x-kubernetes-preserve-unknown-fields": True}
    children = schema["properties"]["tree"]["properties"]["children"]
    assert children["items"] == {"x-kubernetes-preserve-unknown-fields": True}  # recursion stops here
    assert schema["required"] == ["spec"]
    assert structural_errors(crd_for(_Synthetic)) == []


def test_structural_validator_catches_mistakes() -> None:
    crd = crd_for(_Synthetic)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    spec["properties"]["bad"] = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    spec["properties"]["ref"] = {"$ref": "#/$defs/X"}
    spec["properties"]["list"] = {"type": "array"}
    spec["properties"]["look"] = {"type": "string", "pattern": "^(?!x)"}
    spec["properties"]["obj"] = {
        "type": "object",
        "properties": {},
        "additionalProperties": {"type": "string"},
    }
    crd["spec"]["versions"][0]["storage"] = False
    crd["spec"]["group"] = "example.k8s.io"
    crd["metadata"]["name"] = "synthetics.example.k8s.io"
    errors = "\n".join(structural_errors(crd))
    for expected in (
        "'anyOf' is not allowed",
        "'$ref' is not allowed",
        "an array needs one items schema",
        "lookaround",
        "mutually exclusive",
        "exactly one version must be the storage version",
        "properties.bad: type is required",
        "required for the protected group example.k8s.io",
    ):
        assert expected in errors


def test_write_removes_stale_generated_files(tmp_path: Path) -> None:
    (tmp_path / "old_kinds.yaml").write_text(HEADER + "kind: Old\n")
    (tmp_path / "hand-written.yaml").write_text("kind: Mine\n")
    written = write(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "old_kinds.yaml" not in names
    assert "hand-written.yaml" in names
    assert sorted(p.name for p in written) == sorted(GENERATED)


@pytest.mark.k8s
@pytest.mark.slow
def test_real_api_server_accepts_the_crds_and_our_valid_documents() -> None:
    """The authority on structural schemas: a real kube-apiserver installs every CRD and accepts (server-side
    dry run, so its schema validation and pruning run) each valid test document and example of those kinds."""
    from istiopy.testing.cluster import TestCluster

    groups = {c.GROUP for c in crd_kinds()}
    data = Path(__file__).resolve().parents[1] / "data" / "valid"
    docs = [
        d
        for f in sorted(data.glob("*.yaml")) + sorted((CRDS.parent / "examples").glob("*.yaml"))
        for d in yaml.safe_load_all(f.read_text())
        if d
        and d.get("apiVersion", "").rpartition("/")[0] in groups
        # a few upstream vectors use names Kubernetes itself refuses (``nsA``); the schema is the subject here
        and all(_DNS.fullmatch(d["metadata"].get(k, "default")) for k in ("name", "namespace"))
    ]
    assert len(docs) > 20
    with TestCluster() as cluster:
        cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
        for _ in range(30):  # `wait` errors out on a CRD whose status the server has not written yet
            waited = cluster.kubectl(
                "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s", check=False
            )
            if waited.returncode == 0:
                break
            time.sleep(1)
        assert waited.returncode == 0, waited.stderr
        for ns in sorted({d["metadata"].get("namespace", "default") for d in docs} - {"default"}):
            cluster.kubectl("create", "namespace", ns)
        refused = []
        for d in docs:
            out = cluster.kubectl(
                "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(d), check=False
            )
            if out.returncode != 0:
                refused.append(f"{d['kind']}/{d['metadata']['name']}: {out.stderr.strip()}")
        assert refused == []
        # Limits that live on model fields reach the server too.
        invalid = Path(__file__).resolve().parents[1] / "data" / "invalid"
        for name in (
            "gateway-listener-port-range.yaml",
            "gateway-httproute-negative-weight.yaml",
            "gateway-httproute-path-type.yaml",
        ):
            out = cluster.kubectl("apply", "--dry-run=server", "-f", str(invalid / name), check=False)
            assert out.returncode != 0, name
            assert "spec." in out.stderr, out.stderr
