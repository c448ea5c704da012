"""``istioctl-py``: the entry point. Subcommands live in modules of this package and register themselves.

Every module of ``istiopy.istioctl`` (other than this one and private ``_`` modules) that defines
``register(subparsers)`` adds its subcommand; so ``analyze``, ``waypoint``, ``ztunnel-config`` and
``version`` arrive as new files without edits here. ``register`` adds a parser with
``subparsers.add_parser(...)`` and sets ``func=<callable(args) -> int>`` as its default; the int is the exit
status.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TypeAlias

import istiopy
import istiopy.istioctl

__all__ = ["Handler", "Parser", "SubParsers", "build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]
# argparse has no public name for the object ``add_subparsers`` returns.
SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


class Parser(argparse.ArgumentParser):
    """Bad flags end in one clear line (and exit status 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _subcommand_modules() -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules(istiopy.istioctl.__path__))
    return [f"istiopy.istioctl.{n}" for n in names if n != "cli" and not n.startswith("_")]


def build_parser() -> Parser:
    parser = Parser(
        prog="istioctl-py",
        description="Configure and inspect an istiopy (Istio ambient compatible) mesh.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {istiopy.__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)
    for name in _subcommand_modules():
        module = importlib.import_module(name)
        register = getattr(module, "register", None)
        if callable(register):
            register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.error("a command is required")
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
