"""Backbones on timm (ViT, XCiT) and torchvision (ResNet-50).

Every backbone built here maps a normalised image batch ``[B, 3, H, W]`` to its DINO
feature ``[B, D]`` (the final-normed [CLS] token for ViT/XCiT, the global average pool
for ResNet) and exposes ``embed_dim``. ViTs additionally give their normed tokens
(:meth:`DinoVisionTransformer.forward_tokens`), intermediate blocks, and the last
block's attention, computed explicitly only where it is asked for: every other block
keeps timm's fused attention.

Position embeddings are resized to the input's patch grid the way the original DINO
code does it (``pos_embed_interp="dino"``): bicubic interpolation called with a *scale
factor* ``((h + 0.1) / h0, (w + 0.1) / w0)`` for a target grid ``h x w`` from the
trained ``h0 x w0`` grid. ``"timm"`` resamples to a target *size* (with antialiasing)
as timm does; the two agree at the training resolution only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VIT_SIZES",
    "DinoVisionTransformer",
    "attention_qk",
    "interpolate_pos_embed",
    "build_vit",
    "build_resnet50",
    "build_xcit",
    "build_backbone",
    "parse_arch",
]

# name -> (embed_dim, depth, num_heads)
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    # ViT-Tiny's width at a third of its depth: DINO on small images on a CPU
    # (the Fashion-MNIST recipes of dinofeat.demo and the vit_t_fmnist zoo model)
    "mini": (192, 4, 3),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
HEADS_BY_DIM = {dim: heads for dim, _, heads in VIT_SIZES.values()}


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    grid: tuple[int, int],
    trained_grid: tuple[int, int],
    mode: str = "dino",
    num_prefix_tokens: int = 1,
    square_input: bool = True,
) -> torch.Tensor:
    """Position embeddings ``[1, P + h0*w0, D]`` for a ``grid = (h, w)`` patch grid.

    Returns ``[1, P + h*w, D]`` (``P`` prefix tokens, normally the [CLS] one, are kept
    as they are). ``mode="dino"`` reproduces the original implementation exactly,
    ``mode="timm"`` is timm's size-based resampling.

    ``square_input``: whether the image had as many pixel rows as columns. The original
    keeps the trained embeddings only for a square image with the trained grid; a
    non-square image whose sides are not multiples of the patch can still have the
    trained grid (224 x 232 at /16), and then the original resamples by ``(h0 + 0.1) /
    h0`` all the same, which shifts the values slightly. ``mode="dino"`` does that too.
    """
    h, w = grid
    h0, w0 = trained_grid
    if (h, w) == (h0, w0) and (square_input or mode != "dino"):
        return pos_embed
    prefix, patch = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    dtype = patch.dtype
    patch = patch.float().reshape(1, h0, w0, dim).permute(0, 3, 1, 2)
    if mode == "dino":
        # The 0.1 offset keeps floor(size * scale) from rounding one patch short.
        patch = F.interpolate(
            patch, scale_factor=((h + 0.1) / h0, (w + 0.1) / w0), mode="bicubic",
            align_corners=False,
        )
    elif mode == "timm":
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", align_corners=False,
                              antialias=True)
    else:
        raise ValueError(f"pos_embed_interp must be 'dino' or 'timm', got {mode!r}")
    if patch.shape[-2:] != (h, w):
        raise RuntimeError(f"position embedding interpolation gave grid {tuple(patch.shape[-2:])}, "
                           f"expected {(h, w)}")
    patch = patch.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(dtype)
    return torch.cat([prefix, patch], dim=1)


def attention_qk(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k ``[B, heads, N, head_dim]`` of a timm ``Attention`` module for tokens ``x``
    (after its q/k norms): what the last block's attention maps are computed from, here
    and in the exported graph."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k)


_attention_qk = attention_qk  # the earlier private name


class DinoVisionTransformer(nn.Module):
    """A timm ``VisionTransformer`` with DINO's position-embedding interpolation.

    Parameter names are timm's, which are also the original DINO release's
    (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``), so
    both load without renaming. Any input size works; the patch grid is
    ``(H // patch, W // patch)`` (a remainder is dropped by the patch convolution, as in
    the original).
    """

    def __init__(self, *, patch_size: int = 16, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, img_size: int = 224, drop_path_rate: float = 0.0,
                 pos_embed_interp: str = "dino", mlp_ratio: float = 4.0):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.vit = VisionTransformer(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0,
            drop_path_rate=drop_path_rate, dynamic_img_size=True, global_pool="token",
        )
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.pos_embed_interp = pos_embed_interp
        self.trained_grid = tuple(self.vit.patch_embed.grid_size)

    # State dicts use timm/original names (no "vit." prefix).
    def state_dict(self, *args, **kwargs):
        return self.vit.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.vit.load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vit.blocks

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch_size, width // self.patch_size

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> tokens ``[B, 1 + h*w, D]`` ([CLS] first) with
        position embeddings added."""
        v = self.vit
        square = x.shape[-2] == x.shape[-1]
        p = self.patch_size  # the stride-p patch convolution ignores a remainder: drop it
        x = v.patch_embed(x[..., : x.shape[-2] // p * p, : x.shape[-1] // p * p])  # [B, h, w, D]
        B, h, w, D = x.shape
        pos = interpolate_pos_embed(v.pos_embed, (h, w), self.trained_grid, self.pos_embed_interp,
                                    square_input=square)
        x = torch.cat([v.cls_token.expand(B, -1, -1), x.reshape(B, h * w, D)], dim=1)
        return v.pos_drop(x + pos)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> final-normed tokens ``[B, 1 + h*w, D]``."""
        x = self.prepare_tokens(x)
        if self.vit.grad_checkpointing and torch.is_grad_enabled():
            from timm.models._manipulate import checkpoint_seq
            x = checkpoint_seq(self.vit.blocks, x)
        else:
            x = self.vit.blocks(x)
        return self.vit.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> normed [CLS] feature ``[B, D]``."""
        return self.forward_tokens(x)[:, 0]

    def intermediate_tokens(self, x: torch.Tensor, n: int | Sequence[int] = 1,
                            norm: bool = True) -> list[torch.Tensor]:
        """Tokens ``[B, 1 + h*w, D]`` after the last ``n`` blocks (or after the blocks with
        the given indices), each passed through the final LayerNorm when ``norm``, as the
        linear evaluation of the paper uses them."""
        depth = len(self.vit.blocks)
        wanted = set(range(depth - n, depth)) if isinstance(n, int) else {
            i % depth for i in n}
        out = []
        x = self.prepare_tokens(x)
        for i, blk in enumerate(self.vit.blocks):
            x = blk(x)
            if i in wanted:
                out.append(self.vit.norm(x) if norm else x)
            if i >= max(wanted):
                break
        return out

    def _tokens_before_last_block(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare_tokens(x)
        for blk in self.vit.blocks[:-1]:
            x = blk(x)
        return x

    def last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block ``[B, heads, 1 + h*w, 1 + h*w]``."""
        x = self._tokens_before_last_block(x)
        blk = self.vit.blocks[-1]
        q, k = attention_qk(blk.attn, blk.norm1(x))
        return ((q * blk.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)

    def last_cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Only the [CLS] row of the last block's attention, ``[B, heads, 1 + h*w]``.

        Costs one ``1 x N`` product per head instead of the full ``N x N`` matrix."""
        x = self._tokens_before_last_block(x)
        blk = self.vit.blocks[-1]
        q, k = attention_qk(blk.attn, blk.norm1(x))
        return ((q[:, :, :1] * blk.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]


class _ResNetTrunk(nn.Module):
    """torchvision ResNet-50 without its classifier: ``[B, 3, H, W]`` -> ``[B, 2048]``.

    Parameter names are torchvision's (``conv1.*``, ``layer1.*``...), those of the DINO
    release file."""

    def __init__(self, net: nn.Module):
        super().__init__()
        net.fc = nn.Identity()
        self.net = net
        self.embed_dim = 2048
        self.patch_size = None

    def state_dict(self, *args, **kwargs):
        sd = self.net.state_dict(*args, **kwargs)
        return type(sd)((k, v) for k, v in sd.items() if not k.startswith("fc."))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _XCiTTrunk(nn.Module):
    """timm XCiT without its classifier: ``[B, 3, H, W]`` -> normed [CLS] ``[B, D]``."""

    def __init__(self, net: nn.Module, patch_size: int):
        super().__init__()
        self.net = net
        self.embed_dim = net.embed_dim
        self.patch_size = patch_size

    def state_dict(self, *args, **kwargs):
        return self.net.state_dict(*args, **kwargs)

    def remap_state_dict(self, state_dict) -> dict[str, torch.Tensor]:
        """Original XCiT names (``pos_embeder.*``, fused class-attention ``qkv``) ->
        timm's; classifier keys dropped. Idempotent on timm names."""
        from timm.models.xcit import checkpoint_filter_fn
        state_dict = checkpoint_filter_fn(dict(state_dict), self.net)
        return {k: v for k, v in state_dict.items() if not k.startswith("head.")}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.net.load_state_dict(self.remap_state_dict(state_dict), strict=strict,
                                        assign=assign)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)[:, 0]


def build_vit(size: str = "small", patch_size: int = 16, *, img_size: int = 224,
              drop_path_rate: float = 0.0, pos_embed_interp: str = "dino",
              init: str = "dino") -> DinoVisionTransformer:
    """A ViT of ``size`` tiny/small/base/large at ``patch_size``.

    ``init="dino"`` initialises as the DINO release does (truncated normal, std 0.02, for
    linear weights, [CLS] and position embeddings; zero biases; unit LayerNorms)."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; choose one of {', '.join(VIT_SIZES)}")
    dim, depth, heads = VIT_SIZES[size]
    model = DinoVisionTransformer(patch_size=patch_size, embed_dim=dim, depth=depth,
                                  num_heads=heads, img_size=img_size,
                                  drop_path_rate=drop_path_rate,
                                  pos_embed_interp=pos_embed_interp)
    if init == "dino":
        nn.init.trunc_normal_(model.vit.pos_embed, std=0.02)
        nn.init.trunc_normal_(model.vit.cls_token, std=0.02)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model


def build_resnet50(**_ignored) -> _ResNetTrunk:
    import torchvision
    return _ResNetTrunk(torchvision.models.resnet50(weights=None))


def build_xcit(timm_name: str, *, drop_path_rate: float = 0.0) -> _XCiTTrunk:
    import timm
    net = timm.create_model(timm_name, pretrained=False, num_classes=0,
                            drop_path_rate=drop_path_rate)
    patch = int(timm_name.split("_p")[1].split("_")[0])
    return _XCiTTrunk(net, patch)


_ALIASES = {"vit_t": "vit_tiny", "vit_s": "vit_small", "vit_b": "vit_base", "vit_l": "vit_large",
            "deit_tiny": "vit_tiny", "deit_small": "vit_small"}


def parse_arch(arch: str, patch_size: int | None = None) -> tuple[str, str | None, int | None]:
    """Split an architecture name into ``(family, size, patch)``.

    Accepts the zoo names (``vit_s16``, ``vit_b8``, ``resnet50``, ``xcit_s12_16``), the
    release names (``vit_small`` + ``patch_size``, ``deit_small``) and
    ``vit_tiny16``-style shorthands."""
    a = arch.lower()
    if a in ("resnet50", "resnet_50"):
        return "resnet", "50", None
    if a.startswith("xcit"):
        return "xcit", a, patch_size
    for short, long in sorted(_ALIASES.items(), key=lambda kv: -len(kv[0])):
        if a.startswith(long):
            break
        if a.startswith(short):
            a = long + a[len(short):]
            break
    if a.startswith("vit_"):
        rest = a[4:]
        for size in VIT_SIZES:
            if rest.startswith(size):
                tail = rest[len(size):].lstrip("_").removeprefix("patch")
                p = int(tail) if tail else (patch_size or 16)
                if tail and patch_size is not None and patch_size != p:
                    raise ValueError(f"{arch!r} says patch {p} but patch_size={patch_size}")
                return "vit", size, p
    raise ValueError(
        f"unknown architecture {arch!r}; use vit_tiny|vit_small|vit_base|vit_large with a "
        "patch size (e.g. vit_small16, vit_s8), resnet50, or an XCiT zoo name")


_XCIT_TIMM = {"xcit_s12_16": "xcit_small_12_p16_224", "xcit_s12_8": "xcit_small_12_p8_224",
              "xcit_m24_16": "xcit_medium_24_p16_224", "xcit_m24_8": "xcit_medium_24_p8_224"}


def build_backbone(arch: str, patch_size: int | None = None, *, img_size: int = 224,
                   drop_path_rate: float = 0.0, pos_embed_interp: str = "dino",
                   init: str = "dino") -> nn.Module:
    """Build a randomly initialised backbone by architecture name.

    ``arch``: ``vit_s16``-style zoo names, ``vit_small`` (+ ``patch_size``), ``vit_tiny8``,
    ``resnet50``, ``xcit_s12_16`` or a timm XCiT name. The result maps ``[B, 3, H, W]`` to
    ``[B, embed_dim]``.
    """
    family, size, patch = parse_arch(arch, patch_size)
    if family == "resnet":
        return build_resnet50()
    if family == "xcit":
        name = _XCIT_TIMM.get(size, size)
        return build_xcit(name, drop_path_rate=drop_path_rate)
    return build_vit(size, patch, img_size=img_size, drop_path_rate=drop_path_rate,
                     pos_embed_interp=pos_embed_interp, init=init)


def trained_grid_from_pos_embed(pos_embed: torch.Tensor, num_prefix_tokens: int = 1) -> int:
    """Side of the square patch grid a ``[1, P + n, D]`` position embedding was trained at."""
    n = pos_embed.shape[1] - num_prefix_tokens
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"position embedding with {n} patch positions is not a square grid")
    return side
