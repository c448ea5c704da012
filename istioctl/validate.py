"""``istioctl-py validate -f PATH``: check mesh configuration files offline, like upstream's command.

Every document is checked with the same loader the control plane uses, so "valid here" means "loads in
istiod-py". Unknown kinds (Deployments next to the mesh config) are skipped with a note; the exit status is 1
when any document is invalid or a file is not YAML.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from istiopy.mesh.loader import DocResult, LoadResult, load_path, load_text

if TYPE_CHECKING:
    from istiopy.istioctl.cli import SubParsers

__all__ = ["register", "run"]


def register(sub: SubParsers) -> None:
    p = sub.add_parser(
        "validate",
        aliases=["v"],
        help="validate mesh configuration files",
        description="Validate Istio, Gateway API and Kubernetes documents in files or directories. "
        "Exits 0 when every document is valid, 1 otherwise; kinds the mesh does not read are skipped.",
    )
    p.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="PATH",
        help="file or directory of YAML/JSON to validate ('-' for standard input); repeatable",
    )
    p.add_argument(
        "-n",
        "--namespace",
        default="default",
        help="namespace for documents that do not name one (default: %(default)s)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    p.set_defaults(func=run)


def _name(doc: DocResult, fallback: str) -> str:
    return str(doc.key) if doc.key is not None else fallback


def _report(console: Console, result: LoadResult, quiet: bool) -> tuple[int, int, int]:
    valid = invalid = skipped = 0
    for f in result.files:
        for doc in f.documents:
            if doc.resource is not None:
                valid += 1
            elif doc.unknown is not None:
                skipped += 1
                note = doc.unknown
                console.print(
                    f"[dim]note: {escape(note.resource)} ({escape(doc.where)}): "
                    f"{escape(note.api_version)}/{escape(note.kind)} is not a mesh resource, skipped[/dim]"
                )
            elif doc.error is not None:
                invalid += 1
                name = escape(_name(doc, doc.error.resource))
                for e in doc.error.errors:
                    console.print(
                        f"[bold red]error[/bold red]: [bold]{name}[/bold] ({escape(doc.where)}): "
                        f"[yellow]{escape(e.path or '<document>')}[/yellow]: {escape(e.reason)}"
                    )
            elif doc.malformed is not None:
                invalid += 1
                console.print(f"[bold red]error[/bold red]: {escape(str(doc.malformed))}")
        if f.ok and not quiet and f.documents:
            console.print(f'[green]"{escape(f.path)}" is valid[/green]')
    return valid, invalid, skipped


def load_files(filenames: list[str], namespace: str) -> LoadResult:
    """Every document of the ``-f`` arguments (``-`` is stdin), as ``validate`` and ``analyze`` read them."""
    result = LoadResult()
    for path in filenames:
        if path == "-":
            result.files.append(load_text(sys.stdin.read(), "<stdin>", namespace))
        else:
            result.files += load_path(path, namespace).files
    return result


def run(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True, highlight=False)
    result = load_files(args.filename, args.namespace)
    valid, invalid, skipped = _report(console, result, args.quiet)
    total = valid + invalid + skipped
    files = len(result.files)
    summary = (
        f"{total} document{'s' if total != 1 else ''} in {files} file{'s' if files != 1 else ''}: "
        f"{valid} valid, {invalid} invalid, {skipped} skipped"
    )
    style = "red" if invalid else "green"
    console.print(f"[{style}]{summary}[/{style}]")
    return 1 if invalid else 0
