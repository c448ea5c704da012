"""``istioctl-py waypoint generate|apply|delete|list|status``: waypoint Gateways, as upstream istioctl.

A waypoint is a Gateway API ``Gateway`` of class ``istio-waypoint`` with one listener ``mesh`` on 15008/HBONE;
istiod-py's waypoint controller turns it into a Deployment and Service and reports ``Programmed``. Flags and
output follow upstream ``istioctl waypoint`` (see ``ambient.md`` section 6), so scripts written for Istio
work here:

* ``apply`` uses server-side apply with field manager ``istioctl``: re-running it is a no-op, and a field
  someone else owns is a conflict the user sees instead of a silent overwrite;
* ``--enroll-namespace`` labels the namespace ``istio.io/use-waypoint=<name>``; a namespace already using
  another waypoint is left alone unless ``--overwrite``;
* ``--wait`` returns once the Gateway is ``Programmed`` (or fails after ``--waypoint-timeout``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

import yaml
from rich import box
from rich.console import Console
from rich.table import Table

from istiopy.istioctl.kube import GATEWAY_API, JSON, Kube, KubeError, add_kube_flags, resource_path, run
from istiopy.mesh.ambient import (
    DATAPLANE_MODE_LABEL,
    HBONE_PORT,
    USE_WAYPOINT_LABEL,
    WAYPOINT_FOR_LABEL,
)

__all__ = ["gateway_manifest", "register"]

DEFAULT_NAME = "waypoint"
WAYPOINT_CLASS = "istio-waypoint"
REV_LABEL = "istio.io/rev"
TRAFFIC_TYPES = ("service", "workload", "all", "none")
GATEWAY_VERSION = "v1"
GATEWAY_CRD = f"gateways.{GATEWAY_API}"


def _duration(text: str) -> float:
    """Go-style durations as istioctl takes them: ``90s``, ``2m``, ``1m30s``, or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip()
    try:
        return float(t)
    except ValueError:
        pass
    total, num = 0.0, ""
    i = 0
    while i < len(t):
        c = t[i]
        if c.isdigit() or c == ".":
            num += c
            i += 1
            continue
        unit = "ms" if t.startswith("ms", i) else c
        if unit not in units or not num:
            raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90s, 2m)")
        total += float(num) * units[unit]
        num = ""
        i += len(unit)
    if num:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (missing unit, e.g. 90s)")
    return total


def _name(value: str) -> str:
    if value == "none":
        raise argparse.ArgumentTypeError('"none" is reserved (istio.io/use-waypoint=none opts out)')
    return value


def gateway_manifest(name: str, namespace: str, traffic_type: str | None = None, revision: str = "") -> JSON:
    """The waypoint Gateway, exactly what ``generate`` prints and ``apply`` applies."""
    labels: dict[str, str] = {}
    if traffic_type:
        labels[WAYPOINT_FOR_LABEL] = traffic_type
    if revision:
        labels[REV_LABEL] = revision
    metadata: JSON = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = labels
    return {
        "apiVersion": f"{GATEWAY_API}/{GATEWAY_VERSION}",
        "kind": "Gateway",
        "metadata": metadata,
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}],
        },
    }


def _gw_path(namespace: str | None, name: str | None = None) -> str:
    return resource_path(GATEWAY_API, GATEWAY_VERSION, "gateways", namespace, name)


def _ns_path(name: str) -> str:
    return resource_path("", "v1", "namespaces", name=name)


async def _require_gateway_api(kube: Kube) -> None:
    if not await kube.crd_exists(GATEWAY_CRD):
        raise KubeError(
            "the Gateway API CRDs are not installed in this cluster: install them with `helm install "
            "istio-base charts/base -n istio-system --create-namespace` or kubectl apply -f crds/"
        )


def _condition(gw: JSON, kind: str) -> JSON | None:
    for c in (gw.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return dict(c)
    return None


def _programmed(gw: JSON) -> bool:
    c = _condition(gw, "Programmed")
    return c is not None and c.get("status") == "True"


def _is_waypoint(gw: JSON) -> bool:
    return (gw.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS


async def _wait_programmed(kube: Kube, namespace: str, name: str, wait_for: float) -> JSON:
    deadline = time.monotonic() + wait_for
    last: JSON | None = None
    while True:
        last = await kube.get(_gw_path(namespace, name))
        if last is not None and _programmed(last):
            return last
        if time.monotonic() >= deadline:
            cond = _condition(last or {}, "Programmed") or {}
            detail = (
                f": {cond.get('reason')}: {cond.get('message')}"
                if cond
                else " (no status yet: is istiod-py running?)"
            )
            raise KubeError(
                f"timed out after {wait_for:g}s waiting for waypoint {namespace}/{name} "
                f"to be programmed{detail}"
            )
        await asyncio.sleep(0.5)


def _console() -> Console:
    # Wide and without wrapping when piped, so scripts get one row per line.
    return Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 200)


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for h in headers:
        table.add_column(h, no_wrap=True)
    for r in rows:
        table.add_row(*r)
    _console().print(table)


# ---------------------------------------------------------------------------------------------- commands


def cmd_generate(args: argparse.Namespace) -> int:
    namespace = args.namespace
    if namespace is None:
        # generate needs no cluster; use the kubeconfig's namespace when there is one, like kubectl.
        from istiopy.istioctl.kube import _context_namespace, default_kubeconfig

        namespace = _context_namespace(default_kubeconfig(args.kubeconfig), args.context) or "default"
    gw = gateway_manifest(args.name, namespace, args.traffic_type, args.revision)
    sys.stdout.write(yaml.safe_dump(gw, sort_keys=False))
    return 0


async def _apply(kube: Kube, args: argparse.Namespace) -> int:
    ns = kube.namespace(args.namespace)
    await _require_gateway_api(kube)
    namespace = await kube.get(_ns_path(ns))
    if namespace is None:
        raise KubeError(f'namespace "{ns}" does not exist: create it first (kubectl create namespace {ns})')
    labels = (namespace.get("metadata") or {}).get("labels") or {}
    current = labels.get(USE_WAYPOINT_LABEL)
    if args.enroll_namespace and current and current != args.name and not args.overwrite:
        raise KubeError(
            f'namespace "{ns}" already uses waypoint "{current}": '
            f'pass --overwrite to switch it to "{args.name}"'
        )
    gw = gateway_manifest(args.name, ns, args.traffic_type, args.revision)
    await kube.apply(_gw_path(ns, args.name), gw, force=args.overwrite)
    print(f"✅ waypoint {ns}/{args.name} applied")
    if args.enroll_namespace:
        if labels.get(DATAPLANE_MODE_LABEL) != "ambient":
            print(
                f'⚠️ namespace "{ns}" is not enrolled in ambient mode; its pods will not use the waypoint '
                f"until you run: kubectl label namespace {ns} {DATAPLANE_MODE_LABEL}=ambient",
                file=sys.stderr,
            )
        await kube.merge_patch(_ns_path(ns), {"metadata": {"labels": {USE_WAYPOINT_LABEL: args.name}}})
        print(f'✅ namespace "{ns}" labeled with "{USE_WAYPOINT_LABEL}={args.name}"')
    if args.wait:
        await _wait_programmed(kube, ns, args.name, args.waypoint_timeout)
        print(f"✅ waypoint {ns}/{args.name} programmed")
    return 0


async def _delete(kube: Kube, args: argparse.Namespace) -> int:
    ns = kube.namespace(args.namespace)
    await _require_gateway_api(kube)
    if args.all:
        if args.names:
            raise KubeError("pass either waypoint names or --all, not both")
        gws = [g for g in await kube.list(_gw_path(ns)) if _is_waypoint(g)]
        if args.revision:
            gws = [g for g in gws if (g["metadata"].get("labels") or {}).get(REV_LABEL) == args.revision]
        names = [g["metadata"]["name"] for g in gws]
        if not names:
            print(f'no waypoints found in namespace "{ns}"')
            return 0
    else:
        names = list(args.names) or [args.name]
    failed = 0
    deleted: list[str] = []
    for name in names:
        existing = await kube.get(_gw_path(ns, name))
        if existing is None or not _is_waypoint(existing):
            print(f"error: waypoint {ns}/{name} not found", file=sys.stderr)
            failed += 1
            continue
        if args.revision and (existing["metadata"].get("labels") or {}).get(REV_LABEL) != args.revision:
            print(f"error: waypoint {ns}/{name} is not of revision {args.revision}", file=sys.stderr)
            failed += 1
            continue
        await kube.delete(_gw_path(ns, name))
        deleted.append(name)
        print(f"✅ waypoint {ns}/{name} deleted")
    # A namespace still pointing at a deleted waypoint would send its traffic nowhere: unenroll it.
    namespace = await kube.get(_ns_path(ns))
    current = ((namespace or {}).get("metadata") or {}).get("labels", {}).get(USE_WAYPOINT_LABEL)
    if current in deleted:
        await kube.merge_patch(_ns_path(ns), {"metadata": {"labels": {USE_WAYPOINT_LABEL: None}}})
        print(f'✅ label "{USE_WAYPOINT_LABEL}" removed from namespace "{ns}"')
    return 1 if failed else 0


def _revision(gw: JSON) -> str:
    return str((gw["metadata"].get("labels") or {}).get(REV_LABEL) or "default")


def _programmed_column(gw: JSON) -> str:
    c = _condition(gw, "Programmed")
    return "True" if c and c.get("status") == "True" else "False"


async def _list(kube: Kube, args: argparse.Namespace) -> int:
    await _require_gateway_api(kube)
    ns = None if args.all_namespaces else kube.namespace(args.namespace)
    gws = sorted(
        (g for g in await kube.list(_gw_path(ns)) if _is_waypoint(g)),
        key=lambda g: (g["metadata"]["namespace"], g["metadata"]["name"]),
    )
    if not gws:
        where = "any namespace" if ns is None else f'namespace "{ns}"'
        print(f"No waypoints found in {where}.")
        return 0
    headers = (["NAMESPACE"] if ns is None else []) + ["NAME", "REVISION", "PROGRAMMED"]
    rows = [
        ([g["metadata"]["namespace"]] if ns is None else [])
        + [g["metadata"]["name"], _revision(g), _programmed_column(g)]
        for g in gws
    ]
    _print_table(headers, rows)
    return 0


async def _status(kube: Kube, args: argparse.Namespace) -> int:
    await _require_gateway_api(kube)
    ns = None if args.all_namespaces else kube.namespace(args.namespace)
    if ns is None:
        gws = [g for g in await kube.list(_gw_path(None)) if _is_waypoint(g)]
    else:
        gw = await kube.get(_gw_path(ns, args.name))
        if gw is None or not _is_waypoint(gw):
            raise KubeError(
                f"waypoint {ns}/{args.name} not found: create it with `istioctl-py waypoint apply -n {ns}`"
            )
        gws = [gw]
    if args.wait:
        gws = [
            await _wait_programmed(
                kube, g["metadata"]["namespace"], g["metadata"]["name"], args.waypoint_timeout
            )
            for g in gws
        ]
    rows: list[list[str]] = []
    for g in sorted(gws, key=lambda g: (g["metadata"]["namespace"], g["metadata"]["name"])):
        conditions: list[Any] = (g.get("status") or {}).get("conditions") or []
        if not conditions:
            rows.append(
                [g["metadata"]["namespace"], g["metadata"]["name"], "Unknown", "-", "-", "no status yet"]
            )
        for c in conditions:
            rows.append(
                [
                    g["metadata"]["namespace"],
                    g["metadata"]["name"],
                    str(c.get("status", "")),
                    str(c.get("type", "")),
                    str(c.get("reason", "")),
                    str(c.get("message", "")),
                ]
            )
    if not rows:
        print("No waypoints found.")
        return 0
    _print_table(["NAMESPACE", "NAME", "STATUS", "TYPE", "REASON", "MESSAGE"], rows)
    return 0


def _handler(coro: Any) -> Any:
    def handle(args: argparse.Namespace) -> int:
        try:
            return int(run(args, lambda kube: coro(kube, args)))
        except KubeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    return handle


# ---------------------------------------------------------------------------------------------- parser


def register(subparsers: Any) -> None:
    wp = subparsers.add_parser(
        "waypoint",
        aliases=["wp"],
        help="manage waypoint proxies (Gateways of class istio-waypoint)",
        description="Generate, apply, delete, list and check the status of waypoint proxies.",
    )
    wp.set_defaults(func=lambda _args: (wp.print_help(), 2)[1])
    sub = wp.add_subparsers(title="commands", metavar="COMMAND", parser_class=type(wp))

    def common(p: argparse.ArgumentParser) -> None:
        add_kube_flags(p)
        p.add_argument(
            "--name", type=_name, default=DEFAULT_NAME, help="waypoint name (default: %(default)s)"
        )

    def for_and_rev(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--for",
            dest="traffic_type",
            choices=TRAFFIC_TYPES,
            default=None,
            help="traffic the waypoint handles (istio.io/waypoint-for; default: istiod's, service)",
        )
        p.add_argument("-r", "--revision", default="", help="control-plane revision (istio.io/rev label)")

    def wait_flags(p: argparse.ArgumentParser, default: bool) -> None:
        p.add_argument(
            "-w",
            "--wait",
            action=argparse.BooleanOptionalAction,
            default=default,
            help="wait until the waypoint is Programmed",
        )
        p.add_argument(
            "--waypoint-timeout",
            type=_duration,
            default=90.0,
            help="how long --wait waits (default: 90s)",
        )

    gen = sub.add_parser("generate", help="print the waypoint Gateway as YAML")
    common(gen)
    for_and_rev(gen)
    gen.set_defaults(func=cmd_generate)

    apply = sub.add_parser(
        "apply", help="apply a waypoint Gateway (server-side apply, field manager istioctl)"
    )
    common(apply)
    for_and_rev(apply)
    apply.add_argument(
        "--enroll-namespace", action="store_true", help="label the namespace istio.io/use-waypoint=<name>"
    )
    apply.add_argument(
        "--overwrite",
        action="store_true",
        help="take over fields and a namespace enrolled to another waypoint",
    )
    wait_flags(apply, default=False)
    apply.set_defaults(func=_handler(_apply))

    delete = sub.add_parser("delete", help="delete waypoints (and unenroll a namespace pointing at them)")
    common(delete)
    delete.add_argument("names", nargs="*", help="waypoint names (default: --name)")
    delete.add_argument("--all", action="store_true", help="delete every waypoint in the namespace")
    delete.add_argument("-r", "--revision", default="", help="only waypoints of this revision")
    delete.set_defaults(func=_handler(_delete))

    lst = sub.add_parser("list", help="list waypoints")
    common(lst)
    lst.add_argument("-A", "--all-namespaces", action="store_true", help="list waypoints in every namespace")
    lst.set_defaults(func=_handler(_list))

    status = sub.add_parser("status", help="show the conditions of a waypoint")
    common(status)
    status.add_argument(
        "-A", "--all-namespaces", action="store_true", help="every waypoint in every namespace"
    )
    wait_flags(status, default=True)
    status.set_defaults(func=_handler(_status))
