"""The DINO projection head, the optional predictor, and the backbone+head network.

State-dict names match the original release after its ``module.`` prefix is stripped:
``backbone.*`` (timm ViT names), ``head.mlp.{0,2,4}.*`` (linear layers at ``{0,3,6}``, BatchNorm at ``{1,4}`` with
BatchNorm; ``head.mlp.*`` for a one-layer head),
``head.last_layer.weight_g`` ``[K, 1]`` and ``head.last_layer.weight_v`` ``[K, 256]``.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WeightNormLinear", "DINOHead", "Predictor", "MultiCropNetwork", "build_head"]


def _init_linear(module: nn.Module) -> None:
    """Truncated normal (std 0.02) weights and zero biases for every ``nn.Linear``."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation (Salimans & Kingma, 2016):
    ``W = g * V / ||V||`` with one norm per output row.

    Parameters ``weight_g`` ``[out, 1]`` and ``weight_v`` ``[out, in]`` (the names of the
    release checkpoints). ``fix_gain=True`` freezes ``g`` (``requires_grad=False``); it is
    initialised to 1 either way. ``V`` keeps ``nn.Linear``'s default initialisation
    (uniform in +-1/sqrt(in), row norms about 0.58), as in the release, which builds this
    layer after its truncated-normal pass over the MLP: a larger ``V`` makes each AdamW
    step a smaller rotation of the prototypes.

    Shapes: ``[..., in] -> [..., out]``.
    """

    def __init__(self, in_features: int, out_features: int, fix_gain: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_gain)
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``g * V / ||V||``, ``[out, in]``."""
        return self.weight_g * self.weight_v / torch.linalg.vector_norm(
            self.weight_v, dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fixed_gain={not self.weight_g.requires_grad}")


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, nlayers: int, use_bn: bool) -> nn.Module:
    """``nlayers`` linear layers in -> hidden ... -> out with GELU (and BatchNorm) between
    (a single ``nn.Linear`` when ``nlayers == 1``, as in the release)."""
    if nlayers == 1:
        return nn.Linear(in_dim, out_dim)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for a, b in itertools.pairwise(dims):
        layers.append(nn.Linear(a, b))
        if use_bn:
            layers.append(nn.BatchNorm1d(b))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, out_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """The DINO projection head.

    ``mlp``: ``nlayers`` linear layers ``in_dim -> hidden_dim -> ... -> bottleneck_dim`` with
    GELU (and optional BatchNorm) between; then L2 normalisation (``l2_bottleneck``); then
    ``last_layer``, a weight-normalised bias-free linear layer ``bottleneck_dim -> out_dim``
    whose gain is fixed to 1 when ``norm_last_layer``.

    Shapes: ``[B, in_dim] -> [B, out_dim]``.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, use_bn: bool = False,
                 norm_last_layer: bool = True, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, l2_bottleneck: bool = True):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be at least 1, got {nlayers}")
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.l2_bottleneck = l2_bottleneck
        self.mlp = _mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, use_bn)
        _init_linear(self.mlp)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim] -> [B, bottleneck_dim]`` (L2-normalised when ``l2_bottleneck``)."""
        z = self.mlp(x)
        return F.normalize(z, dim=-1, p=2) if self.l2_bottleneck else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))


class Predictor(nn.Module):
    """BYOL-style predictor for the ablation of the paper, placed on the head's bottleneck.

    ``dim -> hidden_dim -> dim`` with GELU (and optional BatchNorm), applied to the
    student's bottleneck features before the last layer (re-normalised when the head
    L2-normalises its bottleneck). Working in the 256-d bottleneck rather than on the
    65536-d output keeps it small (0.5M instead of ~270M parameters at hidden 2048) while
    still letting the student predict the teacher; only the student has one.

    Shapes: ``[B, dim] -> [B, dim]``.
    """

    def __init__(self, dim: int = 256, hidden_dim: int = 2048, use_bn: bool = False):
        super().__init__()
        self.mlp = _mlp(dim, hidden_dim, dim, 2, use_bn)
        _init_linear(self.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def build_head(cfg, in_dim: int) -> DINOHead:
    """The :class:`DINOHead` a :class:`~dinofeat.training.config.TrainConfig` describes."""
    return DINOHead(in_dim, cfg.out_dim, use_bn=cfg.use_bn_in_head,
                    norm_last_layer=cfg.norm_last_layer, nlayers=cfg.head_layers,
                    hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                    l2_bottleneck=cfg.l2_bottleneck)


def _resolution_groups(crops: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Runs of consecutive crops with the same spatial size."""
    return [list(g) for _, g in itertools.groupby(crops, key=lambda t: tuple(t.shape[-2:]))]


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crop batches.

    ``forward(crops)``: ``crops`` is a list of ``[B_i, 3, H_i, W_i]`` batches (or one
    tensor). Consecutive crops of the same resolution are concatenated and go through the
    backbone in one call (2 global + N local crops: two backbone calls); the head then runs
    once on all features. Returns ``[sum(B_i), out_dim]`` in crop order.

    Attributes ``backbone``, ``head`` (and ``predictor`` when given), so state-dict keys are
    ``backbone.*`` and ``head.*`` as in the release checkpoints.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead, predictor: Predictor | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        if predictor is not None:
            self.predictor = predictor
        else:
            self.predictor = None

    def features(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Backbone features of every crop: ``[sum(B_i), embed_dim]``."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if len(crops) == 0:
            raise ValueError("MultiCropNetwork: no crops given")
        feats = [self.backbone(torch.cat(group)) for group in _resolution_groups(crops)]
        return torch.cat(feats)

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        feats = self.features(crops)
        if self.predictor is None:
            return self.head(feats)
        z = self.predictor(self.head.bottleneck(feats))
        if self.head.l2_bottleneck:
            z = F.normalize(z, dim=-1, p=2)
        return self.head.last_layer(z)
