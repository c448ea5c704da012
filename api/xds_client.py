"""An asyncio delta ADS client (``DeltaAggregatedResources``), as ztunnel speaks it (ambient.md 1.1).

Used by ztunnel-py for WDS/WADS and by tests against our server. Per type URL the caller subscribes with a
handler; the handler sees each response as a ``DeltaUpdate`` and may raise to reject it (a NACK carrying the
exception text as ``error_detail``), in which case the client's state is left as it was. The client:

- sends one request per subscribed type on every (re)connect, with ``initial_resource_versions`` taken from
  the resources it holds, so a server that still has the same content sends nothing again;
- keeps its last state while the server is away, and reconnects with exponential backoff (with jitter),
  reset after a stream that delivered something;
- lets subscriptions change at any time (``subscribe_names`` / ``unsubscribe_names``); changes made while
  disconnected are sent as part of the next connect.

Wildcard subscriptions are sent as an explicit ``*``; ``names=None`` means wildcard, a set means named.
It speaks gRPC through :mod:`istiopy.api.grpc_h2` (not grpcio, which costs the node proxy ~9 MB RSS) and
imports only that, protobuf and xds-protos (the wire layer may import nothing else of ours).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from istiopy.api.grpc_h2 import Call, Channel, RpcError, StatusCode, client_ssl_context
from istiopy.api.tls_stream import TlsClient, TlsFactory

if TYPE_CHECKING:
    import ssl

log = logging.getLogger(__name__)

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

Message = Any  # xds-protos ships no type stubs


def _pb() -> Any:
    from envoy.service.discovery.v3 import discovery_pb2

    return discovery_pb2


@dataclass(frozen=True)
class HeldResource:
    """One resource as last accepted: its version and the packed ``google.protobuf.Any``.

    ``resource`` is None in the state of a client made with ``keep_resources=False``: the handler saw the
    ``Any`` in its :class:`DeltaUpdate`, and names and versions are all a reconnect needs.
    """

    name: str
    version: str
    resource: Message

    def unpack(self, message_class: Any) -> Any:
        """The resource as ``message_class`` (raises ``ValueError`` when the type does not match, or when
        the client did not keep the resource)."""
        if self.resource is None:
            raise ValueError(f"resource {self.name!r} was not kept (DeltaXdsClient(keep_resources=False))")
        msg = message_class()
        if not self.resource.Unpack(msg):
            raise ValueError(
                f"resource {self.name!r} is a {self.resource.type_url}, not {msg.DESCRIPTOR.full_name}"
            )
        return msg


@dataclass(frozen=True)
class DeltaUpdate:
    """One response for one type: what changed and what went away."""

    type_url: str
    system_version: str
    nonce: str
    updated: Mapping[str, HeldResource]
    removed: tuple[str, ...]


Handler = Callable[[DeltaUpdate], Awaitable[None] | None]


@dataclass
class _Subscription:
    type_url: str
    handler: Handler | None
    wildcard: bool
    names: set[str] = field(default_factory=set)
    state: dict[str, HeldResource] = field(default_factory=dict)
    acks: int = 0
    nacks: int = 0
    last_error: str = ""
    system_version: str = ""


class DeltaXdsClient:
    """A reconnecting delta ADS client. ``start()`` runs it in the background; ``stop()`` ends it.

    Plaintext unless ``ssl_context`` is given (see :meth:`connect` for TLS from PEM strings);
    ``server_name`` is the name the server's certificate is verified for (and sent as SNI and
    ``:authority``) when it differs from the host in ``target``.

    ``keep_resources=False`` keeps only names and versions in the state (``resources()`` then holds
    ``HeldResource``s whose ``resource`` is None): each held ``Any`` is a view into the response it came in,
    so keeping any of it keeps whole responses alive (~0.6 MB for ztunnel-py holding 1000 workloads and
    500 services, issue 8); a caller whose handler copies what it needs out of the update (ztunnel-py) has
    no use for them.
    """

    def __init__(
        self,
        target: str,
        node: Message,
        *,
        ssl_context: ssl.SSLContext | TlsClient | None = None,
        server_name: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        max_message_bytes: int = 200 * 1024 * 1024,
        keepalive_time: float | None = None,
        keep_resources: bool = True,
    ) -> None:
        self.target = target
        self.node = node
        self.ssl_context = ssl_context
        self.server_name = server_name
        self.metadata = tuple(metadata)
        self.max_message_bytes = max_message_bytes
        self.keepalive_time = keepalive_time
        self.keep_resources = keep_resources
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.subscriptions: dict[str, _Subscription] = {}
        self.connected = asyncio.Event()
        self.connects = 0
        self.responses = 0
        self.last_stream_error = ""
        self._changed = asyncio.Condition()
        self._outbox: asyncio.Queue[Message] | None = None
        self._task: asyncio.Task[None] | None = None
        self._channel: Channel | None = None
        self._stopping = False

    @classmethod
    def connect(
        cls,
        target: str,
        node: Message,
        roots_pem: str,
        *,
        server_name: str | None = None,
        client_cert: tuple[str, str] | None = None,
        tls: TlsFactory = client_ssl_context,
        **options: Any,
    ) -> DeltaXdsClient:
        """A client over TLS verifying the server against ``roots_pem`` for ``server_name``.

        ``client_cert`` is ``(chain_pem, key_pem)`` for mutual TLS; ``tls`` builds the TLS client (Python's
        ``ssl`` by default); ``options`` go to the constructor.
        """
        ctx = tls(roots_pem, client_cert=client_cert)
        return cls(target, node, ssl_context=ctx, server_name=server_name, **options)

    # ------------------------------------------------------------------------------------ subscriptions
    def subscribe(
        self, type_url: str, handler: Handler | None = None, names: Iterable[str] | None = None
    ) -> None:
        """Watch ``type_url``: all resources (``names=None``) or the named ones; before or after start."""
        wildcard = names is None
        sub = _Subscription(type_url, handler, wildcard, set(names or ()))
        self.subscriptions[type_url] = sub
        if self._outbox is not None and self.connected.is_set():
            self._outbox.put_nowait(self._initial_request(sub, include_node=False))

    def subscribe_names(self, type_url: str, names: Iterable[str]) -> None:
        sub = self.subscriptions[type_url]
        new = [n for n in names if n not in sub.names]
        sub.names.update(new)
        if new:
            self._send(_pb().DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=new))

    def unsubscribe_names(self, type_url: str, names: Iterable[str]) -> None:
        """Stop watching names; their resources are dropped from the state (the server forgets them too)."""
        sub = self.subscriptions[type_url]
        gone = [n for n in names if n in sub.names]
        for n in gone:
            sub.names.discard(n)
            if not sub.wildcard:
                sub.state.pop(n, None)
        if gone:
            self._send(_pb().DeltaDiscoveryRequest(type_url=type_url, resource_names_unsubscribe=gone))

    def resources(self, type_url: str) -> dict[str, HeldResource]:
        """What the client holds for a type (kept across disconnects)."""
        return dict(self.subscriptions[type_url].state)

    def status(self, type_url: str) -> _Subscription:
        return self.subscriptions[type_url]

    def _send(self, req: Message) -> None:
        if self._outbox is not None and self.connected.is_set():
            self._outbox.put_nowait(req)

    def _initial_request(self, sub: _Subscription, include_node: bool) -> Message:
        req = _pb().DeltaDiscoveryRequest(type_url=sub.type_url)
        if include_node:
            req.node.CopyFrom(self.node)
        if sub.wildcard or sub.names:
            req.resource_names_subscribe.extend((["*"] if sub.wildcard else []) + sorted(sub.names))
        else:
            # Named with no names yet: an empty list would mean legacy wildcard, so say "nothing" the way
            # ztunnel's on-demand mode does: subscribe to * and unsubscribe from it in one request.
            req.resource_names_subscribe.append("*")
            req.resource_names_unsubscribe.append("*")
        for name, held in sub.state.items():
            req.initial_resource_versions[name] = held.version
        return req

    # ---------------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"xds-client-{self.target}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self.connected.clear()

    async def __aenter__(self) -> DeltaXdsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def wait_for(self, predicate: Callable[[DeltaXdsClient], bool]) -> None:
        """Wait until ``predicate(self)`` holds, re-checked after every processed response or (dis)connect.
        Bound it with ``asyncio.timeout``."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _new_channel(self) -> Channel:
        return Channel(
            self.target,
            ssl_context=self.ssl_context,
            server_name=self.server_name,
            max_receive_message_bytes=self.max_message_bytes,
            keepalive_time=self.keepalive_time,
        )

    async def _run(self) -> None:
        backoff = self.backoff_initial
        while not self._stopping:
            got_response = False
            try:
                got_response = await self._stream_once()
            except asyncio.CancelledError:
                raise
            except RpcError as e:
                self.last_stream_error = f"{e.code.name}: {e.details}"
                log.info("xDS stream to %s ended: %s", self.target, self.last_stream_error)
            except Exception as e:
                self.last_stream_error = f"{type(e).__name__}: {e}"
                log.warning("xDS stream to %s failed: %s", self.target, self.last_stream_error)
            finally:
                self.connected.clear()
                await self._notify()
            if self._stopping:
                return
            if got_response:
                backoff = self.backoff_initial
            delay = backoff * (0.5 + random.random() / 2)
            backoff = min(self.backoff_max, backoff * 2)
            await asyncio.sleep(delay)

    async def _stream_once(self) -> bool:
        if self._channel is None:
            self._channel = self._new_channel()  # one connection, re-dialled lazily after it died
        call = await self._channel.stream_stream(ADS_METHOD, metadata=self.metadata)
        self._outbox = asyncio.Queue()
        first = True
        for sub in list(self.subscriptions.values()):
            self._outbox.put_nowait(self._initial_request(sub, include_node=first))
            first = False
        self.connected.set()
        self.connects += 1
        writer = asyncio.create_task(self._write(call, self._outbox))
        got = False
        try:
            while True:
                data = await call.read()
                if data is None:
                    self.last_stream_error = "server closed the stream"
                    return got
                resp = _pb().DeltaDiscoveryResponse.FromString(data)
                got = True
                self.responses += 1
                ack = await self._process(resp)
                # Not kept while waiting for the next one: the response (and every view into it) can go now.
                del data, resp
                self._outbox.put_nowait(ack)
                await self._notify()
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            call.cancel()

    async def _write(self, call: Call, outbox: asyncio.Queue[Message]) -> None:
        while True:
            req = await outbox.get()
            await call.write(req.SerializeToString())

    async def _process(self, resp: Message) -> Message:
        """Run the handler; return the ACK, or the NACK if it raised (state then left untouched)."""
        pb = _pb()
        sub = self.subscriptions.get(resp.type_url)
        ack = pb.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        if sub is None:
            ack.error_detail.code = int(StatusCode.INVALID_ARGUMENT)
            ack.error_detail.message = f"not subscribed to {resp.type_url}"
            return ack
        updated = {r.name: HeldResource(r.name, r.version, r.resource) for r in resp.resources}
        update = DeltaUpdate(
            resp.type_url, resp.system_version_info, resp.nonce, updated, tuple(resp.removed_resources)
        )
        try:
            if sub.handler is not None:
                result = sub.handler(update)
                if result is not None:
                    await result
        except Exception as e:
            sub.nacks += 1
            sub.last_error = f"{type(e).__name__}: {e}"
            ack.error_detail.code = int(StatusCode.INVALID_ARGUMENT)
            ack.error_detail.message = sub.last_error
            log.warning("rejecting %s response %s: %s", resp.type_url, resp.nonce, sub.last_error)
            return ack
        sub.acks += 1
        sub.system_version = update.system_version
        if self.keep_resources:
            sub.state.update(updated)
        else:
            sub.state.update((n, HeldResource(n, h.version, None)) for n, h in updated.items())
        for name in update.removed:
            sub.state.pop(name, None)
        return ack
