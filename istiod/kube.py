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

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from istiopy.ca.auth import Authenticator, KubeJwtAuthenticator, TokenReview
from istiopy.ca.kube import SecretRootStore, TrustBundleSync
from istiopy.ca.node_auth import DEFAULT_TRUSTED_NODE_ACCOUNTS
from istiopy.ca.service import CaConfig, CertificateAuthority, start_authority
from istiopy.istiod.server import ControlPlane
from istiopy.istiod.wiring import Istiod, IstiodOptions, assemble
from istiopy.mesh.indexes import install_indexes
from istiopy.mesh.resources.common import parse_duration
from istiopy.mesh.resources.core import Namespace
from istiopy.mesh.store import Change, ConfigStore
from istiopy.operator.config import OperatorConfig, WaypointTemplate
from istiopy.operator.kubeapi import ApiError, KubeApi, resource_path
from istiopy.operator.runner import KubeOperator
from istiopy.operator.webhook import CertProvider, ServingCert

__all__ = [
    "KubeConfigMapApi",
    "KubeSecretApi",
    "KubeTokenReviewer",
    "add_kube_command",
    "add_operator",
    "kube_control_plane",
]

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


# --------------------------------------------------------------------------------------------- CA wiring
def ca_serving_cert(ca: CertificateAuthority, namespace: str, service: str = "istiod") -> CertProvider:
    """The webhook's certificate from the mesh CA: the bundle is the mesh root, the same on every replica."""
    names = [f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local", "localhost"]
    issued: list[ServingCert] = []

    def provider() -> ServingCert:
        if not issued:
            bundle = ca.issue_serving(names, ["127.0.0.1"])
            issued.append(ServingCert(bundle.key_pem, "".join(bundle.chain_pem), bundle.roots_pem))
        return issued[0]

    return provider


async def start_kube_ca(
    api: KubeApi,
    store: ConfigStore,
    config: OperatorConfig,
    *,
    trusted_node_accounts: Sequence[str] = DEFAULT_TRUSTED_NODE_ACCOUNTS,
    bundle_resync: float = 300.0,
) -> tuple[CertificateAuthority, Callable[[], Coroutine[Any, Any, None]]]:
    """The CA with its root in Secret ``istio-ca-secret`` (created once, shared by replicas), and the
    component that keeps ConfigMap ``istio-ca-root-cert`` in every namespace (run it once the operator has
    listed the namespaces; it keeps up with new ones, retries failed writes and re-applies every
    ``bundle_resync`` seconds: :class:`~istiopy.ca.kube.TrustBundleSync`)."""

    def namespaces() -> list[str]:
        return [ns.name for ns in store.list_typed(Namespace)]

    ca = await start_authority(
        CaConfig(
            trust_domain=config.trust_domain,
            namespace=config.namespace,
            trusted_node_accounts=list(trusted_node_accounts),
        ),
        SecretRootStore(KubeSecretApi(api), config.namespace),
    )

    sync = TrustBundleSync(KubeConfigMapApi(api), namespaces, lambda: ca.roots_pem, resync=bundle_resync)

    async def keep_trust_bundles() -> None:
        """Run once the first listing is in; each namespace that appears gets its copy at once."""

        def on_change(change: Change) -> None:
            if change.op == "add" and change.key.kind == "Namespace":
                sync.namespace_added(change.key.name)

        unsubscribe = store.subscribe(on_change)
        try:
            await sync.run()
        finally:
            unsubscribe()

    return ca, keep_trust_bundles


# ------------------------------------------------------------------------------------------------ command
def add_kube_command(sub: Any) -> None:
    """``istiod-py kube``: Kubernetes mode (operator; xDS and CA attach to the same store).

    Flag defaults come from the environment the Helm chart sets (``charts/istiod``)."""
    p = sub.add_parser(
        "kube",
        help="run in Kubernetes mode (in-cluster or from a kubeconfig)",
        description="Watch the API server, deploy waypoints, write status, serve the validating webhook, "
        "xDS and the CA.",
    )
    env = os.environ.get
    p.add_argument("--listen-host", default="127.0.0.1", help="address xDS, CA and monitoring bind")
    p.add_argument("--xds-port", type=int, default=15012, help="TLS port: ADS and the CA (0: any free)")
    p.add_argument(
        "--plaintext-port", type=int, default=None, help="plaintext xDS, no identity (default: off)"
    )
    p.add_argument("--monitoring-port", type=int, default=15014, help="metrics and /ready (0: any free)")
    p.add_argument(
        "--max-connection-age",
        type=connection_age,
        default=env("KEEPALIVE_MAX_SERVER_CONNECTION_AGE", ""),
        help="GOAWAY an xDS/CA connection after this long (a Go duration such as 30m) so proxies spread "
        "over new replicas; empty or 0: never ($KEEPALIVE_MAX_SERVER_CONNECTION_AGE)",
    )
    p.add_argument("--trust-domain", default=env("TRUST_DOMAIN", "cluster.local"), help="($TRUST_DOMAIN)")
    p.add_argument(
        "--token-audience",
        default=env("TOKEN_AUDIENCE", "istio-ca"),
        help="audience of the CA's projected tokens ($TOKEN_AUDIENCE)",
    )
    p.add_argument(
        "--trusted-node-accounts",
        default=env("CA_TRUSTED_NODE_ACCOUNTS", ",".join(DEFAULT_TRUSTED_NODE_ACCOUNTS)),
        help="<ns>/<sa>[,...] allowed to impersonate pods of their node ($CA_TRUSTED_NODE_ACCOUNTS)",
    )
    p.add_argument(
        "--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, else in-cluster)"
    )
    p.add_argument(
        "--istio-namespace", default=env("POD_NAMESPACE", "istio-system"), help="control-plane namespace"
    )
    p.add_argument(
        "--identity", default=None, help="leader-election identity (default: $POD_NAME or host-pid)"
    )
    p.add_argument("--lease-name", default="istiod-py-leader")
    p.add_argument("--webhook-port", type=int, default=15017, help="validating webhook port (0: disabled)")
    p.add_argument("--webhook-url", default="", help="URL the API server calls (default: the istiod Service)")
    p.add_argument(
        "--webhook-name",
        default=env("VALIDATION_WEBHOOK_CONFIG_NAME", "istiod-py-validator"),
        help="ValidatingWebhookConfiguration name ($VALIDATION_WEBHOOK_CONFIG_NAME)",
    )
    p.add_argument(
        "--webhook-failure-policy",
        default="Auto",
        choices=["Auto", "Ignore", "Fail"],
        help="Auto: Ignore until the API server is seen calling the webhook, then Fail (as upstream istiod)",
    )
    p.add_argument("--hub", default=env("HUB", "docker.io/istiopy"), help="waypoint image hub ($HUB)")
    p.add_argument("--tag", default=env("TAG", "latest"), help="waypoint image tag ($TAG)")
    p.add_argument(
        "--waypoint-image", default=env("WAYPOINT_IMAGE", ""), help="full image (overrides hub/tag)"
    )
    p.add_argument(
        "--waypoint-args",
        default=env("WAYPOINT_ARGS", ""),
        help="waypoint container args, space separated ($WAYPOINT_ARGS; default none: the image's "
        "entrypoint runs the launcher)",
    )
    p.add_argument("--waypoint-cpu", default=env("WAYPOINT_CPU_REQUEST", "100m"))
    p.add_argument("--waypoint-memory", default=env("WAYPOINT_MEMORY_REQUEST", "128Mi"))
    p.add_argument("--waypoint-cpu-limit", default=env("WAYPOINT_CPU_LIMIT", ""))
    p.add_argument("--waypoint-memory-limit", default=env("WAYPOINT_MEMORY_LIMIT", ""))
    p.set_defaults(func=cmd_kube)


def connection_age(value: str) -> float | None:
    """``--max-connection-age``: seconds, or None for never (empty or zero)."""
    if not value.strip():
        return None
    try:
        seconds = parse_duration(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"KEEPALIVE_MAX_SERVER_CONNECTION_AGE / --max-connection-age: not a duration: {value!r} "
            "(e.g. 30m, 1h30m, 90s)"
        ) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"--max-connection-age must not be negative: {value!r}")
    return seconds or None


def config_from(args: argparse.Namespace) -> OperatorConfig:
    template = WaypointTemplate(
        hub=args.hub,
        tag=args.tag,
        image=args.waypoint_image,
        args=tuple(args.waypoint_args.split()),
        cpu_request=args.waypoint_cpu,
        memory_request=args.waypoint_memory,
        cpu_limit=args.waypoint_cpu_limit,
        memory_limit=args.waypoint_memory_limit,
    )
    extra = {"identity": args.identity} if args.identity else {}
    return OperatorConfig(
        namespace=args.istio_namespace,
        lease_name=args.lease_name,
        webhook_enabled=args.webhook_port != 0,
        webhook_port=args.webhook_port,
        webhook_url=args.webhook_url,
        webhook_name=args.webhook_name,
        webhook_failure_policy=args.webhook_failure_policy,
        waypoint=template,
        trust_domain=args.trust_domain,
        **extra,
    )


def attach_xds(
    plane: ControlPlane,
    ca: CertificateAuthority,
    api: KubeApi,
    config: OperatorConfig,
    args: argparse.Namespace,
) -> Istiod:
    """The standalone xDS/CA wiring over the operator's store: TLS port asks for no client certificate
    (ztunnel and waypoints present projected tokens, checked by TokenReview; certificates still work)."""
    ns = config.namespace
    service = os.environ.get("ISTIOD_SERVICE", "istiod")
    options = IstiodOptions(
        config_dirs=(),
        namespace=ns,
        system_namespace=ns,
        host=args.listen_host,
        tls_port=args.xds_port,
        plaintext_port=args.plaintext_port,
        monitoring_port=args.monitoring_port,
        trust_domain=config.trust_domain,
        allow_tokens=True,
        max_connection_age=args.max_connection_age,
        serving_names=(
            f"{service}.{ns}.svc",
            f"{service}.{ns}.svc.cluster.local",
            *(("istiod.istio-system.svc",) if (service, ns) != ("istiod", "istio-system") else ()),
        ),
    )
    authenticators: list[Authenticator] = [
        ca.client_cert_authenticator(),
        KubeJwtAuthenticator(KubeTokenReviewer(api), config.trust_domain, (args.token_audience,)),
    ]
    return assemble(plane, ca, authenticators, options)


def cmd_kube(args: argparse.Namespace) -> int:
    config = config_from(args)
    if ca_address := os.environ.get("CA_ADDRESS", "").strip():
        # Upstream istiod then leaves signing to an external CA; istiod-py always signs itself.
        log.warning("CA_ADDRESS=%s is not supported and ignored: istiod-py runs its own CA", ca_address)

    async def main() -> None:
        store = ConfigStore()
        install_indexes(store)
        plane = ControlPlane(store=store, domain=config.domain_suffix)
        api = await KubeApi.connect(args.kubeconfig)
        accounts = [a for a in args.trusted_node_accounts.split(",") if a.strip()]
        ca, publish = await start_kube_ca(api, store, config, trusted_node_accounts=accounts)
        op = add_operator(plane, api, config, serving_cert=ca_serving_cert(ca, config.namespace))
        istiod = attach_xds(plane, ca, api, config, args)

        async def trust_bundles() -> None:
            await op.ready.wait()
            await publish()

        plane.add("ca-trust-bundles", trust_bundles)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await istiod.run()
        finally:
            await api.close()

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(main())
    log.info("control plane stopped")
    return 0
