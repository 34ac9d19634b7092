"""Deprecated alias of :mod:`dinofeat.weights` (the module was renamed); removed in 0.3."""

import warnings

from . import weights as _weights

warnings.warn("dinofeat.hub is now dinofeat.weights; the old name goes away in 0.3",
              DeprecationWarning, stacklevel=2)


def __getattr__(name: str):
    return getattr(_weights, name)
