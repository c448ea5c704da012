"""``KubeOperator``: the Kubernetes mode as one async component of istiod's ``ControlPlane``.

Every replica runs the same thing:

* kopf, embedded in istiod's event loop (``kopf.operator``), with the watch handlers of ``sources`` feeding
  the store - every replica has the full model, so every replica serves xDS and the CA;
* the validating webhook server (every replica can be behind the ``istiod`` Service);
* a periodic resync that catches deletions a re-list would not report;
* leader election on a Lease; only the leader writes: waypoint objects, Gateway/GatewayClass status,
  Istio resource status, and the ValidatingWebhookConfiguration (with the current caBundle).

Leader work is level-triggered: any change wakes one reconcile pass over the whole model (debounced),
so a missed event or a new leader converges without per-event bookkeeping.

``kopf.operator`` installs SIGINT/SIGTERM handlers when run on the main thread, which would take shutdown
away from istiod; the runner puts back whatever handlers the loop had before kopf started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

import kopf

from istiopy.mesh.ambient import MeshSettings
from istiopy.mesh.resources.core import Service
from istiopy.mesh.resources.gateway import Gateway, GatewayClass
from istiopy.mesh.store import Change, ConfigStore
from istiopy.operator.config import OperatorConfig
from istiopy.operator.kubeapi import ApiError, KubeApi
from istiopy.operator.leader import LeaderElector
from istiopy.operator.sources import SOURCE, KubeSource, operator_settings
from istiopy.operator.status import StatusWriter
from istiopy.operator.waypoints import WaypointReconciler
from istiopy.operator.webhook import (
    CertProvider,
    WebhookServer,
    ensure_configuration,
    self_signed,
    webhook_configuration,
    webhook_enforced,
)

__all__ = ["KubeOperator"]

log = logging.getLogger(__name__)


class KubeOperator:
    """Run with ``await op.run()`` (cancel to stop); ``ready`` is set once the first listing is in."""

    def __init__(
        self,
        store: ConfigStore,
        api: KubeApi,
        config: OperatorConfig | None = None,
        *,
        serving_cert: CertProvider | None = None,
        resync_period: float = 300.0,
    ) -> None:
        self.store = store
        self.api = api
        self.config = config or OperatorConfig()
        self.settings = MeshSettings(
            trust_domain=self.config.trust_domain,
            domain_suffix=self.config.domain_suffix,
            root_namespace=self.config.namespace,
        )
        self.source = KubeSource(store, api)
        self.waypoints = WaypointReconciler(api, self.config)
        self.status = StatusWriter(api, store, self.source, self.settings, self.config.controller_name)
        self.elector = LeaderElector(
            api,
            self.config.namespace,
            self.config.lease_name,
            self.config.identity,
            lease_duration=self.config.lease_duration,
            renew_deadline=self.config.renew_deadline,
            retry_period=self.config.retry_period,
        )
        svc = f"{self.config.webhook_service}.{self.config.namespace}.svc"
        self._certs: CertProvider = serving_cert or _cached(lambda: self_signed([svc, "localhost"]))
        self.webhook = (
            WebhookServer(self._certs, self.config.webhook_address, self.config.webhook_port)
            if self.config.webhook_enabled
            else None
        )
        self.resync_period = resync_period
        self.ready = asyncio.Event()
        self.reconciles = 0
        # Hand the Lease over on a clean stop (False only to simulate a crash in tests).
        self.release_on_exit = True
        self._wake = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = None
        # failurePolicy Auto: Fail once the API server is seen consulting the webhook (then stays Fail).
        self.webhook_verified = False

    @property
    def is_leader(self) -> bool:
        return self.elector.is_leader.is_set()

    # ---------------------------------------------------------------------------------------------- run
    async def run(self) -> None:
        registry = kopf.OperatorRegistry()
        self.source.register(registry)
        kopf.on.login(registry=registry)(self._login)
        self.source.listeners.append(self._wake.set)
        self._unsubscribe = self.store.subscribe(self._on_store_change)
        settings = operator_settings(self.config.watch_server_timeout, self.config.watch_client_timeout)
        stop = asyncio.Event()
        kopf_ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        saved = _signal_handlers(loop)
        try:
            async with asyncio.TaskGroup() as group:
                if self.webhook is not None:
                    await self.webhook.start()
                    group.create_task(self.webhook.run(), name="webhook")
                group.create_task(
                    kopf.operator(
                        registry=registry,
                        settings=settings,
                        clusterwide=True,
                        standalone=True,
                        stop_flag=stop,
                        ready_flag=kopf_ready,
                    ),
                    name="kopf",
                )
                await kopf_ready.wait()
                _restore_signal_handlers(loop, saved)
                group.create_task(self._await_listing(), name="initial-listing")
                group.create_task(self.source.run_resync(self.resync_period), name="resync")
                group.create_task(self.elector.run(self._lead), name="leader-election")
        finally:
            stop.set()
            if self._unsubscribe is not None:
                self._unsubscribe()
            if self.release_on_exit:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.elector.release())

    async def _login(self, **_: Any) -> kopf.ConnectionInfo:
        return self.api.connection_info()

    def _on_store_change(self, change: Change) -> None:
        if change.source == SOURCE or change.op == "delete":
            self._wake.set()

    async def _await_listing(self) -> None:
        """Ready once every watched kind has been listed at least once (or a short grace has passed)."""
        # kopf gives no per-resource "listed" hook; a resync listing proves the API is reachable, and the
        # watch handlers have run once the event counter stops growing for a moment.
        while True:
            try:
                await self.api.request("GET", "/api/v1/namespaces", query={"limit": "1"})
                break
            except ApiError:
                await asyncio.sleep(0.5)
        last = -1
        while self.source.events != last:
            last = self.source.events
            await asyncio.sleep(0.3)
        self.ready.set()
        log.info("operator: initial listing done (%d objects in the store)", len(self.store))

    # ---------------------------------------------------------------------------------------- leadership
    async def _lead(self) -> None:
        """Leader work: reconcile now, then after every change (debounced), and every 30 s regardless."""
        self.waypoints.forget()
        await self.ready.wait()
        webhook_every = await self._ensure_webhook_configuration()
        last_webhook = asyncio.get_running_loop().time()
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
            except ApiError as e:
                log.warning("reconcile: %s (retrying)", e)
                await asyncio.sleep(1)
                self._wake.set()
            except Exception:
                log.exception("reconcile failed")
                await asyncio.sleep(1)
                self._wake.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(webhook_every):
                    await self._wake.wait()
            await asyncio.sleep(self.config.status_debounce)
            now = asyncio.get_running_loop().time()
            if now - last_webhook > webhook_every:
                webhook_every = await self._ensure_webhook_configuration()
                last_webhook = now

    async def _ensure_webhook_configuration(self) -> float:
        """Write the webhook configuration; returns when to look again (soon while Auto waits to verify)."""
        if self.webhook is None:
            return 30.0
        cfg = self.config
        policy = cfg.webhook_failure_policy
        if policy == "Auto":
            policy = "Fail" if self.webhook_verified else "Ignore"
        await self._write_webhook_configuration(policy)
        if cfg.webhook_failure_policy != "Auto" or self.webhook_verified:
            return 30.0
        try:
            self.webhook_verified = await webhook_enforced(self.api, cfg.namespace)
        except ApiError as e:
            log.warning("webhook check: %s", e)
        if not self.webhook_verified:
            return 2.0  # the API server may not have loaded the configuration yet
        log.info("webhook %s verified reachable: failurePolicy Fail from now on", cfg.webhook_name)
        await self._write_webhook_configuration("Fail")
        return 30.0

    async def _write_webhook_configuration(self, policy: str) -> None:
        assert self.webhook is not None
        cert = self.webhook.current or self._certs()
        cfg = self.config
        url = cfg.webhook_url
        body = webhook_configuration(
            cfg.webhook_name,
            cert.ca_bundle_pem,
            url=url,
            service=None if url else (cfg.namespace, cfg.webhook_service),
            failure_policy=policy,
        )
        try:
            await ensure_configuration(self.api, body)
        except ApiError as e:
            log.warning("webhook configuration %s not written: %s", cfg.webhook_name, e)

    async def reconcile(self) -> None:
        """One pass over the model: GatewayClass, waypoints and statuses."""
        self.reconciles += 1
        cfg = self.config
        if cfg.manage_gateway_class:
            gc = self.store.get_typed(GatewayClass, "", cfg.waypoint_class)
            gc_status = self.source.statuses.get(_gc_key(cfg.waypoint_class)) or {}
            await self.waypoints.ensure_gateway_class(gc, gc_status)
        for gw in self.store.list_typed(Gateway):
            if self.store.source_of(gw.key) != SOURCE or not gw.is_waypoint:
                continue
            if gw.metadata.deletion_timestamp:
                continue
            svc = self.store.get_typed(Service, gw.namespace, gw.name)
            deployment = self.source.deployments.get((gw.namespace, gw.name))
            status = self.source.statuses.get(gw.key) or {}
            try:
                await self.waypoints.reconcile(gw, svc, deployment, status)
            except ApiError as e:
                if not e.not_found:  # the namespace or Gateway is going away
                    raise
        if cfg.write_status:
            await self.status.sync()


def _gc_key(name: str) -> Any:
    from istiopy.mesh.meta import ResourceKey

    return ResourceKey("GatewayClass", "", name)


def _cached(make: Callable[[], Any]) -> Callable[[], Any]:
    value: list[Any] = []

    def get() -> Any:
        if not value:
            value.append(make())
        return value[0]

    return get


def _signal_handlers(loop: asyncio.AbstractEventLoop) -> dict[int, Any]:
    handlers = getattr(loop, "_signal_handlers", None)
    if not isinstance(handlers, dict):
        return {}
    return {sig: handlers.get(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(loop: asyncio.AbstractEventLoop, saved: dict[int, Any]) -> None:
    """Put istiod's shutdown handlers back after kopf replaced them (no-op when there were none)."""
    for sig, handle in saved.items():
        with contextlib.suppress(Exception):
            if handle is None:
                loop.remove_signal_handler(sig)  # back to Python's default (KeyboardInterrupt, exit)
            else:
                loop.add_signal_handler(sig, handle._callback, *handle._args)
