"""Offline quickstart: list the zoo, build a model, embed a generated image.

Until a trained model ships in the package this runs with random weights (no network is
needed); with network access ``dinofeat.load("vit_s16")`` gives the published weights.
"""

import numpy as np
import torch

import dinofeat
from dinofeat.backbones import build_backbone
from dinofeat.zoo import format_table

print(format_table())
model = dinofeat.DinoModel(build_backbone("vit_s16"), name="vit_s16 (random weights)").eval()
rng = np.random.default_rng(0)
img = rng.integers(0, 256, size=(240, 320, 3), dtype=np.uint8)
x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div(255)
x = x[..., :224, :224]
with torch.inference_mode():
    feat = model(x)
print(f"\n{model.name}: feature {tuple(feat.shape)}, norm {feat.norm():.3f}")
