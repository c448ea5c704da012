"""The sample app every kit pod runs: an HTTP/1.1 server that answers with who it is and what it saw.

``python -m istiopy.testing.meshapp --pod NAME --namespace NS --port 8080 [--port 9090 ...]``

Why its own server (not ``testing.servers``): policy tests want the request *headers* that reached the app
(what a waypoint added or rewrote, the JWT it forwarded) and the port that answered, in one JSON body. A
query ``?status=503`` answers with that status and ``?delay=S`` waits first, so retries and timeouts can be
exercised against the same app.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.parse

from istiopy.testing.servers import read_request


def _handler(pod: str, namespace: str, port: int) -> object:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                method, target, headers = await read_request(reader)
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
                if "delay" in query:
                    await asyncio.sleep(float(query["delay"][0]))
                status = int(query.get("status", ["200"])[0])
                seen = {
                    "pod": pod,
                    "namespace": namespace,
                    "port": port,
                    "peer": f"{peer[0]}:{peer[1]}",
                    "path": target,
                    "method": method,
                    "headers": headers,
                }
                data = json.dumps(seen).encode()
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n".encode()
                    + f"x-served-by: {pod}\r\ncontent-length: {len(data)}\r\n\r\n".encode()
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


async def _main(pod: str, namespace: str, ports: list[int]) -> None:
    servers = []
    for port in ports:
        servers.append(
            await asyncio.start_server(
                _handler(pod, namespace, port),  # type: ignore[arg-type]
                "0.0.0.0",
                port,
                reuse_address=True,
                backlog=1024,
            )
        )
    print("ready " + " ".join(str(s.sockets[0].getsockname()[1]) for s in servers), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="istiopy.testing.meshapp")
    p.add_argument("--pod", required=True)
    p.add_argument("--namespace", default="default")
    p.add_argument("--port", type=int, action="append", required=True)
    a = p.parse_args(argv)
    try:
        asyncio.run(_main(a.pod, a.namespace, a.port))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
