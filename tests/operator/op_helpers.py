"""Helpers of the operator tests: CRD install, namespaces, polling, and an operator run in the test's loop.

Each operator gets unique Lease and webhook configuration names and a free webhook port, so several can run
against one API server (failover tests) and tests cannot see each other's leaders.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from istiopy.mesh.indexes import install_indexes
from istiopy.mesh.store import ConfigStore
from istiopy.operator.config import OperatorConfig, WaypointTemplate
from istiopy.operator.kubeapi import KubeApi
from istiopy.operator.runner import KubeOperator
from istiopy.testing.cluster import TestCluster, free_port

CRDS = Path(__file__).resolve().parents[2] / "crds"
DATA = Path(__file__).resolve().parents[1] / "data"
T = TypeVar("T")


def install_crds(cluster: TestCluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
    for _ in range(60):  # `wait` errors out on a CRD whose status the server has not written yet
        if (
            cluster.kubectl(
                "wait", "--for=condition=Established", "crd", "--all", "--timeout=60s", check=False
            ).returncode
            == 0
        ):
            return
        time.sleep(0.5)
    raise AssertionError("CRDs not established")


def new_namespace(cluster: TestCluster, labels: dict[str, str] | None = None) -> str:
    ns = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", ns)
    if labels:
        cluster.kubectl("label", "namespace", ns, *(f"{k}={v}" for k, v in labels.items()))
    return ns


def eventually(fn: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll until fn returns something truthy (controllers are asynchronous by design)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = fn()
            if result:
                return result
            last = result
        except AssertionError as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        time.sleep(0.1)


def operator_config(**overrides: Any) -> OperatorConfig:
    """Unique names per operator; the webhook is reached on 127.0.0.1 (no Service routing in tests)."""
    port = free_port()
    tag = uuid.uuid4().hex[:6]
    cfg = OperatorConfig(
        namespace="istio-system",
        identity=f"test-{tag}",
        lease_name=f"istiod-py-test-{tag}",
        lease_duration=4.0,
        renew_deadline=3.0,
        retry_period=0.5,
        webhook_address="127.0.0.1",
        webhook_port=port,
        webhook_name=f"istiod-py-test-{tag}",
        webhook_url=f"https://127.0.0.1:{port}/validate",
        # Pinned: each test operator's webhook has a loopback URL of its own (no Service to fail over to),
        # so a Fail policy left behind by a stopped one would refuse other tests' applies. Auto is tested
        # on its own (test_operator_k8s.py).
        webhook_failure_policy="Ignore",
        watch_server_timeout=30,
        watch_client_timeout=40,
        waypoint=WaypointTemplate(hub="example.invalid/istiopy", tag="test"),
    )
    return replace(cfg, **overrides)


class RunningOperator:
    """An operator on its own thread and event loop, as istiod would run it, while the test thread drives
    kubectl synchronously (the API server calls the operator's webhook during an apply, so the two must not
    share a loop). ``extra`` coroutines run in the operator's loop (e.g. an xDS server over its store)."""

    def __init__(
        self,
        cluster: TestCluster,
        config: OperatorConfig | None = None,
        extra: Callable[[ConfigStore], Awaitable[None]] | None = None,
    ) -> None:
        self.cluster = cluster
        self.config = config or operator_config()
        self.store = ConfigStore()
        install_indexes(self.store)
        self.extra = extra
        self.op: KubeOperator | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self.error: BaseException | None = None

    def start(self, timeout: float = 60.0) -> RunningOperator:
        self._thread = threading.Thread(target=self._run, name="operator", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise AssertionError("operator did not start")
        if self.error is not None:
            raise self.error
        eventually(
            lambda: (self.op is not None and self.op.ready.is_set()) or self.error, timeout, "initial listing"
        )
        if self.error is not None:
            raise self.error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:
            self.error = e
        finally:
            self._started.set()
            loop.close()

    async def _main(self) -> None:
        api = await KubeApi.connect(self.cluster.kubeconfig)
        try:
            self.op = KubeOperator(self.store, api, self.config, resync_period=5.0)
            self._task = asyncio.current_task()
            self._started.set()
            async with asyncio.TaskGroup() as group:
                group.create_task(self.op.run())
                if self.extra is not None:
                    group.create_task(self.extra(self.store))
        finally:
            await api.close()

    def call(self, coro: Awaitable[T]) -> T:
        """Run a coroutine in the operator's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)  # type: ignore[arg-type]

    @property
    def is_leader(self) -> bool:
        return self.op is not None and self.op.is_leader

    def crash(self) -> None:
        """Stop without handing the Lease over, as a killed process would."""
        if self.op is not None:
            self.op.release_on_exit = False
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            # kopf's stream stopper may cancel "the current task" while shutting down; cancel until done.
            for _ in range(100):
                if self._thread is None or not self._thread.is_alive():
                    break
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._task.cancel)
                self._thread.join(0.3)
        cfg = self.config
        if cfg.webhook_enabled:
            self.cluster.kubectl(
                "delete",
                "validatingwebhookconfiguration",
                cfg.webhook_name,
                "--ignore-not-found",
                check=False,
            )
        self.cluster.kubectl(
            "delete", "lease", cfg.lease_name, "-n", cfg.namespace, "--ignore-not-found", check=False
        )

    def __enter__(self) -> RunningOperator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
