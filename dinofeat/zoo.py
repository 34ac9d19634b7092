"""The model table: every published DINO backbone as data.

Each entry says what the network is (architecture, patch size, feature dimension, depth,
heads), where its weights live (Hugging Face hub repo of the timm copy, the original
release URLs) and what the paper reports for it (ImageNet k-NN and linear top-1), plus
the preprocessing its numbers were measured with. Nothing here builds or downloads
anything: :mod:`dinofeat.backbones` builds, :mod:`dinofeat.weights` fetches.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "ModelSpec",
    "MODELS",
    "get_spec",
    "list_models",
    "register_model",
    "format_table",
    "format_markdown_table",
]

PREPROCESSING_MODES = ("dino", "whole")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
#: The largest resize or crop side preprocessing may ask for (8192 px: 200 MB as uint8 RGB).
MAX_INPUT_SIDE = 8192

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RELEASE = "https://dl.fbaipublicfiles.com/dino"


@dataclass(frozen=True)
class Preprocessing:
    """How images are turned into the model's input tensor.

    ``mode="dino"``: resize the short side to ``resize_size`` (bicubic), centre-crop
    ``crop_size`` (the k-NN / linear evaluation protocol of the paper). ``mode="whole"``:
    resize the whole image so that its long side is ``crop_size`` and round both sides
    down to a multiple of the patch size (retrieval, attention maps).
    """

    mode: str = "dino"
    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    grayscale: bool = False  # convert to one channel and repeat it three times

    def __post_init__(self) -> None:
        # Preprocessing is also read from files (weights metadata, index headers, ONNX
        # exports): a value that would make a 28-px image allocate gigabytes, or a mode
        # nobody implements, is refused here rather than deep inside a resize.
        if self.mode not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing mode must be one of {', '.join(PREPROCESSING_MODES)},"
                             f" got {self.mode!r}")
        for key in ("resize_size", "crop_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_INPUT_SIDE:
                raise ValueError(f"preprocessing {key} must be a whole number of pixels from 1 "
                                 f"to {MAX_INPUT_SIDE}, got {v!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"preprocessing interpolation must be one of "
                             f"{', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        for key in ("mean", "std"):
            v = getattr(self, key)
            ok = isinstance(v, (tuple, list)) and len(v) == 3 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in v)
            if not ok or (key == "std" and min(v) <= 0):
                raise ValueError(f"preprocessing {key} must be three finite numbers"
                                 f"{' above 0' if key == 'std' else ''}, got {v!r}")
            object.__setattr__(self, key, tuple(float(x) for x in v))
        if not isinstance(self.grayscale, bool):
            raise ValueError(f"preprocessing grayscale must be true or false, got "
                             f"{self.grayscale!r}")

    @classmethod
    def from_dict(cls, d: Any) -> "Preprocessing":
        """Read preprocessing stored as JSON (lists for tuples); unknown keys and bad
        values are refused with a :class:`ValueError` naming them."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing field(s): {', '.join(map(str, unknown))}")
        return cls(**d)

    def replace(self, **changes) -> "Preprocessing":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry. ``arch`` is ``"vit"``, ``"resnet"`` or ``"xcit"``."""

    name: str
    arch: str
    timm_name: str | None  # architecture name in timm (torchvision for resnet50)
    patch_size: int | None
    embed_dim: int
    depth: int | None
    num_heads: int | None
    params_m: int
    knn_top1: float | None
    linear_top1: float | None
    hf_hub_id: str | None = None  # timm copy of the weights on the Hugging Face hub
    # Pin of the hub copy: a 40-hex commit is immune to later pushes to the repo; the
    # SHA-256 of its model.safetensors, when filled, is checked on every load at that
    # revision. Both need a look at the hub; see docs/weights.md for filling them in.
    hf_revision: str = "main"
    hf_sha256: str | None = None
    backbone_url: str | None = None  # original release files
    full_checkpoint_url: str | None = None
    linear_head_url: str | None = None
    sha256: str | None = None  # of backbone_url, when known
    img_size: int = 224  # grid the position embeddings were trained at
    pos_embed_interp: str = "dino"  # "dino" (scale-factor + 0.1) or "timm" (target size)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    local_file: str | None = None  # weights shipped inside the package (dinofeat/shipped_weights/)
    description: str = ""
    dataset: str = "ImageNet-1k"  # where knn_top1 / linear_top1 were measured

    @property
    def num_patch_tokens_224(self) -> int | None:
        if self.patch_size is None:
            return None
        return (224 // self.patch_size) ** 2

    @property
    def tokens_at_224(self) -> int | None:
        n = self.num_patch_tokens_224
        return None if n is None else n + 1


def _release(folder: str, stem: str) -> dict:
    return dict(
        backbone_url=f"{_RELEASE}/{folder}/{stem}_pretrain.pth",
        full_checkpoint_url=f"{_RELEASE}/{folder}/{stem}_pretrain_full_checkpoint.pth",
        linear_head_url=f"{_RELEASE}/{folder}/{stem}_linearweights.pth",
    )


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add (or replace) a zoo entry; returns it."""
    MODELS[spec.name] = spec
    return spec


for _spec in [
    ModelSpec(
        "vit_s16", "vit", "vit_small_patch16_224", 16, 384, 12, 6, 21, 74.5, 77.0,
        hf_hub_id="timm/vit_small_patch16_224.dino",
        **_release("dino_deitsmall16_pretrain", "dino_deitsmall16"),
        description="ViT-S/16 (DeiT-S), DINO ImageNet-1k, 800 epochs",
    ),
    ModelSpec(
        "vit_s8", "vit", "vit_small_patch8_224", 8, 384, 12, 6, 21, 78.3, 79.7,
        hf_hub_id="timm/vit_small_patch8_224.dino",
        **_release("dino_deitsmall8_pretrain", "dino_deitsmall8"),
        description="ViT-S/8, DINO ImageNet-1k",
    ),
    ModelSpec(
        "vit_b16", "vit", "vit_base_patch16_224", 16, 768, 12, 12, 85, 76.1, 78.2,
        hf_hub_id="timm/vit_base_patch16_224.dino",
        **_release("dino_vitbase16_pretrain", "dino_vitbase16"),
        description="ViT-B/16, DINO ImageNet-1k",
    ),
    ModelSpec(
        "vit_b8", "vit", "vit_base_patch8_224", 8, 768, 12, 12, 85, 77.4, 80.1,
        hf_hub_id="timm/vit_base_patch8_224.dino",
        **_release("dino_vitbase8_pretrain", "dino_vitbase8"),
        description="ViT-B/8, DINO ImageNet-1k",
    ),
    ModelSpec(
        "resnet50", "resnet", "resnet50", None, 2048, None, None, 23, 67.5, 75.3,
        **_release("dino_resnet50_pretrain", "dino_resnet50"),
        description="ResNet-50 (torchvision layout), DINO ImageNet-1k",
    ),
    ModelSpec(
        "xcit_s12_16", "xcit", "xcit_small_12_p16_224", 16, 384, 12, 8, 26, 76.0, 77.8,
        **_release("dino_xcit_small_12_p16_pretrain", "dino_xcit_small_12_p16"),
        pos_embed_interp="none",
        description="XCiT-S12/16, DINO ImageNet-1k",
    ),
    ModelSpec(
        "xcit_s12_8", "xcit", "xcit_small_12_p8_224", 8, 384, 12, 8, 26, 77.1, 79.2,
        **_release("dino_xcit_small_12_p8_pretrain", "dino_xcit_small_12_p8"),
        pos_embed_interp="none",
        description="XCiT-S12/8, DINO ImageNet-1k",
    ),
    ModelSpec(
        "xcit_m24_16", "xcit", "xcit_medium_24_p16_224", 16, 512, 24, 8, 84, 76.4, 78.8,
        **_release("dino_xcit_medium_24_p16_pretrain", "dino_xcit_medium_24_p16"),
        pos_embed_interp="none",
        description="XCiT-M24/16, DINO ImageNet-1k",
    ),
    ModelSpec(
        "xcit_m24_8", "xcit", "xcit_medium_24_p8_224", 8, 512, 24, 8, 84, 77.9, 80.3,
        **_release("dino_xcit_medium_24_p8_pretrain", "dino_xcit_medium_24_p8"),
        pos_embed_interp="none",
        description="XCiT-M24/8, DINO ImageNet-1k",
    ),
    # Trained by this package: `python benchmarks/fashion_mnist.py --recipe ship
    # --save-weights dinofeat/shipped_weights/vit_t_fmnist.safetensors` (recipe "ship" of
    # dinofeat.demo.RECIPES, 3000 steps x 64 unlabelled photos on one CPU thread). k-NN top-1:
    # the 10,000 test photos against the 60,000 training photos (k = 20, T = 0.07), from
    # benchmarks/results/fashion_mnist_ship.json (tests/test_fashion_mnist.py recomputes it).
    ModelSpec(
        "vit_t_fmnist", "vit", None, 7, 192, 4, 3, 2, 81.39, None,
        img_size=28, local_file="vit_t_fmnist.safetensors", dataset="Fashion-MNIST",
        preprocessing=Preprocessing(mode="dino", resize_size=28, crop_size=28,
                                    interpolation="bicubic", mean=(0.286,) * 3,
                                    std=(0.353,) * 3, grayscale=True),
        description="ViT 192-d, 4 blocks, 7x7-px patches, DINO on Fashion-MNIST (28x28 grey "
                    "photos) by dinofeat on a CPU; shipped in the package, no download",
    ),
]:
    register_model(_spec)


def get_spec(name: str) -> ModelSpec:
    """The zoo entry called ``name``; a ``KeyError`` naming the valid names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}"
        ) from None


def list_models(as_dicts: bool = False):
    """Names of the zoo models (or, with ``as_dicts=True``, one dict per model with
    name, arch, dim, patch size, params, the k-NN/linear top-1 and the ``dataset`` they
    were measured on: ImageNet-1k for the published models)."""
    if not as_dicts:
        return list(MODELS)
    return [
        dict(
            name=s.name,
            arch=s.arch,
            dim=s.embed_dim,
            patch_size=s.patch_size,
            params_m=s.params_m,
            knn_top1=s.knn_top1,
            linear_top1=s.linear_top1,
            hf_hub_id=s.hf_hub_id,
            description=s.description,
            dataset=s.dataset,
        )
        for s in MODELS.values()
    ]


def format_table(local: "dict[str, object] | None" = None) -> str:
    """The zoo as a plain-text table (what ``dinofeat models`` prints). ``local`` maps a
    name to where its weights already are on this machine (``None``: not here), as
    :func:`dinofeat.weights.local_weights` finds them; given, a "here" column shows it."""
    head = ("name", "arch", "dim", "patch", "params", "k-NN", "linear", "weights",
            "top-1 on") + (("here",) if local is not None else ())
    rows = [head]
    for s in MODELS.values():
        src = s.hf_hub_id or ("package" if s.local_file else "release .pth")
        rows.append((
            s.name, s.arch, str(s.embed_dim), str(s.patch_size or "-"), f"{s.params_m}M",
            f"{s.knn_top1:.1f}" if s.knn_top1 is not None else "-",
            f"{s.linear_top1:.1f}" if s.linear_top1 is not None else "-",
            src, s.dataset,
        ) + (("yes" if local.get(s.name) else "no",) if local is not None else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown_table() -> str:
    """The zoo as a Markdown table with the published top-1 numbers (what
    ``dinofeat models --markdown`` prints and README.md's model table holds)."""
    lines = ["| model | arch | dim | patch | params | k-NN top-1 | linear top-1 | measured on |",
             "|---|---|---|---|---|---|---|---|"]
    for s in MODELS.values():
        top1 = [f"{v:.1f}" if v is not None else "-" for v in (s.knn_top1, s.linear_top1)]
        lines.append(f"| `{s.name}` | {s.arch} | {s.embed_dim} | {s.patch_size or '-'} | "
                     f"{s.params_m}M | {top1[0]} | {top1[1]} | {s.dataset} |")
    return "\n".join(lines)
