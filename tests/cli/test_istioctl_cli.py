"""``istioctl-py`` run as the real console script."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import istiopy

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent / "istioctl-py"
VALID = ROOT / "tests" / "data" / "valid"


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, input=stdin, cwd=ROOT, timeout=60, check=False
    )


def run_all(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Independent invocations side by side: each one is mostly interpreter start-up and imports, so on a
    multi-core machine running them one after the other only adds up waiting."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda argv: run(*argv), argvs))


def test_help_and_version() -> None:
    out, version = run_all(["--help"], ["--version"])
    assert out.returncode == 0
    assert "validate" in out.stdout
    assert version.returncode == 0
    assert version.stdout.strip() == f"istioctl-py {istiopy.__version__}"


def test_bad_flags_exit_2_with_one_line() -> None:
    bad = (["--bogus"], ["validate"], ["validate", "-f", "x", "--nope"], [])
    for args, out in zip(bad, run_all(*bad), strict=True):
        assert out.returncode == 2, args
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith("istioctl-py")
        assert "error:" in lines[0]


def test_validate_valid_files() -> None:
    files = [str(p) for p in sorted(VALID.glob("gateway-*.yaml")) + sorted(VALID.glob("k8s-*.yaml"))]
    out = run("validate", *[a for f in files for a in ("-f", f)])
    assert out.returncode == 0, out.stdout
    assert f'"{files[0]}" is valid' in out.stdout
    assert " 0 invalid" in out.stdout


def test_validate_examples_names_the_invalid_document() -> None:
    out = run("validate", "-f", "examples/")
    assert out.returncode == 1
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("error:")]
    assert "AuthorizationPolicy/backend/demo-invalid-policy" in line
    assert "examples/invalid/authorizationpolicy-demo-error.yaml:" in line
    assert "spec.action" in line
    assert "DENYALL" in line
    assert '"examples/policies.yaml" is valid' in out.stdout


def test_unknown_kinds_are_skipped_with_a_note(tmp_path: Path) -> None:
    f = tmp_path / "app.yaml"
    f.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n"
    )
    out = run("validate", "-f", str(f))
    assert out.returncode == 0, out.stdout
    assert "note: Deployment/shop/web" in out.stdout
    assert "skipped" in out.stdout
    assert "1 valid, 0 invalid, 1 skipped" in out.stdout


def test_every_invalid_document_and_field_is_listed(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
        "spec:\n  rules:\n  - matches: [{path: {type: Prefix}}]\n"
        "    backendRefs: [{name: a, port: 80, weight: -1}]\n"
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ok}\n"
    )
    (tmp_path / "b.yaml").write_text("apiVersion: v1\nkind: Service\nmetadata: {name: [\n")
    out = run("validate", "-f", str(tmp_path), "-n", "shop")
    assert out.returncode == 1
    errors = [ln for ln in out.stdout.splitlines() if ln.startswith("error:")]
    assert len(errors) == 3
    assert "HTTPRoute/shop/r" in errors[0]
    assert "spec.rules[0].matches[0].path.type" in errors[0]
    assert "spec.rules[0].backendRefs[0].weight" in errors[1]
    assert f"{tmp_path / 'b.yaml'}:3" in errors[2]
    assert "invalid YAML" in errors[2]
    assert "3 documents in 2 files: 1 valid, 2 invalid, 0 skipped" in out.stdout


def test_stdin_and_missing_path() -> None:
    out = run("validate", "-f", "-", stdin="apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n")
    assert out.returncode == 0
    out = run("validate", "-f", "does/not/exist")
    assert out.returncode == 1
    assert "no such file or directory" in out.stdout
