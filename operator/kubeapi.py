"""A thin JSON-over-REST layer on ``kubernetes_asyncio``'s ApiClient, plus kopf's login from the same config.

Why not the generated typed APIs: the operator reads and writes a dozen kinds, several of them CRDs, and
needs server-side apply, merge patches on ``/status`` and plain dicts it can hand to ``mesh.kinds.parse``.
One generic ``request`` over the ApiClient's authenticated HTTP session does all of that, and the ApiClient
still owns what is hard to get right: kubeconfig and in-cluster loading, TLS material and token refresh.

kopf logs in with its own HTTP client; :meth:`KubeApi.connection_info` derives its ``ConnectionInfo`` from
the same loaded configuration, so both clients always talk to the same server with the same identity.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

__all__ = ["ApiError", "KubeApi", "resource_path"]

log = logging.getLogger(__name__)

JSON = dict[str, Any]


class ApiError(Exception):
    """An HTTP error from the API server: ``status`` (0 for transport errors) and the server's message."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(f"{status} {reason}: {message}" if reason else f"{status}: {message}")
        self.status = status
        self.message = message
        self.reason = reason

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def resource_path(
    group: str,
    version: str,
    plural: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """``/api/v1/...`` for the core group, ``/apis/<group>/<version>/...`` otherwise."""
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    if name:
        base += f"/{name}"
    if subresource:
        base += f"/{subresource}"
    return base


@dataclass
class KubeApi:
    """An authenticated API client; create with :meth:`connect`, close with :meth:`close`."""

    api: client.ApiClient
    configuration: client.Configuration
    field_manager: str = "istiod-py"
    timeout: float = 15.0

    @classmethod
    async def connect(cls, kubeconfig: str | Path | None = None, *, context: str | None = None) -> KubeApi:
        """From a kubeconfig file, else ``$KUBECONFIG``, else the in-cluster service account."""
        cfg = client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG")
        if path:
            await config.load_kube_config(config_file=str(path), context=context, client_configuration=cfg)
        else:
            config.load_incluster_config(client_configuration=cfg)
        return cls(client.ApiClient(cfg), cfg)

    async def close(self) -> None:
        await self.api.close()

    # --------------------------------------------------------------------------------------- requests
    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,  # noqa: ASYNC109 - the HTTP request timeout
    ) -> JSON:
        """One call; returns the decoded JSON body, raises :class:`ApiError` for HTTP and transport errors."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            result = await self.api.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params=headers,
                body=body,
                response_types_map={200: "object", 201: "object", 202: "object"},
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
                _request_timeout=timeout or self.timeout,
            )
        except ApiException as e:
            message, reason = _status_message(e)
            raise ApiError(int(e.status or 0), message, reason) from None
        except (TimeoutError, OSError) as e:
            raise ApiError(0, f"{type(e).__name__}: {e}") from None
        except Exception as e:  # aiohttp's client errors are not OSErrors
            if type(e).__module__.startswith("aiohttp"):
                raise ApiError(0, f"{type(e).__name__}: {e}") from None
            raise
        return result if isinstance(result, dict) else {}

    async def get(self, path: str) -> JSON | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path)
        except ApiError as e:
            if e.not_found:
                return None
            raise

    async def list(self, path: str, label_selector: str = "") -> list[JSON]:
        query = {"labelSelector": label_selector} if label_selector else None
        return list((await self.request("GET", path, query=query)).get("items") or [])

    async def create(self, path: str, body: JSON) -> JSON:
        return await self.request("POST", path, body)

    async def apply(self, path: str, body: JSON, *, force: bool = True) -> JSON:
        """Server-side apply: idempotent, so a retried or concurrent reconcile never duplicates objects."""
        return await self.request(
            "PATCH",
            path,
            body,
            query={"fieldManager": self.field_manager, "force": "true" if force else "false"},
            content_type="application/apply-patch+yaml",
        )

    async def merge_patch(self, path: str, body: JSON) -> JSON:
        return await self.request("PATCH", path, body, content_type="application/merge-patch+json")

    async def replace(self, path: str, body: JSON) -> JSON:
        return await self.request("PUT", path, body)

    async def delete(self, path: str) -> bool:
        """False when it was already gone."""
        try:
            await self.request("DELETE", path)
            return True
        except ApiError as e:
            if e.not_found:
                return False
            raise

    # --------------------------------------------------------------------------------------- kopf login
    def connection_info(self) -> kopf.ConnectionInfo:
        """kopf's credentials, taken from the loaded configuration (files written by kubernetes_asyncio)."""
        cfg = self.configuration
        token = None
        auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        if auth:
            token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else auth
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert or None,
            insecure=not cfg.verify_ssl,
            token=token,
            certificate_path=cfg.cert_file or None,
            private_key_path=cfg.key_file or None,
        )


def _status_message(e: ApiException) -> tuple[str, str]:
    import json

    try:
        status = json.loads(e.body) if e.body else {}
    except (TypeError, ValueError):
        status = {}
    if isinstance(status, dict) and status.get("message"):
        return str(status["message"]), str(status.get("reason") or "")
    return str(e.reason or e.body or "error"), ""
