"""The CA's Kubernetes side against the real API server: projected ServiceAccount tokens checked by
TokenReview (audience istio-ca), refused for another audience, an expired token and a deleted account; the
root kept in Secret istio-ca-secret (one root for racing replicas) and published to istio-ca-root-cert."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from istiopy.ca.auth import AuthenticationError, KubeJwtAuthenticator, RequestCredentials
from istiopy.ca.kube import ConfigMapTrustBundlePublisher, SecretRootStore
from istiopy.ca.service import CaConfig, start_authority
from istiopy.istiod.kube import KubeConfigMapApi, KubeSecretApi, KubeTokenReviewer
from istiopy.operator.kubeapi import KubeApi
from istiopy.testing.cluster import SERVICE_ACCOUNT_ISSUER, TestCluster

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
