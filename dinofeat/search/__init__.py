"""Nearest-neighbour search over DINO features: the index, its files, building it from
images, choosing its faiss type, and near-duplicate grouping.

- :mod:`~dinofeat.search.index`: :class:`KNNIndex` (vectors, records, search, classify);
- :mod:`~dinofeat.search.storage`: the on-disk format (generations, atomic saves, readers
  that never see a half-written index);
- :mod:`~dinofeat.search.build`: planning and hashing image files, embedding them, merging
  the shards of a ``torchrun`` build (free functions);
- :mod:`~dinofeat.search.factory`: faiss factory strings, training sizes, the ``auto`` choice;
- :mod:`~dinofeat.search.identity`: which model and settings made a set of vectors;
- :mod:`~dinofeat.search.dedup`: near-duplicate groups of a collection;
- :mod:`~dinofeat.search.ondisk`: IVF lists on disk, growing a memory-mapped index.

faiss's bundled OpenBLAS is pointed at the CPU's kernels when ``dinofeat`` is imported
(:mod:`dinofeat.openblas`), before anything loads faiss.
"""

from .build import AddReport, ImagePlan, image_files
from .dedup import (DEFAULT_THRESHOLD, DedupResult, DuplicateGroup, RowGroup, dedup_folder,
                    duplicate_groups, find_duplicate_pairs, find_duplicates, group_pairs)
from .factory import AUTO_EXACT_LIMIT, BLAS_THRESHOLD, choose_factory, configure_threads
from .identity import (IncompatibleFeaturesError, check_compatible, embedding_identity,
                       features_info)
from .index import KNNIndex
from .storage import FORMAT_VERSION, IndexFormatError

__all__ = ["KNNIndex", "IndexFormatError", "IncompatibleFeaturesError", "FORMAT_VERSION",
           "AUTO_EXACT_LIMIT", "BLAS_THRESHOLD", "choose_factory", "configure_threads",
           "features_info", "embedding_identity", "check_compatible", "AddReport", "ImagePlan",
           "image_files", "DEFAULT_THRESHOLD", "DedupResult", "DuplicateGroup",
           "dedup_folder", "find_duplicate_pairs", "find_duplicates", "duplicate_groups",
           "group_pairs", "RowGroup"]
