"""The Kubernetes side of ``istioctl-py``: a kubeconfig-driven JSON client and errors a user can act on.

Why our own small client (and not ``operator.kubeapi``): the import contract keeps the CLI off the operator,
and a CLI needs different failure handling - every problem ends as *one* line that says what to do (no
kubeconfig, cluster unreachable, not allowed, a CRD missing), never a traceback. ``kubernetes_asyncio`` still
does what is hard to get right: kubeconfig parsing (contexts, client certificates, tokens, exec plugins).

Commands are synchronous; each runs one coroutine with :func:`run` so the client is opened and closed inside
one event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "FIELD_MANAGER",
    "Kube",
    "KubeError",
    "add_kube_flags",
    "connect",
    "default_kubeconfig",
    "resource_path",
    "run",
]

JSON = dict[str, Any]
T = TypeVar("T")

FIELD_MANAGER = "istioctl"
GATEWAY_API = "gateway.networking.k8s.io"


class KubeError(Exception):
    """A problem talking to the cluster; ``str()`` is the single line shown to the user."""

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    @property
    def not_found(self) -> bool:
        return self.status == 404


def add_kube_flags(parser: argparse.ArgumentParser, *, namespace: bool = True) -> None:
    """istioctl's cluster flags: ``--kubeconfig/-c``, ``--context`` and, for namespaced commands, ``-n``."""
    parser.add_argument(
        "-c", "--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
    )
    parser.add_argument(
        "--context", default=None, help="kubeconfig context to use (default: the current one)"
    )
    if namespace:
        parser.add_argument(
            "-n", "--namespace", default=None, help="namespace (default: the context's, else default)"
        )


def default_kubeconfig(explicit: str | None = None) -> Path | None:
    """``--kubeconfig``, else the first file of ``$KUBECONFIG``, else ``~/.kube/config``; else None."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("KUBECONFIG")
    if env:
        for part in env.split(os.pathsep):
            if part and Path(part).exists():
                return Path(part)
        return Path(env.split(os.pathsep)[0]) if env.split(os.pathsep)[0] else None
    home = Path.home() / ".kube" / "config"
    return home if home.exists() else None


def _in_cluster() -> bool:
    return (
        bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        and Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
    )


def resource_path(
    group: str, version: str, plural: str, namespace: str | None = None, name: str | None = None
) -> str:
    """``/api/v1/...`` for the core group, ``/apis/<group>/<version>/...`` otherwise."""
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    if name:
        base += f"/{name}"
    return base


@dataclass
class Kube:
    """An open API client plus what the kubeconfig said (server, context namespace)."""

    api: Any  # kubernetes_asyncio.client.ApiClient
    server: str
    context_namespace: str
    timeout: float = 15.0

    def namespace(self, explicit: str | None) -> str:
        return explicit or self.context_namespace or "default"

    async def close(self) -> None:
        await self.api.close()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> JSON:
        """One call; decoded JSON body, or :class:`KubeError` with a one-line message."""
        from kubernetes_asyncio.client.exceptions import ApiException

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
                _request_timeout=self.timeout,
            )
        except ApiException as e:
            raise _api_error(e, method, path) from None
        except (OSError, TimeoutError) as e:
            raise self.unreachable(e) from None
        except Exception as e:  # aiohttp's client errors are not OSErrors
            if type(e).__module__.startswith("aiohttp"):
                raise self.unreachable(e) from None
            raise
        return result if isinstance(result, dict) else {}

    def unreachable(self, e: BaseException) -> KubeError:
        reason = str(e) or type(e).__name__
        return KubeError(
            f"cannot reach the Kubernetes API server at {self.server} ({reason}); "
            "check that the cluster is running and that your kubeconfig points at it"
        )

    async def get(self, path: str) -> JSON | None:
        try:
            return await self.request("GET", path)
        except KubeError as e:
            if e.not_found:
                return None
            raise

    async def list(self, path: str, label_selector: str = "") -> list[JSON]:
        query = {"labelSelector": label_selector} if label_selector else None
        return list((await self.request("GET", path, query=query)).get("items") or [])

    async def apply(self, path: str, body: JSON, *, force: bool = False) -> JSON:
        """Server-side apply as ``istioctl`` (so ``kubectl`` users see who owns which field)."""
        query = {"fieldManager": FIELD_MANAGER}
        if force:
            query["force"] = "true"
        return await self.request(
            "PATCH", path, body, query=query, content_type="application/apply-patch+yaml"
        )

    async def merge_patch(self, path: str, body: JSON) -> JSON:
        return await self.request(
            "PATCH",
            path,
            body,
            query={"fieldManager": FIELD_MANAGER},
            content_type="application/merge-patch+json",
        )

    async def delete(self, path: str) -> bool:
        """False when it was already gone."""
        try:
            await self.request("DELETE", path)
            return True
        except KubeError as e:
            if e.not_found:
                return False
            raise

    async def server_version(self) -> JSON:
        return await self.request("GET", "/version")

    async def crd_exists(self, name: str) -> bool:
        return (
            await self.get(
                resource_path("apiextensions.k8s.io", "v1", "customresourcedefinitions", name=name)
            )
            is not None
        )

    async def can_i(self, verb: str, group: str, resource: str, namespace: str = "") -> tuple[bool, str]:
        """SelfSubjectAccessReview: may the kubeconfig's identity do this? (allowed, reason)."""
        attrs: JSON = {"verb": verb, "group": group, "resource": resource}
        if namespace:
            attrs["namespace"] = namespace
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectAccessReview",
            "spec": {"resourceAttributes": attrs},
        }
        out = await self.request("POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)
        status = out.get("status") or {}
        return bool(status.get("allowed")), str(status.get("reason") or "")


def _api_error(e: Any, method: str, path: str) -> KubeError:
    try:
        status = json.loads(e.body) if e.body else {}
    except (TypeError, ValueError):
        status = {}
    message = str(status.get("message") or e.reason or "error") if isinstance(status, dict) else str(e.reason)
    reason = str(status.get("reason") or "") if isinstance(status, dict) else ""
    code = int(e.status or 0)
    if code == 401:
        message = f"the API server did not accept your credentials ({message}); refresh your kubeconfig"
    elif code == 403:
        message = f"not allowed: {message}; ask a cluster admin for the permission or use another context"
    elif code == 404 and not message:
        message = f"{method} {path}: not found"
    return KubeError(message, code, reason)


def _context_namespace(path: Path | None, context: str | None) -> str:
    """The namespace the kubeconfig context selects (kubectl's default for -n)."""
    if path is None:
        if _in_cluster():
            try:
                return Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
            except OSError:
                return ""
        return ""
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    name = context or cfg.get("current-context")
    for ctx in cfg.get("contexts") or []:
        if ctx.get("name") == name:
            return str((ctx.get("context") or {}).get("namespace") or "")
    return ""


async def connect(
    kubeconfig: str | None = None, context: str | None = None, request_timeout: float = 15.0
) -> Kube:
    """Load the kubeconfig like kubectl does; a missing or broken one is a :class:`KubeError`."""
    from kubernetes_asyncio import client, config
    from kubernetes_asyncio.config.config_exception import ConfigException

    path = default_kubeconfig(kubeconfig)
    cfg = client.Configuration()
    if path is None:
        if not _in_cluster():
            raise KubeError(
                "no Kubernetes configuration found: set KUBECONFIG, pass --kubeconfig "
                "or create ~/.kube/config"
            )
        config.load_incluster_config(client_configuration=cfg)
    else:
        if not path.exists():
            raise KubeError(f"kubeconfig {path} does not exist: pass --kubeconfig or fix KUBECONFIG")
        try:
            await config.load_kube_config(config_file=str(path), context=context, client_configuration=cfg)
        except ConfigException as e:
            raise KubeError(f"cannot use kubeconfig {path}: {e}") from None
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise KubeError(f"cannot read kubeconfig {path}: {e}") from None
    return Kube(client.ApiClient(cfg), cfg.host, _context_namespace(path, context), request_timeout)


def run(args: argparse.Namespace, body: Callable[[Kube], Awaitable[T]]) -> T:
    """Connect with the command's flags, run ``body(kube)``, close; raises :class:`KubeError` as is."""

    async def main() -> T:
        kube = await connect(getattr(args, "kubeconfig", None), getattr(args, "context", None))
        try:
            return await body(kube)
        finally:
            await kube.close()

    return asyncio.run(main())
