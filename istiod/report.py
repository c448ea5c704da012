"""What the control plane tells a person about its configuration: a one-line summary and the demo tables.

Kept apart from the CLI so other front ends (a debug endpoint, the operator's status) can reuse the wording.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict

from rich.console import Console
from rich.table import Table

from istiopy.mesh.errors import InvalidResource, MalformedFile
from istiopy.mesh.loader import LoadResult
from istiopy.mesh.meta import Resource
from istiopy.mesh.store import ConfigStore

__all__ = ["print_demo", "problem_rows", "summary_line"]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary_line(store: ConfigStore, result: LoadResult, path: str) -> str:
    kinds = store.kinds()
    return (
        f"loaded {_plural(len(store), 'resource')} of {_plural(len(kinds), 'kind')} from {path} "
        f"({_plural(len(result.files), 'file')}); {_plural(len(result.problems), 'invalid document')}, "
        f"{_plural(len(result.unknown), 'skipped document')}"
    )


def _relative(where: str) -> str:
    """Paths relative to the working directory read better in a table than absolute ones."""
    cwd = os.getcwd() + os.sep
    return where[len(cwd) :] if where.startswith(cwd) else where


def problem_rows(result: LoadResult) -> list[tuple[str, str, str, str]]:
    """(resource, where, field, reason) for every problem, one row per bad field."""
    rows: list[tuple[str, str, str, str]] = []
    for doc in result.documents:
        problem = doc.problem
        if isinstance(problem, InvalidResource):
            name = str(doc.key) if doc.key is not None else problem.resource
            rows += [(name, _relative(doc.where), e.path or "-", e.reason) for e in problem.errors]
        elif isinstance(problem, MalformedFile):
            rows.append(("<not YAML>", _relative(doc.where), "-", problem.reason))
    return rows


def _console() -> Console:
    # Not a terminal (CI logs, pipes): use a wide fixed width so tables do not wrap names.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def print_demo(store: ConfigStore, result: LoadResult, path: str) -> None:
    console = _console()
    by_kind: dict[str, list[Resource]] = defaultdict(list)
    for res in store:
        by_kind[res.KIND].append(res)
    table = Table(title=f"Resources loaded from {path}", title_justify="left")
    table.add_column("Kind", style="bold")
    table.add_column("API group")
    table.add_column("Count", justify="right")
    table.add_column("Resources")
    for kind in sorted(by_kind):
        items = by_kind[kind]
        names = ", ".join(f"{r.namespace}/{r.name}" if r.namespace else r.name for r in items)
        table.add_row(kind, items[0].GROUP or "core", str(len(items)), names)
    console.print(table)

    rows = problem_rows(result)
    if rows:
        problems = Table(title="Validation problems (these documents were not loaded)", title_justify="left")
        problems.add_column("Resource", style="bold red", no_wrap=True)
        problems.add_column("File", no_wrap=True)
        problems.add_column("Field", style="yellow", no_wrap=True)
        problems.add_column("Reason", overflow="fold")
        for row in rows:
            problems.add_row(*row)
        console.print(problems)
    else:
        console.print("[green]No validation problems.[/green]")
    for doc in result.documents:
        if doc.unknown is not None:
            console.print(
                f"[dim]skipped {doc.unknown.resource} ({_relative(doc.where)}): not a mesh resource[/dim]"
            )
    console.print(summary_line(store, result, path))
