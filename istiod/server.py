"""The control plane as one object: the config store plus the async components that run around it.

Standalone mode puts a ``FileSource`` in it; xDS and CA attach later by appending their own components
(``control_plane.add("xds", server.run)``), so this module never needs to know about them. Components run
concurrently until cancelled; if one fails, the others are cancelled and the error propagates (a control
plane with a dead xDS server must not look healthy).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from istiopy.mesh.filesource import FileSource
from istiopy.mesh.indexes import DEFAULT_DOMAIN, install_indexes
from istiopy.mesh.store import ConfigStore

__all__ = ["Component", "ControlPlane", "standalone"]

log = logging.getLogger(__name__)

Component = Callable[[], Awaitable[None]]


@dataclass
class ControlPlane:
    """Holds the store and the components that read or write it."""

    store: ConfigStore = field(default_factory=ConfigStore)
    domain: str = DEFAULT_DOMAIN
    file_source: FileSource | None = None
    components: list[tuple[str, Component]] = field(default_factory=list)

    def add(self, name: str, component: Component) -> None:
        """Run ``component()`` alongside the others when ``run`` is called."""
        self.components.append((name, component))

    async def run(self) -> None:
        """Run every component until cancelled or until one fails."""
        names = ", ".join(n for n, _ in self.components) or "nothing"
        log.info("control plane starting: %s", names)
        async with asyncio.TaskGroup() as group:
            for name, component in self.components:
                group.create_task(self._guard(name, component), name=name)

    @staticmethod
    async def _guard(name: str, component: Component) -> None:
        try:
            await component()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("component %s failed", name)
            raise


def standalone(config_dir: str | Path, *, default_namespace: str = "default") -> ControlPlane:
    """A control plane fed from a directory of YAML: loaded now, watched once ``run`` starts."""
    store = ConfigStore()
    install_indexes(store)
    source = FileSource(store, config_dir, default_namespace=default_namespace)
    plane = ControlPlane(store=store, file_source=source)
    plane.add("file-source", source.run)
    return plane
