"""Resilience at the waypoint with real misbehaving backends: retries, timeouts, fault injection, outlier
detection, circuit breaking, load balancers, mirroring."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from wp_helpers import istio, service
from wp_mesh import WaypointMesh, eventually

pytestmark = [pytest.mark.envoy, pytest.mark.asyncio(loop_scope="module")]


def vs(name: str, http: list[dict[str, Any]]) -> Any:
    return istio("VirtualService", name, {"hosts": [name], "http": http})


def dr(name: str, policy: dict[str, Any]) -> Any:
    return istio("DestinationRule", name, {"host": name, "trafficPolicy": policy})


async def svc(wmesh: WaypointMesh, name: str, n: int, pods: int = 1) -> str:
    for i in range(1, pods + 1):
        await wmesh.add_pod(f"{name}-{i}", name)
    await wmesh.apply(service(name, wmesh.vip(n)))
    return f"{wmesh.vip(n)}:80"


async def test_retries_turn_flaky_503s_into_200s(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "flaky", 50)
    backend = wmesh.backends["flaky-1"]
    backend.fail_next = 2
    assert (await wmesh.request(target, "/")).status == 503  # no retries configured: the 503 shows
    backend.reset()
    await wmesh.apply(
        vs(
            "flaky",
            [{"retries": {"attempts": 3, "retryOn": "5xx"}, "route": [{"destination": {"host": "flaky"}}]}],
        )
    )
    backend.fail_next = 2
    r = await wmesh.request(target, "/")
    assert r.status == 200, r
    assert backend.hits == 3  # two failures retried, the backend's own counter proves it
    backend.reset()
    backend.fail_next = 5
    assert (await wmesh.request(target, "/")).status == 503  # 1 + 3 attempts, all failed
    assert backend.hits == 4
    # retryOn by status code
    await wmesh.apply(
        vs(
            "flaky",
            [{"retries": {"attempts": 1, "retryOn": "503"}, "route": [{"destination": {"host": "flaky"}}]}],
        )
    )
    backend.reset()
    backend.fail_next = 1
    assert (await wmesh.request(target, "/")).status == 200
    assert backend.hits == 2


async def test_timeout_answers_504_and_per_try_timeout(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "slow", 51)
    await wmesh.apply(vs("slow", [{"timeout": "0.3s", "route": [{"destination": {"host": "slow"}}]}]))
    r = await wmesh.request(target, "/?delay=2")
    assert r.status == 504
    assert r.text == "upstream request timeout"
    assert (await wmesh.request(target, "/?delay=0")).status == 200
    await wmesh.apply(
        vs(
            "slow",
            [
                {
                    "timeout": "5s",
                    "retries": {"attempts": 2, "perTryTimeout": "0.2s", "retryOn": "5xx"},
                    "route": [{"destination": {"host": "slow"}}],
                }
            ],
        )
    )
    backend = wmesh.backends["slow-1"]
    backend.reset()
    r = await wmesh.request(target, "/?delay=1")
    assert r.status == 504
    assert backend.hits == 3  # each try cut at 0.2 s and retried


async def test_fault_injection_abort_and_delay(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "faulty", 52)
    await wmesh.apply(
        vs(
            "faulty",
            [
                {
                    "match": [{"uri": {"prefix": "/abort"}}],
                    "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 100}}},
                    "route": [{"destination": {"host": "faulty"}}],
                },
                {
                    "match": [{"uri": {"prefix": "/delay"}}],
                    "fault": {"delay": {"fixedDelay": "0.4s", "percentage": {"value": 100}}},
                    "route": [{"destination": {"host": "faulty"}}],
                },
                {"route": [{"destination": {"host": "faulty"}}]},
            ],
        )
    )
    backend = wmesh.backends["faulty-1"]
    r = await wmesh.request(target, "/abort")
    assert r.status == 418
    assert backend.hits == 0
    started = time.monotonic()
    r = await wmesh.request(target, "/delay")
    assert r.status == 200
    assert backend.hits == 1
    assert time.monotonic() - started >= 0.35  # the injected delay is a lower bound, not a speed claim
    stats = await asyncio.to_thread(wmesh.launcher.stats, "fault")
    assert any(k.endswith("fault.delays_injected") and v >= 1 for k, v in stats.items())
    assert any(k.endswith("fault.aborts_injected") and v >= 1 for k, v in stats.items())


async def test_outlier_detection_ejects_the_failing_pod(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "outlier", 53, pods=2)
    bad = wmesh.backends["outlier-1"]
    bad.always_fail = True
    await wmesh.apply(
        dr(
            "outlier",
            {
                "loadBalancer": {"simple": "ROUND_ROBIN"},
                "outlierDetection": {
                    "consecutive5xxErrors": 2,
                    "interval": "1s",
                    "baseEjectionTime": "60s",
                    "maxEjectionPercent": 100,
                },
            },
        )
    )
    statuses = [(await wmesh.request(target, "/")).status for _ in range(10)]
    assert 503 in statuses  # the failing pod was hit before it was ejected
    bad_hits = bad.hits
    after = [(await wmesh.request(target, "/")).status for _ in range(20)]
    assert after == [200] * 20
    assert bad.hits == bad_hits  # ejected: no more traffic
    stats = await asyncio.to_thread(wmesh.launcher.stats, "outlier_detection")
    assert (
        stats.get(
            "cluster.inbound-vip|80|http|outlier.default.svc.cluster.local.outlier_detection.ejections_active"
        )
        == 1
    )


async def test_circuit_breaking_connection_pool(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "breaker", 54)
    await wmesh.apply(
        dr(
            "breaker",
            {
                "connectionPool": {
                    "tcp": {"maxConnections": 1},
                    "http": {"http1MaxPendingRequests": 1, "http2MaxRequests": 1},
                }
            },
        )
    )
    results = await asyncio.gather(*(wmesh.request(target, "/?delay=0.5") for _ in range(6)))
    codes = sorted(r.status for r in results)
    assert 200 in codes, codes
    assert 503 in codes, codes
    overflow = [r for r in results if r.status == 503]
    assert all(r.headers.get("x-envoy-overloaded") == "true" for r in overflow)
    assert wmesh.backends["breaker-1"].hits == codes.count(200)


async def test_load_balancers(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "lb", 55, pods=2)

    async def spread(n: int, headers: dict[str, str] | None = None) -> dict[str, int]:
        seen: dict[str, int] = {}
        for _ in range(n):
            who = (await wmesh.request(target, "/", headers=headers)).text.split()[0]
            seen[who] = seen.get(who, 0) + 1
        return seen

    await wmesh.apply(dr("lb", {"loadBalancer": {"simple": "ROUND_ROBIN"}}))
    rr = await spread(20)
    assert rr == {"lb-1": 10, "lb-2": 10}

    for simple, envoy_name in (("LEAST_REQUEST", "LEAST_REQUEST"), ("RANDOM", "RANDOM")):
        await wmesh.apply(dr("lb", {"loadBalancer": {"simple": simple}}))
        clusters = await asyncio.to_thread(wmesh.launcher.config_dump, "dynamic_active_clusters")
        lb = next(
            c["cluster"]
            for c in clusters["configs"]
            if c["cluster"]["name"].endswith("|lb.default.svc.cluster.local")
        )
        assert lb.get("lb_policy", "ROUND_ROBIN") == envoy_name
        assert set(await spread(30)) == {"lb-1", "lb-2"}

    await wmesh.apply(dr("lb", {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}))
    await wmesh.apply(vs("lb", [{"route": [{"destination": {"host": "lb"}}]}]))
    for user in ("alice", "bob", "carol"):
        assert len(await spread(8, {"x-user": user})) == 1  # sticky per header value
    owners = set()
    for i in range(24):
        owners |= set(await spread(1, {"x-user": f"user-{i}"}))
    assert owners == {"lb-1", "lb-2"}


async def test_mirror_seen_by_shadow_never_by_client(wmesh: WaypointMesh) -> None:
    target = await svc(wmesh, "primary", 56)
    await wmesh.add_pod("shadow-1", "shadow")
    await wmesh.apply(service("shadow", wmesh.vip(57), waypoint=None))
    await wmesh.apply(
        vs(
            "primary",
            [
                {
                    "route": [{"destination": {"host": "primary"}}],
                    "mirror": {"host": "shadow"},
                    "mirrorPercentage": {"value": 100},
                }
            ],
        )
    )
    shadow = wmesh.backends["shadow-1"]
    for i in range(5):
        r = await wmesh.request(target, f"/m/{i}")
        assert (r.status, r.text) == (200, f"primary-1 /m/{i}")  # the client only ever sees the primary
    await eventually(lambda: _at_least(shadow, 5), what="5 mirrored requests at the shadow")
    assert sorted(shadow.paths) == [f"/m/{i}" for i in range(5)]
    assert "-shadow" in shadow.headers[-1]["host"]  # Envoy marks mirrored requests

    await wmesh.apply(
        vs(
            "primary",
            [
                {
                    "route": [{"destination": {"host": "primary"}}],
                    "mirrors": [{"destination": {"host": "shadow"}, "percentage": {"value": 50}}],
                }
            ],
        )
    )
    shadow.reset()
    n = 300
    async with wmesh.session(target) as session:
        for _ in range(n):
            assert (await session.request("/half")).status == 200
    await asyncio.sleep(0.5)
    # Binomial(300, 0.5): mean 150, sd 8.7; [110, 190] is beyond 4.5 sd.
    assert 110 <= shadow.hits <= 190, shadow.hits


async def _at_least(b: Any, n: int) -> bool:
    return bool(b.hits >= n)
