"""Tiny real servers that test pods run (``python -m istiopy.testing.servers echo|http --port N``).

Why separate processes: a pod is a network namespace; a process started with ``ip netns exec`` binds and
accepts inside it, exactly like a containerised app would, and knows nothing about the mesh.

* ``echo``: echoes bytes; on the client's half-close it finishes sending and half-closes too, so tests can
  observe END_STREAM <-> FIN propagation end to end.
* ``http``: answers every HTTP/1.1 request with a small JSON body naming the pod and the peer address it saw
  (``{"pod": ..., "peer": "ip:port", "path": ...}``), which is what cross-pod tests usually want to assert.
  ``/pad/<n>`` adds ``n`` bytes of padding (a response bigger than the socket buffers); ``/reset`` starts a
  response and then aborts the connection with a TCP RST (``SO_LINGER`` 0), so tests can tell a reset
  that crossed the mesh from a graceful close.

Each server prints ``ready <port>`` on stdout once it listens; ``Pod.spawn_server`` waits for that line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import sys


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An asyncio stream handler echoing every byte, then half-closing after the peer did (tests use it
    in-process as the app behind a tunnel)."""
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """One HTTP/1.1 request off the stream: (method, target, lower-cased headers); its body is read and
    dropped (these servers answer from the request line and headers alone)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
    fields = (ln.partition(":") for ln in lines[1:] if ln)
    headers = {k.strip().lower(): v.strip() for k, _, v in fields}
    length = int(headers.get("content-length", "0") or 0)
    if length:
        await reader.readexactly(length)
    return method, target, headers


def _http_factory(pod: str) -> object:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                method, path, headers = await read_request(reader)
                if path == "/reset":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\npartial")
                    await writer.drain()
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()
                    return
                seen = {"pod": pod, "peer": f"{peer[0]}:{peer[1]}", "path": path, "method": method}
                if path.startswith("/pad/") and path[5:].isdigit():
                    seen["pad"] = "x" * int(path[5:])
                body = json.dumps(seen)
                data = body.encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(data)}\r\n\r\n".encode()
                    + data
                )
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError, ValueError):
            pass
        finally:
            writer.close()

    return handle


async def _main(kind: str, port: int, host: str, pod: str) -> None:
    handler = echo if kind == "echo" else _http_factory(pod)
    server = await asyncio.start_server(handler, host, port, reuse_address=True, backlog=1024)  # type: ignore[arg-type]
    bound = server.sockets[0].getsockname()[1]
    print(f"ready {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    """Entry point: parse the kind and port, serve until killed."""
    p = argparse.ArgumentParser(prog="istiopy.testing.servers")
    p.add_argument("kind", choices=["echo", "http"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--pod", default=os.environ.get("POD_NAME", "unknown"))
    a = p.parse_args(argv)
    try:
        asyncio.run(_main(a.kind, a.port, a.host, a.pod))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
