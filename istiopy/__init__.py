"""istiopy: an Istio-ambient-compatible service mesh whose control plane, CA and node proxy are Python.

The root folders of the repository (``api/``, ``mesh/``, ``xds/``, ...) are mapped onto subpackages of this
package by ``[tool.setuptools.package-dir]`` in ``pyproject.toml``.
"""

__version__ = "0.1.0"
