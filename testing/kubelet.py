"""A kubelet stand-in for tests. It is NOT a kubelet: it runs no containers and enforces nothing.

Why it exists: the test cluster (``cluster.py``) has a real API server and controller-manager but no scheduler
and no kubelet, so pods would stay Pending forever and the real endpointslice controller would never publish
endpoints. This stand-in does the minimum a node does, as seen from the API:

* registers a Node (Ready, InternalIP, podCIDR ``10.244.<index>.0/24``);
* acts as a trivial scheduler: binds unscheduled pods (default scheduler) to its node, if ``schedule=True``;
* for pods on its node, allocates an IP from the podCIDR (host network pods get the node IP), calls the
  ``on_pod_start`` hook (where later work creates a network namespace with that IP and runs a test server),
  and patches ``status`` to Running with every container ready, so EndpointSlices list the pod;
* for pods being deleted, calls ``on_pod_stop``, frees the IP and finishes the deletion (grace period 0),
  which is the kubelet's job in a real cluster.

It polls the API with plain HTTPS (urllib, the kubeconfig's client certificate or token) from one thread:
simple, and it rides out API server and etcd restarts without watch bookkeeping.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import logging
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

Pod = dict[str, Any]
PodHook = Callable[[Pod, str], None]
"""Called with the pod object and its IP. Exceptions are logged; a failing start hook leaves the pod Pending
and is retried on the next poll."""


class KubeClient:
    """Just enough of a Kubernetes REST client, configured from a kubeconfig file's current context."""

    def __init__(self, kubeconfig: Path) -> None:
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        ctx_name = cfg["current-context"]
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user: dict[str, Any] = next(
            (u["user"] for u in cfg.get("users", []) if u["name"] == ctx.get("user")), {}
        )
        self.server = cluster["server"].rstrip("/")
        self._tmp = tempfile.TemporaryDirectory(prefix="istiopy-kubelet-")
        tmp = Path(self._tmp.name)

        def material(key: str) -> str | None:
            """Path of a PEM given inline (``<key>-data``) or by file (``<key>``)."""
            for src in (cluster, user):
                if f"{key}-data" in src:
                    p = tmp / key
                    p.write_bytes(base64.b64decode(src[f"{key}-data"]))
                    return str(p)
                if key in src:
                    return str(src[key])
            return None

        if cluster.get("insecure-skip-tls-verify"):
            self.ssl = ssl._create_unverified_context()
        else:
            self.ssl = ssl.create_default_context(cafile=material("certificate-authority"))
        cert, key = material("client-certificate"), material("client-key")
        if cert and key:
            self.ssl.load_cert_chain(cert, key)
        self.token: str | None = user.get("token")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Returns (HTTP status, parsed JSON or None); never raises on HTTP errors, only on I/O errors."""
        url = self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.ssl) as r:
                raw, status = r.read(), int(r.status)
        except urllib.error.HTTPError as e:
            raw, status = e.read(), int(e.code)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, None

    def close(self) -> None:
        self._tmp.cleanup()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeletStandIn:
    """Makes pods on one test Node Running/Ready with IPs. A test stand-in, not a kubelet (see module doc)."""

    def __init__(
        self,
        kubeconfig: Path,
        node_name: str = "node-0",
        *,
        index: int = 0,
        node_ip: str | None = None,
        schedule: bool = True,
        labels: dict[str, str] | None = None,
        on_pod_start: PodHook | None = None,
        on_pod_stop: PodHook | None = None,
        interval: float = 0.2,
    ) -> None:
        if not 0 <= index <= 255:
            raise ValueError("index must be 0..255 (it is the third octet of the pod CIDR)")
        self.client = KubeClient(kubeconfig)
        self.node_name = node_name
        self.pod_cidr = ipaddress.ip_network(f"10.244.{index}.0/24")
        # Node IPs are never dialled by the stand-in; distinct per node so topology looks real.
        self.node_ip = node_ip or f"172.30.0.{index + 10}"
        self.schedule = schedule
        self.labels = {"kubernetes.io/hostname": node_name, "kubernetes.io/os": "linux", **(labels or {})}
        self.on_pod_start = on_pod_start
        self.on_pod_stop = on_pod_stop
        self.interval = interval
        self._ips: dict[str, str] = {}  # pod uid -> IP we gave it
        self._pods: dict[str, Pod] = {}  # pod uid -> last object seen, for on_pod_stop after a force delete
        self._free = [str(h) for h in list(self.pod_cidr.hosts())[1:]]  # .1 is the "gateway"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[str] = []  # recent errors, for test diagnostics

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> KubeletStandIn:
        self.register_node()
        self._thread = threading.Thread(
            target=self._run, name=f"kubelet-standin-{self.node_name}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.client.close()

    def __enter__(self) -> KubeletStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as e:  # the API server may be restarting; keep going
                self._note(f"sync failed: {e!r}")
            self._stop.wait(self.interval)

    def _note(self, msg: str) -> None:
        log.debug("kubelet stand-in %s: %s", self.node_name, msg)
        self.errors = [*self.errors[-49:], msg]

    # -- node -----------------------------------------------------------------------------------------

    def register_node(self) -> None:
        """Create (or adopt) the Node and mark it Ready; the endpointslice controller needs the Node."""
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": self.labels},
            "spec": {"podCIDR": str(self.pod_cidr), "podCIDRs": [str(self.pod_cidr)]},
        }
        code, body = self.client.request("POST", "/api/v1/nodes", node)
        if code not in (201, 409):
            raise RuntimeError(f"cannot register node {self.node_name}: {code} {body}")
        now = _now()
        status = {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "istiopy kubelet stand-in (not a kubelet)",
                        "lastHeartbeatTime": now,
                        "lastTransitionTime": now,
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": self.node_ip},
                    {"type": "Hostname", "address": self.node_name},
                ],
                "capacity": {"cpu": "8", "memory": "16Gi", "pods": "250"},
                "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "250"},
                "nodeInfo": {
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                    "kernelVersion": "",
                    "osImage": "istiopy kubelet stand-in",
                    "containerRuntimeVersion": "none://0",
                    "kubeletVersion": "v1.34.3",
                    "kubeProxyVersion": "",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            }
        }
        code, body = self.client.request(
            "PATCH",
            f"/api/v1/nodes/{self.node_name}/status",
            status,
            content_type="application/merge-patch+json",
        )
        if code != 200:
            raise RuntimeError(f"cannot set node {self.node_name} status: {code} {body}")

    # -- pods -----------------------------------------------------------------------------------------

    def sync_once(self) -> None:
        """One reconcile pass over all pods; public so tests can force progress deterministically."""
        code, body = self.client.request("GET", "/api/v1/pods")
        if code != 200:
            self._note(f"list pods: {code}")
            return
        pods: list[Pod] = body.get("items", [])
        seen: set[str] = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            node = pod["spec"].get("nodeName")
            if not node:
                if (
                    self.schedule
                    and pod["spec"].get("schedulerName", "default-scheduler") == "default-scheduler"
                ):
                    self._bind(pod)
                continue
            if node != self.node_name:
                continue
            seen.add(uid)
            self._pods[uid] = pod
            if pod["metadata"].get("deletionTimestamp"):
                self._finish_delete(pod)
            elif pod.get("status", {}).get("phase") in (None, "Pending") or uid not in self._ips:
                self._run_pod(pod)
        # Pods deleted behind our back (e.g. force-deleted): run the stop hook and free their IPs.
        for uid in list(self._ips):
            if uid not in seen:
                ip = self._ips.pop(uid)
                self._call(self.on_pod_stop, self._pods.get(uid, {"metadata": {"uid": uid}}), ip)
                self._release(ip)
        for uid in list(self._pods):
            if uid not in seen:
                del self._pods[uid]

    def _bind(self, pod: Pod) -> None:
        md = pod["metadata"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": md["name"], "namespace": md["namespace"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
        }
        code, body = self.client.request(
            "POST", f"/api/v1/namespaces/{md['namespace']}/pods/{md['name']}/binding", binding
        )
        if code not in (201, 409):
            self._note(f"bind {md['namespace']}/{md['name']}: {code} {body}")

    def _allocate(self, pod: Pod) -> str:
        uid = pod["metadata"]["uid"]
        if uid in self._ips:
            return self._ips[uid]
        if pod["spec"].get("hostNetwork"):
            ip = self.node_ip
        else:
            # Adopt an IP we gave earlier (stand-in restarted), else take the next free one.
            prev = pod.get("status", {}).get("podIP")
            if prev and prev in self._free:
                self._free.remove(prev)
                ip = prev
            elif self._free:
                ip = self._free.pop(0)
            else:
                raise RuntimeError(f"pod CIDR {self.pod_cidr} exhausted")
        self._ips[uid] = ip
        return ip

    def _release(self, ip: str) -> None:
        if ip != self.node_ip and ipaddress.ip_address(ip) in self.pod_cidr and ip not in self._free:
            self._free.append(ip)

    def _run_pod(self, pod: Pod) -> None:
        md = pod["metadata"]
        ip = self._allocate(pod)
        if not self._call(self.on_pod_start, pod, ip):
            return
        now = _now()
        conds = [
            {"type": t, "status": "True", "lastProbeTime": None, "lastTransitionTime": now}
            for t in ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled")
        ]

        def statuses(key: str, state: dict[str, Any], ready: bool) -> list[dict[str, Any]]:
            return [
                {
                    "name": c["name"],
                    "image": c.get("image", ""),
                    "imageID": "",
                    "containerID": f"standin://{md['uid']}/{c['name']}",
                    "ready": ready,
                    "started": ready,
                    "restartCount": 0,
                    "state": state,
                }
                for c in pod["spec"].get(key, [])
            ]

        status = {
            "status": {
                "phase": "Running",
                "conditions": conds,
                "hostIP": self.node_ip,
                "hostIPs": [{"ip": self.node_ip}],
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": now,
                # No qosClass: the API server derives it at creation and refuses a different one (a pod
                # with resource requests is Burstable), which would leave the pod Pending forever.
                "containerStatuses": statuses("containers", {"running": {"startedAt": now}}, True),
                "initContainerStatuses": statuses(
                    "initContainers",
                    {
                        "terminated": {
                            "exitCode": 0,
                            "reason": "Completed",
                            "startedAt": now,
                            "finishedAt": now,
                        }
                    },
                    False,
                ),
            }
        }
        code, body = self.client.request(
            "PATCH",
            f"/api/v1/namespaces/{md['namespace']}/pods/{md['name']}/status",
            status,
            content_type="application/merge-patch+json",
        )
        if code != 200:
            self._note(f"status {md['namespace']}/{md['name']}: {code} {body}")

    def _finish_delete(self, pod: Pod) -> None:
        md = pod["metadata"]
        ip = self._ips.pop(md["uid"], None)
        if ip is not None:
            self._call(self.on_pod_stop, pod, ip)
            self._release(ip)
        code, body = self.client.request(
            "DELETE",
            f"/api/v1/namespaces/{md['namespace']}/pods/{md['name']}",
            {
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "gracePeriodSeconds": 0,
                "preconditions": {"uid": md["uid"]},
            },
        )
        if code not in (200, 404, 409):
            self._note(f"delete {md['namespace']}/{md['name']}: {code} {body}")

    def _call(self, hook: PodHook | None, pod: Pod, ip: str) -> bool:
        if hook is None:
            return True
        try:
            hook(pod, ip)
            return True
        except Exception as e:
            self._note(f"hook {getattr(hook, '__name__', hook)} for {pod['metadata'].get('name')}: {e!r}")
            return False

    def wait_running(self, namespace: str, selector: str, count: int, timeout: float = 60.0) -> list[Pod]:
        """Poll until ``count`` pods matching ``selector`` are Running with an IP (test convenience)."""
        deadline = time.monotonic() + timeout
        while True:
            code, body = self.client.request(
                "GET", f"/api/v1/namespaces/{namespace}/pods", query={"labelSelector": selector}
            )
            pods = [
                p
                for p in (body or {}).get("items", [])
                if p.get("status", {}).get("phase") == "Running"
                and p["status"].get("podIP")
                and not p["metadata"].get("deletionTimestamp")
            ]
            if code == 200 and len(pods) >= count:
                return pods
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(pods)}/{count} pods Running for {selector}; errors: {self.errors[-5:]}"
                )
            time.sleep(0.2)
