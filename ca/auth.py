"""Who is calling the CA: pluggable authenticators turning request credentials into a :class:`Caller`.

The identity a certificate is issued for always comes from here (or from a node proxy's vetted
impersonation request), never from the CSR, so a stolen CSR or a lying client gains nothing.

Authenticators, tried in order; the first that recognises its kind of credential decides:

* :class:`ClientCertAuthenticator` - standalone mode: the TLS client certificate (already chain-verified by
  the TLS layer) must be issued by this CA and carry a SPIFFE id. A bootstrap certificate additionally
  binds the node it was issued for.
* :class:`StaticTokenAuthenticator` - standalone mode: ``authorization: Bearer <token>`` looked up in a token
  file the operator controls (re-read when it changes).
* :class:`KubeJwtAuthenticator` - Kubernetes mode: a projected ServiceAccount token validated by a
  :class:`TokenReviewer` (the Kubernetes integration supplies one calling the real TokenReview API).

An authenticator returns None when the request carries no credential of its kind, and raises
:class:`AuthenticationError` when it carries one that is invalid: a bad token must not fall through to a
weaker authenticator.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml
from cryptography import x509

from istiopy.api.identity import InvalidSpiffeId, SpiffeId, identity_of
from istiopy.ca.signer import bootstrap_node

log = logging.getLogger(__name__)

DEFAULT_AUDIENCE = "istio-ca"


class AuthenticationError(Exception):
    """Credentials were presented but are not acceptable."""


@dataclass(frozen=True)
class Caller:
    """An authenticated CA client.

    ``node`` is set when the credential itself binds a node (bootstrap certificate, token file entry);
    ``pod_name``/``pod_uid`` when it binds a pod (a projected ServiceAccount token, via TokenReview).
    """

    identity: SpiffeId
    authenticator: str
    node: str | None = None
    pod_name: str | None = None
    pod_uid: str | None = None

    @property
    def account(self) -> str:
        """``<namespace>/<service account>``, the form of the trusted node accounts list."""
        return f"{self.identity.namespace}/{self.identity.service_account}"

    def describe(self) -> str:
        extra = []
        if self.node:
            extra.append(f"node={self.node}")
        if self.pod_name:
            extra.append(f"pod={self.identity.namespace}/{self.pod_name}")
        suffix = f" ({', '.join(extra)})" if extra else ""
        return f"{self.identity} via {self.authenticator}{suffix}"


@dataclass(frozen=True)
class RequestCredentials:
    """What a request carries: lower-cased metadata, the verified TLS client certificate, the peer."""

    metadata: Mapping[str, str] = field(default_factory=dict)
    peer_cert_pem: bytes | None = None
    peer: str = ""

    @property
    def bearer_token(self) -> str | None:
        value = self.metadata.get("authorization", "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return token.strip()


class Authenticator(Protocol):
    name: str

    async def authenticate(self, creds: RequestCredentials) -> Caller | None: ...


# ------------------------------------------------------------------------------------- client certificate
class ClientCertAuthenticator:
    """Accepts TLS client certificates issued by this CA (its signing certificate) in ``trust_domain``.

    The TLS layer has verified the chain against the configured client roots; we re-check that *this*
    CA issued it and that it is current, since the serving port may trust more roots than the CA does.
    """

    name = "client-cert"

    def __init__(
        self, issuers: Sequence[x509.Certificate], trust_domain: str, clock: Callable[[], float] = time.time
    ):
        self.issuers = list(issuers)
        self.trust_domain = trust_domain
        self._clock = clock

    async def authenticate(self, creds: RequestCredentials) -> Caller | None:
        if not creds.peer_cert_pem:
            return None
        try:
            cert = x509.load_pem_x509_certificate(creds.peer_cert_pem)
        except ValueError as e:
            raise AuthenticationError(f"unreadable client certificate: {e}") from None
        if not any(_issued_by(cert, issuer) for issuer in self.issuers):
            raise AuthenticationError("client certificate was not issued by this CA")
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        if not (cert.not_valid_before_utc <= now < cert.not_valid_after_utc):
            raise AuthenticationError("client certificate is not currently valid")
        try:
            ident = identity_of(cert)
        except InvalidSpiffeId as e:
            raise AuthenticationError(f"client certificate has no usable SPIFFE id: {e}") from None
        if ident.trust_domain != self.trust_domain:
            raise AuthenticationError(f"client identity {ident} is outside trust domain {self.trust_domain}")
        return Caller(ident, self.name, node=bootstrap_node(cert))


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except Exception:
        return False


# ----------------------------------------------------------------------------------------- static tokens
@dataclass(frozen=True)
class TokenEntry:
    identity: SpiffeId
    node: str | None = None


class StaticTokenAuthenticator:
    """Bearer tokens from an operator-controlled map ``token -> identity (+ node)``.

    File format (YAML)::

        tokens:
          - token: 3f9a...            # long random secret
            identity: spiffe://cluster.local/ns/istio-system/sa/ztunnel
            node: node-a              # optional: binds the node for impersonation checks

    The file is re-read when its modification time changes, so tokens rotate without a restart. Tokens
    are compared in constant time.
    """

    name = "token"

    def __init__(
        self, tokens: Mapping[str, TokenEntry] | None = None, path: str | Path | None = None
    ) -> None:
        self._tokens: dict[str, TokenEntry] = dict(tokens or {})
        self._path = Path(path) if path is not None else None
        self._mtime: float | None = None
        if self._path is not None:
            self._reload()

    @staticmethod
    def parse(text: str) -> dict[str, TokenEntry]:
        doc = yaml.safe_load(text) or {}
        out: dict[str, TokenEntry] = {}
        for i, item in enumerate(doc.get("tokens") or []):
            try:
                token = str(item["token"])
                ident = SpiffeId.parse(str(item["identity"]))
            except (KeyError, TypeError, InvalidSpiffeId) as e:
                raise ValueError(f"token file entry {i}: {e}") from e
            if len(token) < 16:
                raise ValueError(f"token file entry {i}: token shorter than 16 characters")
            node = item.get("node")
            out[token] = TokenEntry(ident, str(node) if node else None)
        return out

    def _reload(self) -> None:
        assert self._path is not None
        try:
            mtime = self._path.stat().st_mtime
        except FileNotFoundError:
            self._tokens, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        try:
            self._tokens = self.parse(self._path.read_text())
            self._mtime = mtime
        except (OSError, ValueError, yaml.YAMLError) as e:
            log.error("token file %s unusable, keeping previous tokens: %s", self._path, e)

    async def authenticate(self, creds: RequestCredentials) -> Caller | None:
        token = creds.bearer_token
        if token is None:
            return None
        if self._path is not None:
            self._reload()
        found: TokenEntry | None = None
        for known, entry in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = entry
        if found is None:
            raise AuthenticationError("unknown bearer token")
        return Caller(found.identity, self.name, node=found.node)


# --------------------------------------------------------------------------------- Kubernetes TokenReview
@dataclass(frozen=True)
class TokenReview:
    """The parts of a ``TokenReview`` status the CA needs."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    pod_name: str | None = None  # user.extra["authentication.kubernetes.io/pod-name"]
    pod_uid: str | None = None  # user.extra["authentication.kubernetes.io/pod-uid"]
    error: str = ""


class TokenReviewer(Protocol):
    """Validates a token against the API server (``POST authentication.k8s.io/v1 TokenReview``) with
    ``spec.audiences = audiences``. Raises on transport errors; returns ``authenticated=False`` otherwise."""

    async def review(self, token: str, audiences: Sequence[str]) -> TokenReview: ...


class KubeJwtAuthenticator:
    """Kubernetes mode: a projected ServiceAccount token (audience ``istio-ca``) checked by TokenReview."""

    name = "kube-jwt"

    def __init__(
        self, reviewer: TokenReviewer, trust_domain: str, audiences: Sequence[str] = (DEFAULT_AUDIENCE,)
    ) -> None:
        self.reviewer = reviewer
        self.trust_domain = trust_domain
        self.audiences = tuple(audiences)

    async def authenticate(self, creds: RequestCredentials) -> Caller | None:
        token = creds.bearer_token
        if token is None:
            return None
        try:
            review = await self.reviewer.review(token, self.audiences)
        except Exception as e:
            raise AuthenticationError(f"TokenReview failed: {e}") from None
        if not review.authenticated:
            raise AuthenticationError(f"token rejected by TokenReview: {review.error or 'not authenticated'}")
        if review.audiences and not set(review.audiences) & set(self.audiences):
            raise AuthenticationError(
                f"token audiences {list(review.audiences)} exclude {list(self.audiences)}"
            )
        parts = review.username.split(":")
        if len(parts) != 4 or parts[:2] != ["system", "serviceaccount"]:
            raise AuthenticationError(f"token user {review.username!r} is not a service account")
        try:
            ident = SpiffeId(self.trust_domain, parts[2], parts[3])
        except InvalidSpiffeId as e:
            raise AuthenticationError(str(e)) from None
        return Caller(ident, self.name, pod_name=review.pod_name, pod_uid=review.pod_uid)


# ----------------------------------------------------------------------------------- xDS stream adapter
class StreamAuthRequest(Protocol):
    """The fields of ``istiopy.xds.server.AuthRequest`` the adapter reads (``ca`` does not import ``xds``)."""

    @property
    def peer(self) -> str: ...

    @property
    def peer_cert_pem(self) -> bytes | None: ...

    @property
    def metadata(self) -> Mapping[str, str]: ...


def stream_authenticator(
    authenticators: Sequence[Authenticator], error: Callable[[str], Exception], *, required: bool = True
) -> Callable[[StreamAuthRequest], Awaitable[str | None]]:
    """The CA's authenticators as an xDS server ``authenticate`` hook: returns the caller's SPIFFE id.

    istiod passes ``error=istiopy.xds.server.AuthenticationError`` so a refusal closes the stream with
    UNAUTHENTICATED. With ``required=False`` a stream with no credential at all gets no identity (it
    still gets config, but SDS returns no secrets for it).
    """

    async def authenticate(req: StreamAuthRequest) -> str | None:
        creds = RequestCredentials(
            {k.lower(): v for k, v in req.metadata.items()}, req.peer_cert_pem, req.peer
        )
        for auth in authenticators:
            try:
                caller = await auth.authenticate(creds)
            except AuthenticationError as e:
                log.warning("xDS stream from %s refused by %s: %s", req.peer, auth.name, e)
                raise error(f"{auth.name}: {e}") from None
            if caller is not None:
                return str(caller.identity)
        if required:
            raise error("no credential presented (client certificate or bearer token)")
        return None

    return authenticate
