"""Kubernetes-mode root store and trust bundle publisher over in-memory implementations of their API protocols
(the Kubernetes integration supplies the real ones; these tests pin the create-once and fan-out semantics)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import pytest

from istiopy.ca.authority import CaMaterialError, load_or_create_root
from istiopy.ca.kube import ConfigMapTrustBundlePublisher, SecretRootStore
from istiopy.ca.service import CaConfig, start_authority


class MemorySecrets:
    def __init__(self) -> None:
        self.data: dict[tuple[str, str], dict[str, bytes]] = {}
        self.creates = 0

    async def read(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        await asyncio.sleep(0)
        return self.data.get((namespace, name))

    async def create(self, namespace: str, name: str, data: Mapping[str, bytes]) -> bool:
        await asyncio.sleep(0)
        self.creates += 1
        if (namespace, name) in self.data:
            return False
        self.data[(namespace, name)] = dict(data)
        return True


class MemoryConfigMaps:
    def __init__(self, broken: str = "") -> None:
        self.data: dict[tuple[str, str], dict[str, str]] = {}
        self.broken = broken

    async def apply(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        if namespace == self.broken:
            raise PermissionError("forbidden")
        self.data[(namespace, name)] = dict(data)


async def test_replicas_racing_on_first_start_share_one_root_secret() -> None:
    api = MemorySecrets()
    stores = [SecretRootStore(api, "istio-system") for _ in range(4)]
    materials = await asyncio.gather(*(load_or_create_root(s, "cluster.local") for s in stores))
    assert len({m.root.serial_number for m in materials}) == 1
    assert api.creates >= 1
    stored = api.data[("istio-system", "istio-ca-secret")]
    assert set(stored) == {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"}
    # A restart reads the Secret instead of creating.
    again = await start_authority(CaConfig(), root_store=SecretRootStore(api, "istio-system"))
    assert again.material.root == materials[0].root


async def test_corrupt_secret_is_a_clear_error() -> None:
    api = MemorySecrets()
    api.data[("istio-system", "istio-ca-secret")] = {"ca-cert.pem": b"junk", "ca-key.pem": b"junk"}
    with pytest.raises(CaMaterialError, match="Secret istio-system/istio-ca-secret is unusable"):
        await SecretRootStore(api, "istio-system").load()


async def test_configmap_published_to_every_namespace_even_if_one_fails() -> None:
    api = MemoryConfigMaps(broken="locked")
    namespaces = ["default", "istio-system", "locked", "default"]
    ca = await start_authority(CaConfig(), root_store=SecretRootStore(MemorySecrets(), "istio-system"))
    pub = ConfigMapTrustBundlePublisher(api, lambda: namespaces)
    with pytest.raises(RuntimeError, match="not published to: locked"):
        await pub.publish(ca.roots_pem)
    assert api.data == {
        ("default", "istio-ca-root-cert"): {"root-cert.pem": ca.roots_pem},
        ("istio-system", "istio-ca-root-cert"): {"root-cert.pem": ca.roots_pem},
    }
