"""Test kit for ztunnel-py: builders for WDS/WADS resources and helpers to run the proxy.

Why builders: ``istio.workload.Address`` and ``istio.security.Authorization`` messages are deep and easy to
get subtly wrong by hand (raw address bytes, the ``services`` port map, the oneofs). These helpers produce
exactly what istiod's generators send, so tests of the node proxy read like the mesh they describe.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from istiopy.api.gen import authorization_pb2, workload_pb2
from istiopy.testing import procs as _procs
from istiopy.testing.procs import die_with_parent

CLUSTER = "Kubernetes"


def ip_bytes(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def gateway(
    *, address: str | None = None, hostname: str | None = None, namespace: str = "", network: str = ""
) -> workload_pb2.GatewayAddress:
    """A waypoint/gateway reference by service hostname (``namespace/hostname``) or by address."""
    gw = workload_pb2.GatewayAddress(hbone_mtls_port=15008)
    if hostname is not None:
        gw.hostname.CopyFrom(workload_pb2.NamespacedHostname(namespace=namespace, hostname=hostname))
    elif address is not None:
        gw.address.CopyFrom(workload_pb2.NetworkAddress(network=network, address=ip_bytes(address)))
    return gw


def pod_uid(namespace: str, name: str, cluster: str = CLUSTER) -> str:
    return f"{cluster}//Pod/{namespace}/{name}"


def workload(
    name: str,
    namespace: str,
    ip: str | Sequence[str],
    *,
    service_account: str = "default",
    node: str = "node-a",
    hbone: bool = True,
    services: Mapping[str, Mapping[int, int]] | None = None,
    waypoint: workload_pb2.GatewayAddress | None = None,
    policies: Iterable[str] = (),
    healthy: bool = True,
    trust_domain: str = "",
    network: str = "",
    uid: str | None = None,
    canonical_name: str = "",
) -> workload_pb2.Address:
    """An ``Address`` carrying one pod's Workload; ``services`` maps ``ns/host`` -> {service port: target}."""
    ips = [ip] if isinstance(ip, str) else list(ip)
    wl = workload_pb2.Workload(
        uid=uid or pod_uid(namespace, name),
        name=name,
        namespace=namespace,
        addresses=[ip_bytes(a) for a in ips],
        network=network,
        tunnel_protocol=workload_pb2.HBONE if hbone else workload_pb2.NONE,
        trust_domain=trust_domain,
        service_account=service_account if service_account != "default" else "",
        node=node,
        workload_name=name.rsplit("-", 1)[0] if "-" in name else name,
        workload_type=workload_pb2.DEPLOYMENT,
        canonical_name=canonical_name or name,
        canonical_revision="latest",
        authorization_policies=list(policies),
        status=workload_pb2.HEALTHY if healthy else workload_pb2.UNHEALTHY,
        cluster_id=CLUSTER,
    )
    if waypoint is not None:
        wl.waypoint.CopyFrom(waypoint)
    for key, ports in (services or {}).items():
        wl.services[key].ports.extend(
            workload_pb2.Port(service_port=sp, target_port=tp) for sp, tp in ports.items()
        )
    return workload_pb2.Address(workload=wl)


def service(
    name: str,
    namespace: str,
    vips: str | Sequence[str],
    ports: Mapping[int, int],
    *,
    waypoint: workload_pb2.GatewayAddress | None = None,
    domain: str = "cluster.local",
    network: str = "",
) -> workload_pb2.Address:
    """An ``Address`` carrying a Service with the given VIPs and {service port: target port}."""
    vip_list = [vips] if isinstance(vips, str) else list(vips)
    svc = workload_pb2.Service(
        name=name,
        namespace=namespace,
        hostname=f"{name}.{namespace}.svc.{domain}",
        addresses=[workload_pb2.NetworkAddress(network=network, address=ip_bytes(v)) for v in vip_list],
        ports=[workload_pb2.Port(service_port=sp, target_port=tp) for sp, tp in ports.items()],
    )
    if waypoint is not None:
        svc.waypoint.CopyFrom(waypoint)
    return workload_pb2.Address(service=svc)


def service_key(name: str, namespace: str, domain: str = "cluster.local") -> str:
    return f"{namespace}/{name}.{namespace}.svc.{domain}"


def resource_name(addr: workload_pb2.Address) -> str:
    """The xDS resource name istiod uses: the workload uid, or ``namespace/hostname`` for a service."""
    if addr.WhichOneof("type") == "workload":
        return addr.workload.uid
    return f"{addr.service.namespace}/{addr.service.hostname}"


# ---- policies -------------------------------------------------------------------------------------


def exact(s: str) -> authorization_pb2.StringMatch:
    return authorization_pb2.StringMatch(exact=s)


def prefix(s: str) -> authorization_pb2.StringMatch:
    return authorization_pb2.StringMatch(prefix=s)


def suffix(s: str) -> authorization_pb2.StringMatch:
    return authorization_pb2.StringMatch(suffix=s)


def presence() -> authorization_pb2.StringMatch:
    m = authorization_pb2.StringMatch()
    m.presence.SetInParent()
    return m


def cidr(spec: str) -> authorization_pb2.Address:
    net = ipaddress.ip_network(spec, strict=False)
    return authorization_pb2.Address(address=net.network_address.packed, length=net.prefixlen)


def match(**fields: object) -> authorization_pb2.Match:
    """A Match; string lists may be given as plain strings (exact), IP lists as CIDR strings."""
    m = authorization_pb2.Match()
    for key, values in fields.items():
        assert isinstance(values, list | tuple)
        target = getattr(m, key)
        for v in values:
            if key.endswith("ips"):
                target.append(cidr(v) if isinstance(v, str) else v)
            elif key.endswith("service_accounts"):
                ns, sa = v if isinstance(v, tuple) else str(v).split("/")
                target.append(authorization_pb2.ServiceAccountMatch(namespace=ns, serviceAccount=sa))
            elif key.endswith("ports"):
                target.append(int(str(v)))
            else:
                target.append(exact(v) if isinstance(v, str) else v)
    return m


def policy(
    name: str,
    namespace: str,
    rules: Sequence[Sequence[Sequence[authorization_pb2.Match]]],
    *,
    action: str = "ALLOW",
    scope: str = "NAMESPACE",
    dry_run: bool = False,
) -> authorization_pb2.Authorization:
    """An Authorization: ``rules`` is a list of rules, each a list of clauses, each a list of matches."""
    return authorization_pb2.Authorization(
        name=name,
        namespace=namespace,
        scope=scope,  # protobuf accepts enum value names
        action=action,
        dry_run=dry_run,
        rules=[
            authorization_pb2.Rule(clauses=[authorization_pb2.Clause(matches=list(cl)) for cl in rule])
            for rule in rules
        ],
    )


# ---- capture ---------------------------------------------------------------------------------------


def install_capture(pod: object) -> None:
    """In-pod capture for a ``testing.netns.Pod`` with the node agent's own rules (``dataplane.capture``)."""
    from istiopy.dataplane.capture import install_capture as _install

    fd = pod.open_netns()  # type: ignore[attr-defined]
    try:
        _install(fd)
    finally:
        os.close(fd)


# ---- a real control plane and real ztunnel-py processes ----------------------------------------------


class TestControlPlane:
    """istiod's ambient half for tests: config store -> WDS/WADS generators -> delta ADS (TLS) + the CA.

    Everything is the real code (``istiopy.xds`` server and generators, ``istiopy.ca`` servicer with node
    impersonation checks); only the sources of config (YAML documents applied to the store) stand in for
    Kubernetes. Listens on loopback free ports. Use as ``async with``.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self, documents: str = "", *, trust_domain: str = "cluster.local", waypoints: bool = False
    ) -> None:
        import istiopy.mesh.resources  # noqa: F401  (registers every kind)
        from istiopy.ca.authority import generate_root
        from istiopy.ca.service import CaConfig, CertificateAuthority
        from istiopy.mesh.store import ConfigStore

        self.store = ConfigStore()
        self.authority = CertificateAuthority(
            CaConfig(trust_domain=trust_domain), generate_root(trust_domain)
        )
        self.serving = self.authority.issue_serving(["istiod.istio-system.svc"], ["127.0.0.1"])
        self.waypoints = waypoints  # also serve waypoint (Envoy) proxies
        self.xds_port = 0
        self.ca_port = 0
        self._xds: Any = None
        self._pipeline: Any = None
        self._ca: Any = None
        if documents:
            self.apply(documents)

    @property
    def roots_pem(self) -> str:
        return str(self.authority.roots_pem)

    def apply(self, documents: str) -> None:
        """Apply YAML documents (Kubernetes/Istio kinds) to the store; pushes follow."""
        import yaml

        from istiopy.mesh.kinds import parse

        for doc in yaml.safe_load_all(documents):
            if doc:
                self.store.apply(parse(doc, source="test"), source="test")

    def delete(self, kind: str, namespace: str, name: str) -> None:
        res = self.store.get(kind, namespace, name)
        if res is not None:
            self.store.delete(res.key)

    async def start_xds(self) -> None:
        from istiopy.xds.push import PushPipeline
        from istiopy.xds.registry import GeneratorRegistry
        from istiopy.xds.server import ServerOptions, TlsConfig, XdsServer
        from istiopy.xds.wds import register_ambient_generators

        if self._pipeline is None:
            registry = GeneratorRegistry()
            register_ambient_generators(registry)
            if self.waypoints:
                from istiopy.xds.waypoint import register_waypoint_generators

                register_waypoint_generators(registry)
            self._pipeline = PushPipeline(self.store, registry, debounce_after=0.02, debounce_max=0.5)
            await self._pipeline.start()
        tls = TlsConfig(
            cert_pem=self.serving.served_chain_pem.encode(),
            key_pem=self.serving.key_pem.encode(),
            client_ca_pem=self.roots_pem.encode(),
            require_client_cert=False,
        )
        address = f"127.0.0.1:{self.xds_port}"
        self._xds = XdsServer(self._pipeline, ServerOptions(tls=tls, tls_address=address))
        self.xds_port = (await self._xds.start())["tls"]

    async def start_ca(self) -> None:
        from istiopy.ca.server import serve

        servicer = self.authority.servicer([self.authority.client_cert_authenticator()], self.store)
        self._ca, self.ca_port = await serve(
            servicer,
            self.serving.served_chain_pem,
            self.serving.key_pem,
            self.roots_pem,
            port=self.ca_port,
            require_client_cert=True,  # node proxies authenticate with their bootstrap certificate
        )

    async def start(self) -> TestControlPlane:
        await self.start_xds()
        await self.start_ca()
        return self

    async def stop(self) -> None:
        """Stop serving (xDS and CA); clients keep their last config. ``start`` again on the same ports."""
        if self._xds is not None:
            await self._xds.stop(0.1)
            self._xds = None
        if self._ca is not None:
            await self._ca.stop(0.1)
            self._ca = None

    async def close(self) -> None:
        await self.stop()
        if self._pipeline is not None:
            await self._pipeline.stop()
            self._pipeline = None

    async def __aenter__(self) -> TestControlPlane:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def bootstrap_files(
        self, node: str, directory: str, namespace: str = "istio-system", service_account: str = "ztunnel"
    ) -> tuple[str, str, str]:
        """(root, chain, key) PEM files: a bootstrap credential for ``namespace/service_account`` on ``node``
        (default: the node's ztunnel)."""
        from istiopy.api.identity import SpiffeId

        bundle = self.authority.issue_bootstrap(SpiffeId("cluster.local", namespace, service_account), node)
        paths = []
        for name, text in (
            ("root.pem", self.roots_pem),
            ("chain.pem", bundle.full_chain_pem),
            ("key.pem", bundle.key_pem),
        ):
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o600)
            paths.append(path)
        return paths[0], paths[1], paths[2]


def free_port() -> int:
    """A free loopback port, distinct from the ones this process handed out lately."""
    return _procs.free_port()


class ZtunnelProcess:
    """A real ``ztunnel-py`` process for one node of a topology.

    Pods come from a node agent over ZDS at ``zds_socket`` (in-pod mode, as deployed), or are given
    statically as ``(uid, name, namespace, service_account, netns_path)`` tuples (``--pod``).
    """

    def __init__(
        self,
        plane: TestControlPlane,
        node: str,
        node_ip: str,
        pods: Sequence[tuple[str, str, str, str, str]] = (),
        workdir: str = "/tmp",
        *,
        zds_socket: str | None = None,
    ) -> None:
        self.node = node
        self.workdir = os.path.join(workdir, node)
        os.makedirs(self.workdir, exist_ok=True)
        root, chain, key = plane.bootstrap_files(node, self.workdir)
        self.admin_port, self.metrics_port, self.readiness_port = free_port(), free_port(), free_port()
        self.log_path = os.path.join(self.workdir, "ztunnel.log")
        argv = [
            sys.executable, "-m", "istiopy.dataplane.launch",
            "--xds-address", f"127.0.0.1:{plane.xds_port}",
            "--ca-address", f"127.0.0.1:{plane.ca_port}",
            "--root-cert", root, "--ca-client-cert", chain, "--ca-client-key", key,
            "--token-file", os.path.join(self.workdir, "no-token"),
            "--node-name", node, "--pod-name", f"ztunnel-{node}", "--instance-ip", node_ip,
            "--admin-port", str(self.admin_port), "--metrics-address", "127.0.0.1",
            "--metrics-port", str(self.metrics_port), "--readiness-port", str(self.readiness_port),
            "--log-level", "debug",
        ]  # fmt: skip
        argv += ["--zds-socket", zds_socket] if zds_socket else ["--no-zds"]
        for uid, name, ns, sa, netns in pods:
            argv += ["--pod", f"{uid},{name},{ns},{sa},{netns}"]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        # cwd: the repository root has folders (``xds/``) that would shadow third-party packages on sys.path.
        self.popen = subprocess.Popen(
            die_with_parent(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.workdir,
        )

    def get(self, port: int, path: str, timeout: float = 30.0) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"ztunnel-py on {self.node} exited: {self.logs()[-3000:]}")
            with contextlib.suppress(OSError):
                if self.get(self.readiness_port, "/healthz/ready", 1.0)[0] == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"ztunnel-py on {self.node} not ready: {self.logs()[-3000:]}")

    def config_dump(self) -> dict[str, Any]:
        return json.loads(self.get(self.admin_port, "/config_dump")[1])  # type: ignore[no-any-return]

    def metrics(self) -> str:
        return self.get(self.metrics_port, "/stats/prometheus")[1]

    def logs(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()
