"""One HTTP/2 connection of a channel: the reader task, frames to call events, GOAWAY and keepalive."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame

from istiopy.api.grpc_h2.call import Call
from istiopy.api.grpc_h2.status import Header, RpcError, StatusCode

STREAM_WINDOW = 4 * 1024 * 1024  # what one stream may have in flight towards us
CONN_WINDOW = 16 * 1024 * 1024  # ... and all streams of a connection together
MAX_HEADER_LIST_SIZE = 64 * 1024
READ_CHUNK = 256 * 1024
H2_DEFAULT_WINDOW = 65535


class GracefulH2Connection(h2.connection.H2Connection):
    """h2 treats any received GOAWAY as the end: it drops queued output, moves to CLOSED and then rejects
    every later frame as a protocol error. RFC 9113 6.8 lets the streams up to ``last_stream_id`` finish,
    and grpc servers rely on it (max connection age, graceful shutdown: GOAWAY, then the open calls end
    normally). So a GOAWAY here only reports ``ConnectionTerminated``; :class:`Connection` opens no new
    streams on this connection and fails those the server will not process."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class Connection:
    """One HTTP/2 connection: a reader task turns frames into call events; calls write through it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        keepalive_time: float | None,
        keepalive_timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        cfg = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=True)
        self.h2 = GracefulH2Connection(cfg)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.h2.decoder.max_header_list_size = MAX_HEADER_LIST_SIZE
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONN_WINDOW - H2_DEFAULT_WINDOW)
        self.calls: dict[int, Call] = {}
        self.dead = False
        self.goaway = False
        self.error = ""
        self._slot_freed = asyncio.Event()
        self._ping_acks: dict[bytes, asyncio.Future[None]] = {}
        self.flush()
        self._task = asyncio.create_task(self._run(), name="grpc-h2-reader")
        self._closer: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        if keepalive_time:
            self._keepalive = asyncio.create_task(self._ping_loop(keepalive_time, keepalive_timeout))

    @property
    def usable(self) -> bool:
        return not self.dead and not self.goaway

    # -- output ----------------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.dead and not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        if self.dead:
            return  # the calls were failed with the reason already
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as e:
            self._lost(f"write failed: {e}")

    def send_window(self, stream_id: int) -> int:
        if self.dead:
            return 0
        try:
            return min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
        except h2.exceptions.ProtocolError:
            return 0

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool) -> None:
        if self.dead:
            return
        try:
            if data:
                self.h2.send_data(stream_id, data, end_stream=end_stream)
            elif end_stream:
                self.h2.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            return  # the call is ending; its status says why
        self.flush()

    def ack(self, stream_id: int, n: int) -> None:
        if n <= 0 or self.dead:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError, ValueError):
            self.h2.acknowledge_received_data(n, stream_id)
        self.flush()

    def reset(self, stream_id: int, code: ErrorCodes) -> None:
        if self.dead:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)
        self.flush()

    def forget(self, stream_id: int) -> None:
        self.calls.pop(stream_id, None)
        self._slot_freed.set()
        if self.goaway and not self.calls:
            self._close_soon()

    # -- calls -----------------------------------------------------------------------------------------
    async def open_call(self, headers: list[Header], max_message: int, deadline: float | None) -> Call:
        while self.usable and self.h2.open_outbound_streams >= self.h2.remote_settings.max_concurrent_streams:
            self._slot_freed.clear()
            await self._slot_freed.wait()
        if not self.usable:
            raise RpcError(StatusCode.UNAVAILABLE, self.error or "connection is going away")
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers)
        call = Call(self, sid, max_message, deadline)
        self.calls[sid] = call
        self.flush()
        return call

    # -- input -----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        reason = "connection closed by the server"
        try:
            while True:
                data = await self.reader.read(READ_CHUNK)
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    reason = f"server broke HTTP/2: {e}"
                    self.flush()  # the GOAWAY h2 prepared
                    break
                for ev in events:
                    self._dispatch(ev)
                self.flush()
        except (OSError, asyncio.IncompleteReadError) as e:  # ssl.SSLError is an OSError
            reason = f"connection lost: {e}"
        finally:
            self._lost(reason)

    def _dispatch(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            if (c := self.calls.get(ev.stream_id or 0)) is not None:
                c._on_headers(bytes_headers(ev.headers))
        elif isinstance(ev, h2.events.DataReceived):
            sid = ev.stream_id or 0
            fcl = ev.flow_controlled_length or 0
            if (c := self.calls.get(sid)) is not None:
                c._on_data(ev.data or b"", fcl)
            else:
                self.ack(sid, fcl)  # a call we already finished: keep the connection window open
        elif isinstance(ev, h2.events.TrailersReceived):
            if (c := self.calls.get(ev.stream_id or 0)) is not None:
                c._on_trailers(bytes_headers(ev.headers))
        elif isinstance(ev, h2.events.StreamEnded):
            if (c := self.calls.get(ev.stream_id or 0)) is not None:
                c._on_end()
        elif isinstance(ev, h2.events.StreamReset):
            if (c := self.calls.get(ev.stream_id or 0)) is not None:
                c._on_reset(int(ev.error_code or 0))
        elif isinstance(ev, h2.events.WindowUpdated):
            targets = self.calls.values() if not ev.stream_id else [self.calls.get(ev.stream_id)]
            for c in targets:
                if c is not None:
                    c._writable.set()
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            for c in self.calls.values():
                c._writable.set()
            self._slot_freed.set()
        elif isinstance(ev, h2.events.PingAckReceived):
            fut = self._ping_acks.pop(ev.ping_data or b"", None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = True
            self.error = f"server sent GOAWAY ({error_name(ev.error_code)})"
            last = ev.last_stream_id or 0
            for sid, c in list(self.calls.items()):
                if sid > last:  # never processed: safe to retry elsewhere
                    c._finish(RpcError(StatusCode.UNAVAILABLE, self.error))
            self._slot_freed.set()
            if not self.calls:
                self._close_soon()

    async def _ping_loop(self, interval: float, ack_within: float) -> None:
        while not self.dead:
            await asyncio.sleep(interval)
            data = os.urandom(8)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._ping_acks[data] = fut
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.ping(data)
            self.flush()
            try:
                await asyncio.wait_for(fut, ack_within)
            except TimeoutError:
                self._lost(f"keepalive ping not acknowledged within {ack_within}s")
                return

    # -- teardown --------------------------------------------------------------------------------------
    def _close_soon(self) -> None:
        """After a GOAWAY, once the last call ended: the channel dials a new connection for the next one."""
        if self._closer is None and not self.dead:
            self._closer = asyncio.get_running_loop().create_task(self.close("server sent GOAWAY"))

    def _lost(self, reason: str) -> None:
        if self.dead:
            return
        self.dead = True
        self.error = reason
        for c in list(self.calls.values()):
            c._finish(RpcError(StatusCode.UNAVAILABLE, reason))
        self.calls.clear()
        self._slot_freed.set()
        if self._keepalive is not None and self._keepalive is not asyncio.current_task():
            self._keepalive.cancel()
        self.writer.close()

    async def close(self, reason: str = "channel closed") -> None:
        """GOAWAY, then close; calls still open fail with CANCELLED."""
        for c in list(self.calls.values()):
            c._finish(RpcError(StatusCode.CANCELLED, reason))
        if not self.dead:
            with contextlib.suppress(Exception):
                self.h2.close_connection()
                self.flush()
        self._lost(reason)
        if self._task is not asyncio.current_task():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (Exception, asyncio.CancelledError):
            self.writer.transport.abort()


def bytes_headers(headers: Sequence[tuple[bytes | str, bytes | str]] | None) -> list[tuple[bytes, bytes]]:
    """h2 hands headers over as bytes (``header_encoding=None``); normalise the type for mypy and us."""
    return [
        (k if isinstance(k, bytes) else k.encode(), v if isinstance(v, bytes) else v.encode())
        for k, v in headers or []
    ]


def error_name(code: object) -> str:
    try:
        return ErrorCodes(int(code)).name  # type: ignore[call-overload]
    except (ValueError, TypeError):
        return str(code)
