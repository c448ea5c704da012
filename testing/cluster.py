"""A real Kubernetes control plane for tests: etcd + kube-apiserver + kube-controller-manager.

Why real binaries instead of mocks: the operator, the CA's TokenReview and the waypoint controller must be
exercised against the behaviour of the actual API server (admission, validation, TokenRequest audiences,
endpointslice publishing, garbage collection). The binaries are built from the Go module proxy by
``tools/k8s/build.sh`` (``make k8s-tools``) into a cache keyed by version; nothing else is downloaded.

The flag set follows controller-runtime's envtest (see ``shared/reference/k8s-test-cluster.md``), with a small
in-process CA so that the admin kubeconfig verifies the serving certificate, and a service-account signing
key so that TokenRequest (``kubectl create token --audience istio-ca``) and TokenReview work. Every process
runs in its own process group and every port is a free loopback port, so two clusters can run side by side.

Run ``python -m istiopy.testing.cluster`` (``make cluster``) for a cluster a human can poke at.
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from istiopy.testing import procs as _procs
from istiopy.testing.procs import die_with_parent

K8S_VERSION = "v1.34.3"
REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")

# Controllers that make a bare control plane behave like a cluster for our tests: namespaces get a
# `default` ServiceAccount and `kube-root-ca.crt`, Deployments get ReplicaSets and Pods, Services get
# EndpointSlices once pods are Ready (the kubelet stand-in makes them so), owners cascade on delete.
# Deliberately absent: node-lifecycle (would taint stand-in nodes), scheduler/kubelet (see kubelet.py).
DEFAULT_CONTROLLERS = (
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "garbage-collector-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "endpoints-controller",
    "deployment-controller",
    "replicaset-controller",
    "statefulset-controller",
    "job-controller",
    "clusterrole-aggregation-controller",
)

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
ADMIN_TOKEN = "istiopy-test-admin-token"


class MissingBinariesError(RuntimeError):
    """The Kubernetes binaries have not been built for this machine yet."""


class ClusterStartError(RuntimeError):
    """A control-plane component did not come up; the message carries the tail of its log."""


class KubectlError(subprocess.CalledProcessError):
    """kubectl failed; unlike CalledProcessError, str() shows stderr, which is what a test failure needs."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def cache_dir() -> Path:
    """Root of the build cache shared with ``tools/k8s/build.sh``."""
    env = os.environ.get("ISTIOPY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "istiopy"


def default_bin_dir() -> Path:
    """Where build.sh puts the binaries for the pinned Kubernetes version (overridable for odd setups)."""
    env = os.environ.get("ISTIOPY_K8S_BIN_DIR")
    return Path(env) if env else cache_dir() / "k8s" / K8S_VERSION / "bin"


def find_binaries(bin_dir: Path | None = None) -> Path:
    """Return the bin dir, or explain exactly how to produce it (the build takes ~20 min cold)."""
    d = bin_dir or default_bin_dir()
    missing = [b for b in REQUIRED_BINARIES if not os.access(d / b, os.X_OK)]
    if missing:
        raise MissingBinariesError(
            f"Kubernetes test binaries missing in {d}: {', '.join(missing)}. "
            "Run `make k8s-tools` (tools/k8s/build.sh) to build them from the Go module proxy."
        )
    return d


def free_port() -> int:
    """A currently free loopback TCP port, distinct from the ones this process handed out lately."""
    return _procs.free_port()


def _has_default_route() -> bool:
    """kube-apiserver picks its advertise address from the default route; without one it refuses to start."""
    try:
        with open("/proc/net/route") as f:
            return any(line.split()[1] == "00000000" for line in f.readlines()[1:] if line.strip())
    except OSError:
        return False


def _advertise_address() -> str | None:
    """None lets the apiserver choose; otherwise a non-loopback address (loopback fails validation)."""
    if _has_default_route():
        return None
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            addr = line.split()[3].split("/")[0]
            if not ipaddress.ip_address(addr).is_loopback:
                return addr
    except (OSError, IndexError, ValueError):
        pass
    # Never routed to: only used for the `kubernetes` Service's endpoints, which tests don't dial.
    return "192.0.2.250"


# ---------------------------------------------------------------------------------------------- certs


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    sans: Sequence[x509.GeneralName] = (),
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _make_pki(d: Path) -> None:
    """CA, apiserver serving cert (127.0.0.1/localhost), admin client cert (system:masters), SA key."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "istiopy-test-ca")])
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(d / "ca.key", ca_key)

    srv_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    srv = _cert(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        srv_key,
        ca_name,
        ca_key,
        sans=sans,
    )
    (d / "apiserver.crt").write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    _write_key(d / "apiserver.key", srv_key)

    adm_key = ec.generate_private_key(ec.SECP256R1())
    adm_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
            x509.NameAttribute(NameOID.COMMON_NAME, "admin"),
        ]
    )
    adm = _cert(adm_name, adm_key, ca_name, ca_key, client=True)
    (d / "admin.crt").write_bytes(adm.public_bytes(serialization.Encoding.PEM))
    _write_key(d / "admin.key", adm_key)

    # RSA: the widest-supported JWT algorithm (RS256) for anything that verifies SA tokens offline.
    _write_key(d / "sa.key", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    (d / "tokens.csv").write_text(f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n')


# ---------------------------------------------------------------------------------------------- processes


class _Proc:
    """One control-plane process in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            out.write(f"--- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                die_with_parent(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM the whole group (children included), SIGKILL what is left after ``grace`` seconds.

        grace=0 is a crash (SIGKILL at once). kube-apiserver's graceful shutdown waits for open watches and
        etcd for its gRPC streams, which takes 7-10 s here, so teardown does not wait for it.
        """
        p = self.popen
        if p is None:
            return
        self.popen = None
        if grace > 0:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Also reached after a clean exit: make sure no group member outlives the leader.
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class TestCluster:
    """etcd + kube-apiserver + kube-controller-manager on free loopback ports, in a temp dir.

    Use as a context manager (or ``start()``/``stop()``). ``stop()`` is safe to call at any point, also after
    a failed ``start()``: it kills every process group it started and removes the temp dir.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        bin_dir: Path | None = None,
        *,
        controllers: Sequence[str] = DEFAULT_CONTROLLERS,
        extra_apiserver_args: Sequence[str] = (),
        start_timeout: float = 120.0,
        keep_dir: bool = False,
    ) -> None:
        self.bin_dir = find_binaries(bin_dir)
        self.controllers = tuple(controllers)
        self.extra_apiserver_args = tuple(extra_apiserver_args)
        self.start_timeout = start_timeout
        self.keep_dir = keep_dir or bool(os.environ.get("ISTIOPY_KEEP_CLUSTER"))
        self.dir: Path | None = None
        self.etcd_port = 0
        self.apiserver_port = 0
        self.kcm_port = 0
        self._etcd: _Proc | None = None
        self._apiserver: _Proc | None = None
        self._kcm: _Proc | None = None
        self._started = False

    # -- public paths ---------------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> Path:
        return self._d / "kubeconfig"

    @property
    def pki_dir(self) -> Path:
        return self._d / "pki"

    @property
    def ca_file(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def log_dir(self) -> Path:
        return self._d / "logs"

    @property
    def admin_token(self) -> str:
        """A static bearer token for system:masters, for clients that prefer tokens to client certs."""
        return ADMIN_TOKEN

    @property
    def _d(self) -> Path:
        if self.dir is None:
            raise RuntimeError("cluster not started")
        return self.dir

    def env(self) -> dict[str, str]:
        """os.environ plus KUBECONFIG and the bin dir first on PATH, for subprocesses under test."""
        e = dict(os.environ)
        e["KUBECONFIG"] = str(self.kubeconfig)
        e["PATH"] = f"{self.bin_dir}{os.pathsep}{e.get('PATH', '')}"
        return e

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the apiserver against the test CA and authenticates as admin by client certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.load_cert_chain(str(self.pki_dir / "admin.crt"), str(self.pki_dir / "admin.key"))
        return ctx

    # -- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> TestCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> TestCluster:
        if self._started:
            return self
        self._started = True
        atexit.register(self.stop)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        t0 = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix="istiopy-k8s-"))
        self.log_dir.mkdir()
        _make_pki(self.pki_dir)
        self.etcd_port, peer_port, self.apiserver_port, self.kcm_port = (free_port() for _ in range(4))
        self._write_kubeconfig()

        etcd_url = f"http://127.0.0.1:{self.etcd_port}"
        self._etcd = _Proc(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                f"--name=istiopy-{self.etcd_port}",
                f"--data-dir={self._d / 'etcd'}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=istiopy-{self.etcd_port}=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
            self.log_dir / "etcd.log",
        )
        pki = self.pki_dir
        apiserver_args = [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'sa.key'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--v=1",
        ]
        adv = _advertise_address()
        if adv:
            apiserver_args.append(f"--advertise-address={adv}")
        apiserver_args += self.extra_apiserver_args
        self._apiserver = _Proc("kube-apiserver", apiserver_args, self.log_dir / "kube-apiserver.log")
        kc = str(self.kubeconfig)
        self._kcm = _Proc(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.kcm_port}",
                f"--cert-dir={self._d / 'kcm-certs'}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
                f"--controllers={','.join(self.controllers)}",
                "--concurrent-endpoint-syncs=5",
                "--profiling=false",
                "--v=1",
            ],
            self.log_dir / "kube-controller-manager.log",
        )

        self._etcd.start()
        self._wait_etcd()
        self._apiserver.start()
        self._wait_apiserver()
        self._kcm.start()
        self._wait_kcm()
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Kill everything (reverse start order) and remove the temp dir. Idempotent."""
        for p in (self._kcm, self._apiserver, self._etcd):
            if p is not None:
                p.stop()
        self._kcm = self._apiserver = self._etcd = None
        if self.dir is not None and not self.keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self._started:
            atexit.unregister(self.stop)
            self._started = False

    def restart_apiserver(self, graceful: bool = False) -> None:
        """Restart kube-apiserver with the same flags and port, for tests of watch/reconnect logic.

        By default it is killed (a crash: clients see connections reset); ``graceful=True`` sends SIGTERM and
        waits up to 30 s for the apiserver's own shutdown sequence (clients see their watches closed).
        """
        assert self._apiserver is not None
        self._apiserver.stop(grace=30.0 if graceful else 0.0)
        self._apiserver.start()
        self._wait_apiserver()

    def restart_etcd(self, graceful: bool = False) -> None:
        """Restart etcd on the same data dir and port; returns once the apiserver is ready again.

        Killing etcd loses nothing here: every write was acknowledged after reaching the OS (no-fsync only
        matters for machine crashes), and bbolt/WAL recover from process crashes.
        """
        assert self._etcd is not None
        self._etcd.stop(grace=30.0 if graceful else 0.0)
        self._etcd.start()
        self._wait_etcd()
        self._wait_apiserver()

    def stop_etcd(self) -> None:
        """Take etcd down (and keep it down) to test behaviour during a storage outage."""
        assert self._etcd is not None
        self._etcd.stop(grace=0.0)

    def start_etcd(self) -> None:
        assert self._etcd is not None
        self._etcd.start()
        self._wait_etcd()

    # -- readiness ------------------------------------------------------------------------------------

    def _deadline_loop(self, what: _Proc, timeout: float | None = None) -> Iterator[None]:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while True:
            if not what.alive():
                raise ClusterStartError(f"{what.name} exited during start-up; log tail:\n{what.tail()}")
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    f"{what.name} not ready after {timeout or self.start_timeout}s:\n{what.tail()}"
                )
            yield
            time.sleep(0.2)

    def _wait_etcd(self) -> None:
        assert self._etcd is not None
        for _ in self._deadline_loop(self._etcd):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.etcd_port}/health", timeout=2) as r:
                    if json.loads(r.read()).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass

    def _get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as e:
            return int(e.code), e.read()

    def _wait_apiserver(self) -> None:
        assert self._apiserver is not None
        for _ in self._deadline_loop(self._apiserver):
            try:
                code, _body = self._get("/readyz")
                if code == 200 and self._get("/api/v1/namespaces/default")[0] == 200:
                    return
            except OSError:
                pass

    def _wait_kcm(self) -> None:
        """Ready when the serviceaccount controller has created `default/default` (proves it syncs)."""
        assert self._kcm is not None
        want_sa = "serviceaccount-controller" in self.controllers
        for _ in self._deadline_loop(self._kcm):
            try:
                if not want_sa or self._get("/api/v1/namespaces/default/serviceaccounts/default")[0] == 200:
                    return
            except OSError:
                pass

    def _write_kubeconfig(self) -> None:
        """Admin kubeconfig with embedded CA and client cert: self-contained, works from any cwd."""
        import base64

        def b64(p: Path) -> str:
            return base64.b64encode(p.read_bytes()).decode()

        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "istiopy-test",
                    "cluster": {"server": self.server, "certificate-authority-data": b64(self.ca_file)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(self.pki_dir / "admin.crt"),
                        "client-key-data": b64(self.pki_dir / "admin.key"),
                    },
                }
            ],
            "contexts": [{"name": "istiopy-test", "context": {"cluster": "istiopy-test", "user": "admin"}}],
            "current-context": "istiopy-test",
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    # -- helpers --------------------------------------------------------------------------------------

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the matching kubectl against this cluster; raises KubectlError (with stderr) on failure."""
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        cp = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and cp.returncode != 0:
            raise KubectlError(cp.returncode, argv, cp.stdout, cp.stderr)
        return cp

    def kubectl_json(self, *args: str, input: str | None = None, timeout: float = 60.0) -> Any:
        """kubectl ... -o json, parsed."""
        return json.loads(self.kubectl(*args, "-o", "json", input=input, timeout=timeout).stdout)

    def helm(
        self, *args: str, check: bool = True, timeout: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """Run helm (built next to kubectl) against this cluster, with its state dirs inside the temp dir."""
        env = self.env()
        for var, sub in (
            ("HELM_CACHE_HOME", "cache"),
            ("HELM_CONFIG_HOME", "config"),
            ("HELM_DATA_HOME", "data"),
        ):
            env[var] = str(self._d / "helm" / sub)
        argv = [str(self.bin_dir / "helm"), f"--kubeconfig={self.kubeconfig}", *args]
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, env=env)
        if check and cp.returncode != 0:
            raise KubectlError(cp.returncode, argv, cp.stdout, cp.stderr)
        return cp


def main(argv: Sequence[str] | None = None) -> int:
    """`make cluster`: start a cluster, print how to use it, run until Ctrl-C."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--bin-dir", type=Path, default=None)
    ap.add_argument("--kubelet", action="store_true", help="also run the kubelet stand-in (node 'node-0')")
    args = ap.parse_args(argv)
    try:
        cluster = TestCluster(args.bin_dir, keep_dir=False)
    except MissingBinariesError as e:
        print(e, file=sys.stderr)
        return 1
    with cluster:
        print(f"cluster up in {cluster.start_seconds:.1f}s: {cluster.server}")
        print(f"kubeconfig: {cluster.kubeconfig}")
        print(f"logs:       {cluster.log_dir}")
        print(f"export KUBECONFIG={cluster.kubeconfig} PATH={cluster.bin_dir}:$PATH")
        kubelet = None
        if args.kubelet:
            from istiopy.testing.kubelet import KubeletStandIn

            kubelet = KubeletStandIn(cluster.kubeconfig).start()
            print(f"kubelet stand-in: node {kubelet.node_name}")
        print("Ctrl-C to stop", flush=True)
        try:
            # Explicit handlers: a shell starts background jobs with SIGINT ignored, and `kill` sends SIGTERM.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            if kubelet is not None:
                kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
