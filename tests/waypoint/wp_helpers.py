"""Model builders and small clients for the waypoint tests (module name unique across the suite)."""

from __future__ import annotations

from typing import Any

from istiopy.mesh.kinds import parse
from istiopy.mesh.meta import Resource

NS = "default"
WAYPOINT = "waypoint"


def namespace(name: str = NS, **labels: str) -> Resource:
    return parse({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})


def gateway(name: str = WAYPOINT, ns: str = NS, waypoint_for: str = "service") -> Resource:
    return parse(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns, "labels": {"istio.io/waypoint-for": waypoint_for}},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        }
    )


def service(
    name: str,
    vip: str,
    port: int = 80,
    target: int = 8080,
    ns: str = NS,
    waypoint: str | None = WAYPOINT,
    selector: dict[str, str] | None = None,
) -> Resource:
    labels = {"istio.io/use-waypoint": waypoint} if waypoint else {}
    return parse(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "clusterIP": vip,
                "selector": selector or {"app": name},
                "ports": [{"name": "http", "port": port, "targetPort": target}],
            },
        }
    )


def pod(name: str, ip: str, labels: dict[str, str], ns: str = NS, sa: str = "default") -> Resource:
    return parse(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "serviceAccountName": sa,
                "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}],
            },
            "status": {"phase": "Running", "podIP": ip},
        }
    )


def istio(
    kind: str, name: str, spec: dict[str, Any], ns: str = NS, group: str = "networking.istio.io/v1"
) -> Resource:
    return parse(
        {"apiVersion": group, "kind": kind, "metadata": {"name": name, "namespace": ns}, "spec": spec}
    )


def validation_bootstrap(store: Any, proxy: Any, base: dict[str, Any]) -> dict[str, Any]:
    """Everything the generators produce for ``proxy``, inlined as static resources into ``base`` (the
    launcher's bootstrap), so ``envoy --mode validate`` checks listeners, clusters, endpoints and routes."""
    import copy

    from google.protobuf import json_format

    from istiopy.xds import waypoint as W

    def js(m: Any) -> dict[str, Any]:
        return json_format.MessageToDict(m, preserving_proto_field_name=True)

    routes = {n: js(m) for n, m in W.generate_routes(store, proxy)}
    eps = {n: js(m) for n, m in W.generate_endpoints(store, proxy)}
    clusters = []
    for name, c in W.generate_clusters(store, proxy):
        d = js(c)
        if d.get("type") == "EDS":
            eds = d.pop("eds_cluster_config")["service_name"]
            d["type"] = "STATIC"
            d["load_assignment"] = eps.get(eds, {"cluster_name": name})
        clusters.append(d)
    listeners = []
    for _, lst in W.generate_listeners(store, proxy):
        d = js(lst)
        for chain in d.get("filter_chains", []):
            for f in chain.get("filters", []):
                tc = f.get("typed_config", {})
                if "rds" in tc:
                    tc["route_config"] = routes[tc.pop("rds")["route_config_name"]]
        listeners.append(d)
    out = copy.deepcopy(base)
    out["static_resources"]["clusters"] += clusters
    out["static_resources"]["listeners"] = listeners
    out.pop("dynamic_resources", None)
    return out


def envoy_validate(config: dict[str, Any]) -> tuple[bool, str]:
    import json
    import subprocess
    import tempfile

    from istiopy.dataplane.waypoint import envoy_binary

    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(config, f)
        f.flush()
        proc = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", f.name, "--disable-hot-restart", "-l", "error"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    return proc.returncode == 0, proc.stdout + proc.stderr
