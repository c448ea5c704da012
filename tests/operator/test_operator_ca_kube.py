"""The CA's Kubernetes side against the real API server: projected ServiceAccount tokens checked by
TokenReview (audience istio-ca), refused for another audience, an expired token and a deleted account; the
root kept in Secret istio-ca-secret (one root for racing replicas) and published to istio-ca-root-cert,
which is then kept there: retried when a write is refused, restored when deleted or edited."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from envoy.config.core.v3 import base_pb2
from op_helpers import eventually, new_namespace

from istiopy.api.ca_client import DEFAULT_CA_SERVER_NAME, CaClient
from istiopy.api.gen import workload_pb2 as wl
from istiopy.api.identity import SpiffeId
from istiopy.api.xds_client import DeltaXdsClient
from istiopy.ca.auth import AuthenticationError, KubeJwtAuthenticator, RequestCredentials
from istiopy.ca.kube import ConfigMapTrustBundlePublisher, SecretRootStore, TrustBundleSync
from istiopy.ca.service import CaConfig, start_authority
from istiopy.istiod.kube import KubeConfigMapApi, KubeSecretApi, KubeTokenReviewer
from istiopy.operator.kubeapi import KubeApi
from istiopy.testing.cluster import SERVICE_ACCOUNT_ISSUER, TestCluster, free_port
from istiopy.testing.kubelet import KubeletStandIn
from istiopy.xds.wds import ADDRESS_TYPE_URL

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


@pytest.fixture
async def api(k8s: TestCluster) -> AsyncIterator[KubeApi]:
    client = await KubeApi.connect(k8s.kubeconfig)
    yield client
    await client.close()


def creds(token: str) -> RequestCredentials:
    return RequestCredentials({"authorization": f"Bearer {token}"})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def expired_token(cluster: TestCluster, namespace: str, sa: str, uid: str) -> str:
    """A token the API server itself would have issued (its signing key, issuer, audience), but expired."""
    key = serialization.load_pem_private_key((cluster.pki_dir / "sa.key").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    now = int(time.time())
    claims = {
        "iss": SERVICE_ACCOUNT_ISSUER,
        "aud": ["istio-ca"],
        "sub": f"system:serviceaccount:{namespace}:{sa}",
        "iat": now - 7200,
        "nbf": now - 7200,
        "exp": now - 3600,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": sa, "uid": uid}},
    }
    header = {"alg": "RS256", "typ": "JWT"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(sig)}"


async def test_projected_token_authenticates_and_bad_ones_fail(
    k8s: TestCluster, api: KubeApi, ns: str
) -> None:
    k8s.kubectl("create", "serviceaccount", "app", "-n", ns)
    token = k8s.kubectl("create", "token", "app", "-n", ns, "--audience", "istio-ca").stdout.strip()
    auth = KubeJwtAuthenticator(KubeTokenReviewer(api), "cluster.local")

    caller = await auth.authenticate(creds(token))
    assert caller is not None
    assert str(caller.identity) == f"spiffe://cluster.local/ns/{ns}/sa/app"

    other = k8s.kubectl("create", "token", "app", "-n", ns, "--audience", "other").stdout.strip()
    with pytest.raises(AuthenticationError, match="TokenReview"):
        await auth.authenticate(creds(other))

    uid = k8s.kubectl_json("get", "serviceaccount", "app", "-n", ns)["metadata"]["uid"]
    with pytest.raises(AuthenticationError, match="TokenReview"):
        await auth.authenticate(creds(expired_token(k8s, ns, "app", uid)))

    # A deleted ServiceAccount invalidates its tokens (after the API server's short auth cache).
    k8s.kubectl("delete", "serviceaccount", "app", "-n", ns)
    deadline = time.monotonic() + 30
    while True:
        try:
            await auth.authenticate(creds(token))
        except AuthenticationError:
            break
        assert time.monotonic() < deadline, "token of a deleted ServiceAccount still accepted"
        await asyncio.sleep(0.5)


async def test_root_in_secret_shared_by_racing_replicas_and_published(
    k8s: TestCluster, api: KubeApi, ns: str
) -> None:
    cfg = CaConfig(namespace=ns)
    publisher = ConfigMapTrustBundlePublisher(KubeConfigMapApi(api), lambda: [ns])
    first, second = await asyncio.gather(
        start_authority(cfg, SecretRootStore(KubeSecretApi(api), ns), [publisher]),
        start_authority(cfg, SecretRootStore(KubeSecretApi(api), ns)),
    )
    assert first.roots_pem == second.roots_pem
    secret = k8s.kubectl_json("get", "secret", "istio-ca-secret", "-n", ns)
    assert {"ca-cert.pem", "ca-key.pem"} <= set(secret["data"])
    cm = k8s.kubectl_json("get", "configmap", "istio-ca-root-cert", "-n", ns)
    assert cm["data"]["root-cert.pem"] == first.roots_pem
    # A restart reads the same root back.
    again = await start_authority(cfg, SecretRootStore(KubeSecretApi(api), ns))
    assert again.roots_pem == first.roots_pem


async def test_trust_bundle_is_kept_retried_and_restored(k8s: TestCluster, api: KubeApi, ns: str) -> None:
    other = new_namespace(k8s)
    roots = "-----BEGIN CERTIFICATE-----\nbundle-sync-test\n-----END CERTIFICATE-----\n"
    listed = [ns]
    sync = TrustBundleSync(
        KubeConfigMapApi(api),
        lambda: list(listed),
        lambda: roots,
        resync=1.0,
        retry_initial=0.2,
        retry_max=0.5,
    )

    def bundle(namespace: str) -> str:
        return k8s.kubectl(
            "get", "configmap", "istio-ca-root-cert", "-n", namespace,
            "-o", "jsonpath={.data.root-cert\\.pem}", check=False,
        ).stdout  # fmt: skip

    async def until(cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(cond):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.2)

    # An admission policy (CEL, in the API server itself) refuses the bundle in `other`.
    policy = f"refuse-bundle-{other}"
    k8s.kubectl("apply", "-f", "-", input=json.dumps(_refuse_bundle_policy(policy, other)))

    def refused() -> bool:
        probe = k8s.kubectl(
            "create", "configmap", "istio-ca-root-cert", "-n", other, "--dry-run=server", check=False
        )
        return probe.returncode != 0 and "trust bundle refused" in probe.stderr

    await until(refused, "the admission policy to take effect")
    task = asyncio.ensure_future(sync.run())
    try:
        await until(lambda: bundle(ns) == roots, f"the bundle in {ns}")
        listed.append(other)
        sync.namespace_added(other)
        await until(lambda: sync.failures >= 2, "retries of the refused write")  # retried, not dropped
        assert bundle(other) == ""
        assert bundle(ns) == roots  # the other namespace was not held up
        k8s.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", policy)
        await until(lambda: bundle(other) == roots, f"the bundle in {other} once the policy is gone")
        # Deleted or edited copies come back with the next resync.
        k8s.kubectl("delete", "configmap", "istio-ca-root-cert", "-n", ns)
        await until(lambda: bundle(ns) == roots, "the deleted bundle restored")
        k8s.kubectl(
            "patch", "configmap", "istio-ca-root-cert", "-n", other, "--type=merge",
            "-p", json.dumps({"data": {"root-cert.pem": "tampered"}}),
        )  # fmt: skip
        await until(lambda: bundle(other) == roots, "the edited bundle put right")
        # A namespace that is no longer listed (being deleted) is left alone from then on.
        listed.remove(other)
        k8s.kubectl(
            "patch", "configmap", "istio-ca-root-cert", "-n", other, "--type=merge",
            "-p", json.dumps({"data": {"root-cert.pem": "left alone"}}),
        )  # fmt: skip
        writes = sync.writes
        await asyncio.sleep(2.5)  # more than two resync periods
        assert sync.writes >= writes + 2  # ns kept being resynced
        assert bundle(other) == "left alone"
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _refuse_bundle_policy(name: str, namespace: str) -> dict[str, object]:
    """A ValidatingAdmissionPolicy and its binding (a List) refusing istio-ca-root-cert in one namespace."""
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["configmaps"],
                    }
                ]
            },
            "validations": [
                {
                    "expression": "object.metadata.name != 'istio-ca-root-cert'",
                    "message": "trust bundle refused",
                }
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {
            "policyName": name,
            "validationActions": ["Deny"],
            "matchResources": {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}
            },
        },
    }
    return {"apiVersion": "v1", "kind": "List", "items": [policy, binding]}


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def test_istiod_kube_process_serves_ca_and_wds(
    k8s: TestCluster, k8s_kubelet: KubeletStandIn, tmp_path: Path
) -> None:
    """A real ``istiod-py kube`` (its own control-plane namespace, lease and CA Secret): a projected token
    gets a certificate over gRPC, and a delta ADS client on the same TLS port sees a kubectl-created pod."""
    istio_ns = new_namespace(k8s)
    ns = new_namespace(k8s, {"istio.io/dataplane-mode": "ambient"})
    xds_port, mon_port = free_port(), free_port()
    argv = [
        str(Path(sys.executable).parent / "istiod-py"), "kube",
        "--kubeconfig", str(k8s.kubeconfig),
        "--istio-namespace", istio_ns,
        "--identity", "ca-proc",
        "--lease-name", "istiod-py-ca-proc",
        "--webhook-port", "0",
        "--xds-port", str(xds_port),
        "--monitoring-port", str(mon_port),
        "--trusted-node-accounts", f"{istio_ns}/ztunnel",
    ]  # fmt: skip
    log = tmp_path / "istiod.log"
    # cwd away from the repo root, whose folders (xds/, api/) would shadow installed packages.
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        k8s.kubectl("create", "serviceaccount", "app", "-n", ns)
        k8s.kubectl("create", "serviceaccount", "ztunnel", "-n", istio_ns)
        roots = eventually(
            lambda: k8s.kubectl(
                "get", "configmap", "istio-ca-root-cert", "-n", ns, "-o", "jsonpath={.data.root-cert\\.pem}",
                check=False,
            ).stdout,
            what=f"istio-ca-root-cert in {ns}; log: {log}",
        )  # fmt: skip
        eventually(lambda: proc.poll() is None and _listening(xds_port), what=f"xDS port; log: {log}")
        token = k8s.kubectl("create", "token", "app", "-n", ns, "--audience", "istio-ca").stdout.strip()
        node_token = k8s.kubectl(
            "create", "token", "ztunnel", "-n", istio_ns, "--audience", "istio-ca"
        ).stdout.strip()
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "serviceAccountName": "app",
                "containers": [{"name": "web", "image": "example.invalid/web:1"}],
            },
        }
        k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod))
        (running_pod,) = k8s_kubelet.wait_running(ns, "app=web", 1)
        name = f"Kubernetes//Pod/{ns}/web"

        async def flow() -> tuple[SpiffeId, list[bytes]]:
            ca = CaClient.connect(f"127.0.0.1:{xds_port}", roots, token_source=lambda: token)
            try:
                bundle = await ca.fetch(SpiffeId("cluster.local", ns, "app"), ttl_seconds=3600)
            finally:
                await ca.close()
            client = DeltaXdsClient.connect(
                f"127.0.0.1:{xds_port}",
                base_pb2.Node(id=f"ztunnel~10.244.0.201~ztunnel-x.{istio_ns}~{istio_ns}.svc.cluster.local"),
                roots,
                server_name=DEFAULT_CA_SERVER_NAME,
                metadata=[("authorization", f"Bearer {node_token}")],
                backoff_initial=0.05,
            )
            client.subscribe(ADDRESS_TYPE_URL, lambda _u: None)
            async with client:
                try:
                    async with asyncio.timeout(30):
                        await client.wait_for(lambda c: name in c.resources(ADDRESS_TYPE_URL))
                except TimeoutError:
                    raise AssertionError(
                        f"{name} not in WDS {sorted(client.resources(ADDRESS_TYPE_URL))}: "
                        f"{client.last_stream_error}\n{log.read_text()[-3000:]}"
                    ) from None
            w = client.resources(ADDRESS_TYPE_URL)[name].unpack(wl.Address).workload
            return bundle.identity, list(w.addresses)

        identity, addresses = asyncio.run(flow())
        assert identity == SpiffeId("cluster.local", ns, "app")
        assert addresses == [ipaddress.ip_address(running_pod["status"]["podIP"]).packed]
        assert proc.poll() is None, log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for n in (ns, istio_ns):
            k8s.kubectl("delete", "namespace", n, "--wait=false", check=False)
