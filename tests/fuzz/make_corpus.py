"""Regenerate the seed corpus for fuzz_hbone (`python tests/fuzz/make_corpus.py`): valid HBONE client
byte streams made with the h2 library, so the fuzzer starts from inputs that reach CONNECT handling."""

from __future__ import annotations

from pathlib import Path

import h2.config
import h2.connection
from h2.errors import ErrorCodes

OUT = Path(__file__).parent / "corpus"


def _client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    c.initiate_connection()
    return c


def _connect(c: h2.connection.H2Connection, sid: int, authority: str, end: bool = False) -> None:
    headers = [(":method", "CONNECT"), (":authority", authority), ("forwarded", 'for="10.0.0.1:4000"')]
    c.send_headers(sid, headers, end_stream=end)


def _server_answers(statuses: list[int], data: bytes = b"", end: bool = False) -> bytes:
    """What a server sends a client that opened streams 1, 3, 5: SETTINGS, then the answers."""
    cli = _client()
    srv = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    srv.initiate_connection()
    for sid in (1, 3, 5):
        _connect(cli, sid, "10.0.0.5:8080")
    srv.receive_data(cli.data_to_send())
    for sid, status in zip((1, 3, 5), statuses, strict=False):
        srv.send_headers(sid, [(":status", str(status))], end_stream=status != 200)
        if status == 200 and data:
            srv.send_data(sid, data, end_stream=end)
    if len(statuses) < 3:  # the unanswered stream is reset instead
        srv.reset_stream(5, ErrorCodes.CANCEL)
    return srv.data_to_send()


def seeds() -> dict[str, bytes]:
    """Keys: file names; the first byte of each seed picks the engine's side (0 server, 1 client)."""
    out = {k: b"\x00" + v for k, v in _server_seeds().items()}
    out["client_200_data_end"] = b"\x01" + _server_answers([200, 200, 200], b"reply" * 50, end=True)
    out["client_401_503"] = b"\x01" + _server_answers([401, 503])
    out["client_200_then_reset"] = b"\x01" + _server_answers([200, 200])
    return out


def _server_seeds() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    c = _client()
    _connect(c, 1, "10.0.0.5:8080")
    c.send_data(1, b"hello" * 100)
    c.end_stream(1)
    out["connect_data_end"] = c.data_to_send()
    c = _client()
    _connect(c, 1, "10.0.0.5:8080")
    _connect(c, 3, "[fd00::1]:80")
    c.send_data(3, b"x" * 1000)
    c.reset_stream(1, ErrorCodes.CANCEL)
    c.increment_flow_control_window(1 << 20)
    c.ping(b"12345678")
    out["two_streams_reset_ping"] = c.data_to_send()
    c = _client()
    c.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a:1")])
    out["get_not_connect"] = c.data_to_send()
    c = _client()
    _connect(c, 1, "no-port", end=True)
    c.close_connection()
    out["bad_authority_goaway"] = c.data_to_send()
    c = _client()
    for i in range(1, 40, 2):
        _connect(c, i, f"10.0.0.{i}:80")
    out["many_streams"] = c.data_to_send()
    return out


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    for name, data in seeds().items():
        (OUT / name).write_bytes(data)
