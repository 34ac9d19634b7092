"""The model contract: what embedding, attention maps, the index, dedup and the CLI need
of a model.

:class:`FeatureModel` is a ``typing.Protocol``: :class:`~dinofeat.model.DinoModel`
(PyTorch) and :class:`~dinofeat.export.OnnxModel` (an exported file run by ONNX Runtime)
both satisfy it, and everything above the model layer is written against it, so either
kind of model can be passed wherever a model is taken. A capability a model lacks (the
intermediate blocks of an ONNX file, the attention of a ResNet) is an error naming it,
raised by the method that would need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .attention import AttentionMaps
    from .embedding import EmbedStream
    from .features import FeatureSpec
    from .zoo import Preprocessing

__all__ = ["FeatureModel"]


@runtime_checkable
class FeatureModel(Protocol):
    """A backbone with its preprocessing, as embedding and search use it.

    Facts: ``name``, ``embed_dim`` (width of the [CLS] token), ``patch_size`` (``None``
    for a ResNet), ``depth`` (number of blocks, ``None`` when unknown), ``is_vit`` (has
    self-attention blocks), ``has_tokens`` (gives patch tokens), ``preprocessing``,
    ``device``, ``weights_hash`` (identifies the weights whatever file they came in) and
    ``describe()`` (a JSON-able identity).

    Tensors: calling the model maps a normalised batch ``[B, 3, H, W]`` to its [CLS]
    features ``[B, D]``; ``forward_tokens`` to all final-normed tokens ``[B, 1 + N, D]``;
    ``intermediate_tokens(x, n, norm)`` to the tokens of the last ``n`` blocks (or of the
    blocks with the given indices); ``last_cls_attention`` to the last block's [CLS]
    attention ``[B, heads, 1 + N]``.

    Images: ``embed``, ``iter_embed``, ``patch_features`` and ``attention_maps`` take
    paths, folders, PIL images, arrays and tensors.
    """

    name: str

    @property
    def embed_dim(self) -> int: ...

    @property
    def patch_size(self) -> int | None: ...

    @property
    def depth(self) -> int | None: ...

    @property
    def is_vit(self) -> bool: ...

    @property
    def has_tokens(self) -> bool: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def weights_hash(self) -> str: ...

    @property
    def preprocessing(self) -> "Preprocessing": ...

    def describe(self) -> dict[str, Any]: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor: ...

    def intermediate_tokens(self, x: torch.Tensor, n: int | Sequence[int] = 1,
                            norm: bool = True) -> list[torch.Tensor]: ...

    def last_cls_attention(self, x: torch.Tensor) -> torch.Tensor: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def eval(self) -> Any: ...

    def iter_embed(self, images: Any, spec: "FeatureSpec | None" = None,
                   **options: Any) -> "EmbedStream": ...

    def embed(self, images: Any, spec: "FeatureSpec | None" = None, **options: Any) -> Any: ...

    def patch_features(self, images: Any, *, blocks: int | list[int] | None = None,
                       norm: bool = True, preprocessing: "None | str | Preprocessing" = None,
                       size: int | None = None, batch_size: int = 16,
                       num_workers: int | None = None, precision: str = "fp32",
                       device: str | torch.device | None = None,
                       progress: bool | None = None) -> torch.Tensor: ...

    def attention_maps(self, img: Any, *, size: int | None = None, threshold: float = 0.6,
                       device: str | torch.device | None = None,
                       precision: str = "fp32") -> "AttentionMaps": ...
