"""``istiod-py`` run as the real console script: demo, serve once, and serving while files change."""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import istiopy

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent / "istiod-py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], capture_output=True, text=True, cwd=ROOT, timeout=60, check=False
    )


def run_all(*argvs: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Independent invocations side by side: each one is mostly interpreter start-up and imports (~1 s of
    CPU), so on a multi-core machine running them one after the other only adds up waiting."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(lambda argv: run(*argv), argvs))


@pytest.mark.slow  # nine interpreter starts with the mesh models imported: 5-15 s on 2 cores
def test_help_version_and_bad_flags() -> None:
    bad = (
        ["--bogus"],
        [],
        ["serve"],
        ["demo", "--what"],
        ["--log-level", "loud", "demo"],
        ["--config-dir", "no/such/dir"],
        ["demo", "--config-dir", "no/such/dir"],
        ["kube", "--max-connection-age", "30 minutes"],
    )
    out, version, *outs = run_all(["--help"], ["--version"], *bad)
    assert out.returncode == 0
    assert "serve" in out.stdout
    assert "demo" in out.stdout
    assert version.stdout.strip() == f"istiod-py {istiopy.__version__}"
    for args, out in zip(bad, outs, strict=True):
        assert out.returncode == 2, args
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert "error:" in lines[0]
    assert "not a duration: '30 minutes'" in outs[-1].stderr  # names the value and the variable's flag


def test_max_connection_age_reads_go_durations() -> None:
    from istiopy.istiod.kube import connection_age

    assert connection_age("30m") == 1800.0
    assert connection_age("1h30m") == 5400.0
    assert connection_age("") is None
    assert connection_age("0s") is None


def test_demo_prints_resources_and_problems() -> None:
    out = run("demo", "--config-dir", "examples/", "--config-only")  # the mesh run: tests/e2e/test_e2e_kit.py
    assert out.returncode == 0, out.stderr
    for text in (
        "AuthorizationPolicy",
        "backend/backend-allow-frontend",
        "VirtualService",
        "backend/backend-canary",
        "Gateway",
        "backend/waypoint",
        "frontend/frontend-7d9f8b6c5-abcde",
        "AuthorizationPolicy/backend/demo-invalid-policy",
        "examples/invalid/authorizationpolicy-demo-error.yaml:",
        "spec.action",
        "1 invalid document",
    ):
        assert text in out.stdout, text


def test_serve_once_reports_the_invalid_document_and_loads_the_rest() -> None:
    out = run("serve", "--config-dir", "examples/", "--once")
    assert out.returncode == 0, out.stderr
    warnings = [ln for ln in out.stderr.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1
    assert "AuthorizationPolicy/backend/demo-invalid-policy" in warnings[0]
    assert "spec.action" in warnings[0]
    assert "loaded 23 resources of 10 kinds from examples/" in out.stderr


class Lines:
    """Reads a process's stderr line by line with a deadline, so a hung server fails the test."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.stream = proc.stderr
        os.set_blocking(self.stream.fileno(), False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.stream, selectors.EVENT_READ)
        self.seen: list[str] = []

    def wait_for(self, text: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.seen:
                if text in line:
                    self.seen.remove(line)
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not logged; got {self.seen}")
            if self.sel.select(left):
                chunk = self.stream.read()
                if chunk:
                    self.seen += chunk.splitlines()


def test_serving_shortcut_watches_the_directory(tmp_path: Path) -> None:
    config = tmp_path / "config"
    shutil.copytree(ROOT / "examples", config)
    proc = subprocess.Popen(
        [str(BIN), "--config-dir", str(config)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        lines = Lines(proc)
        warning = lines.wait_for("WARNING")
        assert "AuthorizationPolicy/backend/demo-invalid-policy" in warning
        assert "spec.action" in warning
        assert "loaded 23 resources" in lines.wait_for("loaded")
        lines.wait_for("watching")
        # Fix the invalid document: it loads and the problem is cleared.
        bad = config / "invalid" / "authorizationpolicy-demo-error.yaml"
        bad.write_text(bad.read_text().replace("DENYALL", "DENY"))
        lines.wait_for("authorizationpolicy-demo-error.yaml: fixed")
        # Delete a file: its resources go.
        (config / "traffic.yaml").unlink()
        assert "2 resource(s) deleted" in lines.wait_for("traffic.yaml")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
