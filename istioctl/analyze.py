"""``istioctl-py analyze -f DIR``: report configuration problems offline, in upstream's shape.

The files are loaded with the control plane's own loader into a real ``ConfigStore`` and run through
``istiopy.mesh.analysis``, the same code that decides what ztunnel and the operator see, so a message here
is exactly what the mesh would do with that config. Lines look like upstream's::

    Warning (AuthorizationPolicy default/allow-get) ztunnel does not support HTTP attributes (found: ...
    Error [IST0101] (VirtualService default/reviews) Referenced host+subset in destinationrule not found: ...

Exit status: 0 when nothing reaches ``--failure-threshold`` (default Error), 79 when something does (as
upstream), 1 when a file cannot be loaded.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from typing import TYPE_CHECKING, Any

import yaml

from istiopy.istioctl.validate import load_files
from istiopy.mesh.ambient import MeshSettings
from istiopy.mesh.analysis import ANALYZERS, SEVERITY_RANK, Diagnostic, analyze
from istiopy.mesh.store import ConfigStore

if TYPE_CHECKING:
    from istiopy.istioctl.cli import SubParsers

__all__ = ["FOUND_ISSUES_EXIT", "register", "run"]

FOUND_ISSUES_EXIT = 79
_LEVELS = ("Info", "Warning", "Error")


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "analyze",
        help="analyze mesh configuration files for problems",
        description="Load Istio, Gateway API and Kubernetes documents and report what the mesh would do "
        "wrong with them: HTTP rules ztunnel cannot enforce, waypoint labels that bind nothing, routes to "
        "unknown hosts or subsets.",
    )
    p.add_argument(
        "-f",
        "--filename",
        action="append",
        default=[],
        metavar="PATH",
        help="file or directory of YAML/JSON ('-' for standard input); repeatable (required)",
    )
    p.add_argument(
        "-n",
        "--namespace",
        default="default",
        help="namespace for documents that do not name one (default: %(default)s)",
    )
    p.add_argument("-o", "--output", choices=("log", "json", "yaml"), default="log")
    p.add_argument(
        "--failure-threshold",
        choices=_LEVELS,
        default="Error",
        help="lowest severity that makes the exit status non-zero (default: %(default)s)",
    )
    p.add_argument(
        "--output-threshold",
        choices=_LEVELS,
        default="Info",
        help="lowest severity printed (default: %(default)s)",
    )
    p.add_argument(
        "-S",
        "--suppress",
        action="append",
        default=[],
        metavar="CODE=KIND NAME[.NS]",
        help="suppress matching messages, e.g. 'IST0101=VirtualService reviews.default'; "
        "'*' globs; a reason may stand in for the code",
    )
    p.add_argument("--analyzer", action="append", choices=sorted(ANALYZERS), help="run only these analyzers")
    p.add_argument("-L", "--list-analyzers", action="store_true", help="list the analyzers and exit")
    p.add_argument("--root-namespace", default="istio-system", help="the mesh root namespace")
    p.set_defaults(func=run)


def _suppressed(d: Diagnostic, rules: list[str]) -> bool:
    target = f"{d.resource.kind} {d.resource.name}"
    if d.resource.namespace:
        target += f".{d.resource.namespace}"
    for rule in rules:
        code, _, what = rule.partition("=")
        if (fnmatch.fnmatch(d.code, code) or fnmatch.fnmatch(d.reason, code)) and fnmatch.fnmatch(
            target, what or "*"
        ):
            return True
    return False


def _as_dict(d: Diagnostic) -> dict[str, Any]:
    origin = (
        f"{d.resource.kind} {d.resource.namespace + '/' if d.resource.namespace else ''}{d.resource.name}"
    )
    return {
        "code": d.code,
        "level": d.severity,
        "message": d.message,
        "origin": origin,
        "reason": d.reason,
        "reference": d.field,
    }


def run(args: argparse.Namespace) -> int:
    if args.list_analyzers:
        for name, fn in sorted(ANALYZERS.items()):
            doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            print(f"* {name}:\n    {doc}")
        return 0
    if not args.filename:
        print("istioctl-py analyze: error: -f/--filename is required (offline analysis)", file=sys.stderr)
        return 2
    result = load_files(args.filename, args.namespace)
    for problem in result.problems:
        print(f"Error: {problem}", file=sys.stderr)
    store = ConfigStore()
    for res in result.resources:
        store.apply(res, "analyze")
    found = analyze(store, MeshSettings(root_namespace=args.root_namespace), args.analyzer)
    found = [d for d in found if not _suppressed(d, args.suppress)]
    shown = [d for d in found if SEVERITY_RANK[d.severity] >= SEVERITY_RANK[args.output_threshold]]
    if args.output == "json":
        print(json.dumps([_as_dict(d) for d in shown], indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump([_as_dict(d) for d in shown], sort_keys=False), end="")
    elif shown:
        for d in shown:
            print(d)
    elif not result.problems:
        namespaces = sorted({r.namespace for r in result.resources if r.namespace}) or [args.namespace]
        print(f"\u2714 No validation issues found when analyzing namespace: {', '.join(namespaces)}.")
    if result.problems:
        return 1
    failing = [d for d in found if SEVERITY_RANK[d.severity] >= SEVERITY_RANK[args.failure_threshold]]
    if failing:
        if args.output == "log":
            print("Error: Analyzers found issues.", file=sys.stderr)
        return FOUND_ISSUES_EXIT
    return 0
