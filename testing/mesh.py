"""A whole ambient mesh on this machine, from the YAML you would ``kubectl apply`` (public testing kit).

Usage (in your own pytest suite, or a script; needs root, ``ip`` and ``iptables``)::

    from istiopy.testing.mesh import Mesh

    with Mesh("deploy/mesh/") as mesh:                    # or Mesh(documents=yaml_text)
        web = mesh.pod("frontend/frontend")              # by name, name prefix or app label
        assert web.http("backend/backend", 8080, "/api/v1").json()["pod"].startswith("backend-v1")
        assert not web.reaches("backend/admin-api", 9090) # denied (connection reset by ztunnel)
        mesh.apply(extra_policy_yaml)                      # more config; waits until proxies have it
    # every process, namespace and iptables rule is gone here, even after a failure or Ctrl-C

What it brings up, and why this way:

* **istiod-py** as a real process (``istiod-py serve``) watching your directory, so editing a file changes
  the mesh live, exactly as in ``istiod-py up``; the kit's own additions (ztunnel pods per node, whatever
  ``apply`` adds) live in a second, private directory so your files are never written.
* **Nodes** from your ``Node`` objects (their InternalIP), else from the pods' ``spec.nodeName``; each gets a
  node agent (capture rules + ZDS) and a **ztunnel-py** process.
* **Pods** from your ``Pod`` objects with ``status.podIP`` (given as ``documents=``, Pods without one get a
  node and an IP as a kubelet would): a network namespace each, on one private bridge,
  running a small HTTP app on every ``containerPort`` (``istiopy.testing.meshapp``: it answers with the pod,
  port, path and the request headers it saw). Ambient pods (namespace or pod label
  ``istio.io/dataplane-mode: ambient``) are captured.
* **Waypoints**: for each ``Gateway`` of class ``istio-waypoint`` whose pod is in the YAML (label
  ``gateway.networking.k8s.io/gateway-name``), a real Envoy through ``dataplane.waypoint``. Given as
  ``documents=``, a Gateway alone is enough: the kit adds its Pod and Service as Istio's waypoint
  controller would.

Cleanup: ``close`` (``with`` exit) stops everything; the network namespaces are those of
``testing.netns.Topology`` (torn down on exceptions, Ctrl-C and SIGTERM, and a crashed run's leftovers are
removed by the next run); the processes run in their own sessions and are killed by group.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from istiopy.testing.netns import Node, Pod, Topology, TopologyError, cleanup_leftovers, list_netns
from istiopy.testing.procs import stop_group

__all__ = ["Mesh", "MeshError", "MeshPod", "Response", "requirements_missing"]

CLUSTER = "Kubernetes"
KIT_PREFIX = "ipymesh"
AMBIENT = "istio.io/dataplane-mode"
GATEWAY_NAME = "gateway.networking.k8s.io/gateway-name"


class MeshError(RuntimeError):
    """The mesh could not be brought up (with the reason and the relevant log tail)."""


def requirements_missing() -> str | None:
    """Why this machine cannot run a mesh (one sentence), or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables); run it with sudo or as root"
    for tool in ("ip", "iptables", "nsenter"):
        if shutil.which(tool) is None:
            return f"needs the `{tool}` command (apt-get install iproute2 iptables util-linux)"
    if not Path("/proc/self/ns/net").exists():
        return "needs Linux network namespaces"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _read_line(proc: subprocess.Popen[bytes], timeout: float, what: str, log: Path | None = None) -> str:
    """The first line a child prints (its ``ready ...``), or a MeshError with its log."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            raise MeshError(f"{what} did not become ready in {timeout:.0f}s{_tail(log)}")
        ch = os.read(proc.stdout.fileno(), 1)
        if not ch:
            raise MeshError(f"{what} exited early (status {proc.wait()}){_tail(log)}")
        line += ch
    return line.decode().strip()


def _tail(log: Path | None, n: int = 25) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()[-n:]
    return "\n--- " + str(log) + " ---\n" + "\n".join(lines)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is not None:
        stop_group(proc, timeout)


# ------------------------------------------------------------------------------------------ responses
@dataclass
class Response:
    """An HTTP response as the client pod saw it."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data

    @property
    def via_waypoint(self) -> bool:
        """Envoy (the waypoint) stamps ``x-envoy-upstream-service-time`` on what it proxied."""
        return "x-envoy-upstream-service-time" in self.headers


def _complete(raw: bytes) -> bool:
    """Whether ``raw`` holds a whole response (so the reader stops without waiting for the close)."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    for ln in head.split(b"\r\n")[1:]:
        k, _, v = ln.partition(b":")
        if k.strip().lower() == b"content-length":
            return len(body) >= int(v.strip() or b"0")
    return False


def _parse_response(raw: bytes) -> Response:
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/"):
        raise ConnectionResetError(f"no HTTP response ({raw[:80]!r})")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2 :]
        body = out
    elif "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Response(int(lines[0].split()[1]), headers, body)


# ------------------------------------------------------------------------------------------------ pods
@dataclass
class MeshPod:
    """One pod of the mesh: its namespace, its Pod object, and clients that behave like its app."""

    mesh: Mesh
    pod: Pod
    labels: dict[str, str]
    ports: list[int]
    ambient: bool
    waypoint_for: str | None = None  # "ns/gateway" when this is a waypoint's pod

    @property
    def name(self) -> str:
        return self.pod.name

    @property
    def namespace(self) -> str:
        return self.pod.namespace

    @property
    def ip(self) -> str:
        return self.pod.ip

    @property
    def node(self) -> str:
        return self.pod.node.name

    @property
    def service_account(self) -> str:
        return self.pod.service_account

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.mesh.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __repr__(self) -> str:
        return f"MeshPod({self.namespace}/{self.name} {self.ip} on {self.node})"

    def connect(self, target: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from this pod's app (captured like any app's): ``target`` is ``ns/service``,
        ``ns/pod`` (name, prefix or app label), a hostname ``svc.ns.svc.cluster.local`` or an IP."""
        return self.pod.connect((self.mesh.resolve(target), port), timeout=timeout)

    def request(
        self,
        target: str,
        port: int,
        path: str = "/",
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        timeout: float = 10.0,
    ) -> Response:
        """One HTTP/1.1 request; raises ``ConnectionError`` when the mesh refuses the connection."""
        host = target if "/" not in target else self.mesh.hostname(target)
        hdrs = {"host": host, "connection": "close", "user-agent": "istiopy-kit", **(headers or {})}
        if body or method in ("POST", "PUT", "PATCH"):
            hdrs["content-length"] = str(len(body))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        try:
            s = self.connect(target, port, timeout)
        except TimeoutError as e:
            raise ConnectionError(f"connect to {target}:{port} timed out") from e
        with s:
            s.settimeout(timeout)
            s.sendall(head.encode() + body)
            raw = b""
            try:
                while not _complete(raw) and (chunk := s.recv(65536)):
                    raw += chunk
            except TimeoutError as e:
                if not raw:
                    raise ConnectionError(f"no answer from {target}:{port} in {timeout}s") from e
            except ConnectionResetError:
                if not raw:  # a reset before any answer is the mesh refusing the connection
                    raise
        return _parse_response(raw)

    def http(self, target: str, port: int, path: str = "/", **kw: Any) -> Response:
        """Like ``request``; kept short for tests that read ``.status`` and ``.json()``."""
        return self.request(target, port, path, **kw)

    def reaches(self, target: str, port: int, path: str = "/", **kw: Any) -> bool:
        """True when an HTTP request gets *any* answer from the destination app (2xx-5xx from the app or
        the waypoint), False when the mesh resets or refuses the connection (an L4 deny)."""
        try:
            self.request(target, port, path, **kw)
        except (ConnectionError, OSError):
            return False
        return True

    def run(self, cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.pod.run(cmd, **kw)


# ------------------------------------------------------------------------------------ proxy handles
@dataclass
class ZtunnelHandle:
    node: str
    proc: subprocess.Popen[bytes]
    admin_port: int
    metrics_port: int
    readiness_port: int
    log: Path
    agent: subprocess.Popen[bytes] | None = None

    def metrics(self) -> str:
        return _http_get(f"http://127.0.0.1:{self.metrics_port}/stats/prometheus")[1]

    def config_dump(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(_http_get(f"http://127.0.0.1:{self.admin_port}/config_dump")[1])
        return data

    def ready(self) -> bool:
        with contextlib.suppress(OSError):
            return _http_get(f"http://127.0.0.1:{self.readiness_port}/healthz/ready", 1.0)[0] == 200
        return False


@dataclass
class WaypointHandle:
    name: str
    namespace: str
    pod: MeshPod
    proc: subprocess.Popen[bytes]
    admin_port: int
    workdir: Path

    def _get(self, port: int, path: str) -> str:
        """HTTP GET from inside the waypoint pod (its ports are not on the host)."""
        with self.pod.pod.connect(("127.0.0.1" if port != 15020 else self.pod.ip, port), timeout=5) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        return _parse_response(raw).text

    def metrics(self) -> str:
        """Istio's HTTP metrics (``istio_requests_total`` ...) from the launcher's access-log agent."""
        return self._get(15020, "/stats/prometheus")

    def stats(self, prefix: str = "") -> str:
        return self._get(self.admin_port, "/stats" + (f"?filter={prefix}" if prefix else ""))

    def log_tail(self, n: int = 30) -> str:
        return _tail(self.workdir / "envoy.log", n)


# ------------------------------------------------------------------------------------------- the mesh
def _load_docs(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every mapping document under ``paths`` (unparseable files are istiod's to report, not ours)."""
    docs: list[dict[str, Any]] = []
    for root in paths:
        files = [root] if root.is_file() else sorted(root.rglob("*.y*ml"))
        for f in files:
            if f.suffix not in (".yaml", ".yml"):
                continue
            with contextlib.suppress(yaml.YAMLError, OSError, UnicodeDecodeError):
                docs += [d for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
    return docs


def _complete_pods(documents: str) -> str:
    """YAML text with every Pod given what a kubelet would: a node, an IP (``10.244.<node>.<n>``) and phase
    Running - so tests can write Pods as they write manifests. Pods that have an IP keep it; text with no
    Pod lacking one is returned unchanged."""
    try:
        docs = [d for d in yaml.safe_load_all(documents) if d is not None]
    except yaml.YAMLError:
        return documents  # istiod-py reports it
    added = _waypoint_deployments(docs)
    pods = [d for d in docs if isinstance(d, dict) and d.get("kind") == "Pod"]
    if not added and all((d.get("status") or {}).get("podIP") for d in pods):
        return documents
    nodes = [_meta(d).get("name", "") for d in docs if isinstance(d, dict) and d.get("kind") == "Node"]
    nodes = nodes or sorted({(d.get("spec") or {}).get("nodeName") for d in pods} - {None, ""}) or ["node-1"]
    used = {(d.get("status") or {}).get("podIP") for d in pods}
    counters = dict.fromkeys(nodes, 10)
    for i, d in enumerate(pods):
        spec = d.setdefault("spec", {}) or {}
        d["spec"] = spec
        node = spec.get("nodeName") or nodes[i % len(nodes)]
        spec["nodeName"] = node
        status = d.setdefault("status", {}) or {}
        d["status"] = status
        if not status.get("podIP"):
            index = nodes.index(node) if node in nodes else 0
            while True:
                counters[node] = counters.get(node, 10) + 1
                ip = f"10.244.{index}.{counters[node]}"
                if ip not in used:
                    break
            used.add(ip)
            status.update({"podIP": ip, "podIPs": [{"ip": ip}]})
        status.setdefault("phase", "Running")
    return yaml.safe_dump_all(docs, sort_keys=False)


def _waypoint_deployments(docs: list[Any]) -> bool:
    """What Istio's waypoint controller creates for a waypoint Gateway: its Pod and its Service (appended to
    ``docs`` when missing). Returns whether anything was added."""
    added = False
    vip = 0
    for gw in [d for d in docs if isinstance(d, dict) and d.get("kind") == "Gateway"]:
        if (gw.get("spec") or {}).get("gatewayClassName") != "istio-waypoint":
            continue
        name, ns = _meta(gw).get("name", ""), _meta(gw).get("namespace", "default")
        labels = {GATEWAY_NAME: name, "gateway.istio.io/managed": "istio.io-mesh-controller"}

        def exists(kind: str, match: Callable[[dict[str, Any]], bool], ns: str = ns) -> bool:
            return any(
                isinstance(d, dict) and d.get("kind") == kind and _meta(d).get("namespace", "default") == ns
                and match(d)
                for d in docs
            )  # fmt: skip

        def gateway_pod(d: dict[str, Any], name: str = name) -> bool:
            return bool((_meta(d).get("labels") or {}).get(GATEWAY_NAME) == name)

        def named(d: dict[str, Any], name: str = name) -> bool:
            return bool(_meta(d).get("name") == name)

        if not exists("Pod", gateway_pod):
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"{name}-0", "namespace": ns, "labels": dict(labels)},
                    "spec": {"serviceAccountName": name, "containers": [{"name": "istio-proxy"}]},
                }
            )
            added = True
        if not exists("Service", named):
            vip += 1
            docs.append(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": name, "namespace": ns, "labels": {GATEWAY_NAME: name}},
                    "spec": {
                        "clusterIP": f"10.96.255.{vip}",
                        "selector": {GATEWAY_NAME: name},
                        "ports": [{"name": "mesh", "port": 15008, "targetPort": 15008}],
                    },
                }
            )
            added = True
    return added


def _meta(doc: Mapping[str, Any]) -> dict[str, Any]:
    m = doc.get("metadata")
    return m if isinstance(m, dict) else {}


class Mesh:
    """See the module docstring. ``config``: a directory or file of YAML (watched live); ``documents``: YAML
    text instead (written to a private directory). ``workdir`` keeps logs and state (default: a temp dir,
    removed on close unless ``keep_workdir``)."""

    def __init__(
        self,
        config: str | Path | None = None,
        *,
        documents: str | None = None,
        workdir: str | Path | None = None,
        keep_workdir: bool = False,
        trust_domain: str = "cluster.local",
        log_level: str = "info",
        ztunnel_log_level: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        if (config is None) == (documents is None):
            raise ValueError("give exactly one of config (a directory or file) or documents (YAML text)")
        self._own_workdir = workdir is None
        # Absolute: the children run with their own working directories.
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="istiopy-mesh-"))
        ).resolve()
        self.keep_workdir = keep_workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.kit_dir = self.workdir / "kit-config"
        if config is not None:
            self.config = Path(config).resolve()
            if not self.config.exists():
                raise MeshError(f"config {config}: no such file or directory")
        else:
            self.config = self.workdir / "config"
            self.config.mkdir(exist_ok=True)
            (self.config / "documents.yaml").write_text(_complete_pods(documents or ""))
        self.trust_domain = trust_domain
        self.log_level = log_level
        self.ztunnel_log_level = ztunnel_log_level or log_level
        self.progress = progress or (lambda _msg: None)
        self.topology: Topology | None = None
        self.pods: dict[str, MeshPod] = {}  # "ns/name"
        self.ztunnels: dict[str, ZtunnelHandle] = {}
        self.waypoints: dict[str, WaypointHandle] = {}
        self.services: dict[str, dict[str, Any]] = {}  # "ns/name" -> {"vip": ip, "ports": [...]}
        self.istiod: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._etc_dirs: list[Path] = []
        self._apps: list[tuple[subprocess.Popen[bytes], str]] = []  # started, not yet known to listen
        self._authority: Any = None  # istiod-py's CA, loaded from its state directory for credentials
        self.rundir: Path | None = None  # short paths for unix sockets (set by start)
        self._started = False

    # --------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> Mesh:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def start(self) -> Mesh:
        why = requirements_missing()
        if why:
            raise MeshError(f"istiopy mesh {why}")
        removed = cleanup_leftovers(KIT_PREFIX)
        live = set(list_netns())
        for d in Path("/etc/netns").glob(KIT_PREFIX + "-*"):
            if d.name not in live:
                shutil.rmtree(d, ignore_errors=True)
        if removed:
            self.progress(f"removed {len(removed)} leftover namespaces of a crashed run")
        self._kill_previous()
        self._started = True
        docs = _load_docs([self.config])
        self._index(docs)
        self.topology = Topology(prefix=KIT_PREFIX, cleanup=False).start()
        self._build_topology(docs)
        self._write_kit_config()
        # Everything that can start at once does (on 2 cores most of the time is Python start-up).
        self._start_istiod()
        self._start_waypoints()
        self._start_nodes()
        for popen, what in self._apps:
            _read_line(popen, 60, what)
        self._await_nodes()
        self._await_waypoints()
        self.wait_synced(initial=True)
        return self

    def close(self) -> None:
        """Stop everything this mesh started (idempotent)."""
        for wp in self.waypoints.values():
            _stop(wp.proc)
        for zt in self.ztunnels.values():
            _stop(zt.proc)
            _stop(zt.agent)
        for p in self._procs:
            _stop(p)
        _stop(self.istiod)
        if self.topology is not None:
            with contextlib.suppress(Exception):
                self.topology.close()
            self.topology = None
        for d in self._etc_dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._etc_dirs.clear()
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------------------------- model
    def _track(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        """Record a child's process group in ``<workdir>/pids``, so a run after a crash can end it."""
        with open(self.workdir / "pids", "a") as f:
            f.write(f"{proc.pid}\n")
        return proc

    def _kill_previous(self) -> None:
        """Process groups a crashed earlier run in this workdir left behind (only our own commands), and its
        per-run files (unix sockets would refuse to bind again); the CA state is kept."""
        for sub in ("nodes", "waypoints", "creds"):
            shutil.rmtree(self.workdir / sub, ignore_errors=True)
        with contextlib.suppress(OSError):
            old = Path((self.workdir / "rundir").read_text().strip())
            if old.name.startswith("ipymesh-run-"):
                shutil.rmtree(old, ignore_errors=True)
        for stale in Path(tempfile.gettempdir()).glob("ipymesh-run-*-*"):  # of runs killed outright
            with contextlib.suppress(ValueError, OSError):
                if not Path(f"/proc/{int(stale.name.split('-')[2])}").exists():
                    shutil.rmtree(stale, ignore_errors=True)
        self.rundir = Path(tempfile.mkdtemp(prefix=f"ipymesh-run-{os.getpid()}-"))
        (self.workdir / "rundir").write_text(str(self.rundir))
        path = self.workdir / "pids"
        if not path.exists():
            return
        killed = 0
        for line in path.read_text().split():
            pid = int(line)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"istiopy" in cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                    killed += 1
        path.unlink()
        if killed:
            self.progress(f"stopped {killed} leftover processes of a crashed run")

    def _index(self, docs: list[dict[str, Any]]) -> None:
        self._namespaces = {
            _meta(d).get("name", ""): (_meta(d).get("labels") or {})
            for d in docs
            if d.get("kind") == "Namespace"
        }
        self._nodes: dict[str, str | None] = {}
        for d in docs:
            if d.get("kind") == "Node":
                ip = None
                for a in (d.get("status") or {}).get("addresses") or []:
                    if a.get("type") == "InternalIP":
                        ip = a.get("address")
                self._nodes[_meta(d).get("name", "")] = ip
        self._pod_docs = [d for d in docs if d.get("kind") == "Pod"]
        self._gateways = [
            d
            for d in docs
            if d.get("kind") == "Gateway"
            and (d.get("spec") or {}).get("gatewayClassName") == "istio-waypoint"
        ]
        for d in docs:
            if d.get("kind") == "Service":
                m, spec = _meta(d), d.get("spec") or {}
                key = f"{m.get('namespace', 'default')}/{m.get('name', '')}"
                self.services[key] = {"vip": spec.get("clusterIP"), "ports": spec.get("ports") or []}
        for d in self._pod_docs:
            if (d.get("spec") or {}).get("nodeName") and d["spec"]["nodeName"] not in self._nodes:
                self._nodes[d["spec"]["nodeName"]] = None
        if not self._nodes:
            self._nodes["node-1"] = None

    def _is_ambient(self, ns: str, labels: Mapping[str, str]) -> bool:
        mode = labels.get(AMBIENT) or (self._namespaces.get(ns) or {}).get(AMBIENT)
        return mode == "ambient"

    def _build_topology(self, docs: list[dict[str, Any]]) -> None:
        topo = self.topology
        assert topo is not None
        nodes: dict[str, Node] = {}
        for name, ip in self._nodes.items():
            nodes[name] = topo.add_node(name, ip=ip)
        first = next(iter(nodes.values()))
        for d in self._pod_docs:
            m, spec, status = _meta(d), d.get("spec") or {}, d.get("status") or {}
            name, ns = m.get("name", ""), m.get("namespace", "default")
            if ns == "istio-system" and (m.get("labels") or {}).get("app") == "ztunnel":
                continue
            ip = status.get("podIP")
            if not ip:
                raise MeshError(
                    f"Pod {ns}/{name} has no status.podIP (standalone pods need their IP in YAML)"
                )
            labels = {str(k): str(v) for k, v in (m.get("labels") or {}).items()}
            node = nodes.get(spec.get("nodeName", ""), first)
            sa = spec.get("serviceAccountName") or "default"
            pod = topo.add_pod(name, ns, node=node, ip=ip, service_account=sa, labels=labels)
            pod.uid = f"{CLUSTER}//Pod/{ns}/{name}"
            ports = [
                int(p["containerPort"])
                for c in spec.get("containers") or []
                for p in c.get("ports") or []
                if isinstance(p.get("containerPort"), int)
            ]
            gw = labels.get(GATEWAY_NAME)
            mp = MeshPod(
                self,
                pod,
                labels,
                ports or [8080],
                ambient=self._is_ambient(ns, labels) and gw is None,
                waypoint_for=f"{ns}/{gw}" if gw else None,
            )
            self.pods[f"{ns}/{name}"] = mp
            if gw is None:
                self._spawn_app(mp)

    def _spawn_app(self, mp: MeshPod) -> None:
        argv = [sys.executable, "-P", "-m", "istiopy.testing.meshapp", "--pod", mp.name, "--namespace"]
        argv.append(mp.namespace)
        for port in mp.ports:
            argv += ["--port", str(port)]
        proc = mp.pod.spawn(argv, stdout=subprocess.PIPE)
        self._apps.append((proc.popen, f"app in {mp.namespace}/{mp.name}"))

    def _write_kit_config(self) -> None:
        """The ztunnel pods of every node (the CA only lets a node proxy act for pods on a node where a
        ztunnel pod runs), in the kit's private directory."""
        self.kit_dir.mkdir(exist_ok=True)
        assert self.topology is not None
        docs = [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"ztunnel-{n.name}",
                    "namespace": "istio-system",
                    "labels": {"app": "ztunnel"},
                },
                "spec": {
                    "nodeName": n.name,
                    "serviceAccountName": "ztunnel",
                    "containers": [{"name": "istio-proxy"}],
                },
                "status": {"phase": "Running", "podIP": n.ip, "podIPs": [{"ip": n.ip}]},
            }
            for n in self.topology.nodes
        ]
        (self.kit_dir / "ztunnels.yaml").write_text(yaml.safe_dump_all(docs))

    def _start_istiod(self) -> None:
        self.progress("starting istiod-py (xDS + CA)")
        log = self.workdir / "istiod.log"
        argv = [sys.executable, "-P", "-m", "istiopy.istiod.cli", "--log-level", self.log_level, "serve"]
        argv += ["--config-dir", str(self.config), "--extra-config-dir", str(self.kit_dir)]
        argv += ["--state-dir", str(self.state_dir), "--xds-port", "0", "--monitoring-port", "0"]
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / "ports").unlink()
        with open(log, "ab") as out:
            self.istiod = self._track(
                subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir
                )
            )
        deadline = time.monotonic() + 60
        while not (self.state_dir / "ports").exists():
            if self.istiod.poll() is not None:
                raise MeshError(f"istiod-py exited with {self.istiod.returncode}{_tail(log)}")
            if time.monotonic() > deadline:
                raise MeshError(f"istiod-py did not start{_tail(log)}")
            time.sleep(0.05)
        text = (self.state_dir / "ports").read_text()
        self.ports = {k: int(v) for k, v in (ln.split("=", 1) for ln in text.split())}

    def _bootstrap(self, identity: str, node: str) -> tuple[str, str, str]:
        """A bootstrap credential from istiod-py's own root (what ``istiod-py bootstrap-node`` writes),
        issued in this process: a Python start-up per proxy would double the mesh's start time."""
        if self._authority is None:
            import asyncio
            import concurrent.futures

            from istiopy.ca.service import CaConfig, start_authority

            config = CaConfig(trust_domain=self.trust_domain, root_dir=self.state_dir / "ca")
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the caller may be inside an event loop
                self._authority = pool.submit(asyncio.run, start_authority(config)).result(30)
        from istiopy.api.identity import SpiffeId

        ns, _, sa = identity.partition("/")
        bundle = self._authority.issue_bootstrap(SpiffeId(self.trust_domain, ns, sa), node)
        out = self.workdir / "creds" / f"{identity.replace('/', '.')}@{node}"
        out.mkdir(parents=True, exist_ok=True)
        files = []
        for name, text in (
            ("root-cert.pem", self._authority.roots_pem),
            ("cert-chain.pem", bundle.full_chain_pem),
            ("key.pem", bundle.key_pem),
        ):
            fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            files.append(str(out / name))
        return files[0], files[1], files[2]

    def _start_nodes(self) -> None:
        """Every node's agent first (they set up capture), then every ztunnel-py; each phase in parallel."""
        assert self.topology is not None
        assert self.rundir is not None
        self.progress(
            "starting node agents and ztunnel-py on " + ", ".join(n.name for n in self.topology.nodes)
        )
        agents: list[tuple[Node, subprocess.Popen[bytes], Path]] = []
        for node in self.topology.nodes:
            ndir = self.workdir / "nodes" / node.name
            ndir.mkdir(parents=True, exist_ok=True)
            zds = self.rundir / f"{node.name}.zds"
            argv = [sys.executable, "-P", "-m", "istiopy.dataplane.nodeagent", "--socket", str(zds)]
            for mp in self.pods.values():
                if mp.ambient and mp.pod.node is node:
                    p = mp.pod
                    argv += ["--pod", f"{p.uid},{p.name},{p.namespace},{p.service_account},{p.netns_path}"]
            alog = ndir / "agent.log"
            with open(alog, "ab") as err:
                agent = self._track(
                    subprocess.Popen(
                        argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True, cwd=ndir
                    )
                )
            self._procs.append(agent)
            agents.append((node, agent, alog))
        for node, agent, alog in agents:
            _read_line(agent, 60, f"node agent on {node.name}", alog)
        for node, agent, _ in agents:
            ndir = self.workdir / "nodes" / node.name
            root, chain, key = self._bootstrap("istio-system/ztunnel", node.name)
            admin, metrics, ready = _free_port(), _free_port(), _free_port()
            zlog = ndir / "ztunnel.log"
            istiod = f"127.0.0.1:{self.ports['tls']}"
            argv = [
                sys.executable, "-P", "-m", "istiopy.dataplane.launch",
                "--xds-address", istiod, "--ca-address", istiod,
                "--root-cert", root, "--ca-client-cert", chain, "--ca-client-key", key,
                "--token-file", str(ndir / "no-token"), "--trust-domain", self.trust_domain,
                "--node-name", node.name, "--pod-name", f"ztunnel-{node.name}", "--instance-ip", node.ip,
                "--admin-port", str(admin), "--metrics-address", "127.0.0.1",
                "--metrics-port", str(metrics), "--readiness-port", str(ready),
                "--zds-socket", str(self.rundir / f"{node.name}.zds"), "--log-level", self.ztunnel_log_level,
            ]  # fmt: skip
            with open(zlog, "ab") as out:
                proc = self._track(
                    subprocess.Popen(
                        argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ndir
                    )
                )
            self.ztunnels[node.name] = ZtunnelHandle(node.name, proc, admin, metrics, ready, zlog, agent)

    def _await_nodes(self) -> None:
        deadline = time.monotonic() + 90
        for zt in self.ztunnels.values():
            while not zt.ready():
                if zt.proc.poll() is not None:
                    raise MeshError(f"ztunnel-py on {zt.node} exited{_tail(zt.log)}")
                if time.monotonic() > deadline:
                    raise MeshError(f"ztunnel-py on {zt.node} not ready{_tail(zt.log)}")
                time.sleep(0.05)

    def _start_waypoints(self) -> None:
        for gw in self._gateways:
            m = _meta(gw)
            name, ns = m.get("name", ""), m.get("namespace", "default")
            pods = [p for p in self.pods.values() if p.waypoint_for == f"{ns}/{name}"]
            if not pods:
                self.progress(f"waypoint {ns}/{name}: no Pod labelled {GATEWAY_NAME}={name}; not started")
                continue
            mp = pods[0]
            self.progress(f"starting waypoint {ns}/{name} (Envoy) in pod {mp.name}")
            wdir_index = len(self.waypoints)
            sa = mp.service_account if mp.service_account != "default" else name
            root, chain, key = self._bootstrap(f"{ns}/{sa}", mp.node)
            port = mp.pod.forward_host_port(self.ports["tls"])
            # Unix socket paths (the launcher's agent.sock) are limited to 107 bytes: a short run directory,
            # linked from the workdir so the logs are where the others are.
            assert self.rundir is not None
            wdir = self.rundir / f"wp-{wdir_index}"
            wdir.mkdir(parents=True, exist_ok=True)
            link = self.workdir / "waypoints" / f"{ns}.{name}"
            link.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(wdir)
            argv = [
                sys.executable, "-P", "-m", "istiopy.testing.waypointd",
                "--name", name, "--namespace", ns, "--service-account", sa, "--pod-name", mp.name,
                "--pod-ip", mp.ip, "--istiod", f"127.0.0.1:{port}",
                "--root", root, "--cert", chain, "--key", key, "--workdir", str(wdir),
            ]  # fmt: skip
            self._isolate_dns(mp)
            proc = mp.pod.spawn(argv, stdout=subprocess.PIPE)
            self._track(proc.popen)
            self.waypoints[f"{ns}/{name}"] = WaypointHandle(name, ns, mp, proc.popen, 0, wdir)

    def _await_waypoints(self) -> None:
        for key, wp in self.waypoints.items():
            line = _read_line(wp.proc, 150, f"waypoint {key}", wp.workdir / "envoy.log")
            wp.admin_port = int(line.split()[1]) if len(line.split()) > 1 else 0

    def _isolate_dns(self, mp: MeshPod) -> None:
        """Give the pod a resolver that fails at once (``ip netns exec`` mounts ``/etc/netns/<ns>/*`` over
        ``/etc``): the fabric has no route to the host's DNS server, so a DNS-typed cluster (a ``jwksUri``
        host) would otherwise hold Envoy's cluster initialisation for the whole resolver timeout."""
        d = Path("/etc/netns") / mp.pod.netns
        d.mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        self._etc_dirs.append(d)

    # ---------------------------------------------------------------------------------- lookups
    def pod(self, ref: str) -> MeshPod:
        """``ns/name`` where name is the pod's name, a prefix of it (``backend-v1``) or its ``app`` label."""
        ns, _, name = ref.rpartition("/")
        cands = [p for p in self.pods.values() if not ns or p.namespace == ns]
        matchers: list[Callable[[MeshPod], bool]] = [
            lambda p: p.name == name,
            lambda p: p.name.startswith(name + "-"),
            lambda p: p.labels.get("app") == name,
        ]
        for match in matchers:
            found = [p for p in cands if match(p)]
            if found:
                return found[0]
        raise KeyError(f"no pod {ref!r}; pods: {', '.join(sorted(self.pods))}")

    def hostname(self, ref: str) -> str:
        ns, _, name = ref.rpartition("/")
        if f"{ns}/{name}" in self.services:
            return f"{name}.{ns}.svc.cluster.local"
        return ref

    def resolve(self, target: str) -> str:
        """An IP for ``target``: a literal IP, ``ns/service`` (its VIP), ``ns/pod``, or a service hostname."""
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(target))
        if "/" not in target and ".svc" in target:
            name, ns = target.split(".")[:2]
            target = f"{ns}/{name}"
        svc = self.services.get(target)
        if svc and svc.get("vip"):
            return str(svc["vip"])
        return self.pod(target).ip

    def ztunnel(self, node: str) -> ZtunnelHandle:
        return self.ztunnels[node]

    def waypoint(self, ref: str) -> WaypointHandle:
        """``ns/name`` of the waypoint Gateway (``ns`` alone when it has one waypoint)."""
        if ref in self.waypoints:
            return self.waypoints[ref]
        found = [w for k, w in self.waypoints.items() if k.split("/")[0] == ref]
        if len(found) == 1:
            return found[0]
        raise KeyError(f"no waypoint {ref!r}; waypoints: {', '.join(sorted(self.waypoints)) or 'none'}")

    def istiod_metrics(self) -> str:
        return _http_get(f"http://127.0.0.1:{self.ports['monitoring']}/metrics")[1]

    def istiod_log(self) -> str:
        return _tail(self.workdir / "istiod.log", 200)

    # -------------------------------------------------------------------------------- config changes
    def apply(self, documents: str, name: str = "applied.yaml", *, wait: bool = True) -> None:
        """Add (or replace) a YAML file in the kit's private config directory; by default wait until every
        connected proxy acknowledged the result."""
        path = self.kit_dir / name
        if path.exists() and path.read_text() == documents:
            return  # nothing changes, nothing to wait for
        before = self.config_version()
        tmp = self.kit_dir / f".{name}.tmp"
        tmp.write_text(documents)
        tmp.replace(self.kit_dir / name)
        if wait:
            self.wait_synced(since=before)

    def remove(self, name: str = "applied.yaml", *, wait: bool = True) -> None:
        before = self.config_version()
        path = self.kit_dir / name
        if path.exists():
            path.unlink()
            if wait:
                self.wait_synced(since=before)

    def config_version(self) -> Any:
        """istiod-py's model version (``/debug/configz``); changes whenever a watched file changes it."""
        code, text = _http_get(f"http://127.0.0.1:{self.ports['monitoring']}/debug/configz")
        return json.loads(text).get("version") if code == 200 else None

    def syncz(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = json.loads(
            _http_get(f"http://127.0.0.1:{self.ports['monitoring']}/debug/syncz")[1]
        )
        return data

    def wait_synced(self, since: Any = None, timeout: float = 30.0, *, initial: bool = False) -> None:
        """Until the model changed past ``since`` (when given) and every proxy acknowledged what it was sent.

        ``initial``: also until each ztunnel and waypoint is connected and holds every workload."""
        deadline = time.monotonic() + timeout
        stable_since: float | None = None
        last: Any = None
        while True:
            if time.monotonic() > deadline:
                raise MeshError(
                    f"mesh did not converge in {timeout:.0f}s (last: {last}){self.istiod_log()[-3000:]}"
                )
            ok = True
            if since is not None and self.config_version() == since:
                ok, last = False, "model unchanged"
            if ok:
                conns = self.syncz()
                kinds = [c.get("kind") for c in conns]
                if initial and (
                    kinds.count("ztunnel") < len(self.ztunnels)
                    or kinds.count("waypoint") < len(self.waypoints)
                ):
                    ok, last = False, f"connected: {kinds}"
                for c in conns:
                    for t in c.get("types") or []:
                        if t.get("sent_nonce") and t.get("sent_nonce") != t.get("acked_nonce"):
                            err = f" (last NACK: {t['last_error']})" if t.get("last_error") else ""
                            ok, last = False, f"{c.get('proxy')} has not acked {t.get('type')}{err}"
            if ok:
                stable_since = stable_since or time.monotonic()
                if time.monotonic() - stable_since >= 0.4:  # pushes after a debounce; Envoy warms after ACK
                    return
            else:
                stable_since = None
            time.sleep(0.05)

    # ------------------------------------------------------------------------------------- metrics
    def tcp_metrics(self) -> list[dict[str, str]]:
        """Every ``istio_tcp_connections_opened_total`` series of every ztunnel, as label dicts (+ value)."""
        return _series(
            (zt.metrics() for zt in self.ztunnels.values()),
            "istio_tcp_connections_opened_total",
        )

    def http_metrics(self, settle: float = 0.0) -> list[dict[str, str]]:
        """Every ``istio_requests_total`` series of every waypoint.

        The waypoints' HTTP metrics come from Envoy's access-log stream, which Envoy flushes every 0.2 s:
        requests answered just now may not be counted yet. ``settle`` > 0 waits (at most that many
        seconds) until two reads 0.5 s apart agree, so a report printed right after traffic counts it all.
        """

        def read() -> list[dict[str, str]]:
            return _series((wp.metrics() for wp in self.waypoints.values()), "istio_requests_total")

        series = read()
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            time.sleep(0.5)
            again = read()
            if again == series:
                break
            series = again
        return series

    def netns_names(self) -> list[str]:
        return self.topology.netns_names() if self.topology is not None else []


def _series(texts: Iterator[str] | Iterable[str], name: str) -> list[dict[str, str]]:
    import re

    out: list[dict[str, str]] = []
    for text in texts:
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            labels, _, value = line[len(name) + 1 :].rpartition("} ")
            d = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
            d["value"] = value.strip()
            out.append(d)
    return out


def leftovers() -> list[str]:
    """Network namespaces of kit meshes (any owner); for tests that check cleanup."""
    return [n for n in list_netns() if n.startswith(KIT_PREFIX + "-")]


__all__ += ["TopologyError", "WaypointHandle", "ZtunnelHandle", "leftovers"]
