"""Node-proxy impersonation: may this caller obtain a certificate for *that* workload identity?

A node proxy (ztunnel) holds the certificates of every pod on its node, so it asks the CA on their behalf
with metadata ``ImpersonatedIdentity``. The rule, checked against the config store:

1. The requested identity parses as ``spiffe://<our trust domain>/ns/<ns>/sa/<sa>``.
2. The caller's account (``<ns>/<sa>``) is in the trusted node accounts (default ``istio-system/ztunnel``).
3. The caller's node is established, strongest evidence first:

   a. the credential names the caller's pod (Kubernetes token: pod name and UID from the TokenReview):
      that pod must exist, have the same UID and service account, and its ``spec.nodeName`` is the node;
   b. the credential binds a node (standalone bootstrap certificate or token file entry): a live pod of the
      caller's account must run on that node (the node proxy is really deployed there);
   c. otherwise, if live pods of the caller's account run on exactly one node, that node.
      Several nodes (a DaemonSet without pod-bound credentials) are refused as ambiguous.

4. A live pod (phase Pending or Running, scheduled on that node) with the requested namespace and
   service account is on the caller's node. Pending counts because the node proxy must hold a pod's
   certificate before the pod's first packet, while the pod is still starting; finished pods
   (Succeeded/Failed) do not.

Any failure is an :class:`ImpersonationDenied` whose message says which step failed; the server maps it to
gRPC UNAUTHENTICATED.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from istiopy.api.identity import InvalidSpiffeId, SpiffeId
from istiopy.ca.auth import Caller
from istiopy.mesh.resources import Pod
from istiopy.mesh.store import ConfigStore

DEFAULT_TRUSTED_NODE_ACCOUNTS = ("istio-system/ztunnel",)
POD_NODE_INDEX = "pod-node"
LIVE_PHASES = frozenset({"Pending", "Running"})


def _pods(store: ConfigStore, namespace: str | None = None) -> list[Pod]:
    # cast: ConfigStore.list_typed's annotation trips mypy (its ``list`` method shadows the builtin).
    return cast("list[Pod]", store.list_typed(Pod, namespace))


class ImpersonationDenied(Exception):
    """``reason`` is a short stable label for metrics; ``message`` explains the refusal to the caller."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class NodeAuthorizer:
    """Applies the impersonation rule (module docstring) against a :class:`ConfigStore`."""

    def __init__(
        self,
        store: ConfigStore,
        trust_domain: str,
        trusted_accounts: Iterable[str] = DEFAULT_TRUSTED_NODE_ACCOUNTS,
    ) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.trusted_accounts = frozenset(trusted_accounts)

    def _pods_on_node(self, node: str) -> list[Pod]:
        try:
            found = self.store.by_index(POD_NODE_INDEX, node)
        except KeyError:  # index not installed on this store: scan
            found = [p for p in _pods(self.store) if p.spec.node_name == node]
        return [p for p in found if isinstance(p, Pod) and p.status.phase in LIVE_PHASES]

    def _live_pods_of(self, namespace: str, account: str) -> list[Pod]:
        return [
            p
            for p in _pods(self.store, namespace)
            if p.service_account == account and p.status.phase in LIVE_PHASES and p.spec.node_name
        ]

    def caller_node(self, caller: Caller) -> str:
        """The node the caller runs on (rule step 3)."""
        ns, sa = caller.identity.namespace, caller.identity.service_account
        if caller.pod_name:
            pod = self.store.get_typed(Pod, ns, caller.pod_name)
            if pod is None:
                raise ImpersonationDenied(
                    "caller-pod-unknown", f"caller pod {ns}/{caller.pod_name} is not known"
                )
            if caller.pod_uid and pod.metadata.uid and pod.metadata.uid != caller.pod_uid:
                raise ImpersonationDenied(
                    "caller-pod-unknown",
                    f"caller pod {ns}/{caller.pod_name} has a different UID (recreated?)",
                )
            if pod.service_account != sa:
                raise ImpersonationDenied(
                    "caller-pod-unknown",
                    f"caller pod {ns}/{caller.pod_name} does not run as {caller.account}",
                )
            if not pod.spec.node_name:
                raise ImpersonationDenied(
                    "caller-node-unknown", f"caller pod {ns}/{caller.pod_name} has no node"
                )
            return pod.spec.node_name
        if caller.node:
            if not any(
                p.service_account == sa and p.namespace == ns for p in self._pods_on_node(caller.node)
            ):
                raise ImpersonationDenied(
                    "caller-node-unverified",
                    f"no live pod of {caller.account} runs on node {caller.node!r} "
                    "(the node named by the caller's credential)",
                )
            return caller.node
        nodes = sorted({p.spec.node_name for p in self._live_pods_of(ns, sa)})
        if len(nodes) == 1:
            return nodes[0]
        if not nodes:
            raise ImpersonationDenied(
                "caller-node-unknown", f"no live pod of {caller.account} runs on any node"
            )
        raise ImpersonationDenied(
            "caller-node-unknown",
            f"pods of {caller.account} run on {len(nodes)} nodes "
            "and the caller's credential binds none of them",
        )

    def authorize(self, caller: Caller, requested: str) -> SpiffeId:
        """The identity to issue for, or raise :class:`ImpersonationDenied`."""
        try:
            target = SpiffeId.parse(requested)
        except InvalidSpiffeId as e:
            raise ImpersonationDenied(
                "impersonation-malformed", f"malformed ImpersonatedIdentity: {e}"
            ) from None
        if target.trust_domain != self.trust_domain:
            raise ImpersonationDenied(
                "impersonation-trust-domain",
                f"ImpersonatedIdentity {target} is outside trust domain {self.trust_domain!r}",
            )
        if caller.account not in self.trusted_accounts:
            raise ImpersonationDenied(
                "impersonation-untrusted-caller",
                f"caller {caller.identity} is not a trusted node account "
                f"(trusted: {', '.join(sorted(self.trusted_accounts)) or 'none'})",
            )
        node = self.caller_node(caller)
        if not any(
            p.namespace == target.namespace and p.service_account == target.service_account
            for p in self._pods_on_node(node)
        ):
            raise ImpersonationDenied(
                "impersonation-no-pod-on-node",
                f"no live pod with service account {target.namespace}/{target.service_account} "
                f"on node {node!r}",
            )
        return target
