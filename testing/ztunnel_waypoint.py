"""Run a real waypoint (``dataplane.waypoint.WaypointLauncher`` + Envoy) as a pod process, for ztunnel tests.

``python -m istiopy.testing.ztunnel_waypoint --name waypoint --namespace srv --pod-ip 10.244.1.9 \\
    --xds 127.0.0.1:PORT --ca 127.0.0.1:PORT --root root.pem --cert chain.pem --key key.pem --workdir DIR``

Started with ``ip netns exec <pod netns>`` it is a waypoint pod on the test fabric: Envoy's
``connect_terminate`` listens on the pod's ``:15008`` and its HBONE upstreams leave from the pod's IP. The
control plane is reached through loopback relays the test opens inside that namespace
(:class:`NetnsRelay`), so the pod needs no route to the host. Prints ``ready`` once Envoy is live.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from pathlib import Path


class NetnsRelay:
    """Forward ``127.0.0.1:port`` inside a namespace to ``127.0.0.1:port`` of this process's namespace."""

    def __init__(self, netns_fd: int, port: int) -> None:
        from istiopy.dataplane.sockets import netns_listener

        self.port = port
        self._sock = netns_listener(netns_fd, port, "127.0.0.1")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> NetnsRelay:
        self._server = await asyncio.start_server(self._handle, sock=self._sock)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()

        try:
            await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
        finally:
            writer.close()
            up_w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _run(a: argparse.Namespace, roots: str, cert: str, key: str) -> None:
    from istiopy.api.ca_client import CaClient
    from istiopy.dataplane.waypoint import WaypointLauncher, WaypointOptions, serve_until_signalled

    ca = CaClient.connect(a.ca, roots, client_cert=(cert, key))
    launcher = WaypointLauncher(
        WaypointOptions(
            name=a.name,
            namespace=a.namespace,
            xds_address=a.xds,
            xds_roots_pem=roots,
            pod_name=f"{a.name}-0",
            pod_ip=a.pod_ip,
            listen_address="0.0.0.0",
            metrics_address=None,
            concurrency=1,
            workdir=Path(a.workdir),
        ),
        ca,
    )
    await serve_until_signalled(launcher, ca, lambda: "ready")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="istiopy.testing.ztunnel_waypoint")
    for flag in (
        "--name",
        "--namespace",
        "--pod-ip",
        "--xds",
        "--ca",
        "--root",
        "--cert",
        "--key",
        "--workdir",
    ):
        p.add_argument(flag, required=True)
    a = p.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    asyncio.run(_run(a, Path(a.root).read_text(), Path(a.cert).read_text(), Path(a.key).read_text()))


if __name__ == "__main__":
    main()
