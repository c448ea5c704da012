"""Trust bundle publication: where peers and tools find the mesh root certificate.

Standalone mode writes ``root-cert.pem`` to a configured path (:class:`FileTrustBundlePublisher`).
Kubernetes mode writes the ConfigMap ``istio-ca-root-cert`` (key ``root-cert.pem``) in every mesh
namespace; the Kubernetes integration implements :class:`TrustBundlePublisher` for that.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Protocol

CONFIGMAP_NAME = "istio-ca-root-cert"
CONFIGMAP_KEY = "root-cert.pem"


class TrustBundlePublisher(Protocol):
    """Publish the PEM trust anchors; called at start-up and whenever the roots change. Idempotent."""

    async def publish(self, roots_pem: str) -> None: ...


class FileTrustBundlePublisher:
    """Writes the roots atomically (readers never see a half-written bundle), world-readable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def publish(self, roots_pem: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.read_text() == roots_pem:
            return
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w") as fh:
                fh.write(roots_pem)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
