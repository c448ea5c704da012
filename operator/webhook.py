"""The validating admission webhook: ``kubectl apply`` of an invalid Istio resource is refused up front.

The check is ``mesh.kinds.parse`` itself, so the API server refuses exactly what the store would refuse, with
the same message naming every bad field. Served over TLS on 15017 by every replica (any of them may be
behind the Service); the ``ValidatingWebhookConfiguration`` and its ``caBundle`` are kept by the leader.

Serving certificate: istiod injects a provider backed by the mesh CA (the bundle then is the mesh root,
the same on every replica). Without one, the webhook makes a self-signed certificate - fine for a single
replica, since the leader publishes its own certificate as the caBundle.

``failurePolicy``: ``Auto`` (the default) does what upstream istiod does: the configuration starts with
``Ignore``, so a control plane that is not up yet does not block every ``kubectl apply`` of Istio resources,
and turns to ``Fail`` once a dry-run of a known-invalid document came back refused by this webhook (the API
server can reach it), so from then on nothing skips validation. ``Ignore`` and ``Fail`` pin the policy.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import ssl
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from istiopy.mesh.errors import InvalidResource, UnknownKind
from istiopy.mesh.kinds import parse
from istiopy.operator.kubeapi import ApiError, KubeApi, resource_path

__all__ = ["ServingCert", "WebhookServer", "review", "self_signed", "webhook_configuration"]

log = logging.getLogger(__name__)

VALIDATE_PATH = "/validate"
# Groups and resources validated; Gateway API kinds are validated by their CRD schemas and ours alike.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("networking.istio.io", ("virtualservices", "destinationrules", "serviceentries", "workloadentries")),
    ("security.istio.io", ("authorizationpolicies", "peerauthentications", "requestauthentications")),
)


@dataclass(frozen=True)
class ServingCert:
    """PEM key, certificate chain (leaf first) and the CA bundle the API server verifies it with."""

    key_pem: str
    chain_pem: str
    ca_bundle_pem: str


CertProvider = Callable[[], ServingCert]


def self_signed(
    dns_names: Sequence[str], ips: Sequence[str] = ("127.0.0.1",), days: int = 365
) -> ServingCert:
    """A self-signed serving certificate (its own CA bundle)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0] if dns_names else "istiod-webhook")]
    )
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    return ServingCert(key_pem, pem, pem)


def review(request: dict[str, Any]) -> dict[str, Any]:
    """The AdmissionReview response for one request: allowed, or refused with parse's message."""
    uid = request.get("uid", "")
    obj = request.get("object")
    if request.get("operation") not in ("CREATE", "UPDATE") or not isinstance(obj, dict):
        return {"uid": uid, "allowed": True}
    try:
        parse(obj, default_namespace=str(request.get("namespace") or ""))
    except InvalidResource as e:
        details = "; ".join(str(x) for x in e.errors)
        return {
            "uid": uid,
            "allowed": False,
            "status": {"code": 400, "reason": "Invalid", "message": f"configuration is invalid: {details}"},
        }
    except UnknownKind:
        pass
    except Exception as e:  # the model must never turn a bug into a blocked apply
        log.exception("webhook: validating %s failed", obj.get("kind"))
        return {"uid": uid, "allowed": True, "warnings": [f"istiod-py could not validate: {e}"]}
    return {"uid": uid, "allowed": True}


def webhook_configuration(
    name: str,
    ca_bundle_pem: str,
    *,
    url: str = "",
    service: tuple[str, str] | None = None,
    port: int = 443,
    failure_policy: str = "Ignore",
) -> dict[str, Any]:
    """The ValidatingWebhookConfiguration pointing at us by URL (tests) or by Service (in a cluster)."""
    import base64

    client_config: dict[str, Any] = {"caBundle": base64.b64encode(ca_bundle_pem.encode()).decode()}
    if url:
        client_config["url"] = url
    else:
        assert service is not None
        client_config["service"] = {
            "namespace": service[0],
            "name": service[1],
            "path": VALIDATE_PATH,
            "port": port,
        }
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app": "istiod", "istio.io/owned-by": "istiod-py"}},
        "webhooks": [
            {
                "name": "validation.istio.io",
                "clientConfig": client_config,
                "rules": [
                    {
                        "apiGroups": [group],
                        "apiVersions": ["*"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": list(resources),
                        "scope": "*",
                    }
                    for group, resources in RULES
                ],
                "failurePolicy": failure_policy,
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 10,
            }
        ],
    }


class WebhookServer:
    """Serves ``/validate`` (and ``/ready``) over TLS; ``port`` 0 picks a free port (see ``bound_port``)."""

    def __init__(self, certs: CertProvider, address: str = "0.0.0.0", port: int = 15017) -> None:
        self.certs = certs
        self.address = address
        self.port = port
        self.bound_port = 0
        self.reviews = 0
        self.current: ServingCert | None = None
        self._runner: web.AppRunner | None = None
        self._ssl: ssl.SSLContext | None = None

    def _load(self) -> ssl.SSLContext:
        cert = self.certs()
        ctx = self._ssl or ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory(prefix="istiod-webhook-") as d:
            (Path(d) / "tls.crt").write_text(cert.chain_pem)
            (Path(d) / "tls.key").write_text(cert.key_pem)
            ctx.load_cert_chain(str(Path(d) / "tls.crt"), str(Path(d) / "tls.key"))
        self.current = cert
        return ctx

    async def _validate(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            req = body["request"]
        except (ValueError, KeyError, TypeError):
            return web.Response(status=400, text="expected an AdmissionReview")
        self.reviews += 1
        response = review(req)
        if not response["allowed"]:
            log.info(
                "webhook: refused %s %s/%s: %s",
                req.get("kind", {}).get("kind"),
                req.get("namespace"),
                req.get("name"),
                response["status"]["message"],
            )
        out = {
            "apiVersion": body.get("apiVersion", "admission.k8s.io/v1"),
            "kind": "AdmissionReview",
            "response": response,
        }
        return web.Response(text=json.dumps(out), content_type="application/json")

    async def _ready(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def start(self) -> int:
        app = web.Application()
        app.router.add_post(VALIDATE_PATH, self._validate)
        app.router.add_get("/ready", self._ready)
        # The API server keeps connections alive: do not wait for it to close them on shutdown.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        self._ssl = self._load()
        site = web.TCPSite(self._runner, self.address, self.port, ssl_context=self._ssl)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.bound_port = int(sockets[0].getsockname()[1]) if sockets else self.port
        log.info("webhook: serving %s on %s:%d", VALIDATE_PATH, self.address, self.bound_port)
        return self.bound_port

    def refresh(self) -> None:
        """Pick up a rotated certificate: new handshakes use it."""
        self._load()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def run(self, refresh_every: float = 3600.0) -> None:
        if self._runner is None:
            await self.start()
        try:
            while True:
                await asyncio.sleep(refresh_every)
                self.refresh()
        finally:
            await self.stop()


PROBE_NAME = "istiod-py-webhook-probe"


def probe_document(namespace: str) -> dict[str, Any]:
    """An AuthorizationPolicy the CRD schema accepts and the webhook refuses (selector and targetRefs both
    set): its dry-run tells whether the API server really consults the webhook."""
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": PROBE_NAME, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"istio.io/webhook-probe": "true"}},
            "targetRefs": [{"kind": "Service", "group": "", "name": PROBE_NAME}],
        },
    }


async def webhook_enforced(api: KubeApi, namespace: str) -> bool:
    """Dry-run create of :func:`probe_document`: True only when the webhook itself refused it."""
    path = resource_path("security.istio.io", "v1", "authorizationpolicies", namespace)
    try:
        await api.request("POST", path, probe_document(namespace), query={"dryRun": "All"})
    except ApiError as e:
        return "validation.istio.io" in e.message and "denied" in e.message
    return False  # accepted: with failurePolicy Ignore the webhook was skipped or unreachable


async def ensure_configuration(api: KubeApi, config: dict[str, Any]) -> None:
    """Server-side apply of the webhook configuration (idempotent; keeps caBundle current)."""
    path = resource_path(
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
        None,
        config["metadata"]["name"],
    )
    await api.apply(path, config)
