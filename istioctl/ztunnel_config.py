"""``istioctl-py ztunnel-config``: what a ztunnel(-py) knows, read from its admin ``/config_dump``.

Why it only needs the admin API: the dump carries workloads, services, policies, certificates and live
connections in upstream ztunnel's JSON shape, so this command works the same against ztunnel-py and against
upstream ztunnel (port-forwarded to ``--proxy-admin-port``), or offline with ``-f dump.json``.

Output: ``-o short`` (default) prints aligned tables with upstream's columns; ``-o json`` / ``-o yaml`` print
the (filtered) section as is.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import yaml

Dump = dict[str, Any]

SECTIONS = ("workloads", "services", "policies", "certificates", "connections")
ALIASES = {
    "workloads": ["workload", "w"],
    "services": ["service", "svc", "s"],
    "policies": ["policy", "pol", "p"],
    "certificates": ["certificate", "certs", "cert"],
    "connections": ["cons"],
    "all": [],
}


class DumpError(Exception):
    """The dump could not be fetched or read; the message is shown as is."""


def load_dump(file: str | None, host: str, port: int, timeout: float = 10.0) -> Dump:
    if file:
        try:
            with open(file) as f:
                data = json.load(f)
        except OSError as e:
            raise DumpError(f"cannot read {file}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise DumpError(f"{file} is not JSON: {e}") from None
    else:
        url = f"http://{host}:{port}/config_dump"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                data = json.loads(r.read())
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise DumpError(f"cannot reach the ztunnel admin API at {url}: {reason}") from None
        except json.JSONDecodeError as e:
            raise DumpError(f"{url} did not return JSON: {e}") from None
    if not isinstance(data, dict):
        raise DumpError("config dump is not a JSON object")
    return data


# ---- tables ---------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell plus one space, like Go's tabwriter as istioctl uses it."""
    cells = [[str(c) for c in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        lines.append(" ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def _vip_index(dump: Dump) -> dict[str, dict[str, Any]]:
    """Services by every name a waypoint reference may use: ``network/vip`` and ``namespace/hostname``."""
    out: dict[str, dict[str, Any]] = {}
    for svc in dump.get("services") or []:
        for vip in svc.get("vips") or []:
            out[vip] = svc
        out[f"{svc.get('namespace', '')}/{svc.get('hostname', '')}"] = svc
    return out


def _waypoint_name(ref: dict[str, Any] | None, services: dict[str, dict[str, Any]]) -> str:
    if not ref:
        return "None"
    svc = services.get(str(ref.get("destination", "")))
    return str(svc["name"]) if svc else "NA"


def _strip_network(addr: str) -> str:
    return addr.split("/", 1)[1] if "/" in addr else addr


def workloads_short(items: list[dict[str, Any]], dump: Dump) -> str:
    services = _vip_index(dump)
    rows = [
        (
            w.get("namespace", ""),
            w.get("name", ""),
            (w.get("workloadIps") or [""])[0] or w.get("hostname", ""),
            w.get("node", ""),
            _waypoint_name(w.get("waypoint"), services),
            w.get("protocol", ""),
        )
        for w in sorted(items, key=lambda w: (w.get("namespace", ""), w.get("name", ""), w.get("node", "")))
    ]
    return table(["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"], rows)


def services_short(items: list[dict[str, Any]], dump: Dump) -> str:
    services = _vip_index(dump)
    workloads = {w.get("uid"): w for w in dump.get("workloads") or []}
    rows = []
    for s in sorted(items, key=lambda s: (s.get("namespace", ""), s.get("name", ""), s.get("hostname", ""))):
        eps = list((s.get("endpoints") or {}).values())
        healthy = sum(
            1 for e in eps if (workloads.get(e.get("workloadUid")) or {}).get("status") == "Healthy"
        )
        vips = s.get("vips") or []
        rows.append(
            (
                s.get("namespace", ""),
                s.get("name", ""),
                _strip_network(vips[0]) if vips else "None",
                _waypoint_name(s.get("waypoint"), services),
                f"{healthy}/{len(eps)}",
            )
        )
    return table(["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS"], rows)


def policies_short(items: list[dict[str, Any]], dump: Dump) -> str:
    rows = [
        (p.get("namespace", ""), p.get("name", ""), p.get("action", ""), p.get("scope", ""))
        for p in sorted(items, key=lambda p: (p.get("namespace", ""), p.get("name", "")))
    ]
    return table(["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"], rows)


def _valid_now(cert: dict[str, Any]) -> bool:
    try:
        start = datetime.fromisoformat(str(cert["validFrom"]).replace("Z", "+00:00"))
        end = datetime.fromisoformat(str(cert["expirationTime"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return False
    return start <= datetime.now(UTC) < end


def certificates_short(items: list[dict[str, Any]], dump: Dump) -> str:
    rows: list[tuple[object, ...]] = []
    for c in items:
        state = str(c.get("state", ""))
        state = "Unavailable" if state.startswith("Unavailable") else state
        chain = c.get("certChain") or []
        if not chain:
            rows.append((c.get("identity", ""), "NA", state, False, "NA", "NA", "NA"))
        for i, cert in enumerate(chain):
            kind = "Leaf" if i == 0 else ("Root" if i == len(chain) - 1 else "Intermediate")
            try:
                serial = f"{int(cert.get('serialNumber', '')):x}"
            except ValueError:
                serial = str(cert.get("serialNumber", ""))
            rows.append(
                (
                    c.get("identity", ""),
                    kind,
                    state,
                    _valid_now(cert),
                    serial,
                    cert.get("expirationTime") or "NA",
                    cert.get("validFrom") or "NA",
                )
            )
    headers = ["CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"]
    return table(headers, rows)


def _connection_rows(dump: Dump, direction: str, raw: bool, namespace: str) -> list[tuple[object, ...]]:
    names: dict[str, str] = {}
    if not raw:
        for w in dump.get("workloads") or []:
            for ip in w.get("workloadIps") or []:
                names[ip] = f"{w.get('name')}.{w.get('namespace')}"
        for s in dump.get("services") or []:
            for vip in s.get("vips") or []:
                names[_strip_network(vip)] = str(s.get("hostname", ""))

    def pretty(addr: str) -> str:
        if raw or not addr:
            return addr
        host, sep, port = addr.rpartition(":")
        host = host.strip("[]")
        return f"{names[host]}:{port}" if sep and host in names else addr

    rows: list[tuple[object, ...]] = []
    states = dump.get("workloadState") or {}
    for _, st in sorted(states.items(), key=lambda kv: (kv[1].get("info", {}).get("namespace", ""), kv[0])):
        info = st.get("info") or {}
        if namespace and info.get("namespace") != namespace:
            continue
        who = f"{info.get('name', '')}.{info.get('namespace', '')}"
        conns = st.get("connections") or {}
        if direction != "outbound":
            for c in conns.get("inbound") or []:
                rows.append((who, "Inbound", pretty(c.get("actualDst", "")), pretty(c.get("src", "")),
                             pretty(c.get("originalDst", "")), c.get("protocol", "")))  # fmt: skip
        if direction != "inbound":
            for c in conns.get("outbound") or []:
                rows.append((who, "Outbound", pretty(c.get("src", "")), pretty(c.get("actualDst", "")),
                             pretty(c.get("originalDst", "")), c.get("protocol", "")))  # fmt: skip
    return rows


# ---- selection --------------------------------------------------------------------------------------


def select(dump: Dump, section: str, args: argparse.Namespace) -> Any:
    """The section's items after the subcommand's filters (what json/yaml print)."""
    if section == "workloads":
        items = list(dump.get("workloads") or [])
        if getattr(args, "workload_namespace", ""):
            items = [w for w in items if w.get("namespace") == args.workload_namespace]
        if getattr(args, "workload_node", ""):
            items = [w for w in items if w.get("node") == args.workload_node]
        if getattr(args, "address", ""):
            items = [w for w in items if args.address in (w.get("workloadIps") or [])]
        return items
    if section == "services":
        items = list(dump.get("services") or [])
        if getattr(args, "service_namespace", ""):
            items = [s for s in items if s.get("namespace") == args.service_namespace]
        return items
    if section == "policies":
        items = list(dump.get("policies") or [])
        if getattr(args, "policy_namespace", ""):
            items = [p for p in items if p.get("namespace") == args.policy_namespace]
        return items
    if section == "certificates":
        return list(dump.get("certificates") or [])
    if section == "connections":
        states = dump.get("workloadState") or {}
        ns = getattr(args, "connection_namespace", "")
        return [s for s in states.values() if not ns or (s.get("info") or {}).get("namespace") == ns]
    return dump


SHORT: dict[str, Callable[[list[dict[str, Any]], Dump], str]] = {
    "workloads": workloads_short,
    "services": services_short,
    "policies": policies_short,
    "certificates": certificates_short,
}


def render(dump: Dump, section: str, args: argparse.Namespace) -> str:
    output = getattr(args, "output", "short")
    if output in ("json", "yaml"):
        data = select(dump, section, args)
        if output == "json":
            return json.dumps(data, indent=4) + "\n"
        return yaml.safe_dump(data, sort_keys=False)
    if section == "all":
        parts = []
        for name in SECTIONS:
            parts.append(render(dump, name, args))
        return "\n".join(parts)
    if section == "connections":
        rows = _connection_rows(
            dump,
            getattr(args, "direction", ""),
            getattr(args, "raw", False),
            getattr(args, "connection_namespace", ""),
        )
        return table(["WORKLOAD", "DIRECTION", "LOCAL", "REMOTE", "REMOTE TARGET", "PROTOCOL"], rows)
    return SHORT[section](select(dump, section, args), dump)


# ---- command line -----------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    try:
        dump = load_dump(args.file, args.proxy_admin_address, args.proxy_admin_port)
        out = render(dump, args.section, args)
    except DumpError as e:
        print(f"istioctl-py ztunnel-config: error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(out)
    return 0


def _log(args: argparse.Namespace) -> int:
    """``log``: show, set (``--level``) or reset (``-r``) the ztunnel's log levels via ``/logging``."""
    url = f"http://{args.proxy_admin_address}:{args.proxy_admin_port}/logging"
    level = "info" if args.reset else args.level
    req = (
        urllib.request.Request(f"{url}?level={level}", method="POST")
        if level
        else urllib.request.Request(url)
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            sys.stdout.write(r.read().decode())
    except urllib.error.HTTPError as e:
        print(f"istioctl-py ztunnel-config: error: {e.read().decode().strip()}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(
            f"istioctl-py ztunnel-config: error: cannot reach {url}: {getattr(e, 'reason', e)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", choices=["short", "json", "yaml"], default="short",
                   help="output format (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--proxy-admin-port", type=int, default=15000, help="ztunnel admin port (default: %(default)s)"
    )
    p.add_argument(
        "--proxy-admin-address", default="127.0.0.1", help="ztunnel admin host (default: %(default)s)"
    )
    p.add_argument(
        "-f", "--file", default=None, help="read a saved config_dump JSON instead of the admin API"
    )


def register(subparsers: Any) -> None:
    """Add ``ztunnel-config`` (alias ``zc``) with its subcommands to ``istioctl-py``."""
    zc = subparsers.add_parser(
        "ztunnel-config",
        aliases=["zc"],
        help="inspect a ztunnel's workloads, services, policies, certs, connections",
    )
    sub = zc.add_subparsers(title="sections", metavar="SECTION", parser_class=type(zc))
    for section, aliases in ALIASES.items():
        p = sub.add_parser(section, aliases=aliases, help=f"show the ztunnel's {section}")
        _common(p)
        if section == "workloads":
            p.add_argument("--address", default="", help="only the workload with this IP")
            p.add_argument("--workload-namespace", default="", help="only workloads in this namespace")
            p.add_argument("--workload-node", default="", help="only workloads on this node")
        elif section == "services":
            p.add_argument("--service-namespace", default="", help="only services in this namespace")
        elif section == "policies":
            p.add_argument("--policy-namespace", default="", help="only policies in this namespace")
        elif section == "connections":
            p.add_argument(
                "--direction", choices=["inbound", "outbound"], default="", help="only one direction"
            )
            p.add_argument("--raw", action="store_true", help="print addresses without resolving names")
            p.add_argument("--connection-namespace", default="", help="only workloads in this namespace")
        p.set_defaults(func=_run, section=section)

    lp = sub.add_parser("log", help="show or change the ztunnel's log levels")
    lp.add_argument("--level", default="", help="level, or target=level[,target=level] (e.g. rbac=debug)")
    lp.add_argument("-r", "--reset", action="store_true", help="reset every level to info")
    lp.add_argument(
        "--proxy-admin-port", type=int, default=15000, help="ztunnel admin port (default: %(default)s)"
    )
    lp.add_argument(
        "--proxy-admin-address", default="127.0.0.1", help="ztunnel admin host (default: %(default)s)"
    )
    lp.set_defaults(func=_log)

    def _missing(args: argparse.Namespace) -> int:
        zc.error("a section is required: " + ", ".join([*ALIASES, "log"]))  # exits with status 2
        return 2

    zc.set_defaults(func=_missing)
