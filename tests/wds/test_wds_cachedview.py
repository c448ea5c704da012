"""CachedView answers exactly as the store does (it only saves the repeated sorting)."""

from __future__ import annotations

from wds_helpers import pod, store_from

from istiopy.mesh.ambient import CachedView, typed_list, view
from istiopy.mesh.resources.core import Namespace, Pod


def test_cached_view_matches_the_store() -> None:
    store = store_from(
        """
apiVersion: v1
kind: Namespace
metadata: {name: a}
"""
        + pod("p1", "a", "10.0.0.1", {"app": "x"})
        + pod("p2", "a", "10.0.0.2", {"app": "y"})
        + pod("p3", "b", "10.0.0.3", {"app": "x"})
    )
    cv = CachedView(store)
    for ns in (None, "a", "b", "missing"):
        for sel in (None, {}, {"app": "x"}, {"app": "z"}):
            assert cv.list("Pod", ns, sel) == store.list("Pod", ns, sel)
    assert cv.get("Pod", "a", "p2") == store.get("Pod", "a", "p2")
    assert cv.get("Pod", "a", "nope") is None
    assert cv.get_typed(Namespace, "", "a") == store.get_typed(Namespace, "", "a")
    assert cv.get_typed(Pod, "b", "p3") is not None
    assert [p.name for p in typed_list(cv, Pod, "a")] == ["p1", "p2"]
    assert view(cv) is cv
    # A returned list is the caller's: changing it does not change the view.
    cv.list("Pod").clear()
    assert len(cv.list("Pod")) == 3
