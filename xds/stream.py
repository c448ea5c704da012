"""The sans-I/O xDS protocol core: one object per ADS stream, fed requests and snapshots, yielding responses.

No sockets, no clocks, no randomness: the caller passes ``now`` and a nonce prefix, so every protocol rule is
unit-tested with plain function calls (``tests/xds/test_stream.py``). The gRPC server (``xds/server.py``) is
a thin loop around it.

Rules implemented (envoyproxy.io "xDS REST and gRPC protocol"):

- Subscriptions: explicit wildcard (``*``), named, and legacy wildcard (the first request for a type names
  nothing). A later request that names resources without ``*`` ends a legacy wildcard.
- SotW: a request is an ACK or NACK of the response whose nonce it echoes; a request echoing any other nonce
  than the last one sent for its type is stale and ignored entirely (its subscription may already be
  superseded by a response in flight; the client will re-request). A NACK (``error_detail`` set) keeps the
  last acked version and is recorded with the client's message; the rejected version is not sent again,
  only a newer one. A wildcard first request on a new stream whose ``version_info`` equals the current
  version is not answered again (reconnect after a server restart, versions being content hashes).
- Delta: the server tracks what the client holds (name -> version), seeded from ``initial_resource_versions``
  on a reconnect, so unchanged resources are never resent. Responses carry only changed resources plus
  ``removed_resources`` (deleted from the snapshot, or named but absent, told once). ACK/NACK are matched to
  responses by nonce; a NACK rolls the client's view back to the state before the rejected response, so the
  next change resends everything the client lacks. A stale nonce on a delta request voids its ACK/NACK part
  only: subscription changes in it are still applied, since delta requests are incremental and dropping
  one would lose a subscribe.
- Responses go out in ADS order (CDS, EDS, LDS, RDS, SDS, Address, Authorization, others).
- A Cluster sent changed (or new) that reads its endpoints over EDS gets its ClusterLoadAssignment sent right
  after it, in the same round, even when the client already holds that exact assignment: Envoy warms an
  updated EDS cluster until an assignment arrives for it, but does not ask again for a name it is already
  subscribed to (delta), or asks with a request that changes nothing (SotW). istiod pushes EDS after CDS
  for the same reason. Delta resends just those assignments; SotW resends its EDS response.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from istiopy.xds import types
from istiopy.xds.cache import CachedResource, Snapshot, TypedResources, _discovery

Message = Any


class Kind(StrEnum):
    """What a request turned out to be, for metrics and logs."""

    INITIAL = "initial"
    ACK = "ack"
    NACK = "nack"
    SUBSCRIPTION = "subscription"
    STALE = "stale"


class ProtocolError(ValueError):
    """A request that breaks the protocol in a way the stream cannot continue from (e.g. no type URL)."""


@dataclass
class TypeStatus:
    """Per type URL state of one stream; read by ``/debug/syncz``."""

    type_url: str
    wildcard: bool = False
    legacy_wildcard: bool = False
    names: set[str] = field(default_factory=set)
    must_respond: bool = False
    sent_version: str = ""
    sent_nonce: str = ""
    sent_time: float | None = None
    sent_trigger: float | None = None
    acked_version: str = ""
    acked_nonce: str = ""
    ack_time: float | None = None
    nacks: int = 0
    last_error: str = ""
    last_nack_nonce: str = ""
    nacked_version: str = ""
    initial_version: str = ""
    responses: int = 0
    resources_sent: int = 0
    # Delta only: what the client holds (optimistic, includes responses in flight), what it has acked,
    # the responses in flight, and names it has been told are absent.
    known: dict[str, str] = field(default_factory=dict)
    acked_base: dict[str, str] = field(default_factory=dict)
    pending: list[_Pending] = field(default_factory=list)
    reported_absent: set[str] = field(default_factory=set)
    # Delta EDS only: assignments owed again whatever the client holds (their cluster was just sent changed).
    resend: set[str] = field(default_factory=set)
    # The collection last looked at for this stream, and (delta, wildcard) the one ``known`` equals exactly:
    # fast paths that skip per-resource comparisons when nothing or a shared diff applies.
    last_typed: TypedResources | None = None
    synced_typed: TypedResources | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type_url,
            "wildcard": self.wildcard,
            "names": len(self.names),
            "sent_version": self.sent_version,
            "sent_nonce": self.sent_nonce,
            "acked_version": self.acked_version,
            "acked_nonce": self.acked_nonce,
            "nacks": self.nacks,
            "last_error": self.last_error,
            "responses": self.responses,
            "resources_sent": self.resources_sent,
            "resources_held": len(self.known) if self.known or self.acked_base else None,
        }


@dataclass
class _Pending:
    nonce: str
    version: str
    updates: dict[str, str]
    removed: set[str]
    trigger: float | None
    sent: float


@dataclass(frozen=True)
class RequestOutcome:
    """What one request did. ``trigger_time``/``sent_time`` describe the acked or nacked response."""

    type_url: str
    kind: Kind
    first: bool = False
    nonce: str = ""
    version: str = ""
    error: str = ""
    trigger_time: float | None = None
    sent_time: float | None = None


@dataclass(frozen=True)
class SotwResponse:
    type_url: str
    version: str
    nonce: str
    resources: tuple[CachedResource, ...]

    def encode(self) -> bytes:
        """Wire bytes: the header fields followed by the shared pre-encoded resource entries."""
        head = _discovery().DiscoveryResponse(
            version_info=self.version, type_url=self.type_url, nonce=self.nonce
        )
        parts = [head.SerializeToString()]
        parts.extend(r.sotw_entry for r in self.resources)
        return b"".join(parts)

    def to_proto(self) -> Message:
        return _discovery().DiscoveryResponse.FromString(self.encode())


@dataclass(frozen=True)
class DeltaResponse:
    type_url: str
    system_version: str
    nonce: str
    resources: tuple[CachedResource, ...]
    removed: tuple[str, ...]

    def encode(self) -> bytes:
        head = _discovery().DeltaDiscoveryResponse(
            system_version_info=self.system_version,
            type_url=self.type_url,
            nonce=self.nonce,
            removed_resources=list(self.removed),
        )
        parts = [head.SerializeToString()]
        parts.extend(r.delta_entry for r in self.resources)
        return b"".join(parts)

    def to_proto(self) -> Message:
        return _discovery().DeltaDiscoveryResponse.FromString(self.encode())


Response = SotwResponse | DeltaResponse


class _StreamBase:
    """State shared by both variants: node, per-type status, nonces, the snapshot being served."""

    delta: bool = False

    # Responses a delta client may leave unacknowledged per type before the stream is refused: the record
    # of each is kept until its ACK, so a client that reads but never ACKs must not grow it forever.
    max_pending: int = 256

    def __init__(self, nonce_prefix: str = "", max_names: int = 100_000) -> None:
        self.node: Message | None = None
        self.types: dict[str, TypeStatus] = {}
        self.snapshot = Snapshot()
        self.max_names = max_names
        self._nonce_prefix = nonce_prefix
        self._nonce_counter = 0
        # SotW: the version of each cluster last sent, to tell which ones a CDS response changes.
        self._sent_clusters: dict[str, str] = {}

    def _next_nonce(self) -> str:
        self._nonce_counter += 1
        return f"{self._nonce_prefix}{self._nonce_counter}"

    def _take_node(self, req: Message) -> None:
        if self.node is None and req.HasField("node"):
            self.node = req.node

    def _type_of(self, req: Message) -> str:
        type_url = str(req.type_url)
        if not type_url:
            raise ProtocolError("request has no type_url (required on an aggregated stream)")
        return type_url

    def set_snapshot(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on; ``responses`` tells what the client is owed because of it."""
        self.snapshot = snapshot

    def subscribed_types(self) -> list[str]:
        return types.in_push_order(self.types)

    def missing_types(self) -> list[str]:
        """Types the client asked for that the snapshot does not hold yet (the caller generates them)."""
        return [t for t in self.subscribed_types() if self.snapshot.get(t) is None]

    def status(self) -> list[dict[str, Any]]:
        return [self.types[t].as_dict() for t in self.subscribed_types()]

    def responses(self, now: float) -> list[Response]:
        """Every response owed now, in ADS order; each is recorded as sent."""
        out: list[Response] = []
        for type_url in self.subscribed_types():  # CDS before EDS: what a cluster owes is due this round
            resp = self._response_for(self.types[type_url], now)
            if resp is not None:
                out.append(resp)
                if type_url == types.CLUSTER:
                    self._clusters_sent(resp)
        return out

    def _response_for(self, st: TypeStatus, now: float) -> Response | None:
        raise NotImplementedError

    def _clusters_sent(self, resp: Response) -> None:
        """Owe the client the EDS assignments of the EDS clusters ``resp`` sends changed or new."""
        if isinstance(resp, DeltaResponse):
            changed = resp.resources  # a delta response carries only what the client did not hold
        else:
            before, self._sent_clusters = self._sent_clusters, {r.name: r.version for r in resp.resources}
            changed = tuple(r for r in resp.resources if before.get(r.name) != r.version)
        names = frozenset().union(*(r.eds_names for r in changed))
        eds = self.types.get(types.ENDPOINT)
        if not names or eds is None:
            return  # nothing owed, or EDS not subscribed yet (its first request is answered anyway)
        if not eds.wildcard:
            names &= eds.names
        if not names:
            return
        if isinstance(resp, DeltaResponse):
            eds.resend |= names
        else:
            eds.must_respond = True


class SotwStream(_StreamBase):
    """State-of-the-world ADS stream."""

    def handle_request(self, req: Message, now: float) -> RequestOutcome:
        """Apply one DiscoveryRequest; raises ``ProtocolError`` for a request that cannot be served."""
        type_url = self._type_of(req)
        self._take_node(req)
        if len(req.resource_names) > self.max_names:
            raise ProtocolError(
                f"{len(req.resource_names)} resource names for {type_url} (limit {self.max_names})"
            )
        st = self.types.get(type_url)
        first = st is None
        if st is None:
            st = self.types[type_url] = TypeStatus(type_url)
        nonce = str(req.response_nonce)
        kind = Kind.INITIAL if first else Kind.SUBSCRIPTION
        outcome_extra: dict[str, Any] = {}
        if nonce and not first:
            if nonce != st.sent_nonce:
                return RequestOutcome(type_url, Kind.STALE, nonce=nonce)
            outcome_extra = {"trigger_time": st.sent_trigger, "sent_time": st.sent_time, "nonce": nonce}
            if req.HasField("error_detail"):
                kind = Kind.NACK
                st.nacks += 1
                st.last_error = str(req.error_detail.message)
                st.last_nack_nonce = nonce
                outcome_extra.update(version=st.sent_version, error=st.last_error)
            else:
                kind = Kind.ACK
                st.acked_version = str(req.version_info)
                st.acked_nonce = nonce
                st.ack_time = now
                outcome_extra.update(version=st.acked_version)
        names = set(req.resource_names)
        if first and not names:
            st.legacy_wildcard = True
        elif names and "*" not in names:
            st.legacy_wildcard = False
        wildcard = "*" in names or st.legacy_wildcard
        names.discard("*")
        changed = wildcard != st.wildcard or names != st.names
        st.wildcard, st.names = wildcard, names
        if first:
            # Compared with the snapshot when the response is due (it may not be generated yet).
            st.initial_version = str(req.version_info)
            st.must_respond = True
        elif changed:
            st.must_respond = True
        return RequestOutcome(type_url, kind, first=first, **outcome_extra)

    def _response_for(self, st: TypeStatus, now: float) -> SotwResponse | None:
        held = self.snapshot.get(st.type_url)
        if held is None:
            return None
        if st.initial_version:
            initial, st.initial_version = st.initial_version, ""
            if held.version == initial and st.wildcard:
                # A reconnect holding exactly what we would send: nothing to do (content-hash versions).
                # Only for wildcard: a named subscription may have changed after the client got that
                # version (its last request unanswered when the server went away), so it is answered.
                st.sent_version = st.acked_version = initial
                st.must_respond = False
                return None
        if not st.must_respond and held.version == st.sent_version:
            return None
        if st.wildcard:
            resources = tuple(held.items.values())
        else:
            resources = tuple(held.items[n] for n in sorted(st.names) if n in held.items)
        nonce = self._next_nonce()
        st.must_respond = False
        st.sent_version, st.sent_nonce, st.sent_time = held.version, nonce, now
        st.sent_trigger = self.snapshot.trigger_time
        st.responses += 1
        st.resources_sent += len(resources)
        return SotwResponse(st.type_url, held.version, nonce, resources)


class DeltaStream(_StreamBase):
    """Incremental (delta) ADS stream."""

    delta = True

    def handle_request(self, req: Message, now: float) -> RequestOutcome:
        """Apply one DeltaDiscoveryRequest; raises ``ProtocolError`` for a request that cannot be served."""
        type_url = self._type_of(req)
        self._take_node(req)
        total = len(req.resource_names_subscribe) + len(req.resource_names_unsubscribe)
        total += len(req.initial_resource_versions)
        if total > self.max_names:
            raise ProtocolError(f"{total} resource names for {type_url} (limit {self.max_names})")
        st = self.types.get(type_url)
        first = st is None
        if st is None:
            st = self.types[type_url] = TypeStatus(type_url)
            st.known = dict(req.initial_resource_versions)
            st.acked_base = dict(st.known)
            st.must_respond = True
            if not req.resource_names_subscribe:
                st.legacy_wildcard = st.wildcard = True
        kind = Kind.INITIAL if first else Kind.SUBSCRIPTION
        extra: dict[str, Any] = {}
        nonce = str(req.response_nonce)
        if nonce and not first:
            idx = next((i for i, p in enumerate(st.pending) if p.nonce == nonce), None)
            if idx is None:
                kind = Kind.STALE
                extra = {"nonce": nonce}
            else:
                entry = st.pending[idx]
                extra = {"nonce": nonce, "trigger_time": entry.trigger, "sent_time": entry.sent}
                for p in st.pending[:idx]:
                    _apply(st.acked_base, p)
                if req.HasField("error_detail"):
                    kind = Kind.NACK
                    st.nacks += 1
                    st.last_error = str(req.error_detail.message)
                    st.last_nack_nonce = nonce
                    st.nacked_version = entry.version
                    extra.update(version=entry.version, error=st.last_error)
                else:
                    kind = Kind.ACK
                    _apply(st.acked_base, entry)
                    st.acked_version, st.acked_nonce, st.ack_time = entry.version, nonce, now
                    extra.update(version=entry.version)
                del st.pending[: idx + 1]
                if kind is Kind.NACK:
                    # The client kept what it had before the rejected response; responses after it stand.
                    st.known = dict(st.acked_base)
                    for p in st.pending:
                        _apply(st.known, p)
        for name in req.resource_names_subscribe:
            if name == "*":
                st.wildcard = True
            elif name not in st.names:
                st.names.add(name)
                st.must_respond = True
        for name in req.resource_names_unsubscribe:
            if name == "*":
                st.wildcard = st.legacy_wildcard = False
            else:
                st.names.discard(name)
                st.reported_absent.discard(name)
        if req.resource_names_subscribe and "*" in req.resource_names_subscribe and not first:
            st.must_respond = True
        if kind is Kind.NACK or req.resource_names_subscribe or req.resource_names_unsubscribe:
            st.synced_typed = None  # ``known`` no longer equals a collection we sent
        if not st.wildcard:
            # The client forgets what it unsubscribed from; so do we, or a resubscribe would send nothing.
            for view in (st.known, st.acked_base):
                for name in [n for n in view if n not in st.names]:
                    del view[name]
        return RequestOutcome(type_url, kind, first=first, **extra)

    def _response_for(self, st: TypeStatus, now: float) -> DeltaResponse | None:
        held = self.snapshot.get(st.type_url)
        if held is None:
            return None
        if held is st.last_typed and not st.must_respond and not st.resend:
            return None  # nothing new for this type since we last looked
        st.last_typed = held
        if held.version == st.nacked_version and not st.must_respond and not st.resend:
            return None  # the client rejected exactly this content; wait for a change
        resend, st.resend = st.resend, set()
        if st.wildcard and st.synced_typed is not None:
            changed, gone = held.diff_from(st.synced_typed)
            updates = tuple(held.items[n] for n in changed)
            removed = sorted(gone)
        else:
            if st.wildcard:
                wanted = held.items
                absent: Iterable[str] = ()
            else:
                wanted = {n: held.items[n] for n in st.names if n in held.items}
                absent = sorted(n for n in st.names if n not in held.items and n not in st.reported_absent)
            updates = tuple(res for name, res in wanted.items() if st.known.get(name) != res.version)
            removed = sorted({n for n in st.known if n not in wanted} | set(absent))
        if resend:
            have = {r.name for r in updates}.union(removed)
            updates += tuple(held.items[n] for n in sorted(resend) if n in held.items and n not in have)
        st.synced_typed = held if st.wildcard else None
        if not updates and not removed and not st.must_respond:
            return None
        if len(st.pending) >= self.max_pending:
            raise ProtocolError(
                f"client has not acknowledged {len(st.pending)} {types.short_name(st.type_url)} responses"
            )
        nonce = self._next_nonce()
        entry = _Pending(
            nonce,
            held.version,
            {r.name: r.version for r in updates},
            set(removed),
            self.snapshot.trigger_time,
            now,
        )
        st.pending.append(entry)
        _apply(st.known, entry)
        st.reported_absent.difference_update(entry.updates)
        st.reported_absent.update(removed)
        st.must_respond = False
        st.sent_version, st.sent_nonce, st.sent_time = held.version, nonce, now
        st.sent_trigger = self.snapshot.trigger_time
        st.responses += 1
        st.resources_sent += len(updates)
        return DeltaResponse(
            st.type_url, held.version, nonce, tuple(sorted(updates, key=lambda r: r.name)), tuple(removed)
        )


def _apply(view: dict[str, str], entry: _Pending) -> None:
    view.update(entry.updates)
    for name in entry.removed:
        view.pop(name, None)


def new_stream(delta: bool, nonce_prefix: str = "", max_names: int = 100_000) -> SotwStream | DeltaStream:
    return (DeltaStream if delta else SotwStream)(nonce_prefix, max_names)
