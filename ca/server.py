"""The ``istio.v1.auth.IstioCertificateService`` servicer and a standalone server for it.

:class:`CaServicer` mounts on any ``grpc.aio`` server (istiod hosts it next to ADS on 15012); :func:`serve`
starts a TLS server of its own (tests, and a CA-only deployment).

Per request: size check -> authenticate the caller -> pick the identity (the caller's own, or an
``ImpersonatedIdentity`` vetted by :class:`NodeAuthorizer`) -> vet and sign the CSR. Every outcome is
logged with who asked, for which identity and why it was refused, and counted:

* ``citadel_server_csr_count`` - every request received;
* ``citadel_server_success_cert_issuance_count`` - certificates issued;
* ``citadel_server_refusal_count{reason=...}`` - refusals by stable reason label;
* ``citadel_server_authentication_failure_count`` and ``citadel_server_csr_parsing_err_count`` as upstream.

(prometheus_client exposes counters with a ``_total`` suffix.)

Status codes: authentication and impersonation failures are UNAUTHENTICATED (as istiod); a bad CSR or
lifetime is INVALID_ARGUMENT; an oversized request is RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Counter

from istiopy.api.gen import ca_pb2, ca_pb2_grpc
from istiopy.api.identity import SpiffeId
from istiopy.ca.auth import AuthenticationError, Authenticator, Caller, RequestCredentials
from istiopy.ca.node_auth import ImpersonationDenied, NodeAuthorizer
from istiopy.ca.signer import Signer, SigningError

log = logging.getLogger("istiopy.ca.server")

IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
MAX_REQUEST_BYTES = 64 * 1024


class CaMetrics:
    """The CA's counters, registered on the caller's registry (istiod's /metrics, or a test's own)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.csr = Counter("citadel_server_csr_count", "CSRs received by the CA", registry=registry)
        self.issued = Counter(
            "citadel_server_success_cert_issuance_count", "Certificates issued by the CA", registry=registry
        )
        self.refused = Counter(
            "citadel_server_refusal_count", "CSRs refused by the CA, by reason", ["reason"], registry=registry
        )
        self.auth_failure = Counter(
            "citadel_server_authentication_failure_count",
            "CSRs whose caller failed authentication",
            registry=registry,
        )
        self.parse_error = Counter(
            "citadel_server_csr_parsing_err_count", "CSRs that could not be parsed", registry=registry
        )


@dataclass(frozen=True)
class Refusal(Exception):
    code: grpc.StatusCode
    reason: str
    message: str


class CaServicer(ca_pb2_grpc.IstioCertificateServiceServicer):  # type: ignore[misc]
    """Issues workload certificates to authenticated callers."""

    def __init__(
        self,
        signer: Signer,
        authenticators: Sequence[Authenticator],
        node_authorizer: NodeAuthorizer | None,
        registry: CollectorRegistry | None = None,
        *,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.signer = signer
        self.authenticators = list(authenticators)
        self.node_authorizer = node_authorizer
        self.metrics = CaMetrics(registry if registry is not None else CollectorRegistry())
        self.max_request_bytes = max_request_bytes

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(self, server)

    # ------------------------------------------------------------------------------------------ request
    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> ca_pb2.IstioCertificateResponse:
        self.metrics.csr.inc()
        creds = credentials_of(context)
        caller: Caller | None = None
        wanted = ""
        try:
            size = request.ByteSize()
            if size > self.max_request_bytes:
                raise Refusal(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "request-too-large",
                    f"request is {size} bytes, the limit is {self.max_request_bytes}",
                )
            meta = json_format.MessageToDict(request.metadata) if request.HasField("metadata") else {}
            impersonated = meta.get(IMPERSONATED_IDENTITY)
            wanted = str(impersonated) if impersonated is not None else ""
            caller = await self._authenticate(creds)
            identity = self._identity_for(caller, impersonated)
            wanted = str(identity)
            try:
                chain = self.signer.sign_csr(request.csr, identity, request.validity_duration)
            except SigningError as e:
                if e.reason == "csr-parse":
                    self.metrics.parse_error.inc()
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, e.reason, e.message) from None
        except Refusal as r:
            self.metrics.refused.labels(r.reason).inc()
            who = caller.describe() if caller else f"unauthenticated peer {creds.peer or '?'}"
            log.warning(
                "CSR refused: caller=%s identity=%s reason=%s: %s",
                who,
                wanted or "(caller's)",
                r.reason,
                r.message,
            )
            await context.abort(r.code, r.message)
            raise AssertionError("unreachable") from None
        self.metrics.issued.inc()
        assert caller is not None
        log.info(
            "certificate issued: caller=%s identity=%s ttl=%ss%s",
            caller.describe(),
            identity,
            request.validity_duration,
            " (impersonated)" if impersonated is not None else "",
        )
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)

    async def _authenticate(self, creds: RequestCredentials) -> Caller:
        errors: list[str] = []
        for auth in self.authenticators:
            try:
                caller = await auth.authenticate(creds)
            except AuthenticationError as e:
                errors.append(f"{auth.name}: {e}")
                break  # a bad credential never falls through to a weaker authenticator
            if caller is not None:
                return caller
        self.metrics.auth_failure.inc()
        detail = "; ".join(errors) or "no credential presented (client certificate or bearer token)"
        raise Refusal(
            grpc.StatusCode.UNAUTHENTICATED, "authentication-failed", f"authentication failed: {detail}"
        )

    def _identity_for(self, caller: Caller, impersonated: object) -> SpiffeId:
        if impersonated is None:
            return caller.identity
        if not isinstance(impersonated, str):
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "impersonation-malformed",
                "request impersonation authentication failure: ImpersonatedIdentity must be a string",
            )
        if self.node_authorizer is None:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "impersonation-disabled",
                "request impersonation authentication failure: this CA has no node authorizer",
            )
        try:
            return self.node_authorizer.authorize(caller, impersonated)
        except ImpersonationDenied as e:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                e.reason,
                f"request impersonation authentication failure: {e.message}",
            ) from None


def credentials_of(context: grpc.aio.ServicerContext[object, object]) -> RequestCredentials:
    """Metadata (lower-cased keys), the TLS-verified client certificate and the peer address."""
    md: dict[str, str] = {}
    for item in context.invocation_metadata() or ():
        key, value = item[0], item[1]
        if isinstance(value, bytes):
            continue  # binary (-bin) headers carry nothing we read
        md[key.lower()] = value
    cert: bytes | None = None
    auth = context.auth_context() or {}
    certs = list(auth.get("x509_pem_cert") or [])
    if certs:
        cert = certs[0]
    return RequestCredentials(md, cert, context.peer() or "")


async def serve(
    servicer: CaServicer,
    serving_chain_pem: str,
    serving_key_pem: str,
    client_roots_pem: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    require_client_cert: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Start a TLS gRPC server hosting only the CA; returns it (caller stops it) and the bound port.

    gRPC's Python API can either require a verified client certificate or not ask for one, nothing in
    between: with ``require_client_cert=False`` only bearer tokens can authenticate.
    """
    server = grpc.aio.server()
    servicer.add_to_server(server)
    creds = grpc.ssl_server_credentials(
        [(serving_key_pem.encode(), serving_chain_pem.encode())],
        root_certificates=client_roots_pem.encode(),
        require_client_auth=require_client_cert,
    )
    bound = server.add_secure_port(f"{host}:{port}", creds)
    await server.start()
    return server, bound
