"""``istiod-py``: the control plane's entry point.

``serve --config-dir DIR`` runs standalone from a directory of YAML (``istiod-py --config-dir DIR`` is a
shortcut for it); ``demo --config-dir DIR`` loads the directory once and prints what it found.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import istiopy
from istiopy.istiod import kube, report, standalone_cli
from istiopy.istiod.server import ControlPlane, standalone

__all__ = ["main"]

log = logging.getLogger("istiopy.istiod")


class Parser(argparse.ArgumentParser):
    """Bad flags end in one clear line (and exit status 2), not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> Parser:
    parser = Parser(prog="istiod-py", description="The istiopy control plane (Istio ambient compatible).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {istiopy.__version__}")
    parser.add_argument(
        "--config-dir", dest="top_config_dir", metavar="DIR", help="shortcut for `serve --config-dir DIR`"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(default: info)"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)

    serve = sub.add_parser("serve", help="run the control plane", description="Run the control plane.")
    serve.add_argument(
        "--config-dir", required=True, metavar="DIR", help="directory (or file) of YAML to load and watch"
    )
    serve.add_argument("-n", "--namespace", default="default", help="namespace for documents without one")
    serve.add_argument("--once", action="store_true", help="load and report, then exit instead of serving")
    standalone_cli.add_serve_flags(serve)
    serve.set_defaults(func=cmd_serve)
    standalone_cli.add_commands(sub)
    kube.add_kube_command(sub)

    demo = sub.add_parser(
        "demo",
        help="load a config directory and print what the mesh sees",
        description="Load a config directory once and print its resources per kind and every problem.",
    )
    demo.add_argument("--config-dir", default="examples", metavar="DIR", help="(default: %(default)s)")
    demo.add_argument("-n", "--namespace", default="default", help="namespace for documents without one")
    demo.add_argument("--config-only", action="store_true", help="only print the tables; bring up no mesh")
    standalone_cli.add_up_flags(demo, default_hold=False)
    demo.set_defaults(func=cmd_demo)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def _serve(plane: ControlPlane) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await plane.run()
    log.info("control plane stopped")


def _missing(path: str) -> bool:
    if Path(path).exists():
        return False
    print(f"istiod-py: error: --config-dir {path}: no such file or directory", file=sys.stderr)
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    if _missing(args.config_dir):
        return 2
    plane = standalone(args.config_dir, default_namespace=args.namespace)
    assert plane.file_source is not None
    result = plane.file_source.load()
    log.info("%s", report.summary_line(plane.store, result, args.config_dir))
    if args.once:
        return 0
    return standalone_cli.serve(args)


def cmd_demo(args: argparse.Namespace) -> int:
    if _missing(args.config_dir):
        return 2
    logging.getLogger("istiopy.mesh.filesource").setLevel(logging.ERROR)  # the tables show the problems
    plane = standalone(args.config_dir, default_namespace=args.namespace)
    assert plane.file_source is not None
    result = plane.file_source.load()
    report.print_demo(plane.store, result, args.config_dir)
    if args.config_only:
        return 0
    # Then the mesh itself: one traffic round and its report (``--hold`` keeps it running).
    return standalone_cli.exec_up(args, hold=args.hold)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        if args.top_config_dir is None:
            parser.error("a command or --config-dir is required")
        args = parser.parse_args(
            ["--log-level", args.log_level, "serve", "--config-dir", args.top_config_dir]
        )
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
