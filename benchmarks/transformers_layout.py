"""The transformers DINO layout: dinofeat's LayerNorm epsilon choice, measured.

    python benchmarks/transformers_layout.py

Builds a transformers ``ViTModel`` with the config of the converted ``facebook/dino-*``
repos (LayerNorm eps 1e-12), fills it with the DINO-like random weights of
tests/test_faithfulness.py, ``save_pretrained``s it, loads the folder with ``dinofeat.load``
(default eps 1e-6, and ``layer_norm_eps="config"``) and prints the largest absolute [CLS]
differences against the reference forward of the test module (the original's formulas) and
against transformers' own ``ViTModel``. The numbers go into docs/weights.md.
"""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import transformers
from test_faithfulness import (
    ARCHS,
    _image,
    _max_diff,
    _to_hf_vit,
    dino_like_vit_weights,
    reference_forward,
)

import dinofeat

torch.set_num_threads(1)
for arch in ("vit_s16", "vit_s8"):
    dim, depth, heads, patch = ARCHS[arch]
    sd = dino_like_vit_weights(dim, depth, heads, patch, grid=224 // patch, seed=0)
    cfg = transformers.ViTConfig(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads,
        intermediate_size=4*dim, image_size=224, patch_size=patch, layer_norm_eps=1e-12)
    net = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    net.load_state_dict(_to_hf_vit(sd))
    folder = tempfile.mkdtemp(prefix=f"dino-{arch}-")
    net.save_pretrained(folder)
    d6 = dinofeat.load(folder, device="cpu")
    d12 = dinofeat.load(folder, device="cpu", layer_norm_eps="config")
    for (h, w) in ((224, 224), (480, 640)):
        if arch == "vit_s8" and h == 480:
            continue
        x = _image(1, h, w)
        with torch.no_grad():
            c6, a6 = d6(x), d6.last_self_attention(x)
            c12 = d12(x)
            rc, ra = reference_forward(sd, x, heads)
            r12, _ = reference_forward(sd, x, heads, eps=1e-12)
            c6_64 = d6.double()(x.double())
            c12_64 = d12.double()(x.double())
            d6.float()
            d12.float()
            hf = net(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state[:, 0]
        print(f"{arch} {h}x{w}: default(1e-6) vs reference cls {_max_diff(c6, rc):.1e} attn {_max_diff(a6, ra):.1e}; "
              f"config(1e-12) vs reference(eps 1e-12) {_max_diff(c12, r12):.1e}; "
              f"1e-6 vs 1e-12 float64 {_max_diff(c6_64, c12_64):.1e}; "
              f"config(1e-12) vs transformers ViTModel {_max_diff(c12, hf):.1e}; default vs transformers {_max_diff(c6, hf):.1e}", flush=True)
