"""Torpor engine: model repository, model functions, inference and statistics.

Nothing in this package imports a web framework; the front ends in `api/` translate wire
formats into the dataclasses of `torpor.tensors` and call `torpor.dataplane.engine.Engine`.
"""

__version__ = "0.1.0"
