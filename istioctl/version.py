"""``istioctl-py version``: the client's version and that of each control-plane revision in the cluster.

The control plane's version is read from its Deployments (label ``app=istiod`` in the control-plane
namespace): the chart labels them ``app.kubernetes.io/version`` and the image tag says the same. That needs
only read access to Deployments - no port-forward into the pod, which a CLI outside the cluster network could
not reach anyway. ``--remote=false`` (or no reachable cluster with ``--short``) prints the client only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

import istiopy
from istiopy.istioctl.kube import Kube, KubeError, add_kube_flags, resource_path, run

__all__ = ["control_plane_versions", "register"]


def _image_tag(image: str) -> str:
    ref = image.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else "latest"


async def control_plane_versions(kube: Kube, namespace: str) -> list[dict[str, Any]]:
    """One entry per istiod Deployment: revision, version, image and ready/desired replicas."""
    out = []
    for d in await kube.list(resource_path("apps", "v1", "deployments", namespace), "app=istiod"):
        meta = d.get("metadata") or {}
        labels = meta.get("labels") or {}
        containers = ((d.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers", [])
        image = containers[0].get("image", "") if containers else ""
        status = d.get("status") or {}
        out.append(
            {
                "name": meta.get("name", ""),
                "revision": labels.get("istio.io/rev", "default"),
                "version": labels.get("app.kubernetes.io/version") or _image_tag(image),
                "image": image,
                "ready": int(status.get("readyReplicas") or 0),
                "replicas": int((d.get("spec") or {}).get("replicas") or status.get("replicas") or 0),
            }
        )
    return sorted(out, key=lambda e: (e["revision"] != "default", e["revision"]))


def cmd_version(args: argparse.Namespace) -> int:
    client = istiopy.__version__
    planes: list[dict[str, Any]] = []
    error = ""
    if args.remote:
        try:
            planes = run(args, lambda kube: control_plane_versions(kube, args.istio_namespace))
        except KubeError as e:
            error = str(e)
    if args.output in ("json", "yaml"):
        doc: dict[str, Any] = {"clientVersion": {"version": client}}
        if args.remote:
            doc["meshVersion"] = [
                {
                    "component": "istiod",
                    "revision": p["revision"],
                    "info": {"version": p["version"], "image": p["image"]},
                }
                for p in planes
            ]
        text = (
            json.dumps(doc, indent=2) + "\n"
            if args.output == "json"
            else yaml.safe_dump(doc, sort_keys=False)
        )
        sys.stdout.write(text)
    elif args.short:
        print(client)
    else:
        print(f"client version: {client}")
        for p in planes:
            rev = "" if p["revision"] == "default" else f" (revision {p['revision']})"
            print(
                f"control plane version: {p['version']}{rev}, "
                f"{p['ready']}/{p['replicas']} ready, image {p['image']}"
            )
        if args.remote and not planes and not error:
            print(f"control plane version: none (no istiod in namespace {args.istio_namespace})")
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "version", help="print the client and control-plane versions", description=__doc__.splitlines()[0]
    )
    add_kube_flags(p, namespace=False)
    p.add_argument(
        "-i", "--istio-namespace", "--istioNamespace", default="istio-system", help="control-plane namespace"
    )
    p.add_argument(
        "--remote",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        help="also report the control plane (default: true; --remote=false for the client only)",
    )
    p.add_argument("-s", "--short", action="store_true", help="only the client version number")
    p.add_argument("-o", "--output", choices=("", "json", "yaml"), default="", help="json or yaml")
    p.set_defaults(func=cmd_version)
