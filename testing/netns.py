"""Pods and nodes as real Linux network namespaces, for tests (public testing kit).

Public API (stable)::

    with Topology() as topo:                       # needs root; cleans leftovers of crashed runs first
        n0, n1 = topo.add_node("node-0"), topo.add_node("node-1")
        a = topo.add_pod("a", namespace="default", node=n0)      # IP 10.244.<node index>.<k>
        b = topo.add_pod("b", node=n1, ip="10.244.1.50", service_account="bob")
        srv = b.spawn_server("echo", port=8080)     # a real process inside b's netns
        with a.connect((b.ip, 8080)) as s: ...      # a socket created inside a's netns
        r, w = await a.open_connection(b.ip, 8080)  # same, as asyncio streams
        n0.forward_host_port(15012)                 # 127.0.0.1:15012 in n0 -> the host's 127.0.0.1:15012
        a.run(["iptables-save"])                    # any command inside the pod netns
        with topo.sniff("tcp") as cap: ...          # tcpdump on the fabric bridge; cap.text afterwards
    # everything (processes, namespaces, veths, the pods' iptables rules) is gone here

Design, and why:

* One *fabric* namespace per topology holds a bridge; every node and pod namespace has one veth (``eth0``)
  plugged into it. Veth pairs are created directly inside their namespaces, so the host's own network
  namespace is never touched: nothing can route to a real network, and two topologies (concurrent test
  runs) may even reuse the same pod IPs without seeing each other.
* Addresses are /32 with an on-link default route: every address on the fabric is one ARP away, so pod
  and node addresses may come from any ranges (pods default to ``10.244.<node>.0/24`` like the kubelet
  stand-in's podCIDRs, nodes to ``10.240.0.0/24``) and unknown addresses (service VIPs) simply fail to
  connect unless captured -- like a cluster without kube-proxy.
* A *node* is a namespace too: that node's ztunnel-py may run in it (its admin/metrics ports then never
  collide with another node's), while in-pod capture puts the data-path sockets inside the pods.
* Namespace names are ``<prefix>-<pid>-<n>-<role><index>``: unique per process and topology, and a later
  run can tell leftovers of a dead process apart (``cleanup_leftovers``) from a live concurrent run.
* Teardown runs on normal exit, exceptions, Ctrl-C and (while a topology is open, if nobody else handles
  it) SIGTERM; ``atexit`` is the last resort, and a SIGKILLed run is cleaned by the next one.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from istiopy.dataplane import sockets as _sockets
from istiopy.testing.procs import stop_group

__all__ = [
    "NETNS_DIR",
    "Node",
    "Pod",
    "Process",
    "Sniff",
    "Topology",
    "TopologyError",
    "cleanup_leftovers",
    "list_netns",
]

NETNS_DIR = Path("/run/netns")
DEFAULT_PREFIX = "ipy"
_counter = itertools.count()
_counter_lock = threading.Lock()
_open_topologies = 0
_sigterm_installed = False


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _track_open(delta: int) -> None:
    """While a topology is open, SIGTERM unwinds (``with`` blocks tear down) instead of killing outright."""
    global _open_topologies, _sigterm_installed
    with _counter_lock:
        _open_topologies += delta
        if threading.current_thread() is not threading.main_thread():
            return
        if _open_topologies > 0 and not _sigterm_installed:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, _on_sigterm)
                _sigterm_installed = True
        elif _open_topologies == 0 and _sigterm_installed:
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _sigterm_installed = False


class TopologyError(RuntimeError):
    """A namespace, link or process of the topology could not be set up."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise TopologyError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def list_netns() -> list[str]:
    """Names of every named network namespace on the machine (``ip netns list``)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_netns_pids(name: str) -> None:
    """Kill processes still running inside one of *our* namespaces (a namespace lives while they do)."""
    res = _ip("netns", "pids", name, check=False)
    for tok in res.stdout.split():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(tok), signal.SIGKILL)


def cleanup_leftovers(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete namespaces named ``<prefix>-<pid>-...`` whose creating process is dead; return their names.

    Why by pid: concurrent test runs on the same machine use the same prefix; only a dead owner's namespaces
    are garbage. Pods are deleted before fabrics (the order does not matter to the kernel, but it keeps
    ``ip netns`` listings tidy while it runs).
    """
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-\d+-")
    removed = []
    for name in list_netns():
        m = pat.match(name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        _kill_netns_pids(name)
        if _ip("netns", "del", name, check=False).returncode == 0:
            removed.append(name)
    return removed


class Process:
    """A process started inside a namespace, in its own process group; stopped on teardown."""

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str], port: int | None = None) -> None:
        self.popen = popen
        self.argv = list(argv)
        self.port = port

    @property
    def pid(self) -> int:
        """The pid of ``ip netns exec``'s exec'd child (ip execs the command, so it is the command itself)."""
        return self.popen.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM the process group, SIGKILL it if it does not exit within ``timeout``."""
        stop_group(self.popen, timeout, timeout)
        for f in (self.popen.stdout, self.popen.stderr, self.popen.stdin):
            if f is not None:
                f.close()


class _Netns:
    """What nodes and pods share: a named namespace with one veth on the fabric and one /32 address."""

    def __init__(self, topology: Topology, netns: str, ip: str) -> None:
        self.topology = topology
        self.netns = netns
        self.ip = ip
        self._procs: list[Process] = []

    @property
    def netns_path(self) -> str:
        """``/run/netns/<name>``: what a CNI plugin would hand the node agent."""
        return str(NETNS_DIR / self.netns)

    def open_netns(self) -> int:
        """A new fd for this namespace (the caller closes it); ZDS passes such fds to ztunnel."""
        return _sockets.open_netns(self.netns_path)

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the namespace and wait for it (text output captured)."""
        res = subprocess.run(
            ["ip", "netns", "exec", self.netns, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and res.returncode != 0:
            raise TopologyError(f"{self.netns}: {' '.join(cmd)} -> {res.returncode}: {res.stderr.strip()}")
        return res

    def spawn(
        self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, stdout: int | None = None
    ) -> Process:
        """Start a long-running command inside the namespace; it is stopped when the topology closes."""
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        popen = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *cmd],
            stdout=stdout if stdout is not None else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
        )
        proc = Process(popen, cmd)
        self._procs.append(proc)
        return proc

    def spawn_server(self, kind: str = "echo", port: int = 8080, *, timeout: float = 10.0) -> Process:
        """Start a small real server (``echo`` or ``http``, see ``istiopy.testing.servers``) and wait until it
        listens; ``port=0`` picks a free port, reported as ``Process.port``."""
        name = getattr(self, "name", self.netns)
        proc = self.spawn(
            [sys.executable, "-m", "istiopy.testing.servers", kind, "--port", str(port), "--pod", name],
            stdout=subprocess.PIPE,
        )
        assert proc.popen.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.popen.stdout], [], [], left)[0]:
                proc.stop()
                raise TopologyError(f"{kind} server in {self.netns} did not become ready")
            ch = os.read(proc.popen.stdout.fileno(), 1)
            if not ch:
                proc.stop()
                raise TopologyError(f"{kind} server in {self.netns} exited early")
            line += ch
        proc.port = int(line.split()[1])
        return proc

    def new_socket(
        self, family: socket.AddressFamily = socket.AF_INET, type: socket.SocketKind = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket that lives in this namespace (created by a helper thread that entered it)."""
        fd = self.open_netns()
        try:
            return _sockets.netns_socket(fd, family, type)
        finally:
            os.close(fd)

    def listen(self, port: int = 0, host: str = "0.0.0.0") -> socket.socket:
        """A non-blocking listening socket bound inside this namespace (for in-process test servers)."""
        fd = self.open_netns()
        try:
            return _sockets.netns_listener(fd, port, host)
        finally:
            os.close(fd)

    def connect(self, addr: tuple[str, int], timeout: float = 5.0) -> socket.socket:
        """A blocking TCP connection made from inside this namespace, like an app in the pod would."""
        s = self.new_socket()
        try:
            s.settimeout(timeout)
            s.connect(addr)
        except BaseException:
            s.close()
            raise
        return s

    async def open_connection(
        self, host: str, port: int, connect_timeout: float = 5.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An asyncio connection made from inside this namespace (unmarked: capture applies to it)."""
        fd = self.open_netns()
        try:
            sock = await _sockets.async_connect_in_netns(
                fd, (host, port), mark=None, connect_timeout=connect_timeout
            )
        finally:
            os.close(fd)
        return await asyncio.open_connection(sock=sock)

    def forward_host_port(self, host_port: int, port: int | None = None) -> int:
        """Make ``127.0.0.1:<port>`` inside this namespace reach ``127.0.0.1:<host_port>`` of the host (the
        test process's namespace); returns the port. How a ztunnel-py running in a node namespace reaches a
        control plane listening on the host's loopback, without routing the fabric anywhere."""
        return self.topology._forwarder().add(self, host_port, host_port if port is None else port)

    def _stop_procs(self) -> None:
        for p in self._procs:
            with contextlib.suppress(Exception):
                p.stop()
        self._procs.clear()


class Node(_Netns):
    """A node: a namespace on the fabric where that node's ztunnel-py (and node agent) may run."""

    def __init__(self, topology: Topology, name: str, index: int, netns: str, ip: str) -> None:
        super().__init__(topology, netns, ip)
        self.name = name
        self.index = index
        self.pods: list[Pod] = []
        self._next_host = itertools.count(2)

    def __repr__(self) -> str:
        return f"Node({self.name!r}, ip={self.ip!r}, netns={self.netns!r})"


class Pod(_Netns):
    """A pod: its own namespace and IP on the fabric, scheduled on a node (whose ztunnel serves it)."""

    def __init__(
        self,
        topology: Topology,
        name: str,
        namespace: str,
        ip: str,
        node: Node,
        netns: str,
        service_account: str = "default",
        uid: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(topology, netns, ip)
        self.name = name
        self.namespace = namespace
        self.node = node
        self.service_account = service_account
        self.uid = uid or str(uuid.uuid4())
        self.labels = dict(labels or {})

    def spiffe_id(self, trust_domain: str = "cluster.local") -> str:
        """The identity a mesh gives this pod: ``spiffe://<td>/ns/<namespace>/sa/<service account>``."""
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __repr__(self) -> str:
        return f"Pod({self.namespace}/{self.name}, ip={self.ip!r}, node={self.node.name!r})"


class _Forwarder:
    """Loopback forwards from namespaces to the host, served by one background thread with its own loop.

    The listening socket is created inside the namespace (a socket keeps the namespace it was born in);
    the thread itself stays in the host namespace, so its outgoing connections reach the host's loopback.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="netns-forward", daemon=True)
        self.thread.start()
        self.servers: list[asyncio.Server] = []

    def add(self, ns: _Netns, host_port: int, port: int) -> int:
        fd = ns.open_netns()
        try:
            lsock = _sockets.netns_listener(fd, port, "127.0.0.1")
        finally:
            os.close(fd)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
                if w.can_write_eof():
                    w.write_eof()
            except (ConnectionError, OSError):
                w.transport.abort()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", host_port)
            except OSError:
                w.transport.abort()
                return
            await asyncio.gather(pump(r, uw), pump(ur, w))
            uw.close()
            w.close()

        async def start() -> int:
            server = await asyncio.start_server(handle, sock=lsock)
            self.servers.append(server)
            return int(lsock.getsockname()[1])

        return asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def close(self) -> None:
        async def stop() -> None:
            for s in self.servers:
                s.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


_SENTINEL_SRC = "192.0.2.1"  # TEST-NET-1: never a pod or node address


def _sentinel_frame(token: bytes) -> bytes:
    """An Ethernet/IPv4/TCP frame 192.0.2.1:9 -> 192.0.2.2:9 (RST) carrying ``token``, for ``sniff``."""
    tcp = struct.pack("!HHIIBBHHH", 9, 9, 0, 0, 5 << 4, 0x04, 0, 0, 0) + token
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(tcp),
            0,
            0,
            64,
            socket.IPPROTO_TCP,
            0,
            socket.inet_aton(_SENTINEL_SRC),
            socket.inet_aton("192.0.2.2"),
        )
    )
    total = sum(struct.unpack("!10H", bytes(ip)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip[10:12] = struct.pack("!H", ~total & 0xFFFF)
    eth = bytes.fromhex("02aa00000002") + bytes.fromhex("02aa00000001") + struct.pack("!H", 0x0800)
    return eth + bytes(ip) + tcp


class Sniff:
    """What ``Topology.sniff`` recorded: ``text`` is filled when the ``with`` block ends."""

    def __init__(self) -> None:
        self.text = ""

    def ports(self) -> set[int]:
        """TCP ports seen on either side of every recorded packet (``a.b.c.d.port > e.f.g.h.port``)."""
        out: set[int] = set()
        for m in re.finditer(r" (\d+\.\d+\.\d+\.\d+)\.(\d+) > (\d+\.\d+\.\d+\.\d+)\.(\d+):", self.text):
            out.add(int(m.group(2)))
            out.add(int(m.group(4)))
        return out


class Topology:
    """A set of nodes and pods wired to one private bridge; a context manager that always tears down.

    ``prefix`` names this test suite's namespaces (``cleanup_leftovers`` uses it); ``pod_cidr`` is split in
    /24s per node index for automatic pod IPs; ``node_cidr`` gives node IPs.
    """

    def __init__(
        self,
        *,
        prefix: str = DEFAULT_PREFIX,
        pod_cidr: str = "10.244.0.0/16",
        node_cidr: str = "10.240.0.0/24",
        cleanup: bool = True,
    ) -> None:
        with _counter_lock:
            n = next(_counter)
        self.prefix = prefix
        self.tag = f"{prefix}-{os.getpid()}-{n}"
        self.pod_net = ipaddress.ip_network(pod_cidr)
        self.node_net = ipaddress.ip_network(node_cidr)
        self.fabric = f"{self.tag}-fab"
        self.nodes: list[Node] = []
        self.pods: list[Pod] = []
        self._created: list[str] = []
        self._ports = itertools.count(0)
        self._started = False
        self._closed = False
        self._cleanup = cleanup
        self._fwd: _Forwarder | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> Topology:
        """Create the fabric namespace and bridge (``__enter__`` calls this)."""
        if self._started:
            return self
        if self._cleanup:
            cleanup_leftovers(self.prefix)
        atexit.register(self.close)
        self._started = True
        _track_open(+1)
        self._add_netns(self.fabric)
        _ip("-n", self.fabric, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.fabric, "link", "set", "br0", "up")
        return self

    def __enter__(self) -> Topology:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop every process started in the topology, then delete every namespace it created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for ns in [*self.pods, *self.nodes]:
            ns._stop_procs()
        if self._fwd is not None:
            self._fwd.close()
            self._fwd = None
        for name in reversed(self._created):
            _kill_netns_pids(name)
            _ip("netns", "del", name, check=False)
        self._created.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self._started:
            _track_open(-1)

    def _forwarder(self) -> _Forwarder:
        self._require_started()
        if self._fwd is None:
            self._fwd = _Forwarder()
        return self._fwd

    @contextlib.contextmanager
    def sniff(self, bpf: str = "tcp", *, timeout: float = 10.0) -> Iterator[Sniff]:
        """Record every packet crossing the fabric bridge (tcpdump in the fabric netns) while the body runs.

        After the block, ``Sniff.text`` holds ``tcpdump -nn -A`` output (headers and ASCII payloads), which is
        how a test proves what went over the wire (e.g. only TLS to 15008, never the app's plaintext).

        The capture is complete, not just "probably caught up": before tcpdump is stopped, a sentinel frame
        is sent on the bridge (after every packet of the body) and the capture is stopped only once the
        sentinel is in the file. A fixed pause was not enough on a loaded machine, where tcpdump may not
        have run for a while: packets it had not read yet were lost on SIGINT, which would fail positive
        checks and, worse, make negative ones ("never plaintext") pass without evidence. The sentinel is
        filtered out of ``text``.
        """
        self._require_started()
        tmp = tempfile.mkdtemp(prefix=f"{self.tag}-pcap-")
        path = os.path.join(tmp, "fabric.pcap")
        cmd = [
            "tcpdump",
            "-Z",
            "root",
            "-i",
            "br0",
            "-U",
            "--immediate-mode",
            "-n",
            "-s",
            "0",
            "-w",
            path,
            f"({bpf}) or host {_SENTINEL_SRC}",
        ]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.fabric, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        result = Sniff()
        try:
            assert proc.stderr is not None
            deadline = time.monotonic() + timeout
            while True:  # tcpdump says "listening on" once the capture is armed
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stderr], [], [], left)[0]:
                    raise TopologyError("tcpdump did not start")
                line = proc.stderr.readline()
                if not line:
                    raise TopologyError("tcpdump exited")
                if b"listening on" in line:
                    break
            yield result
        finally:
            if proc.poll() is None:
                self._wait_for_sentinel(path, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
            if os.path.exists(path):
                res = subprocess.run(
                    ["tcpdump", "-nn", "-A", "-r", path, f"not host {_SENTINEL_SRC}"],
                    capture_output=True,
                    text=True,
                    errors="replace",
                )
                result.text = res.stdout
            shutil.rmtree(tmp, ignore_errors=True)

    def _wait_for_sentinel(self, path: str, timeout: float) -> None:
        """Send sentinel frames on the fabric bridge until one is in the capture file (or ``timeout``).

        tcpdump writes each packet as it reads it (``-U``), and it reads in order: once the sentinel, sent
        after the body's last packet, is in the file, so is everything before it. The frame (TEST-NET
        addresses, MACs nobody has) is flooded to the pods, which drop it.
        """
        token = os.urandom(16)
        frame = _sentinel_frame(token)
        fd = _sockets.open_netns(str(NETNS_DIR / self.fabric))
        try:
            with _sockets.in_netns(fd):
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        finally:
            os.close(fd)
        with sock:
            sock.bind(("br0", 0))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                sock.send(frame)
                with contextlib.suppress(OSError), open(path, "rb") as f:
                    if token in f.read():
                        return
                time.sleep(0.05)

    def netns_names(self) -> list[str]:
        """The namespaces of this topology that currently exist (empty after ``close``)."""
        return [n for n in list_netns() if n.startswith(self.tag + "-")]

    # -- building ------------------------------------------------------------------------------------------
    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _attach(self, netns: str, ip: str) -> None:
        port = f"v{next(self._ports)}"
        _ip("link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", port, "netns", self.fabric)
        _ip("-n", self.fabric, "link", "set", port, "master", "br0", "up")
        _ip("-n", netns, "addr", "add", f"{ip}/32", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "route", "add", "default", "dev", "eth0")

    def add_node(self, name: str, ip: str | None = None) -> Node:
        """Add a node namespace on the fabric (IP: the next address of ``node_cidr`` unless given)."""
        self._require_started()
        index = len(self.nodes)
        addr = ip or str(self.node_net.network_address + index + 1)
        netns = f"{self.tag}-n{index}"
        self._add_netns(netns)
        self._attach(netns, addr)
        node = Node(self, name, index, netns, addr)
        self.nodes.append(node)
        return node

    def add_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        node: Node | None = None,
        ip: str | None = None,
        service_account: str = "default",
        uid: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Pod:
        """Add a pod namespace on ``node`` (default: the first node, created if none) with its own IP."""
        self._require_started()
        if node is None:
            node = self.nodes[0] if self.nodes else self.add_node("node-0")
        if ip is None:
            base = self.pod_net.network_address
            if self.pod_net.prefixlen <= 24:
                base = base + node.index * 256  # the node's /24, like a podCIDR
            host = next(node._next_host)
            if host > 254:
                raise TopologyError(f"node {node.name} has no free automatic pod IP left; pass ip=")
            ip = str(base + host)
        netns = f"{self.tag}-p{len(self.pods)}"
        self._add_netns(netns)
        self._attach(netns, ip)
        pod = Pod(self, name, namespace, ip, node, netns, service_account, uid, labels)
        self.pods.append(pod)
        node.pods.append(pod)
        return pod

    def remove_pod(self, pod: Pod) -> None:
        """Stop the pod's processes and delete its namespace (its veth and iptables rules go with it)."""
        pod._stop_procs()
        if pod.netns in self._created:
            _kill_netns_pids(pod.netns)
            _ip("netns", "del", pod.netns, check=False)
            self._created.remove(pod.netns)
        if pod in self.pods:
            self.pods.remove(pod)
        if pod in pod.node.pods:
            pod.node.pods.remove(pod)

    def pod(self, name: str, namespace: str = "default") -> Pod:
        """Look a pod up by name."""
        for p in self.pods:
            if p.name == name and p.namespace == namespace:
                return p
        raise KeyError(f"{namespace}/{name}")

    def _require_started(self) -> None:
        if not self._started or self._closed:
            raise TopologyError("topology not started (use it as a context manager) or already closed")
