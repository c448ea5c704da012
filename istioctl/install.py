"""``istioctl-py install`` and ``istioctl-py manifest generate``: the Helm charts, applied or rendered.

Why helm underneath instead of our own apply loop: the charts are the one description of an installation, so
``istioctl-py install``, ``helm install`` by hand and GitOps tools all produce the same objects, and helm's
release records make ``helm upgrade``/``helm uninstall`` work afterwards. The charts are installed in order
``base`` (CRDs first), ``istiod``, ``ztunnel``, as Istio's ambient profile does.

Values: ``--set KEY=VALUE`` where ``KEY`` is ``global.*`` (every chart), ``<chart>.<key>`` (one chart:
``base``, ``istiod``, ``ztunnel``) or a bare key of the istiod chart; a leading ``values.`` (upstream's
IstioOperator spelling, ``--set values.global.hub=...``) is accepted. ``-f FILE`` gives per-chart values files
as ``<chart>=FILE`` or one file for every chart. Each chart's ``values.schema.json`` rejects unknown keys, so
a typo fails before anything is applied.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["CHARTS", "charts_dir", "helm_commands", "register"]

CHARTS = ("base", "istiod", "ztunnel")
RELEASES = {"base": "istio-base", "istiod": "istiod", "ztunnel": "ztunnel"}


class InstallError(Exception):
    """One line for the user."""


def charts_dir(explicit: str | None = None) -> Path:
    """``--charts``, ``$ISTIOPY_CHARTS``, else the charts next to the package (a source checkout)."""
    for candidate in (explicit, os.environ.get("ISTIOPY_CHARTS")):
        if candidate:
            return Path(candidate)
    return Path(__file__).resolve().parents[1] / "charts"


def _helm(explicit: str | None) -> str:
    found = explicit or shutil.which("helm")
    if not found:
        raise InstallError("helm not found on PATH: install helm v3 (https://helm.sh) or pass --helm PATH")
    return found


def _split_sets(sets: list[str], components: list[str]) -> dict[str, list[str]]:
    """``--set`` flags routed to the charts they belong to (see the module docstring)."""
    out: dict[str, list[str]] = {c: [] for c in components}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InstallError(f"--set {item!r}: expected KEY=VALUE")
        key = key.removeprefix("values.")
        head, _, rest = key.partition(".")
        if head == "global":
            for c in components:
                out[c].append(f"{key}={value}")
        elif head in CHARTS and rest:
            if head in out:
                out[head].append(f"{rest}={value}")
        elif "istiod" in out:
            out["istiod"].append(f"{key}={value}")
    return out


def _split_files(files: list[str], components: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {c: [] for c in components}
    for item in files:
        chart, sep, path = item.partition("=")
        if sep and chart in CHARTS:
            if chart in out:
                out[chart].append(path)
        else:
            for c in components:
                out[c].append(item)
    for paths in out.values():
        for p in paths:
            if not Path(p).is_file():
                raise InstallError(f"values file {p} does not exist")
    return out


def helm_commands(args: argparse.Namespace, *, render: bool) -> list[list[str]]:
    """The helm invocations, in install order: ``template`` when rendering, else ``upgrade --install``."""
    charts = charts_dir(args.charts)
    components = [c for c in CHARTS if c in args.components]
    for c in components:
        if not (charts / c / "Chart.yaml").is_file():
            raise InstallError(f"chart {c} not found in {charts}: pass --charts DIR or set ISTIOPY_CHARTS")
    sets = _split_sets(list(args.set or []), components)
    files = _split_files(list(args.values or []), components)
    helm = _helm(args.helm)
    common: list[str] = []
    if args.kubeconfig:
        common.append(f"--kubeconfig={args.kubeconfig}")
    if args.context:
        common.append(f"--kube-context={args.context}")
    cmds: list[list[str]] = []
    for c in components:
        release = RELEASES[c]
        if args.revision and c == "istiod":
            release = f"istiod-{args.revision}"
        argv = [helm, *common]
        if render:
            argv += ["template", release, str(charts / c), "--namespace", args.istio_namespace]
        else:
            argv += ["upgrade", "--install", release, str(charts / c), "--namespace", args.istio_namespace]
            argv += ["--create-namespace"]
            if args.wait:
                argv += ["--wait", f"--timeout={args.timeout}"]
        if c in ("istiod", "ztunnel") and args.revision:
            argv += ["--set", f"revision={args.revision}"]
        if c == "base" and args.revision:
            argv += ["--set", f"defaultRevision={args.revision}"]
        if c == "ztunnel":
            argv += ["--set", f"istioNamespace={args.istio_namespace}"]
        else:
            argv += ["--set", f"global.istioNamespace={args.istio_namespace}"]
        for f in files[c]:
            argv += ["-f", f]
        for s in sets[c]:
            argv += ["--set", s]
        cmds.append(argv)
    return cmds


def _run(argv: list[str], capture: bool) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=capture, text=True, check=False)
    except OSError as e:
        raise InstallError(f"cannot run {argv[0]}: {e.strerror}") from None


def _helm_failure(cp: subprocess.CompletedProcess[str], what: str) -> InstallError:
    lines = [ln.strip() for ln in (cp.stderr or cp.stdout or "").splitlines() if ln.strip()]
    detail = lines[-1] if lines else f"exit status {cp.returncode}"
    detail = detail.removeprefix("Error: ")
    return InstallError(f"{what} failed: {detail}")


def cmd_manifest_generate(args: argparse.Namespace) -> int:
    try:
        docs: list[str] = []
        for argv in helm_commands(args, render=True):
            cp = _run(argv, capture=True)
            if cp.returncode != 0:
                raise _helm_failure(cp, f"rendering chart {Path(argv[argv.index('template') + 2]).name}")
            docs.append(cp.stdout.strip())
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write("\n---\n".join(d for d in docs if d) + "\n")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_manifest_generate(args)
    try:
        cmds = helm_commands(args, render=False)
        if not args.skip_confirmation and sys.stdin.isatty():
            answer = input(
                f"This will install istiopy ({', '.join(args.components)}) into namespace "
                f"{args.istio_namespace}. Proceed? (y/N) "
            )
            if answer.strip().lower() not in ("y", "yes"):
                print("Cancelled.")
                return 1
        for argv in cmds:
            release = argv[argv.index("--install") + 1]
            cp = _run(argv, capture=True)
            if cp.returncode != 0:
                raise _helm_failure(cp, f"helm upgrade --install {release}")
            print(f"✔ {release} installed")
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("✔ Installation complete")
    return 0


def _components(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in CHARTS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"components are {', '.join(CHARTS)} (got {value!r})")
    return items


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--kubeconfig", default=None, help="kubeconfig file (passed to helm)")
    p.add_argument("--context", default=None, help="kubeconfig context (passed to helm)")
    p.add_argument(
        "-i", "--istio-namespace", "--istioNamespace", default="istio-system", help="control-plane namespace"
    )
    p.add_argument("-r", "--revision", default="", help="control-plane revision (default: none)")
    p.add_argument("-s", "--set", action="append", metavar="KEY=VALUE", help="a chart value (repeatable)")
    p.add_argument("-f", "--values", action="append", metavar="[CHART=]FILE", help="values file (repeatable)")
    p.add_argument("--charts", default=None, help="directory holding the charts (default: the source tree's)")
    p.add_argument("--helm", default=None, help="helm binary (default: helm on PATH)")
    p.add_argument(
        "--components",
        type=_components,
        default=list(CHARTS),
        help="comma-separated charts to include (default: base,istiod,ztunnel)",
    )


def register(subparsers: Any) -> None:
    install = subparsers.add_parser(
        "install",
        help="install istiopy with its Helm charts (base, istiod, ztunnel)",
        description="Install or upgrade istiopy by running helm on the charts (--dry-run prints them).",
    )
    _common(install)
    install.add_argument("--dry-run", action="store_true", help="print the manifests instead of installing")
    install.add_argument(
        "-y", "--skip-confirmation", action="store_true", help="do not ask before installing"
    )
    install.add_argument("-w", "--wait", action="store_true", help="wait for the workloads to be ready")
    install.add_argument("--timeout", default="5m", help="with --wait: how long helm waits (default: 5m)")
    install.set_defaults(func=cmd_install)

    manifest = subparsers.add_parser("manifest", help="render the installation manifests")
    msub = manifest.add_subparsers(title="commands", metavar="COMMAND", parser_class=type(manifest))
    manifest.set_defaults(func=lambda _a: (manifest.print_help(), 2)[1])
    gen = msub.add_parser("generate", help="print every manifest istioctl-py install would apply")
    _common(gen)
    gen.set_defaults(func=cmd_manifest_generate)
