"""Every resource kind the mesh reads; importing this package registers them with ``istiopy.mesh.kinds``."""

from istiopy.mesh.resources.core import *  # noqa: F403
from istiopy.mesh.resources.gateway import *  # noqa: F403
from istiopy.mesh.resources.networking import *  # noqa: F403
from istiopy.mesh.resources.security import *  # noqa: F403
