"""Plain, unfused reference implementations for the benchmarks, written from the formulas.

These are the baselines of ``benchmarks/run.py``: the ViT computation and the DINO
training step as the paper and the original release compute them, with ordinary PyTorch
modules and no platform tuning (default matmul kernels, explicit attention in every
block, fp32 unless autocast is put around them).

* :class:`PlainViT`: patch embedding (a stride-``p`` convolution), a learned [CLS] token
  and position embeddings, ``depth`` pre-norm blocks ``x + Attn(LN(x))``,
  ``x + MLP(LN(x))`` with ``Attn = softmax(q k^T / sqrt(d)) v`` per head, an MLP of
  ratio 4 with exact GELU, LayerNorm eps 1e-6, a final LayerNorm. Parameter names are the
  release's (= timm's), so one state dict loads into PlainViT, dinofeat and timm alike.
* :class:`PlainHead`: MLP ``D -> 2048 -> 2048 -> 256``, L2 normalisation, weight-normed
  ``256 -> K`` without bias.
* :func:`plain_train_step`: teacher on the 2 global crops, student on all crops (same
  resolution crops batched together), DINO loss with centering and sharpening,
  backward, per-parameter gradient clipping at 3.0, AdamW, EMA teacher update.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PlainAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        if return_attention:
            return attn
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class PlainMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PlainBlock(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = PlainAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = PlainMlp(dim, 4 * dim)
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class PlainViT(nn.Module):
    """``[B, 3, H, W]`` -> normed [CLS] ``[B, D]``; see the module docstring."""

    def __init__(self, dim: int = 384, depth: int = 12, heads: int = 6, patch: int = 16,
                 img_size: int = 224, drop_path_rate: float = 0.0):
        super().__init__()
        self.patch = patch
        self.grid = img_size // patch
        self.embed_dim = dim
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, dim))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(PlainBlock(dim, heads, r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def pos_for(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        g = self.pos_embed[:, 1:].reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        g = F.interpolate(g, scale_factor=((h + 0.1) / self.grid, (w + 0.1) / self.grid),
                          mode="bicubic", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], g.flatten(2).transpose(1, 2)], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_for(h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]

    def last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, heads, 1 + N, 1 + N]``, every block computed unfused."""
        x = self.tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn(last.norm1(x), return_attention=True)


class PlainHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last_v = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)
        self.last_g = nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        w = self.last_g * self.last_v / self.last_v.norm(dim=1, keepdim=True)
        return x @ w.t()


class PlainDINO(nn.Module):
    def __init__(self, backbone: PlainViT, head: PlainHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        # crops of the same resolution go through the backbone together, as in the release
        feats, start = [], 0
        sizes = [c.shape[-1] for c in crops]
        while start < len(crops):
            end = start
            while end < len(crops) and sizes[end] == sizes[start]:
                end += 1
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(feats))


def build_plain_dino(dim: int, depth: int, heads: int, patch: int, out_dim: int,
                     drop_path_rate: float = 0.1) -> tuple[PlainDINO, PlainDINO]:
    student = PlainDINO(PlainViT(dim, depth, heads, patch, drop_path_rate=drop_path_rate),
                        PlainHead(dim, out_dim))
    for m in student.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    nn.init.trunc_normal_(student.backbone.pos_embed, std=0.02)
    nn.init.trunc_normal_(student.backbone.cls_token, std=0.02)
    teacher = PlainDINO(PlainViT(dim, depth, heads, patch), PlainHead(dim, out_dim))
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor,
              ncrops: int, student_temp: float = 0.1, teacher_temp: float = 0.04
              ) -> torch.Tensor:
    s = (student_out / student_temp).chunk(ncrops)
    t = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(2)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(ncrops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    return total / n


def plain_train_step(student: PlainDINO, teacher: PlainDINO, optimizer: torch.optim.Optimizer,
                     center: torch.Tensor, crops: list[torch.Tensor], momentum: float = 0.996,
                     clip: float = 3.0) -> float:
    teacher_out = teacher(crops[:2])
    student_out = student(crops)
    loss = dino_loss(student_out, teacher_out, center, len(crops))
    optimizer.zero_grad()
    loss.backward()
    for p in student.parameters():  # each parameter's gradient norm clipped on its own
        if p.grad is not None:
            norm = p.grad.norm(2)
            factor = clip / (norm + 1e-6)
            if factor < 1:
                p.grad.mul_(factor)
    optimizer.step()
    with torch.no_grad():
        for ps, pt in zip(student.parameters(), teacher.parameters()):
            pt.mul_(momentum).add_((1 - momentum) * ps.detach())
        center.mul_(0.9).add_(teacher_out.mean(dim=0, keepdim=True) * 0.1)
    return float(loss.detach())


def vit_flops(dim: int, depth: int, patch: int, height: int, width: int) -> float:
    """FLOPs (multiply and add counted) of one image through the ViT: patch embedding,
    ``depth`` blocks (qkv, ``q k^T``, ``attn v``, projection, MLP)."""
    n = (height // patch) * (width // patch)
    t = n + 1
    embed = 2 * n * (3 * patch * patch) * dim
    block = 2 * t * dim * 3 * dim + 2 * 2 * t * t * dim + 2 * t * dim * dim + \
        2 * 2 * t * dim * 4 * dim
    return float(embed + depth * block)


def _check() -> None:  # pragma: no cover - quick self-test: python benchmarks/plain.py
    assert math.isclose(vit_flops(384, 12, 16, 224, 224) / 1e9, 9.2, rel_tol=0.01)


if __name__ == "__main__":  # pragma: no cover
    _check()
    print("ok")
