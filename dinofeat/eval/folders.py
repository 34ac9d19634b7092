"""Labelled image folders in the ImageFolder layout (``root/<class>/<images>``).

Classes are the sorted names of the sub-folders of ``root`` (hidden ones skipped), class
``i`` being the ``i``-th name, as torchvision's ``ImageFolder`` numbers them; images are
found recursively under each class folder with :func:`dinofeat.images.list_images`. Any
number of classes and images works, including classes with a single image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..utils import get_logger

__all__ = ["LabeledImages", "image_folder"]

log = get_logger(__name__)


@dataclass
class LabeledImages:
    """Images with integer labels: ``paths[i]`` belongs to ``classes[labels[i]]``."""

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # unreadable files, once embedded

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, keep: Sequence[int]) -> "LabeledImages":
        """The images at indices ``keep`` (same classes)."""
        return LabeledImages(self.root, [self.paths[i] for i in keep],
                             [self.labels[i] for i in keep], self.classes, list(self.skipped))


def image_folder(root: str | os.PathLike, classes: Sequence[str] | None = None) -> LabeledImages:
    """List an ImageFolder tree.

    Args:
        root: folder whose sub-folders are the classes.
        classes: the class list to number against (e.g. the training set's, when reading a
            validation set); a sub-folder not in it is an error, classes without a folder
            here simply have no images.

    Raises ``FileNotFoundError``/``NotADirectoryError`` for a bad ``root`` and
    ``ValueError`` when it has no class folders or no images at all.
    """
    from ..images import list_images
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no such folder: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise ValueError(f"{root}: no class sub-folders (expected the ImageFolder layout "
                         f"{root}/<class name>/<image files>)")
    loose = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        log.warning("%s: %d file(s) directly in the folder are not in a class sub-folder and "
                    "are ignored (e.g. %s)", root, len(loose), loose[0])
    if classes is None:
        classes = found
    else:
        classes = list(classes)
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise ValueError(f"{root}: class folder(s) {', '.join(unknown[:5])} do not exist in "
                             f"the training set ({len(classes)} classes)")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    empty = []
    for name in found:
        files = list_images(root / name)
        if not files:
            empty.append(name)
        paths.extend(files)
        labels.extend([index[name]] * len(files))
    if empty:
        log.warning("%s: %d class folder(s) hold no images: %s", root, len(empty),
                    ", ".join(empty[:5]))
    if not paths:
        raise ValueError(f"{root}: no image files in its {len(found)} class folder(s)")
    return LabeledImages(root, paths, labels, list(classes))
