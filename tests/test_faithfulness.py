"""dinofeat computes exactly what the original DINO ViT computes, for the same weights.

``reference_forward`` below is written from the formulas alone (patch convolution,
[CLS] token, position embeddings resized the original's way, pre-norm blocks with
LayerNorm eps 1e-6, qkv with bias, ``softmax(q k^T * d^-0.5)``, MLP ratio 4 with exact
GELU, final LayerNorm); it uses neither timm nor dinofeat. The original resizes the
trained 14 x 14 (/16) or 28 x 28 (/8) grid of position embeddings with bicubic
interpolation called with a *scale factor* ``((h + 0.1) / h0, (w + 0.1) / w0)``, and keeps
them as they are only for a square image with the trained grid.

The weights are random but shaped like trained ones (a smooth position-embedding field,
attention logits with a spread of a few units, so that attention is far from uniform);
they are written to a release-style ``.pth`` and read back with ``dinofeat.load``.
The bound is 1e-5 max abs difference (fp32, CPU) for the [CLS] feature and for every
entry of the last block's attention.

Run ``python tests/test_faithfulness.py`` to print the measured differences, including
those of timm's own ViT (size-based resampling) and of LayerNorm eps 1e-12, for
docs/weights.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dinofeat

TOL = 1e-5
# name -> (embed_dim, depth, heads, patch); the ViT-S rows of the paper's table, ViT-T small
ARCHS = {"vit_s16": (384, 12, 6, 16), "vit_s8": (384, 12, 6, 8),
         "vit_tiny16": (192, 12, 3, 16), "vit_tiny8": (192, 12, 3, 8)}


# ------------------------------------------------------------- weights and reference
def dino_like_vit_weights(dim: int, depth: int, heads: int, patch: int, grid: int = 14,
                          seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ViT weights in the release's names with trained-like statistics:
    unit-variance patch features, a smooth position field (plane waves over the grid
    plus a little noise), attention logits of spread ~3 (so attention is peaked), and
    norm gains around 1."""
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    freq = torch.rand(dim, 2, generator=g) * 0.8  # radians per patch
    phase = torch.rand(dim, 1, 1, generator=g) * 2 * math.pi
    field = torch.sin(freq[:, 0, None, None] * rows + freq[:, 1, None, None] * cols + phase)
    patch_pos = field.reshape(dim, grid * grid).T + normal(grid * grid, dim, std=0.05)
    sd = {
        "cls_token": normal(1, 1, dim, std=0.5),
        "pos_embed": torch.cat([normal(1, dim, std=0.5), patch_pos])[None],
        "patch_embed.proj.weight": normal(dim, 3, patch, patch, std=(3 * patch * patch) ** -0.5),
        "patch_embed.proj.bias": normal(dim, std=0.05),
    }
    qk_std = (3.0 / dim) ** 0.5  # q.k / sqrt(d_head) has a standard deviation of about 3
    for i in range(depth):
        b = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[b + norm + ".weight"] = 1 + normal(dim, std=0.1)
            sd[b + norm + ".bias"] = normal(dim, std=0.05)
        sd[b + "attn.qkv.weight"] = torch.cat([normal(2 * dim, dim, std=qk_std),
                                               normal(dim, dim, std=dim ** -0.5)])
        sd[b + "attn.qkv.bias"] = normal(3 * dim, std=0.05)
        sd[b + "attn.proj.weight"] = normal(dim, dim, std=0.5 * dim ** -0.5)
        sd[b + "attn.proj.bias"] = normal(dim, std=0.02)
        sd[b + "mlp.fc1.weight"] = normal(4 * dim, dim, std=dim ** -0.5)
        sd[b + "mlp.fc1.bias"] = normal(4 * dim, std=0.02)
        sd[b + "mlp.fc2.weight"] = normal(dim, 4 * dim, std=0.5 * (4 * dim) ** -0.5)
        sd[b + "mlp.fc2.bias"] = normal(dim, std=0.02)
    sd["norm.weight"] = 1 + normal(dim, std=0.1)
    sd["norm.bias"] = normal(dim, std=0.05)
    return sd


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)  # biased variance, as LayerNorm uses
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # exact GELU


def reference_pos_embed(pos_embed: torch.Tensor, h: int, w: int, square_image: bool,
                        resize: str = "dino") -> torch.Tensor:
    """The position embeddings for an ``h x w`` patch grid.

    ``resize="dino"``: the original (scale factor ``(n + 0.1) / n0``, bicubic, kept as is
    only for a square image with the trained grid). ``"size"``: bicubic resampling to a
    target size with antialiasing (timm's way), kept as is whenever the grid matches."""
    n0 = pos_embed.shape[1] - 1
    g0 = int(math.isqrt(n0))
    dim = pos_embed.shape[-1]
    same = (h, w) == (g0, g0)
    if same and (square_image or resize == "size"):
        return pos_embed
    grid = pos_embed[:, 1:].reshape(1, g0, g0, dim).permute(0, 3, 1, 2)
    if resize == "dino":
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g0, (w + 0.1) / g0),
                             mode="bicubic", align_corners=False)
    else:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False,
                             antialias=True)
    assert grid.shape[-2:] == (h, w)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)], 1)


@torch.no_grad()
def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int,
                      eps: float = 1e-6, resize: str = "dino"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The original DINO ViT from the formulas: images ``[B, 3, H, W]`` -> (normed [CLS]
    ``[B, D]``, last block's softmax attention ``[B, heads, 1 + N, 1 + N]``)."""
    B = x.shape[0]
    weight = sd["patch_embed.proj.weight"]
    dim, patch = weight.shape[0], weight.shape[-1]
    t = F.conv2d(x, weight, sd["patch_embed.proj.bias"], stride=patch)  # [B, D, h, w]
    h, w = t.shape[-2:]
    t = torch.cat([sd["cls_token"].expand(B, 1, dim), t.flatten(2).transpose(1, 2)], dim=1)
    t = t + reference_pos_embed(sd["pos_embed"], h, w, x.shape[-2] == x.shape[-1], resize)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    d_head = dim // heads
    attn = torch.empty(0)
    for i in range(depth):
        p = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        y = _layer_norm(t, p["norm1.weight"], p["norm1.bias"], eps)
        qkv = y @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]  # [B, T, 3D]
        q, k, v = (z.reshape(B, -1, heads, d_head).transpose(1, 2) for z in qkv.chunk(3, -1))
        attn = torch.softmax(q @ k.transpose(-2, -1) * d_head ** -0.5, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, -1, dim)
        t = t + out @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        y = _layer_norm(t, p["norm2.weight"], p["norm2.bias"], eps)
        y = _gelu(y @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"])
        t = t + y @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    t = _layer_norm(t, sd["norm.weight"], sd["norm.bias"], eps)
    return t[:, 0], attn


# ------------------------------------------------------------------------ helpers
def _weights_file(tmp_path: Path, arch: str, seed: int = 0) -> tuple[dict, Path]:
    dim, depth, heads, patch = ARCHS[arch]
    sd = dino_like_vit_weights(dim, depth, heads, patch, grid=224 // patch, seed=seed)
    path = tmp_path / f"{arch}_release_backbone.pth"
    torch.save(sd, path)
    return sd, path


def _image(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    """A normalised-image-like batch: smooth structure plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, max(height // 32, 2), max(width // 32, 2), generator=g)
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return smooth + 0.3 * torch.randn(batch, 3, height, width, generator=g)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _check_against_reference(model, sd, heads, x, cls_row: bool = False
                             ) -> tuple[float, float]:
    with torch.no_grad():
        cls = model(x)
        attn = model.last_self_attention(x)
        row = model.last_cls_attention(x) if cls_row else None
    ref_cls, ref_attn = reference_forward(sd, x, heads)
    d_cls, d_attn = _max_diff(cls, ref_cls), _max_diff(attn, ref_attn)
    assert d_cls <= TOL and d_attn <= TOL, (d_cls, d_attn)
    if row is not None:
        assert _max_diff(row, ref_attn[:, :, 0]) <= TOL
    # the weights make the test discriminating: every head's [CLS] attention is peaked
    n_tokens = ref_attn.shape[-1]
    assert ref_attn[:, :, 0].max(-1).values.min() > 3.0 / n_tokens
    return d_cls, d_attn


# -------------------------------------------------------------------------- tests
@pytest.mark.parametrize("arch,height,width,batch", [
    ("vit_s16", 224, 224, 2),
    ("vit_s16", 480, 640, 1),
    ("vit_s8", 224, 224, 1),
    pytest.param("vit_s8", 480, 640, 1, marks=pytest.mark.slow),
])
def test_matches_original_vit(tmp_path, arch, height, width, batch):
    sd, path = _weights_file(tmp_path, arch)
    model = dinofeat.load(path, device="cpu")
    dim, depth, heads, patch = ARCHS[arch]
    assert (model.embed_dim, model.patch_size, model.num_heads) == (dim, patch, heads)
    _check_against_reference(model, sd, heads, _image(batch, height, width))


@pytest.mark.parametrize("arch", ["vit_tiny16", "vit_tiny8"])
def test_matches_original_vit_at_many_sizes(tmp_path, arch):
    """Smaller and larger grids, non-square images, one side at the trained size, and
    sides that are not multiples of the patch (the remainder is dropped; a non-square
    image with the trained grid still gets the original's resampling)."""
    sd, path = _weights_file(tmp_path, arch, seed=3)
    model = dinofeat.load(path, device="cpu")
    p = ARCHS[arch][3]
    sizes = [(4 * p, 4 * p), (6 * p, 10 * p), (10 * p, 6 * p), (224, 7 * p),
             (15 * p, 15 * p), (224, 232), (4 * p + 5, 5 * p + 3)]
    for h, w in sizes:
        _check_against_reference(model, sd, ARCHS[arch][2], _image(2, h, w, seed=h + w),
                                 cls_row=True)


@pytest.mark.parametrize("arch,height,width", [("vit_s16", 224, 224), ("vit_tiny8", 96, 160)])
def test_cls_only_last_block_equals_full_block(tmp_path, arch, height, width):
    """Inference computes the last block for [CLS] only; it must give the full
    computation's feature (both dinofeat's own full path and the reference) to 1e-5."""
    sd, path = _weights_file(tmp_path, arch, seed=5)
    model = dinofeat.load(path, device="cpu")
    x = _image(3, height, width, seed=7)
    vit = model.backbone
    calls = []
    hook = vit.vit.blocks[-1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        fast = vit(x)  # the [CLS]-only path: the last block's forward is never called
        full = vit.forward_tokens(x)[:, 0]
    hook.remove()
    assert len(calls) == 1  # only forward_tokens ran the whole last block
    with torch.enable_grad():
        grad_path = vit(x).detach()  # training keeps the full block
    ref, _ = reference_forward(sd, x, ARCHS[arch][2])
    assert _max_diff(fast, full) <= TOL
    assert _max_diff(fast, ref) <= TOL
    assert _max_diff(grad_path, ref) <= TOL


def test_reference_detects_size_based_resampling(tmp_path):
    """The bound has teeth: timm's size-based resampling, same weights, fails it away from
    224 while agreeing at 224. dinofeat's ``pos_embed_interp="timm"`` is timm's own."""
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    sd, path = _weights_file(tmp_path, "vit_tiny16", seed=5)
    peer = timm_vit.VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=12,
                                      num_heads=3, num_classes=0, dynamic_img_size=True)
    peer.load_state_dict(sd)
    peer.eval()
    as_timm = dinofeat.load(path, device="cpu", pos_embed_interp="timm")
    with torch.no_grad():
        x224, x_big = _image(1, 224, 224), _image(1, 320, 480)
        ref224 = reference_forward(sd, x224, 3)[0]
        assert _max_diff(peer.forward_features(x224)[:, 0], ref224) <= TOL
        timm_big = peer.forward_features(x_big)[:, 0]
        assert _max_diff(timm_big, reference_forward(sd, x_big, 3)[0]) > 100 * TOL
        assert _max_diff(timm_big, reference_forward(sd, x_big, 3, resize="size")[0]) <= TOL
        assert _max_diff(as_timm(x_big), timm_big) <= TOL


def test_architecture_constants_are_the_originals(tmp_path):
    """LayerNorm eps 1e-6 everywhere, exact (erf) GELU, qkv with bias, scale d^-0.5."""
    _, path = _weights_file(tmp_path, "vit_tiny16")
    vit = dinofeat.load(path, device="cpu").backbone.vit
    norms = [m for m in vit.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 12 + 1 and all(m.eps == 1e-6 for m in norms)
    gelus = [m for m in vit.modules() if isinstance(m, torch.nn.GELU)]
    assert len(gelus) == 12 and all(m.approximate == "none" for m in gelus)
    for blk in vit.blocks:
        assert blk.attn.qkv.bias is not None
        assert blk.attn.scale == pytest.approx(64 ** -0.5)
        assert blk.mlp.fc1.out_features == 4 * 192


# ------------------------------------------------------------- measurements (docs)
def _to_hf_vit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release names -> Hugging Face transformers ``ViTModel`` names (5.x layout)."""
    out = {"embeddings.cls_token": sd["cls_token"],
           "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, hf = f"blocks.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{kind}"].chunk(3)
            out.update({
                f"{hf}attention.q_proj.{kind}": q, f"{hf}attention.k_proj.{kind}": k,
                f"{hf}attention.v_proj.{kind}": v,
                f"{hf}attention.o_proj.{kind}": sd[f"{b}attn.proj.{kind}"],
                f"{hf}layernorm_before.{kind}": sd[f"{b}norm1.{kind}"],
                f"{hf}layernorm_after.{kind}": sd[f"{b}norm2.{kind}"],
                f"{hf}mlp.fc1.{kind}": sd[f"{b}mlp.fc1.{kind}"],
                f"{hf}mlp.fc2.{kind}": sd[f"{b}mlp.fc2.{kind}"]})
    return out


def measure(archs=("vit_s16", "vit_s8"), sizes=((224, 224), (480, 640))) -> list[dict]:
    """Max abs differences from the reference, for docs/weights.md.

    Columns: dinofeat (fp32) against the fp32 reference and against the float64
    reference; timm's ``VisionTransformer(dynamic_img_size=True)`` (size-based resampling
    with antialiasing); Hugging Face ``ViTModel`` with ``interpolate_pos_encoding=True``
    (size-based, no antialiasing) at LayerNorm eps 1e-6 and at 1e-12; and the effect of
    eps 1e-12 alone, computed in float64 so that fp32 rounding does not hide it."""
    import tempfile

    from timm.models.vision_transformer import VisionTransformer
    try:
        from transformers import ViTConfig, ViTModel
    except ImportError:  # the bench extra
        ViTConfig = ViTModel = None

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            dim, depth, heads, patch = ARCHS[arch]
            sd, path = _weights_file(Path(tmp), arch)
            sd64 = {k: v.double() for k, v in sd.items()}
            model = dinofeat.load(path, device="cpu")
            timm_vit = VisionTransformer(patch_size=patch, embed_dim=dim, depth=depth,
                                         num_heads=heads, num_classes=0, dynamic_img_size=True)
            timm_vit.load_state_dict(sd)
            timm_vit.eval()
            hf = {}
            for eps in ((1e-6, 1e-12) if ViTModel is not None else ()):
                cfg = ViTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
                                intermediate_size=4 * dim, patch_size=patch, image_size=224,
                                layer_norm_eps=eps, qkv_bias=True, hidden_act="gelu")
                cfg._attn_implementation = "eager"  # returns the attention matrices
                hf[eps] = ViTModel(cfg, add_pooling_layer=False).eval()
                hf[eps].load_state_dict(_to_hf_vit(sd), strict=True)
            for h, w in sizes:
                x = _image(1, h, w)
                row = dict(arch=arch, size=f"{h}x{w}")
                with torch.no_grad():
                    cls, attn = model(x), model.last_self_attention(x)
                    timm_cls = timm_vit.forward_features(x)[:, 0]
                ref_cls, ref_attn = reference_forward(sd, x, heads)
                r64_cls, r64_attn = reference_forward(sd64, x.double(), heads)
                e64_cls, e64_attn = reference_forward(sd64, x.double(), heads, eps=1e-12)
                _, timm_attn = reference_forward(sd, x, heads, resize="size")
                row.update(dinofeat_cls=_max_diff(cls, ref_cls),
                           dinofeat_attn=_max_diff(attn, ref_attn),
                           dinofeat_cls64=_max_diff(cls.double(), r64_cls),
                           dinofeat_attn64=_max_diff(attn.double(), r64_attn),
                           timm_cls=_max_diff(timm_cls, ref_cls),
                           timm_attn=_max_diff(timm_attn, ref_attn),
                           timm_cos=F.cosine_similarity(timm_cls, ref_cls).item(),
                           eps12_cls64=_max_diff(e64_cls, r64_cls),
                           eps12_attn64=_max_diff(e64_attn, r64_attn),
                           cls_absmax=ref_cls.abs().max().item())
                # every layer's attention is returned: only affordable for small grids
                want_attn = (h // patch) * (w // patch) <= 2000
                for eps, net in hf.items():
                    with torch.no_grad():
                        out = net(pixel_values=x, output_attentions=want_attn,
                                  interpolate_pos_encoding=(h, w) != (224, 224))
                    tag = "hf6" if eps == 1e-6 else "hf12"
                    row[tag + "_cls"] = _max_diff(out.last_hidden_state[:, 0], ref_cls)
                    row[tag + "_attn"] = (_max_diff(out.attentions[-1], ref_attn) if want_attn
                                          else float("nan"))
                    del out
                rows.append(row)
                print({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()},
                      flush=True)
    return rows


if __name__ == "__main__":
    import platform
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    rows = measure()
    keys = [k for k in rows[0] if k not in ("arch", "size")]
    print("| arch | size | " + " | ".join(keys) + " |")
    for row in rows:
        print(f"| {row['arch']} | {row['size']} | " + " | ".join(
            f"{row[k]:.6f}" if k.endswith("cos") else f"{row[k]:.1e}" for k in keys) + " |")
