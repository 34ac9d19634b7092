"""Deprecated: near-duplicate grouping moved to :mod:`dinofeat.search.dedup`. This module
re-exports its public names for one release."""

import warnings

from .search.dedup import (DEFAULT_THRESHOLD, DedupResult, DuplicateGroup, RowGroup,
                           connected_groups, duplicate_groups, group_pairs,
                           dedup_folder, find_duplicate_pairs, find_duplicates, load_whitening,
                           whitening_id)

warnings.warn("dinofeat.dedup is deprecated; import from dinofeat.search.dedup",
              DeprecationWarning, stacklevel=2)

__all__ = ["DEFAULT_THRESHOLD", "find_duplicate_pairs", "find_duplicates", "connected_groups",
           "DuplicateGroup", "DedupResult", "dedup_folder", "load_whitening", "whitening_id",
           "duplicate_groups", "group_pairs", "RowGroup"]
