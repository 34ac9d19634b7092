"""Labelled image folders (``root/<class>/<images>``) for the evaluations.

The reader itself lives in :mod:`dinofeat.datasets` (one class-folder reader for the whole
package); this module keeps the names importable from ``dinofeat.eval.folders``.
"""

from __future__ import annotations

from ..datasets import LabeledImages, LabelledImages, image_folder

__all__ = ["LabeledImages", "LabelledImages", "image_folder"]
