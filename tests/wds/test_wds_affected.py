"""Change impact: for real changes, every WDS/WADS resource that actually changed is among the names
``affected_names`` reports (so the push pipeline never misses one), and unrelated resources are not."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from wds_helpers import docs, pod, store_from

from istiopy.mesh.kinds import parse
from istiopy.mesh.meta import ResourceKey
from istiopy.mesh.store import Change, ConfigStore
from istiopy.xds import wads, wds

BASE = (
    """
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: a, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: b}
spec: {clusterIP: 10.96.0.20, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: a}
spec: {selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [a]}}]}]}
"""
    + pod("web-1", "a", "10.0.0.1", {"app": "web"})
    + pod("web-2", "a", "10.0.0.2", {"app": "web"})
    + pod("db-1", "b", "10.0.1.1", {"app": "db"})
)
ENTRIES = """
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm, namespace: a, labels: {app: web}}
spec: {address: 10.2.0.1}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: a}
spec:
  hosts: [api.example.com]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http}]
  endpoints: [{address: 10.3.0.1}]
"""


def snapshot(store: ConfigStore) -> dict[str, bytes]:
    out = {}
    for gen, url in (
        (wds.generate_addresses, wds.ADDRESS_TYPE_URL),
        (wads.generate_authorizations, wads.AUTHORIZATION_TYPE_URL),
    ):
        for name, msg in gen(store):
            out[f"{url}|{name}"] = msg.SerializeToString(deterministic=True)
    return out


def apply_yaml(store: ConfigStore, text: str) -> list[Change]:
    changes = []
    for d in docs(text):
        c = store.apply(parse(d))
        assert c is not None
        changes.append(c)
    return changes


def reported(changes: list[Change], store: ConfigStore) -> set[str]:
    names: set[str] = set()
    for change in changes:
        for fn in (wds.affected_names, wads.affected_names):
            for url, found in fn(change, store).items():
                names |= {f"{url}|{n}" for n in found}
    return names


def delete(kind: str, ns: str, name: str) -> Callable[[ConfigStore], list[Change]]:
    def run(store: ConfigStore) -> list[Change]:
        c = store.delete(ResourceKey(kind, ns, name))
        assert c is not None
        return [c]

    return run


def yaml_change(text: str) -> Callable[[ConfigStore], list[Change]]:
    return lambda store: apply_yaml(store, text)


CHANGES: dict[str, Callable[[ConfigStore], list[Change]]] = {
    "pod label use-waypoint": yaml_change(
        pod("web-1", "a", "10.0.0.1", {"app": "web", "istio.io/use-waypoint": "wp"})
    ),
    "pod opts out": yaml_change(
        pod("web-2", "a", "10.0.0.2", {"app": "web", "istio.io/dataplane-mode": "none"})
    ),
    "pod added": yaml_change(pod("web-3", "a", "10.0.0.3", {"app": "web"})),
    "pod deleted": delete("Pod", "a", "web-2"),
    "service selector changes": yaml_change(
        """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {clusterIP: 10.96.0.10, selector: {app: db}, ports: [{port: 80, targetPort: 8080}]}
"""
    ),
    "service port changes": yaml_change(
        """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: a}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 9090}]}
"""
    ),
    "service deleted": delete("Service", "a", "web"),
    "namespace enrolled": yaml_change(
        """
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {istio.io/dataplane-mode: ambient}}
"""
    ),
    "namespace use-waypoint": yaml_change(
        """
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
"""
    ),
    "waypoint deleted": delete("Gateway", "a", "wp"),
    "policy selector changes": yaml_change(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: a}
spec: {selector: {matchLabels: {app: other}}, rules: [{}]}
"""
    ),
    "mesh-wide policy added": yaml_change(
        """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: global-deny, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {ipBlocks: [1.2.3.4]}}]}]}
"""
    ),
    "node topology labels": yaml_change(
        """
apiVersion: v1
kind: Node
metadata: {name: node-0, labels: {topology.kubernetes.io/zone: z1}}
"""
    ),
    "peer authentication strict": yaml_change(
        """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
"""
    ),
}


@pytest.mark.parametrize("entries", [False, True], ids=["pods", "pods+entries"])
@pytest.mark.parametrize("what", sorted(CHANGES))
def test_every_changed_resource_is_reported(what: str, entries: bool) -> None:
    store = store_from(BASE + (ENTRIES if entries else ""))
    before = snapshot(store)
    changes = CHANGES[what](store)
    after = snapshot(store)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed, "the change should alter something"
    names = reported(changes, store)
    wildcard = {k.split("|")[0] for k in names if k.endswith("|*")}
    missed = {k for k in changed if k not in names and k.split("|")[0] not in wildcard}
    assert not missed


def test_pod_label_change_reports_only_that_workload() -> None:
    store = store_from(BASE)
    changes = CHANGES["pod label use-waypoint"](store)
    assert reported(changes, store) == {f"{wds.ADDRESS_TYPE_URL}|Kubernetes//Pod/a/web-1"}


def test_unrelated_kinds_report_nothing() -> None:
    store = store_from(BASE)
    changes = apply_yaml(
        store,
        """
apiVersion: v1
kind: ServiceAccount
metadata: {name: robot, namespace: a}
""",
    )
    assert reported(changes, store) == set()


def test_namespace_label_that_opens_cross_namespace_attachment_is_reported() -> None:
    store = store_from(
        BASE
        + """
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: shared, namespace: a}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {waypoints: allowed}}}}
---
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: b
  labels: {istio.io/use-waypoint: shared, istio.io/use-waypoint-namespace: a}
spec: {clusterIP: 10.96.0.20, selector: {app: db}, ports: [{port: 5432}]}
"""
    )
    before = snapshot(store)
    changes = apply_yaml(
        store,
        """
apiVersion: v1
kind: Namespace
metadata: {name: b, labels: {waypoints: allowed}}
""",
    )
    after = snapshot(store)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {f"{wds.ADDRESS_TYPE_URL}|b/db.b.svc.cluster.local"}
    assert changed <= reported(changes, store)
