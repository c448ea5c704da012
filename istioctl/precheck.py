"""``istioctl-py x precheck``: will an installation succeed on this cluster? Asked before applying anything.

What it checks, and why each one:

* **API server version** (>= 1.28): the charts use ``autoscaling/v2``, ``policy/v1`` and server-side apply;
  istiod-py's ambient mode needs nothing newer.
* **Permissions** (``SelfSubjectAccessReview`` for each kind the charts create): helm would otherwise fail
  half-way, leaving a partial release behind.
* **Gateway API CRDs**: waypoints are Gateways; without the CRDs ``istioctl-py waypoint`` cannot work. The
  base chart ships them, so their absence is a warning, not an error.
* **Conflicting installation**: another Istio control plane (upstream istiod, not istiod-py) in the cluster
  would fight over the same CRDs, webhooks and GatewayClass. An istiopy installation of the same revision is
  fine (install upgrades it).

Exit status 0 when nothing is an error (notes and warnings are printed), 1 otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from typing import Any

from istiopy.istioctl.kube import Kube, KubeError, add_kube_flags, resource_path, run

__all__ = ["MIN_KUBERNETES", "Finding", "register"]

MIN_KUBERNETES = (1, 28)
GATEWAY_CRDS = (
    "gatewayclasses.gateway.networking.k8s.io",
    "gateways.gateway.networking.k8s.io",
    "httproutes.gateway.networking.k8s.io",
    "referencegrants.gateway.networking.k8s.io",
)
# (verb, group, resource, namespaced) the charts need to create.
INSTALL_PERMISSIONS: tuple[tuple[str, str, str, bool], ...] = (
    ("create", "", "namespaces", False),
    ("create", "apiextensions.k8s.io", "customresourcedefinitions", False),
    ("create", "rbac.authorization.k8s.io", "clusterroles", False),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", False),
    ("create", "admissionregistration.k8s.io", "validatingwebhookconfigurations", False),
    ("create", "rbac.authorization.k8s.io", "roles", True),
    ("create", "rbac.authorization.k8s.io", "rolebindings", True),
    ("create", "", "serviceaccounts", True),
    ("create", "", "services", True),
    ("create", "", "configmaps", True),
    ("create", "apps", "deployments", True),
    ("create", "apps", "daemonsets", True),
    ("create", "policy", "poddisruptionbudgets", True),
    ("create", "autoscaling", "horizontalpodautoscalers", True),
)


@dataclass
class Finding:
    level: str  # "error" | "warning" | "info"
    message: str


def _minor(version: dict[str, Any]) -> tuple[int, int] | None:
    git = str(version.get("gitVersion") or "")
    m = re.match(r"v?(\d+)\.(\d+)", git)
    if m:
        return int(m.group(1)), int(m.group(2))
    try:
        return int(version.get("major", "")), int(re.sub(r"\D", "", str(version.get("minor", ""))))
    except ValueError:
        return None


async def checks(kube: Kube, istio_namespace: str, revision: str) -> list[Finding]:
    out: list[Finding] = []
    version = await kube.server_version()
    minor = _minor(version)
    git = version.get("gitVersion", "?")
    if minor is None:
        out.append(Finding("warning", f"cannot tell the Kubernetes version ({git})"))
    elif minor < MIN_KUBERNETES:
        need = ".".join(map(str, MIN_KUBERNETES))
        out.append(Finding("error", f"Kubernetes {git} is too old: istiopy needs {need} or newer"))
    else:
        out.append(Finding("info", f"Kubernetes {git} is supported"))

    denied = []
    for verb, group, resource, namespaced in INSTALL_PERMISSIONS:
        allowed, _reason = await kube.can_i(verb, group, resource, istio_namespace if namespaced else "")
        if not allowed:
            where = f" in namespace {istio_namespace}" if namespaced else ""
            denied.append(f"{verb} {resource}{'.' + group if group else ''}{where}")
    if denied:
        out.append(Finding("error", "missing permissions to install: " + "; ".join(denied)))
    else:
        out.append(Finding("info", "you have the permissions needed to install"))

    try:
        missing = [c for c in GATEWAY_CRDS if not await kube.crd_exists(c)]
    except KubeError as e:
        if e.status != 403:
            raise
        out.append(Finding("warning", "cannot check for Gateway API CRDs: not allowed to read CRDs"))
        missing = []
    else:
        if not missing:
            out.append(Finding("info", "Gateway API CRDs are installed"))
    if missing:
        out.append(
            Finding(
                "warning",
                "Gateway API CRDs not installed (" + ", ".join(missing) + "): the base chart installs them; "
                "waypoints need them",
            )
        )

    try:
        deployments = await kube.list(resource_path("apps", "v1", "deployments"), "app=istiod")
    except KubeError as e:
        if e.status != 403:
            raise
        out.append(
            Finding("warning", "cannot check for other Istio installations: not allowed to list Deployments")
        )
        deployments = []
    for d in deployments:
        meta = d.get("metadata") or {}
        labels = meta.get("labels") or {}
        images = [
            c.get("image", "")
            for c in ((d.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers", [])
        ]
        name = f"{meta.get('namespace')}/{meta.get('name')}"
        ours = labels.get("app.kubernetes.io/part-of") == "istiopy" or any("istiod-py" in i for i in images)
        if not ours:
            out.append(
                Finding(
                    "error",
                    f"another Istio control plane is installed ({name}, image {', '.join(images) or '?'}): "
                    "uninstall it first; istiopy and upstream istiod would fight over CRDs and webhooks",
                )
            )
        elif (
            labels.get("istio.io/rev", "default") == (revision or "default")
            and meta.get("namespace") == istio_namespace
        ):
            out.append(Finding("info", f"istiopy is already installed ({name}); install will upgrade it"))
    return out


ICONS = {"error": "❌", "warning": "⚠️ ", "info": "✔"}


def cmd_precheck(args: argparse.Namespace) -> int:
    try:
        findings = run(args, lambda kube: checks(kube, args.istio_namespace, args.revision))
    except KubeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    errors = [f for f in findings if f.level == "error"]
    for f in findings:
        if f.level == "info" and not args.verbose:
            continue
        print(f"{ICONS[f.level]} {f.message}")
    if errors:
        print(f"❌ {len(errors)} issue(s) found: fix them before installing istiopy.")
        return 1
    print("✔ No issues found when checking the cluster. istiopy is safe to install or upgrade!")
    return 0


def register(subparsers: Any) -> None:
    x = subparsers.add_parser("x", aliases=["experimental"], help="experimental commands (precheck)")
    xsub = x.add_subparsers(title="commands", metavar="COMMAND", parser_class=type(x))
    x.set_defaults(func=lambda _a: (x.print_help(), 2)[1])
    p = xsub.add_parser(
        "precheck",
        help="check that istiopy can be installed or upgraded on the cluster",
        description="Check the API server version, permissions, Gateway API CRDs and conflicting installs.",
    )
    add_kube_flags(p, namespace=False)
    p.add_argument(
        "-i", "--istio-namespace", "--istioNamespace", default="istio-system", help="control-plane namespace"
    )
    p.add_argument("-r", "--revision", default="", help="control-plane revision to check for")
    p.add_argument("-v", "--verbose", action="store_true", help="also print the checks that passed")
    p.set_defaults(func=cmd_precheck)
