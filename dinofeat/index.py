"""Deprecated: the index moved to :mod:`dinofeat.search` (``dinofeat.KNNIndex`` is
unchanged). This module re-exports its public names for one release."""

import warnings

from .search.build import AddReport, ImagePlan, image_files
from .search.factory import AUTO_EXACT_LIMIT, BLAS_THRESHOLD, choose_factory, configure_threads
from .search.identity import (IncompatibleFeaturesError, check_compatible, embedding_identity,
                              features_info)
from .search.index import KNNIndex
from .search.storage import FORMAT_VERSION, IndexFormatError

warnings.warn("dinofeat.index is deprecated; import from dinofeat.search (or use "
              "dinofeat.KNNIndex)", DeprecationWarning, stacklevel=2)

__all__ = ["KNNIndex", "IndexFormatError", "IncompatibleFeaturesError", "AUTO_EXACT_LIMIT",
           "FORMAT_VERSION", "choose_factory", "configure_threads", "BLAS_THRESHOLD",
           "features_info", "check_compatible", "embedding_identity", "AddReport", "ImagePlan",
           "image_files"]
