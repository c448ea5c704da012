"""ztunnel-py's core: one object that owns the state, certificates, pools and per-pod listeners of a node.

How the pieces meet (and why here):

* WDS/WADS arrive through :class:`istiopy.api.xds_client.DeltaXdsClient`; the handlers are
  :meth:`ProxyState.apply_addresses` / :meth:`ProxyState.apply_authorizations`, which raise to NACK and keep
  the last good config — so when the control plane goes away, nothing here changes and traffic keeps
  flowing on the last config.
* Pods arrive through ZDS (or :meth:`Ztunnel.add_pod` directly in tests): for each one the proxy opens its
  listening sockets *inside the pod's network namespace* — 15001 (captured outbound), 15006 (captured
  plaintext inbound), 15008 (HBONE) — and prefetches the pod identity's certificate. Removing a pod closes
  its sockets and drops the certificate once no other local pod needs it.
* Outbound (15001): original destination -> :class:`OutboundResolver` plan -> an HBONE stream from the
  source pod's :class:`HbonePool` (keyed by source identity, destination identities and destination IP;
  dialed from the pod's netns with the proxy mark, so it leaves with the pod's IP and is not re-captured)
  or a plain TCP connection for non-mesh destinations; then a relay.
* Inbound (15008): :class:`HboneServer` terminates mTLS and calls :meth:`_PodProxy.on_connect`, which
  applies :class:`InboundAuthorizer` (400/401) and dials the app inside the pod netns from the client's IP
  (503 on failure). Plaintext inbound (15006) gets the same policy with no source identity; a deny resets
  the connection. A policy change re-checks live inbound connections and resets those no longer allowed.
* Every proxied connection is counted in Istio's TCP metrics and listed in ``/config_dump``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from istiopy.api.identity import DEFAULT_TRUST_DOMAIN, SpiffeId
from istiopy.api.xds_client import DeltaUpdate, DeltaXdsClient
from istiopy.dataplane import fastpath, sockets
from istiopy.dataplane.admin import AdminServer, AdminSources, LocalWorkloadInfo
from istiopy.dataplane.identity import SecretManager
from istiopy.dataplane.inbound import InboundAuthorizer, InboundRefused
from istiopy.dataplane.inpod import PodNetns
from istiopy.dataplane.metrics import ConnectionTracker, Metrics, connection_labels
from istiopy.dataplane.outbound import NoHealthyUpstream, OutboundPlan, OutboundResolver
from istiopy.dataplane.rbac import Connection, check_inbound
from istiopy.dataplane.state import ADDRESS_TYPE, AUTHORIZATION_TYPE, IPAddress, ProxyState, Workload
from istiopy.dataplane.tunnel import (
    Accept,
    ByteStream,
    ConnectRequest,
    Decision,
    PoolKey,
    Reject,
    RelayResult,
    TcpStream,
    build_baggage,
    hbone_headers,
)
from istiopy.dataplane.zds import ZdsWorkload

if TYPE_CHECKING:
    from istiopy.dataplane.hbone import HbonePool, HboneServer

log = logging.getLogger("istiopy.ztunnel.proxy")

# An xDS update this large leaves its response's memory freed but kept by malloc; see _trim_heap_after.
TRIM_HEAP_AT = 100


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on a libc without it (musl)."""
    import ctypes  # already loaded by ``sockets``

    fn = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_size_t]
        fn.restype = ctypes.c_int
    return fn


def _trim_heap_after(update: DeltaUpdate) -> None:
    """Once the xDS client dropped a large response, hand the heap's free pages back to the kernel.

    A WDS response for 1000 workloads is parsed into a few MB of short-lived protobuf arenas; once they are
    freed, glibc keeps the pages in the heap (live objects sit above them), so RSS stays above what the
    proxy holds (issue 8: with the xDS client keeping no resources, ~0.8 MB less RSS holding 1000
    workloads). The trim runs on the next loop iteration, after the client let go of the response; small
    pushes skip it.
    """
    if len(update.updated) + len(update.removed) < TRIM_HEAP_AT or (trim := _malloc_trim()) is None:
        return
    try:
        asyncio.get_running_loop().call_soon(trim, 0)
    except RuntimeError:  # no running loop (a direct call): trim now
        trim(0)


OUTBOUND_PORT = 15001
INBOUND_PLAINTEXT_PORT = 15006
HBONE_PORT = 15008


@dataclass
class ProxyConfig:
    """Node-level settings (upstream env var in brackets where there is one)."""

    node_name: str = ""  # [NODE_NAME]
    pod_name: str = "ztunnel"  # [POD_NAME]
    pod_namespace: str = "istio-system"  # [POD_NAMESPACE]
    instance_ip: str = "127.0.0.1"  # [INSTANCE_IP]
    cluster_id: str = "Kubernetes"  # [CLUSTER_ID]
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    network: str = ""
    outbound_port: int = OUTBOUND_PORT
    inbound_plaintext_port: int = INBOUND_PLAINTEXT_PORT
    hbone_port: int = HBONE_PORT
    pool_max_streams: int = 100
    pool_idle_timeout: float = 300.0
    connect_timeout: float = 10.0
    # How long a connection to a local pod that WDS does not describe yet waits for it (ZDS hands ztunnel a
    # pod as soon as it starts; istiod may publish its workload a moment later) before it is refused.
    workload_wait: float = 5.0
    preserve_source_ip: bool = True  # [ENABLE_ORIG_SRC]: the app sees the client's IP, not the pod's
    # "c" (istiopy.dataplane.fastpath) or "python" (hbone.py); [ISTIOPY_BYTE_PATH], the CLI's --byte-path
    byte_path: str = field(default_factory=lambda: os.environ.get(fastpath.BYTE_PATH_ENV, "python"))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        """``ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local``: how istiod recognises a ztunnel."""
        ns = self.pod_namespace
        return f"ztunnel~{self.instance_ip}~{self.pod_name}.{ns}~{ns}.svc.cluster.local"

    def node_metadata(self) -> dict[str, str]:
        return {
            "NAME": self.pod_name,
            "NAMESPACE": self.pod_namespace,
            "INSTANCE_IPS": self.instance_ip,
            "NODE_NAME": self.node_name,
            "CLUSTER_ID": self.cluster_id,
        }

    def as_dump(self) -> dict[str, Any]:
        return {
            "nodeName": self.node_name,
            "proxyMode": "Shared",
            "clusterId": self.cluster_id,
            "network": self.network,
            "xdsNodeId": self.node_id,
            "outboundAddr": f"[::]:{self.outbound_port}",
            "inboundPlaintextAddr": f"[::]:{self.inbound_plaintext_port}",
            "inboundAddr": f"[::]:{self.hbone_port}",
            **self.extra,
        }


def build_node(config: ProxyConfig) -> Any:
    """The xDS ``Node`` ztunnel identifies itself with (id and metadata as upstream)."""
    from envoy.config.core.v3 import base_pb2

    node = base_pb2.Node(id=config.node_id, cluster=config.cluster_id)
    for k, v in config.node_metadata().items():
        node.metadata.fields[k].string_value = v
    return node


def _addr(a: tuple[str, int] | None) -> str:
    if not a:
        return ""
    ip, port = a[0], a[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


# -------------------------------------------------------------------------------------------------------
# One pod


class _PodProxy:
    """The listeners and handlers ztunnel-py runs inside one pod's network namespace."""

    def __init__(self, zt: Ztunnel, info: LocalWorkloadInfo, netns: PodNetns) -> None:
        self.zt = zt
        self.info = info
        self.netns = netns
        self.netns_fd = netns.fd
        self.hbone: HboneServer | fastpath.FastHboneServer
        if zt.config.byte_path == "c":
            self.hbone = fastpath.FastHboneServer(self.on_connect, self._server_bundle)
        else:  # the Python byte path is imported only when chosen (issue 8: ~0.4 MB RSS on the C path)
            from istiopy.dataplane.hbone import HboneServer

            self.hbone = HboneServer(self.on_connect, self._server_ctx, trust_domain=None)
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        # Live inbound connections with what their authorization was decided on, so a policy change can
        # close the ones it no longer allows (as upstream's connection manager does).
        self.inbound_conns: dict[int, tuple[Connection, str, ByteStream]] = {}

    # ---- identity and addresses ---------------------------------------------------------------

    @property
    def workload(self) -> Workload | None:
        return self.zt.state.workload_by_uid(self.info.uid)

    @property
    def identity(self) -> SpiffeId:
        wl = self.workload
        if wl is not None:
            return wl.identity
        return SpiffeId(
            self.info.trust_domain or self.zt.config.trust_domain,
            self.info.namespace,
            self.info.service_account,
        )

    async def until_known(self) -> None:
        """Wait (up to ``workload_wait``) for WDS to describe this pod; an inbound connection that arrives
        first would otherwise be refused for want of the pod's addresses."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.zt.config.workload_wait
        while self.workload is None and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.zt.wds_changed(), left)

    def local_ips(self) -> set[IPAddress]:
        """The pod's addresses per WDS; empty (refuse everything) while WDS does not know the pod yet."""
        wl = self.workload
        return set(wl.addresses) if wl is not None else set()

    def _server_bundle(self, _local_ip: str) -> Any:
        bundle = self.zt.secrets.current(self.identity)
        return bundle if bundle is not None else self._issued(self.zt.secrets.fetch)

    def _server_ctx(self, _local_ip: str) -> Any:
        ctx = self.zt.secrets.server_context_nowait(self.identity)
        return ctx if ctx is not None else self._issued(self.zt.secrets.server_context)

    async def _issued(self, get: Callable[[SpiffeId], Awaitable[Any]]) -> Any:
        """The pod's certificate (or context) once the CA issued it: a connection that arrives while the
        prefetch is in flight (the first one after the pod appeared) waits rather than being refused."""
        try:
            return await get(self.identity)
        except Exception as e:
            raise ConnectionRefusedError(f"no certificate for {self.identity}: {e}") from e

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.zt.config
        try:
            ls = self.netns.open_listeners(
                outbound_port=cfg.outbound_port,
                inbound_port=cfg.inbound_plaintext_port,
                hbone_port=cfg.hbone_port,
            )
            self._servers.append(await asyncio.start_server(self._outbound, sock=ls.outbound))
            self._servers.append(await asyncio.start_server(self._plaintext, sock=ls.inbound))
            await self.hbone.serve(ls.hbone)  # HboneServer.close() stops it
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        await self.hbone.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for s in self._servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()
        self._servers.clear()

    def _track_task(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ---- inbound HBONE ------------------------------------------------------------------------

    async def on_connect(self, req: ConnectRequest) -> Decision:
        peer_ip = req.peer_addr[0] if req.peer_addr else "0.0.0.0"
        await self.until_known()
        try:
            target = self.zt.inbound.hbone(
                req.peer_identity, req.authority, peer_ip, local_ips=self.local_ips()
            )
        except InboundRefused as e:
            log.info(
                "inbound %s -> %s from %s refused: %s",
                _addr(req.peer_addr),
                req.authority,
                req.peer_identity,
                e,
            )
            self.zt.tracker.failed(self._inbound_labels(req.peer_identity, None, req.peer_addr))
            return Reject(e.status, e.reason)
        sock = await self._dial_app(target.dial, peer_ip)  # raising here makes the server answer 503
        upstream = await TcpStream.from_socket(sock)
        conn = self.zt.tracker.open(
            direction="inbound",
            workload_uid=self.info.uid,
            src=_addr(req.peer_addr),
            original_dst=req.headers.get("forwarded", "").partition("host=")[2] or req.authority,
            actual_dst=_addr(target.dial),
            protocol="HBONE",
            labels=self._inbound_labels(req.peer_identity, target.workload, req.peer_addr),
        )
        log.debug(
            "inbound %s -> %s from %s allowed (%s)",
            _addr(req.peer_addr),
            req.authority,
            req.peer_identity,
            target.decision.reason,
        )

        self.inbound_conns[conn.id] = (target.connection, target.workload.uid, upstream)

        def done(result: RelayResult) -> None:
            # a_to_b: stream -> app (bytes received by the destination); b_to_a: sent back.
            self.inbound_conns.pop(conn.id, None)
            if result.error is not None:
                log.debug("inbound %s -> %s ended with %r", _addr(req.peer_addr), req.authority, result.error)
            self.zt.tracker.add_bytes(conn, received=result.a_to_b, sent=result.b_to_a)
            self.zt.tracker.close(conn)

        return Accept(upstream, on_done=done)

    def _inbound_labels(
        self, peer: SpiffeId | None, dst: Workload | None, peer_addr: tuple[str, int] | None
    ) -> dict[str, str]:
        src_wl = self.zt.state.workload_by_ip(peer_addr[0]) if peer_addr else None
        if src_wl is not None and peer is not None and src_wl.identity != peer:
            src_wl = None  # the address is a waypoint or gateway in front of the real client
        dst = dst or self.workload
        svc = self.zt.state.services_of(dst)[0] if dst is not None and dst.services else None
        return connection_labels(
            reporter="destination",
            src=src_wl,
            src_identity=peer,
            dst=dst,
            dst_identity=dst.identity if dst is not None else self.identity,
            service=svc,
            mtls=peer is not None,
        )

    async def _dial_app(self, dst: tuple[str, int], client_ip: str) -> socket.socket:
        """Connect to the app inside the pod, from the original client's IP when configured (as upstream's
        ``ENABLE_ORIG_SRC``; needs the capture's transparent return routing), else from the pod itself."""
        timeout = self.zt.config.connect_timeout
        if self.zt.config.preserve_source_ip and client_ip and client_ip != dst[0]:
            try:
                return await self.netns.connect(
                    dst, source=(client_ip, 0), transparent=True, connect_timeout=timeout
                )
            except PermissionError as e:
                log.debug(
                    "cannot spoof %s toward the app (%s); connecting from the pod address", client_ip, e
                )
        return await self.netns.connect(dst, connect_timeout=timeout)

    # ---- inbound plaintext --------------------------------------------------------------------

    async def _plaintext(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track_task()
        down = TcpStream(reader, writer)
        sock: socket.socket = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        try:
            dst = sockets.original_dst(sock)
        except OSError:
            dst = writer.get_extra_info("sockname")
        await self.until_known()
        try:
            target = self.zt.inbound.plaintext(
                (peer[0], peer[1]), (dst[0], dst[1]), local_ips=self.local_ips()
            )
        except InboundRefused as e:
            log.info("plaintext inbound %s -> %s refused: %s", _addr(peer), _addr(dst), e)
            self.zt.tracker.failed(self._inbound_labels(None, None, peer))
            down.reset()
            return
        try:
            up_sock = await self._dial_app(target.dial, peer[0])
            upstream = await TcpStream.from_socket(up_sock)
        except OSError as e:
            log.info("plaintext inbound %s -> %s: app unreachable: %s", _addr(peer), _addr(dst), e)
            down.reset()
            return
        conn = self.zt.tracker.open(
            direction="inbound",
            workload_uid=self.info.uid,
            src=_addr(peer),
            original_dst=_addr(dst),
            actual_dst=_addr(target.dial),
            protocol="TCP",
            labels=self._inbound_labels(None, target.workload, peer),
        )
        self.inbound_conns[conn.id] = (target.connection, target.workload.uid, upstream)
        try:
            result = await fastpath.relay(down, upstream, splice=self.zt.config.byte_path == "c")
        finally:
            self.inbound_conns.pop(conn.id, None)
        self.zt.tracker.add_bytes(conn, received=result.a_to_b, sent=result.b_to_a)
        self.zt.tracker.close(conn)

    def recheck_inbound(self) -> int:
        """Re-authorize live inbound connections against the current state; reset the denied ones."""
        closed = 0
        for cid, (rconn, uid, upstream) in list(self.inbound_conns.items()):
            wl = self.zt.state.workload_by_uid(uid)
            if wl is None:
                continue  # the destination left WDS: nothing to decide against, leave the connection be
            decision = check_inbound(self.zt.state, wl, rconn)
            if not decision:
                log.info("closing inbound connection to %s: policy changed (%s)", wl.name, decision.reason)
                self.inbound_conns.pop(cid, None)
                upstream.reset()  # the relay resets the other side too (RST / RST_STREAM)
                closed += 1
        return closed

    # ---- outbound -----------------------------------------------------------------------------

    async def _outbound(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track_task()
        down = TcpStream(reader, writer)
        sock: socket.socket = writer.get_extra_info("socket")
        peer = writer.get_extra_info("peername")
        try:
            dst = sockets.original_dst(sock)
        except OSError:
            log.info("outbound connection from %s was not redirected; closing", _addr(peer))
            down.reset()
            return
        src_wl = self.workload
        try:
            plan = self.zt.outbound.plan(dst, source=src_wl, network=self.zt.config.network)
        except NoHealthyUpstream as e:
            log.info("outbound %s -> %s: %s", _addr(peer), _addr(dst), e)
            down.reset()
            return
        labels = self._outbound_labels(plan)
        try:
            upstream: Any
            if plan.hbone:
                upstream = await self._open_hbone(plan, peer)
            else:
                up_sock = await self.netns.connect(plan.dial, connect_timeout=self.zt.config.connect_timeout)
                upstream = await TcpStream.from_socket(up_sock)
        except Exception as e:  # no certificate, unreachable, refused (4xx/5xx), wrong peer identity
            log.info("outbound %s -> %s via %s failed: %s", _addr(peer), _addr(dst), _addr(plan.dial), e)
            self.zt.tracker.failed(labels)
            down.reset()
            return
        conn = self.zt.tracker.open(
            direction="outbound",
            workload_uid=self.info.uid,
            src=_addr(peer),
            original_dst=_addr(plan.original_dst),
            actual_dst=_addr(plan.dial),
            protocol=plan.protocol,
            labels=labels,
        )
        result = await fastpath.relay(down, upstream, splice=self.zt.config.byte_path == "c")
        if result.error is not None:
            log.debug("outbound %s -> %s ended with %r", _addr(peer), _addr(dst), result.error)
        self.zt.tracker.add_bytes(conn, sent=result.a_to_b, received=result.b_to_a)
        self.zt.tracker.close(conn)

    async def _open_hbone(self, plan: OutboundPlan, peer: tuple[str, int]) -> Any:
        src_id = self.identity
        ctx: Any = (
            await self.zt.secrets.fetch(src_id)  # the C path takes the PEM bundle, not an SSLContext
            if self.zt.config.byte_path == "c"
            else await self.zt.secrets.client_context(src_id)
        )
        wl = self.workload
        baggage = build_baggage(
            cluster=wl.cluster_id or self.zt.config.cluster_id if wl else self.zt.config.cluster_id,
            namespace=self.info.namespace,
            workload_type=wl.workload_type if wl else "pod",
            workload_name=(wl.workload_name or wl.name) if wl else self.info.name,
            service=wl.canonical_name if wl else None,
            version=wl.canonical_revision if wl else None,
        )
        headers = hbone_headers(
            (peer[0], peer[1]), baggage=baggage, host=plan.service.hostname if plan.service else None
        )
        key = PoolKey(str(src_id), ",".join(sorted(str(i) for i in plan.expected_identities)), plan.dial[0])
        netns = self.netns
        timeout = self.zt.config.connect_timeout

        async def dial(addr: tuple[str, int]) -> socket.socket:
            return await netns.connect(addr, connect_timeout=timeout)

        # Pool per source pod: the socket is born in this pod's netns, so connections are not shareable
        # across pods even with the same identity (upstream's key also carries the source IP).
        return await self.zt.pool_for(self.info.uid).open_stream(
            key,
            plan.dial,
            plan.authority,
            headers,
            ctx,
            expected_identities=set(plan.expected_identities),
            connect=dial,
        )

    def _outbound_labels(self, plan: OutboundPlan) -> dict[str, str]:
        dst = plan.dst_workload or plan.via_waypoint
        return connection_labels(
            reporter="source",
            src=self.workload,
            src_identity=self.identity,
            dst=plan.dst_workload,
            dst_identity=(dst.identity if dst is not None and plan.hbone else None),
            service=plan.service,
            mtls=plan.hbone,
        )


# -------------------------------------------------------------------------------------------------------
# The node proxy


class Ztunnel:
    """A node's ztunnel-py. ``await start()``, feed pods with :meth:`add_pod`, ``await stop()``."""

    def __init__(
        self,
        config: ProxyConfig,
        secrets: SecretManager,
        *,
        xds: DeltaXdsClient | None = None,
        admin_addr: tuple[str, int] | None = ("127.0.0.1", 15000),
        metrics_addr: tuple[str, int] | None = ("0.0.0.0", 15020),
        readiness_addr: tuple[str, int] | None = ("0.0.0.0", 15021),
        on_shutdown: Callable[[], Awaitable[None] | None] | None = None,
    ) -> None:
        self.config = config
        self.secrets = secrets
        self.state = ProxyState()
        self.metrics = Metrics()
        self.tracker = ConnectionTracker(self.metrics)
        self.outbound = OutboundResolver(self.state)
        self.inbound = InboundAuthorizer(self.state)
        self.pods: dict[str, _PodProxy] = {}
        self._pools: dict[str, HbonePool | fastpath.FastPool] = {}
        self._stream_seen: dict[str, int] = {}  # type URL -> xDS client connect count of its last response
        self.xds = xds
        self.stopped = asyncio.Event()
        self._on_shutdown = on_shutdown
        self.admin = (
            AdminServer(
                AdminSources(
                    state=self.state,
                    metrics=self.metrics,
                    tracker=self.tracker,
                    certificates=self.secrets.dump,
                    local_workloads=lambda: [p.info for p in self.pods.values()],
                    ready=lambda: self.state.ready,
                    shutdown=self.shutdown,
                    config=config.as_dump(),
                ),
                admin_addr=admin_addr,
                metrics_addr=metrics_addr,
                readiness_addr=readiness_addr,
            )
            if admin_addr is not None
            else None
        )
        self._wds_waiters: list[asyncio.Future[None]] = []
        self.state.subscribe(self._on_state_change)

    def wds_changed(self) -> asyncio.Future[None]:
        """Resolves at the next WDS (address) change."""
        if len(self._wds_waiters) > 64:  # waits that timed out leave cancelled futures behind
            self._wds_waiters = [f for f in self._wds_waiters if not f.done()]
        fut = asyncio.get_running_loop().create_future()
        self._wds_waiters.append(fut)
        return fut

    # ---- xDS ----------------------------------------------------------------------------------

    def _on_addresses(self, update: DeltaUpdate) -> None:
        self.metrics.xds_messages.labels(ADDRESS_TYPE).inc()
        self._resync(update)
        try:
            self.state.apply_addresses({n: h.resource for n, h in update.updated.items()}, update.removed)
        finally:
            _trim_heap_after(update)

    def _on_authorizations(self, update: DeltaUpdate) -> None:
        self.metrics.xds_messages.labels(AUTHORIZATION_TYPE).inc()
        self._resync(update)
        try:
            updated = {n: h.resource for n, h in update.updated.items()}
            self.state.apply_authorizations(updated, update.removed)
        finally:
            _trim_heap_after(update)

    def _resync(self, update: DeltaUpdate) -> None:
        """On the first response of a new stream, drop what neither the client holds nor the server sent.

        The state applies the valid part of a NACKed update (keep-last-good per resource), which the xDS
        client does not record; after a reconnect those are the only resources the server may have deleted
        without telling us.
        """
        client = self.xds
        if client is None:
            return
        seen = self._stream_seen.get(update.type_url)
        if seen == client.connects:
            return
        self._stream_seen[update.type_url] = client.connects
        if seen is None:
            return  # first stream ever: nothing held before it
        keep = set(client.resources(update.type_url)) | set(update.updated)
        dropped = self.state.retain(update.type_url, keep)
        if dropped:
            log.info(
                "dropped %d stale %s resource(s) after reconnect: %s", len(dropped), update.type_url, dropped
            )

    def attach_xds(self, client: DeltaXdsClient) -> None:
        """Subscribe the WDS/WADS handlers (wildcard, as ztunnel without on-demand does)."""
        self.xds = client
        client.subscribe(ADDRESS_TYPE, self._on_addresses)
        client.subscribe(AUTHORIZATION_TYPE, self._on_authorizations)

    def _on_state_change(self, type_url: str) -> None:
        if type_url == ADDRESS_TYPE and self._wds_waiters:
            waiters, self._wds_waiters = self._wds_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        for pod in list(self.pods.values()):
            pod.recheck_inbound()
        if type_url == ADDRESS_TYPE and self.pods:
            # WDS may correct a pod's identity (trust domain, service account): keep certificates in step.
            with contextlib.suppress(RuntimeError):
                self.secrets.set_local([(uid, p.identity) for uid, p in self.pods.items()])

    # ---- pods (ZDS) ---------------------------------------------------------------------------

    async def add_pod(self, info: LocalWorkloadInfo, netns_fd: int) -> None:
        """Start serving a pod: listeners in its netns, certificate prefetch. ``netns_fd`` is dup'ed."""
        if info.uid in self.pods:
            await self.remove_pod(info.uid)
        netns = PodNetns(os.dup(netns_fd), info.uid)
        pod = _PodProxy(self, info, netns)
        try:
            await pod.start()
        except BaseException:
            netns.close()
            raise
        self.pods[info.uid] = pod
        self.secrets.set_local([(uid, p.identity) for uid, p in self.pods.items()])
        log.info("serving pod %s/%s (%s)", info.namespace, info.name, info.uid)

    async def remove_pod(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        if pod is None:
            return
        await pod.stop()
        pool = self._pools.pop(uid, None)
        if pool is not None:
            await pool.close()
        pod.netns.close()
        self.secrets.set_local([(u, p.identity) for u, p in self.pods.items()])
        log.info("stopped serving pod %s/%s", pod.info.namespace, pod.info.name)

    # ZDS handler (``istiopy.dataplane.zds.WorkloadHandler``): the node agent's pods come and go here.

    async def add_workload(self, wl: ZdsWorkload) -> None:
        await self.add_pod(LocalWorkloadInfo(wl.uid, wl.name, wl.namespace, wl.service_account), wl.netns.fd)

    async def del_workload(self, uid: str) -> None:
        await self.remove_pod(uid)

    async def snapshot_done(self, uids: set[str]) -> None:
        await self.reconcile_pods(uids)

    async def reconcile_pods(self, keep: Iterable[str]) -> None:
        """After the node agent's snapshot (ZDS ``SnapshotSent``): stop serving pods it no longer lists."""
        wanted = set(keep)
        for uid in [u for u in self.pods if u not in wanted]:
            await self.remove_pod(uid)

    def pool_for(self, uid: str) -> HbonePool | fastpath.FastPool:
        pool = self._pools.get(uid)
        if pool is None:
            cls: type[HbonePool | fastpath.FastPool] = fastpath.FastPool
            if self.config.byte_path != "c":
                from istiopy.dataplane.hbone import HbonePool

                cls = HbonePool
            pool = self._pools[uid] = cls(
                max_streams_per_conn=self.config.pool_max_streams,
                idle_timeout=self.config.pool_idle_timeout,
                connect_timeout=self.config.connect_timeout,
            )
        return pool

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.admin is not None:
            await self.admin.start()
        if self.xds is not None:
            await self.xds.start()

    async def shutdown(self) -> None:
        """Stop everything (``/quitquitquit`` ends up here)."""
        if self._on_shutdown is not None:
            res = self._on_shutdown()
            if res is not None:
                await res
        await self.stop()

    async def stop(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        for uid in list(self.pods):
            await self.remove_pod(uid)
        for pool in list(self._pools.values()):
            await pool.close()
        self._pools.clear()
        if self.xds is not None:
            await self.xds.stop()
        await self.secrets.close()
        if self.admin is not None:
            await self.admin.stop()


def parse_ip(s: str) -> IPAddress:
    return ipaddress.ip_address(s)
