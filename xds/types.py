"""Type URLs the server knows by name and the order ADS pushes them in.

The order matters to Envoy: a cluster must exist before its endpoints are useful, and a listener before its
routes, otherwise Envoy warms resources against references that are not there yet (go-control-plane's
``ResponseType`` enum and istiod's ``PushOrder`` encode the same rule). Types not listed go last, sorted, so
the order is total and deterministic.
"""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "type.googleapis.com/"

CLUSTER = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = PREFIX + "envoy.config.route.v3.RouteConfiguration"
SECRET = PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"
ADDRESS = PREFIX + "istio.workload.Address"
AUTHORIZATION = PREFIX + "istio.security.Authorization"

PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, ADDRESS, AUTHORIZATION)

# Types whose SotW responses carry the full set: a resource missing from a response is deleted by the client.
# For the others (EDS, RDS, SDS) a SotW client forgets a resource only by unsubscribing from it.
FULL_STATE_TYPES = frozenset({CLUSTER, LISTENER, ADDRESS, AUTHORIZATION})

SHORT_NAMES = {
    CLUSTER: "cds",
    ENDPOINT: "eds",
    LISTENER: "lds",
    ROUTE: "rds",
    SECRET: "sds",
    ADDRESS: "wds",
    AUTHORIZATION: "wads",
}


def short_name(type_url: str) -> str:
    """``cds``/``eds``/... for metrics labels and logs; the last dotted part for anything else."""
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


def push_order_key(type_url: str) -> tuple[int, str]:
    """Sort key giving ADS order: known types by PUSH_ORDER, then unknown ones alphabetically."""
    try:
        return (PUSH_ORDER.index(type_url), "")
    except ValueError:
        return (len(PUSH_ORDER), type_url)


def in_push_order(type_urls: Iterable[str]) -> list[str]:
    return sorted(set(type_urls), key=push_order_key)
