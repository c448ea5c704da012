"""Kubernetes mode wiring: the operator as a ControlPlane component, and the CA's Kubernetes I/O.

The CA (``istiopy.ca``) defines small protocols for what it needs from the API server - ``TokenReviewer``
(``ca.auth``), ``SecretApi`` and ``ConfigMapApi`` (``ca.kube``) - and the operator owns the API client.
istiod is the one layer allowed to import both, so the adapters live here:

* :class:`KubeTokenReviewer` - ``POST authentication.k8s.io/v1 TokenReview`` with ``spec.audiences``;
* :class:`KubeSecretApi` - read/create the root Secret ``istio-ca-secret`` (409 -> another replica won);
* :class:`KubeConfigMapApi` - server-side apply of ``istio-ca-root-cert`` in each namespace.

:func:`add_operator` attaches the operator to a ``ControlPlane`` (its store becomes the Kubernetes view), so
``istiod-py kube`` runs operator, xDS and CA in one process: the xDS/CA wiring reads the same store.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from istiopy.ca.auth import TokenReview
from istiopy.istiod.server import ControlPlane
from istiopy.mesh.indexes import install_indexes
from istiopy.mesh.store import ConfigStore
from istiopy.operator.config import OperatorConfig
from istiopy.operator.kubeapi import ApiError, KubeApi, resource_path
from istiopy.operator.runner import KubeOperator
from istiopy.operator.webhook import CertProvider

__all__ = ["KubeConfigMapApi", "KubeSecretApi", "KubeTokenReviewer", "add_operator", "kube_control_plane"]

log = logging.getLogger(__name__)

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"


class KubeTokenReviewer:
    """The CA's ``TokenReviewer`` over the real TokenReview API (audience-checked by the API server)."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReview:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        result = await self.api.create(resource_path("authentication.k8s.io", "v1", "tokenreviews"), body)
        status = result.get("status") or {}
        user = status.get("user") or {}
        extra = user.get("extra") or {}

        def first(key: str) -> str | None:
            values = extra.get(key) or []
            return str(values[0]) if values else None

        return TokenReview(
            authenticated=bool(status.get("authenticated")),
            username=str(user.get("username") or ""),
            audiences=tuple(status.get("audiences") or ()),
            pod_name=first(POD_NAME_EXTRA),
            pod_uid=first(POD_UID_EXTRA),
            error=str(status.get("error") or ""),
        )


class KubeSecretApi:
    """``ca.kube.SecretApi``: the root Secret, data decoded/encoded as base64."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api

    async def read(self, namespace: str, name: str) -> Mapping[str, bytes] | None:
        secret = await self.api.get(resource_path("", "v1", "secrets", namespace, name))
        if secret is None:
            return None
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    async def create(self, namespace: str, name: str, data: Mapping[str, bytes]) -> bool:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "istio.io/ca-root",
            "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }
        try:
            await self.api.create(resource_path("", "v1", "secrets", namespace), body)
            return True
        except ApiError as e:
            if e.conflict:
                return False
            raise


class KubeConfigMapApi:
    """``ca.kube.ConfigMapApi``: server-side apply, so the data is exactly ours and retries are harmless."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api

    async def apply(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": {"istio.io/config": "true"}},
            "data": dict(data),
        }
        await self.api.apply(resource_path("", "v1", "configmaps", namespace, name), body)


def add_operator(
    plane: ControlPlane,
    api: KubeApi,
    config: OperatorConfig,
    *,
    serving_cert: CertProvider | None = None,
) -> KubeOperator:
    """Attach the operator to ``plane`` (component ``kube-operator``) and return it."""
    op = KubeOperator(plane.store, api, config, serving_cert=serving_cert)
    plane.add("kube-operator", op.run)
    return op


async def kube_control_plane(
    kubeconfig: str | Path | None, config: OperatorConfig, *, serving_cert: CertProvider | None = None
) -> tuple[ControlPlane, KubeOperator, KubeApi]:
    """A control plane fed by the API server (kubeconfig, ``$KUBECONFIG`` or in-cluster)."""
    store = ConfigStore()
    install_indexes(store)
    plane = ControlPlane(store=store, domain=config.domain_suffix)
    api = await KubeApi.connect(kubeconfig)
    op = add_operator(plane, api, config, serving_cert=serving_cert)
    return plane, op, api
