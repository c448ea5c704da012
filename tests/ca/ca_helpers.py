"""Shared pieces of the CA tests (module name unique across the suite: tests import it by name)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from istiopy.api.ca_client import CaClient
from istiopy.api.identity import SpiffeId
from istiopy.api.tls import CertBundle
from istiopy.ca.service import CertificateAuthority
from istiopy.mesh.resources import Pod
from istiopy.mesh.store import ConfigStore

TD = "cluster.local"
ZTUNNEL = SpiffeId(TD, "istio-system", "ztunnel")
APP = SpiffeId(TD, "default", "app")
OTHER = SpiffeId(TD, "default", "other")


def pod(name: str, ns: str, sa: str, node: str, phase: str = "Running", uid: str = "") -> Pod:
    return Pod.model_validate(
        {
            "metadata": {"name": name, "namespace": ns, "uid": uid or f"uid-{name}"},
            "spec": {"nodeName": node, "serviceAccountName": sa},
            "status": {"phase": phase, "podIP": "10.0.0.1"},
        }
    )


def make_store() -> ConfigStore:
    """Two nodes: node-a runs ztunnel + app; node-b runs ztunnel + other."""
    s = ConfigStore()
    for p in (
        pod("ztunnel-a", "istio-system", "ztunnel", "node-a"),
        pod("ztunnel-b", "istio-system", "ztunnel", "node-b"),
        pod("app-1", "default", "app", "node-a"),
        pod("other-1", "default", "other", "node-b"),
        pod("done-1", "default", "finished", "node-a", phase="Succeeded"),
    ):
        s.apply(p)
    return s


@dataclass
class CaHarness:
    """A running CA server plus helpers to build clients with each kind of credential."""

    ca: CertificateAuthority
    registry: CollectorRegistry
    port: int
    tokens: dict[str, SpiffeId]
    clients: list[CaClient] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client_with_cert(self, bundle: CertBundle) -> CaClient:
        chain_and_key = (bundle.served_chain_pem, bundle.key_pem)
        c = CaClient.connect(self.address, self.ca.roots_pem, client_cert=chain_and_key)
        self.clients.append(c)
        return c

    def bootstrap_client(self, identity: SpiffeId, node: str) -> CaClient:
        return self.client_with_cert(self.ca.issue_bootstrap(identity, node))

    def issued(self) -> float:
        return self.registry.get_sample_value("citadel_server_success_cert_issuance_count_total") or 0.0

    def refused(self, reason: str) -> float:
        return self.registry.get_sample_value("citadel_server_refusal_count_total", {"reason": reason}) or 0.0
