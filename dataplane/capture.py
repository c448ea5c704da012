"""In-pod traffic capture: iptables rules inside a pod's network namespace, as upstream's in-pod mode does.

Public API (stable; the node agent calls these, tests may too)::

    cfg = CaptureConfig()                       # ports 15001/15006/15008, mark 0x539
    install_capture(netns_fd, cfg)              # idempotent; atomic per table (iptables-restore)
    capture_installed(netns_fd) -> bool
    remove_capture(netns_fd, cfg)               # deletes our chains, jumps, policy rule and route
    capture_rules(cfg) -> str                   # the iptables-restore payload, for inspection

What the rules do (chains are ours, prefixed ``ISTIOPY_``, so removal never touches anything else):

* nat OUTPUT: the app's outbound TCP is REDIRECTed to 15001 (SO_ORIGINAL_DST keeps the real target);
  packets of sockets carrying the proxy mark (``SO_MARK`` 0x539) and loopback traffic are left alone, which
  is how the proxy's own upstream connections from inside the pod escape capture.
* nat PREROUTING: inbound TCP to the pod is REDIRECTed to 15006 (plaintext inbound), except HBONE on 15008,
  which reaches the proxy's 15008 listener untouched.
* mangle OUTPUT + policy routing: connections the proxy opens toward the app get a connection mark; reply
  packets of the app on them get a packet mark and are routed to the local table (``local 0.0.0.0/0 dev
  lo``), so when the proxy spoofs the original client as source (IP_TRANSPARENT) the app's answers come back
  to the proxy instead of leaving the pod. This is what "source IP preserved toward the app" needs.

Why ``iptables`` (the nft backend on Debian) driven by ``iptables-restore``: it is what upstream installs,
every change to a table lands atomically, and rules live and die with the namespace.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from istiopy.dataplane.sockets import PROXY_MARK, run_in_netns

__all__ = [
    "CHAIN_PREFIX",
    "CONN_MARK",
    "ROUTE_TABLE",
    "CaptureConfig",
    "CaptureError",
    "capture_installed",
    "capture_rules",
    "install_capture",
    "remove_capture",
]

T = TypeVar("T")

CHAIN_PREFIX = "ISTIOPY_"
CONN_MARK = 0x111
ROUTE_TABLE = 133
RULE_PREF = 32764
_MASK = 0xFFF

NAT_PRERT = f"{CHAIN_PREFIX}PRERT"
NAT_OUTPUT = f"{CHAIN_PREFIX}OUTPUT"
MANGLE_OUTPUT = f"{CHAIN_PREFIX}MANGLE_OUT"


class CaptureError(RuntimeError):
    """A rule could not be installed or removed (message carries the tool's stderr)."""


@dataclass(frozen=True)
class CaptureConfig:
    """Ports and marks of the capture; the proxy must listen on the same ports and mark its sockets."""

    outbound_port: int = 15001
    inbound_plaintext_port: int = 15006
    hbone_port: int = 15008
    proxy_mark: int = PROXY_MARK
    conn_mark: int = CONN_MARK
    route_table: int = ROUTE_TABLE
    # inbound ports delivered straight to the app (e.g. a health port the kubelet probes without the mesh)
    exclude_inbound_ports: tuple[int, ...] = ()
    # outbound ports / CIDRs that bypass the proxy
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()
    # route the app's replies to spoofed sources back to the proxy (needed for IP_TRANSPARENT delivery)
    transparent_inbound: bool = True


def capture_rules(cfg: CaptureConfig = CaptureConfig()) -> str:
    """The ``iptables-restore --noflush`` payload for one pod (nat, and mangle when transparent)."""
    pm = f"{cfg.proxy_mark:#x}/{_MASK:#x}"
    cm = f"{cfg.conn_mark:#x}/{_MASK:#x}"
    nat = [
        "*nat",
        f":{NAT_PRERT} - [0:0]",
        f":{NAT_OUTPUT} - [0:0]",
        f"-A PREROUTING -j {NAT_PRERT}",
        f"-A OUTPUT -j {NAT_OUTPUT}",
        f"-A {NAT_PRERT} -m mark --mark {pm} -j RETURN",
        f"-A {NAT_PRERT} -i lo -j RETURN",
        f"-A {NAT_PRERT} -p tcp --dport {cfg.hbone_port} -j RETURN",
        *[f"-A {NAT_PRERT} -p tcp --dport {p} -j RETURN" for p in cfg.exclude_inbound_ports],
        f"-A {NAT_PRERT} -p tcp -j REDIRECT --to-ports {cfg.inbound_plaintext_port}",
        f"-A {NAT_OUTPUT} -m mark --mark {pm} -j RETURN",
        f"-A {NAT_OUTPUT} -o lo -j RETURN",
        *[f"-A {NAT_OUTPUT} -p tcp --dport {p} -j RETURN" for p in cfg.exclude_outbound_ports],
        *[f"-A {NAT_OUTPUT} -d {c} -j RETURN" for c in cfg.exclude_outbound_cidrs],
        f"-A {NAT_OUTPUT} -p tcp -j REDIRECT --to-ports {cfg.outbound_port}",
        "COMMIT",
    ]
    mangle: list[str] = []
    if cfg.transparent_inbound:
        mangle = [
            "*mangle",
            f":{MANGLE_OUTPUT} - [0:0]",
            f"-A OUTPUT -j {MANGLE_OUTPUT}",
            # the proxy's own sockets: remember the connection as the proxy's
            f"-A {MANGLE_OUTPUT} -p tcp -m mark --mark {pm} -j CONNMARK --set-xmark {cm}",
            # the app answering on such a connection: mark the packet so policy routing keeps it local
            f"-A {MANGLE_OUTPUT} -p tcp -m connmark --mark {cm} -m mark ! --mark {pm} "
            f"-j MARK --set-xmark {cm}",
            "COMMIT",
        ]
    return "\n".join([*nat, *mangle, ""])


def _run(cmd: list[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, input=input, capture_output=True, text=True, check=False, timeout=30)
    if check and res.returncode != 0:
        raise CaptureError(f"{' '.join(cmd)}: {res.stderr.strip() or res.returncode}")
    return res


def _in(netns_fd: int | None, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` in the pod's netns; its subprocesses inherit the namespace of the thread that forks them."""
    if netns_fd is None:
        return fn(*args)
    return run_in_netns(netns_fd, fn, *args)


def _remove(cfg: CaptureConfig) -> None:
    for table, builtin, chain in (
        ("nat", "PREROUTING", NAT_PRERT),
        ("nat", "OUTPUT", NAT_OUTPUT),
        ("mangle", "OUTPUT", MANGLE_OUTPUT),
    ):
        for _ in range(16):  # a jump installed twice by an older run is removed too
            if _run(["iptables", "-w", "-t", table, "-D", builtin, "-j", chain], check=False).returncode:
                break
        _run(["iptables", "-w", "-t", table, "-F", chain], check=False)
        _run(["iptables", "-w", "-t", table, "-X", chain], check=False)
    mark = f"{cfg.conn_mark:#x}/{_MASK:#x}"
    for _ in range(16):
        if _run(
            ["ip", "rule", "del", "fwmark", mark, "lookup", str(cfg.route_table)], check=False
        ).returncode:
            break
    _run(["ip", "route", "flush", "table", str(cfg.route_table)], check=False)


def _install(cfg: CaptureConfig) -> None:
    _remove(cfg)
    _run(["iptables-restore", "-w", "--noflush"], input=capture_rules(cfg))
    if cfg.transparent_inbound:
        mark = f"{cfg.conn_mark:#x}/{_MASK:#x}"
        table = str(cfg.route_table)
        _run(["ip", "rule", "add", "fwmark", mark, "pref", str(RULE_PREF), "lookup", table])
        _run(["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", table])


def _installed() -> bool:
    out = _run(["iptables-save"], check=False).stdout
    return f"-j {NAT_OUTPUT}" in out and f"-j {NAT_PRERT}" in out


def install_capture(netns_fd: int | None, cfg: CaptureConfig = CaptureConfig()) -> None:
    """Install (or re-install) the capture rules inside the namespace ``netns_fd`` (None: current one)."""
    try:
        _in(netns_fd, _install, cfg)
    except CaptureError:
        _in(netns_fd, _remove, cfg)
        raise


def remove_capture(netns_fd: int | None, cfg: CaptureConfig = CaptureConfig()) -> None:
    """Remove everything ``install_capture`` added; a namespace without our rules is left as it is."""
    _in(netns_fd, _remove, cfg)


def capture_installed(netns_fd: int | None) -> bool:
    """True when our jumps are present in the namespace's nat table."""
    return _in(netns_fd, _installed)
