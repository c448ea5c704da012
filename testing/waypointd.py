"""A waypoint pod's process for the kit: the real launcher (certificate, SDS/ALS agent, supervised Envoy).

``ip netns exec <waypoint pod> python -P -m istiopy.testing.waypointd --name waypoint --namespace backend
--pod-ip 10.20.2.40 --istiod 127.0.0.1:15012 --root root.pem --cert chain.pem --key key.pem --workdir DIR``

Run inside the waypoint pod's namespace, Envoy's ``connect_terminate`` listens on the pod's ``:15008`` and
its upstream HBONE leaves from the pod's IP, exactly like a waypoint Deployment's pod. istiod is reached
through the kit's loopback forward (``Pod.forward_host_port``), so the fabric needs no route to the host.
The waypoint authenticates to the CA with a bootstrap certificate for its own identity (the istiod port
requires client certificates), then to xDS with the workload certificate it got. Istio's HTTP metrics are
served on ``:15020`` (``/stats/prometheus``). Prints ``ready <envoy admin port>`` once Envoy is live.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path


async def _run(a: argparse.Namespace, roots: str, cert: str, key: str) -> None:
    from istiopy.api.ca_client import CaClient
    from istiopy.dataplane.waypoint import WaypointLauncher, WaypointOptions, serve_until_signalled

    ca = CaClient.connect(a.istiod, roots, client_cert=(cert, key))
    launcher = WaypointLauncher(
        WaypointOptions(
            name=a.name,
            namespace=a.namespace,
            service_account=a.service_account,
            xds_address=a.istiod,
            xds_roots_pem=roots,
            pod_name=a.pod_name,
            pod_ip=a.pod_ip,
            listen_address="0.0.0.0",
            metrics_address="0.0.0.0:15020",
            concurrency=1,
            workdir=Path(a.workdir),
            log_level=a.log_level,
        ),
        ca,
    )
    await serve_until_signalled(launcher, ca, lambda: f"ready {launcher.admin_port or 0}", start_timeout=90)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="istiopy.testing.waypointd")
    for flag in ("--name", "--namespace", "--pod-ip", "--istiod", "--root", "--cert", "--key", "--workdir"):
        p.add_argument(flag, required=True)
    p.add_argument("--service-account", default="")
    p.add_argument("--pod-name", default="")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    asyncio.run(_run(a, Path(a.root).read_text(), Path(a.cert).read_text(), Path(a.key).read_text()))


if __name__ == "__main__":
    main()
