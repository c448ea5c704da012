"""Leader election over a ``coordination.k8s.io/v1`` Lease, in client-go's manner.

Why not kopf's peering: it needs its own CRDs and freezes *every* watch of a non-leader (reference anchors
1.5, item 3), while here every replica must keep watching and serving xDS/CA; only writes (status, waypoint
objects, webhook configuration) are the leader's job.

Expiry is judged by the local clock from when *this* replica last saw the Lease change, never by comparing
the holder's ``renewTime`` with our clock, so skewed clocks cannot produce two leaders. Updates carry the
resourceVersion read, so two candidates racing for an expired Lease cannot both win.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from istiopy.operator.kubeapi import ApiError, KubeApi, resource_path

__all__ = ["LeaderElector"]

log = logging.getLogger(__name__)


def _micro_time(t: float | None = None) -> str:
    return dt.datetime.fromtimestamp(t if t is not None else time.time(), dt.UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ"
    )


class LeaderElector:
    """Campaigns for ``namespace/name``; runs ``lead()`` while leading and cancels it when leadership ends."""

    def __init__(
        self,
        api: KubeApi,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration: float = 10.0,
        renew_deadline: float = 8.0,
        retry_period: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self._clock = clock
        self._observed: dict[str, Any] | None = None  # spec of the Lease as last read
        self._observed_at = 0.0
        self.is_leader = asyncio.Event()
        self.transitions = 0

    @property
    def path(self) -> str:
        return resource_path("coordination.k8s.io", "v1", "leases", self.namespace, self.name)

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Forever: acquire, lead while renewals succeed, step down, try again."""
        while True:
            await self._acquire()
            log.info(
                "leader election: %s is now the leader (lease %s/%s)",
                self.identity,
                self.namespace,
                self.name,
            )
            self.transitions += 1
            self.is_leader.set()
            task: asyncio.Task[None] = asyncio.create_task(lead(), name="leader-work")
            try:
                await self._renew_until_lost(task)
            finally:
                self.is_leader.clear()
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            log.warning("leader election: %s lost the lease %s/%s", self.identity, self.namespace, self.name)

    async def release(self) -> None:
        """Give the Lease up at shutdown so a standby takes over at once instead of after expiry."""
        try:
            lease = await self.api.get(self.path)
            if lease and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                lease["spec"]["holderIdentity"] = ""
                lease["spec"]["leaseDurationSeconds"] = 1
                await self.api.replace(self.path, lease)
        except ApiError as e:
            log.debug("lease release failed: %s", e)

    # --------------------------------------------------------------------------------------------- steps
    async def _acquire(self) -> None:
        while True:
            try:
                if await self._try_acquire_or_renew():
                    return
            except ApiError as e:
                log.debug("leader election: %s", e)
            await asyncio.sleep(self.retry_period)

    async def _renew_until_lost(self, work: asyncio.Task[None]) -> None:
        last_ok = self._clock()
        while True:
            await asyncio.sleep(self.retry_period)
            if work.done() and not work.cancelled() and work.exception() is not None:
                raise work.exception()  # type: ignore[misc]
            try:
                if await self._try_acquire_or_renew():
                    last_ok = self._clock()
                    continue
                return  # someone else holds it now
            except ApiError as e:
                log.warning("leader election: renewal failed: %s", e)
            if self._clock() - last_ok > self.renew_deadline:
                return

    async def _try_acquire_or_renew(self) -> bool:
        now = self._clock()
        lease = await self.api.get(self.path)
        spec_new = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.lease_duration)),
            "renewTime": _micro_time(),
        }
        if lease is None:
            spec_created: dict[str, Any] = {**spec_new, "acquireTime": _micro_time(), "leaseTransitions": 0}
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": spec_created,
            }
            try:
                await self.api.create(
                    resource_path("coordination.k8s.io", "v1", "leases", self.namespace), body
                )
            except ApiError as e:
                if e.conflict:
                    return False
                raise
            self._observe(spec_created, now)
            return True
        spec = dict(lease.get("spec") or {})
        if spec != self._observed:
            self._observe(spec, now)
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        if holder and holder != self.identity and self._observed_at + duration > now:
            return False  # held by someone else and not expired (by our own clock)
        new = dict(spec)
        new.update(spec_new)
        if holder != self.identity:
            new["acquireTime"] = _micro_time()
            new["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        lease["spec"] = new  # metadata.resourceVersion stays: optimistic concurrency
        try:
            await self.api.replace(self.path, lease)
        except ApiError as e:
            if e.conflict:
                return False
            raise
        self._observe(new, self._clock())
        return True

    def _observe(self, spec: dict[str, Any], at: float) -> None:
        self._observed = dict(spec)
        self._observed_at = at
