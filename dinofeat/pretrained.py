"""Model folders and hub repositories: read the ecosystem's, write and publish dinofeat's.

A *pretrained folder* holds ``config.json`` next to ``model.safetensors`` (or
``pytorch_model.bin``). Three flavours are read (:func:`read_folder`):

- **dinofeat** (:func:`save_pretrained`): a timm-style config (``architecture``,
  ``model_args``, ``pretrained_cfg``) plus a ``"dinofeat"`` block with the preprocessing,
  the position-embedding rule and the training summary; a README.md model card. The
  weights use timm's names, so ``timm.create_model(..., pretrained=True,
  pretrained_cfg_overlay=dict(file=...))`` loads them too;
- **timm** (``timm/vit_small_patch16_224.dino`` ...): architecture and preprocessing from
  its ``architecture``/``model_args``/``pretrained_cfg``;
- **transformers** (``ViTModel.save_pretrained``, ``facebook/dino-vits16`` ...): width,
  depth and heads from ``hidden_size``/``num_hidden_layers``/``num_attention_heads``,
  the tensors renamed by :func:`dinofeat.weights.transformers_vit_to_timm`.

Hub names (``hf-hub:org/name[@revision]``, or ``org/name`` when it is not a local path)
resolve through huggingface_hub (:func:`download`), with its cache, revisions, token and
``HF_HUB_OFFLINE``. :func:`push_to_hub` uploads a saved folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, cast

import torch

from . import weights
from .zoo import MODELS, Preprocessing

if TYPE_CHECKING:
    from .model import DinoModel

__all__ = [
    "HUB_PREFIX",
    "DINO_LAYER_NORM_EPS",
    "CONFIG_NAME",
    "WEIGHTS_NAMES",
    "PretrainedFolder",
    "parse_hub_name",
    "download",
    "read_folder",
    "set_layer_norm_eps",
    "training_summary",
    "hub_config",
    "model_card",
    "save_pretrained",
    "push_to_hub",
]

HUB_PREFIX = "hf-hub:"
# The value DINO's ViTs were trained with (timm's default too); transformers' ViTConfig
# defaults to 1e-12, and the converted facebook/dino-* configs kept that default.
DINO_LAYER_NORM_EPS = 1e-6
CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")
FORMAT_VERSION = 1

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_TIMM_VIT_BY_DIM = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224",
                    768: "vit_base_patch16_224", 1024: "vit_large_patch16_224"}


# ----------------------------------------------------------------- hub names
def parse_hub_name(name: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` for a hub name, ``None`` for anything else.

    ``hf-hub:org/name`` (timm's spelling, ``@revision`` allowed) always names a hub repo;
    a plain ``org/name`` does when it is not an existing file or folder and not a zoo
    name. ``revision`` is ``None`` when the name has no ``@``."""
    if not isinstance(name, str):
        return None
    explicit = name.startswith(HUB_PREFIX)
    body = name[len(HUB_PREFIX):] if explicit else name
    if not explicit and (name in MODELS or os.path.exists(name) or name.lower().endswith(
            (".pth", ".pt", ".bin", ".safetensors", ".onnx", ".ckpt"))):
        return None  # a zoo name, or a (missing) local weights file
    repo, _, rev = body.partition("@")
    if not _REPO_ID.match(repo) or ".." in repo:
        if explicit:
            raise ValueError(f"{name!r}: a hub name is hf-hub:ORG/NAME (optionally "
                             "@REVISION)")
        return None
    return repo, (rev or None)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def download(repo_id: str, revision: str | None = None, *,
             cache_dir: str | os.PathLike | None = None, token: str | bool | None = None
             ) -> Path:
    """The snapshot folder of hub repo ``repo_id`` holding its ``config.json`` (when it has
    one) and its weights (``model.safetensors``, else ``pytorch_model.bin``), fetched
    through huggingface_hub into its cache (:func:`dinofeat.weights.hf_cache_dir`).

    ``HF_HUB_OFFLINE=1``, or a hub that does not answer within a few seconds, uses the
    cache alone. Raises :class:`~dinofeat.weights.WeightsNotFoundError` in one line."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    endpoint = weights.hub_endpoint()
    offline = weights.hub_offline()
    unreachable = not offline and not weights.endpoint_reachable(endpoint)
    where = weights.hf_cache_dir(cache_dir)
    kw: dict[str, Any] = dict(revision=revision, cache_dir=where, token=token, endpoint=endpoint,
              local_files_only=offline or unreachable)
    rev = revision or "main"

    def fail(why: str) -> weights.WeightsNotFoundError:
        return weights.WeightsNotFoundError(
            f"hub repo {repo_id} (revision {rev}): {why}; {weights.how_to_pass_weights()}, "
            f"or fill the cache {where} on a connected machine "
            f"(hf download {repo_id}) and set HF_HUB_OFFLINE=1",
            searched=[f"Hugging Face hub {endpoint} / cache {where}"])

    gone = ("not in the cache and HF_HUB_OFFLINE is set" if offline else
            f"not in the cache and {endpoint} cannot be reached within "
            f"{weights.PROBE_TIMEOUT_S:g} s")
    try:
        config = Path(hf_hub_download(repo_id, CONFIG_NAME, **kw))
    except EntryNotFoundError:  # not in the repo (or, cache only, not cached)
        config = None  # a bare weights repo: the tensors alone tell the architecture
    except Exception as e:  # noqa: BLE001 - missing repo, revision, auth: one line
        raise fail(_one_line(e)) from None
    for name in WEIGHTS_NAMES:
        try:
            path = Path(hf_hub_download(repo_id, name, **kw))
        except EntryNotFoundError:  # remote 404 or not cached: try the next name
            continue
        except Exception as e:  # noqa: BLE001
            raise fail(_one_line(e)) from None
        if config is None:
            return path.parent
        if path.parent != config.parent:  # both from one commit: one snapshot folder
            raise fail(f"{CONFIG_NAME} and {name} came from different revisions")
        try:  # transformers' image statistics, when the repo has them
            hf_hub_download(repo_id, "preprocessor_config.json", **kw)
        except Exception:  # noqa: BLE001 - optional file
            pass
        return path.parent
    raise fail(gone if offline or unreachable else
               f"has none of {', '.join(WEIGHTS_NAMES)} (sharded checkpoints are not read)")


# ---------------------------------------------------------------- reading
@dataclass
class PretrainedFolder:
    """What :func:`read_folder` found: the weights file and how to build the network."""

    weights: Path
    kind: str  # "dinofeat", "timm" or "transformers"
    config: dict[str, Any]
    num_heads: int | None = None
    layer_norm_eps: float | None = None  # the config's value (transformers, dinofeat)
    preprocessing: Preprocessing | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # dinofeat's name/arch/pos-embed rule


def _weights_in(folder: Path) -> Path:
    for name in WEIGHTS_NAMES:
        if (folder / name).is_file():
            return folder / name
    if (folder / "model.safetensors.index.json").is_file():
        raise weights.CheckpointError(f"{folder}: sharded checkpoint (model.safetensors."
                                      "index.json); merge it into one model.safetensors")
    raise FileNotFoundError(f"{folder} has {CONFIG_NAME} but no weights "
                            f"({' or '.join(WEIGHTS_NAMES)})")


def _prep_from_timm(cfg: Mapping[str, Any]) -> Preprocessing | None:
    size = cfg.get("input_size")
    if not size or "mean" not in cfg:
        return None
    crop = int(size[-1])
    pct = float(cfg.get("crop_pct") or 1.0)
    return Preprocessing(mode="dino", resize_size=int(math.floor(crop / pct)), crop_size=crop,
                         interpolation=str(cfg.get("interpolation") or "bicubic"),
                         mean=_rgb(cfg["mean"]), std=_rgb(cfg["std"]))


def _rgb(values: Any) -> tuple[float, float, float]:
    # three numbers from a config file; Preprocessing refuses any other length with a
    # clear error, so the cast only states what is checked there
    return cast("tuple[float, float, float]", tuple(map(float, values)))


def _prep_from_dict(d: Mapping[str, Any], source: Path) -> Preprocessing:
    try:
        return Preprocessing.from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise weights.CheckpointError(f"{source}: bad preprocessing: {e}") from None


def read_folder(folder: str | os.PathLike) -> PretrainedFolder | None:
    """Describe a pretrained folder, or ``None`` when ``folder`` has no model
    ``config.json`` (a training run folder's ``config.json`` is a training config)."""
    folder = Path(folder)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise weights.CheckpointError(f"{cfg_path}: not a readable JSON file: {e}") from None
    if not isinstance(cfg, dict):
        return None
    if isinstance(cfg.get("dinofeat"), dict) and "architecture" in cfg:
        d = cfg["dinofeat"]
        return PretrainedFolder(
            _weights_in(folder), "dinofeat", cfg, num_heads=d.get("num_heads"),
            layer_norm_eps=d.get("layer_norm_eps"),
            preprocessing=_prep_from_dict(d["preprocessing"], cfg_path) if d.get("preprocessing")
            else None, meta={k: d[k] for k in ("name", "arch", "pos_embed_interp") if k in d})
    if "architecture" in cfg:  # timm
        args = cfg.get("model_args") or {}
        pre = cfg.get("pretrained_cfg") or cfg
        return PretrainedFolder(_weights_in(folder), "timm", cfg,
                                num_heads=args.get("num_heads"),
                                preprocessing=_prep_from_timm(pre),
                                meta={"name": str(cfg["architecture"])})
    if cfg.get("model_type") in ("vit", "dino", "dinov1"):
        for key, want in (("hidden_act", "gelu"), ("qkv_bias", True), ("num_channels", 3)):
            if cfg.get(key, want) != want:
                raise weights.CheckpointError(f"{cfg_path}: {key}={cfg[key]!r}; dinofeat "
                                              f"reads ViTs with {key}={want!r}")
        hidden, inter = cfg.get("hidden_size"), cfg.get("intermediate_size")
        if hidden and inter and inter != 4 * hidden:
            raise weights.CheckpointError(f"{cfg_path}: MLP width {inter} is not 4 x "
                                          f"{hidden}; dinofeat reads DINO ViTs (MLP ratio 4)")
        prep = None
        pp = folder / "preprocessor_config.json"
        if pp.is_file():
            try:
                p = json.loads(pp.read_text(encoding="utf-8"))
                if p.get("image_mean") and p.get("image_std"):
                    # statistics from the repo; geometry stays DINO's evaluation protocol
                    prep = Preprocessing(mean=_rgb(p["image_mean"]), std=_rgb(p["image_std"]))
            except (OSError, ValueError, TypeError):
                prep = None
        return PretrainedFolder(_weights_in(folder), "transformers", cfg,
                                num_heads=cfg.get("num_attention_heads"),
                                layer_norm_eps=cfg.get("layer_norm_eps"), preprocessing=prep,
                                meta={"name": str(cfg.get("_name_or_path") or folder.name)})
    return None


def set_layer_norm_eps(backbone: torch.nn.Module, eps: float) -> None:
    """Set the epsilon of every LayerNorm of ``backbone`` (DINO's is 1e-6)."""
    for m in backbone.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = float(eps)


def layer_norm_eps_of(backbone: torch.nn.Module) -> float | None:
    for m in backbone.modules():
        if isinstance(m, torch.nn.LayerNorm):
            return float(m.eps)
    return None


# --------------------------------------------------------------- training run
def training_summary(ckpt: Mapping[str, Any]) -> dict[str, Any] | None:
    """The recipe and outcome of the training run a checkpoint comes from, JSON-able:
    dinofeat's own checkpoints (``config``, ``data``, ``knn``, ``history``) and the
    release's full checkpoints (``args``). ``None`` for files without that record."""
    out: dict[str, Any] = {}
    cfg = ckpt.get("config")
    keys: tuple[str, ...]
    if isinstance(cfg, Mapping) and "arch" in cfg:
        keys = ("arch", "patch_size", "epochs", "batch_size_per_gpu", "grad_accum_steps",
                "lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
                "momentum_teacher", "teacher_temp", "warmup_teacher_temp",
                "warmup_teacher_temp_epochs", "student_temp", "out_dim", "optimizer",
                "global_crop_size", "local_crop_size", "local_crops_number",
                "global_crops_scale", "local_crops_scale", "drop_path_rate", "collapse",
                "precision", "seed", "grayscale")
        out["recipe"] = {k: cfg[k] for k in keys if k in cfg}
        out["trainer"] = "dinofeat"
    elif (args := ckpt.get("args")) is not None and hasattr(args, "__dict__"):
        a = vars(args)
        keys = ("arch", "patch_size", "epochs", "batch_size_per_gpu", "lr", "min_lr",
                "momentum_teacher", "teacher_temp", "out_dim", "local_crops_number",
                "optimizer", "weight_decay", "weight_decay_end")
        out["recipe"] = {k: a[k] for k in keys if k in a and isinstance(
            a[k], (int, float, str, bool, list, tuple))}
        out["trainer"] = "DINO release"
    else:
        return None
    for key in ("epoch", "iteration"):
        if isinstance(ckpt.get(key), int):
            out[key + "s_done" if key == "epoch" else "iterations"] = int(ckpt[key])
    data = ckpt.get("data")
    if isinstance(data, Mapping):
        for key in ("num_images", "world_size"):
            if isinstance(data.get(key), int):
                out[key] = int(data[key])
    hist = ckpt.get("history")
    if isinstance(hist, list) and hist and isinstance(hist[-1], Mapping):
        loss = hist[-1].get("loss")
        if isinstance(loss, (int, float)):
            out["final_loss"] = float(loss)
    knn = ckpt.get("knn")
    if isinstance(knn, Mapping) and knn:
        out["knn"] = {k: v for k, v in knn.items() if isinstance(v, (int, float, str))}
    return json.loads(json.dumps(out, default=lambda o: list(o) if isinstance(o, tuple)
                                 else str(o)))


# ---------------------------------------------------------------- writing
def hub_config(model: "DinoModel") -> dict[str, Any]:
    """The ``config.json`` of :func:`save_pretrained`: timm's layout (so timm builds the
    network from it) plus the ``"dinofeat"`` block :func:`read_folder` reads back."""
    bb: Any = model.backbone  # its attributes (vit, patch_size...) depend on the architecture
    prep = model.preprocessing
    spec = model.spec
    d: dict[str, Any] = {
        "format": FORMAT_VERSION, "name": model.name, "arch": spec.name if spec else None,
        "family": "vit" if model.is_vit else type(bb).__name__.lower().strip("_"),
        "embed_dim": model.embed_dim, "patch_size": model.patch_size,
        "num_heads": model.num_heads, "preprocessing": prep.to_dict(),
        "pos_embed_interp": getattr(bb, "pos_embed_interp", "dino"),
        "layer_norm_eps": layer_norm_eps_of(bb), "weights_hash": model.weights_hash,
    }
    if getattr(model, "training_summary", None):
        d["training"] = model.training_summary
    if spec is not None and spec.knn_top1 is not None:
        d["published"] = {"knn_top1": spec.knn_top1, "linear_top1": spec.linear_top1,
                          "dataset": spec.dataset, "description": spec.description}
    model_args: dict[str, Any] = {}
    if model.is_vit:
        grid = bb.trained_grid
        model_args = {"img_size": [grid[0] * bb.patch_size, grid[1] * bb.patch_size],
                      "patch_size": bb.patch_size, "embed_dim": bb.embed_dim,
                      "depth": bb.depth, "num_heads": bb.num_heads,
                      "mlp_ratio": float(bb.vit.blocks[0].mlp.fc1.out_features / bb.embed_dim),
                      "qkv_bias": True, "global_pool": "token", "class_token": True}
        architecture = _TIMM_VIT_BY_DIM.get(bb.embed_dim, "vit_small_patch16_224")
        size = model_args["img_size"]
    else:
        architecture = spec.timm_name if spec and spec.timm_name else "resnet50"
        size = [prep.crop_size, prep.crop_size]
    pretrained_cfg = {
        "input_size": [3, int(size[0]), int(size[1])], "fixed_input_size": False,
        "interpolation": prep.interpolation, "crop_pct": prep.crop_size / prep.resize_size,
        "crop_mode": "center", "mean": list(prep.mean), "std": list(prep.std),
        "num_classes": 0, "first_conv": "patch_embed.proj" if model.is_vit else "conv1",
        "classifier": "head" if model.is_vit else "fc", "license": None,
    }
    return {"architecture": architecture, "num_classes": 0, "num_features": model.embed_dim,
            "global_pool": "token" if model.is_vit else "avg", "model_args": model_args,
            "pretrained_cfg": pretrained_cfg, "dinofeat": d}


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def model_card(model: "DinoModel", config: Mapping[str, Any], *, repo_id: str | None = None,
               license: str = "apache-2.0") -> str:
    """README.md of a saved model: hub metadata, how to load it (dinofeat, timm), the
    preprocessing, the training recipe and data size, k-NN accuracy when measured."""
    d = config["dinofeat"]
    name = repo_id or model.name
    where = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    what = (f"ViT, {d['embed_dim']}-d features, {config['model_args'].get('depth')} blocks, "
            f"{d['num_heads']} heads, {d['patch_size']}x{d['patch_size']}-px patches, trained "
            f"at {config['model_args']['img_size'][0]} px" if model.is_vit else
            f"{config['architecture']}, {d['embed_dim']}-d features")
    params = sum(t.numel() for t in model.backbone.state_dict().values()) / 1e6
    lines = [
        "---", f"license: {license}", "library_name: timm",
        "pipeline_tag: image-feature-extraction",
        "tags:", "- dinofeat", "- dino", "- self-supervised", "- image-feature-extraction",
        "- timm", "---", "",
        f"# {name}", "",
        f"A DINO self-supervised image feature extractor (Caron et al., \"Emerging Properties "
        f"in Self-Supervised Vision Transformers\", ICCV 2021): {what}; {params:.1f}M "
        "parameters. The feature of an image is the final-normed [CLS] token.", "",
        "## Use", "", "```python", "import dinofeat", f'model = dinofeat.load("{where}")',
        'features = model.embed("photos/")   # [N, %d], L2-normalised' % d["embed_dim"],
        "```", "",
        f"From the command line: `dinofeat embed photos/ --model {where} --out feats.npy`.", "",
    ]
    if model.is_vit:
        lines += [
            "The weights use timm's names, so timm reads them as well (same [CLS] feature at "
            "the training size):", "", "```python", "import timm",
            f'model = timm.create_model("hf-hub:{repo_id}", pretrained=True)' if repo_id else
            'import json\ncfg = json.load(open("config.json"))\n'
            'model = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,\n'
            '    pretrained_cfg_overlay=dict(file="model.safetensors"), **cfg["model_args"])',
            "```", "",
            f"Other input sizes: the position embeddings are resampled with "
            f"{'the original DINO rule (bicubic, scale factor with a 0.1 offset)' if d['pos_embed_interp'] == 'dino' else 'timm' + chr(39) + 's rule'}"
            " in dinofeat; timm resamples to a target size, which differs slightly.", ""]
    p = d["preprocessing"]
    lines += ["## Preprocessing", "",
              "| step | value |", "|---|---|",
              f"| resize (short side) | {p['resize_size']} px, {p['interpolation']} |",
              f"| centre crop | {p['crop_size']} px |",
              f"| grayscale (repeated to 3 channels) | {'yes' if p.get('grayscale') else 'no'} |",
              f"| mean | {', '.join(_fmt(v) for v in p['mean'])} |",
              f"| std | {', '.join(_fmt(v) for v in p['std'])} |", ""]
    t = d.get("training")
    lines += ["## Training", ""]
    if t:
        r = t.get("recipe", {})
        lines += [f"Trained with {t.get('trainer', 'dinofeat')}"
                  + (f" on {t['num_images']:,} unlabelled images" if "num_images" in t else "")
                  + (f", {t['epochs_done']} epochs" if "epochs_done" in t else "")
                  + (f", {t['iterations']:,} optimiser steps" if "iterations" in t else "")
                  + (f" on {t['world_size']} process(es)" if "world_size" in t else "")
                  + (f"; final loss {t['final_loss']:.4f}" if "final_loss" in t else "") + ".",
                  "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v) if not isinstance(v, list) else ', '.join(map(_fmt, v))} |"
                  for k, v in r.items()]
        lines.append("")
    elif d.get("published"):
        lines += [f"dinofeat model `{d['arch']}`: {d['published']['description']} "
                  f"(trained on {d['published']['dataset']}).", ""]
    else:
        lines += [f"Not recorded: the weights came from `{Path(str(model.source)).name}` "
                  "without a training record.", ""]
    lines += ["## Evaluation", ""]
    knn = (t or {}).get("knn")
    if knn and "knn_top1" in knn:
        lines += [f"k-NN top-1 {float(knn['knn_top1']):.2f}%"
                  + (f", top-5 {float(knn['knn_top5']):.2f}%" if "knn_top5" in knn else "")
                  + (f" (k = {knn['knn_k']}, {knn.get('knn_train', '?')} train / "
                     f"{knn.get('knn_val', '?')} val images)" if "knn_k" in knn else "")
                  + ", measured during training on the run's labelled k-NN set.", ""]
    elif d.get("published"):
        pub = d["published"]
        lines += [f"{pub['dataset']} top-1: k-NN {pub['knn_top1']}"
                  + (f", linear {pub['linear_top1']}" if pub.get("linear_top1") else "")
                  + (" (the paper's numbers)." if pub["dataset"] == "ImageNet-1k" else
                     " (dinofeat's model table).")
                  , ""]
    else:
        lines += ["No k-NN accuracy measured.", ""]
    lines += ["## Files", "",
              "- `model.safetensors`: backbone weights (timm names, float32)",
              "- `config.json`: architecture (timm), preprocessing and the `dinofeat` block "
              "(position-embedding rule, training summary)",
              f"- weights hash (dinofeat): `{d['weights_hash']}`", "",
              f"License: {license}.", ""]
    return "\n".join(lines)


def save_pretrained(model: "DinoModel", folder: str | os.PathLike, *,
                    repo_id: str | None = None, license: str = "apache-2.0") -> Path:
    """Write ``model`` as a pretrained folder: ``model.safetensors``, ``config.json`` and a
    README.md model card. Each file is replaced atomically; other files in ``folder`` are
    left alone. ``dinofeat.load(folder)`` gives the same model back."""
    from safetensors.torch import save_file

    from .utils import atomic_path, atomic_write_bytes, atomic_write_json
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    config = hub_config(model)
    config["pretrained_cfg"]["license"] = license
    d = config["dinofeat"]
    meta = {"name": model.name, "arch": d["arch"], "preprocessing": d["preprocessing"],
            "pos_embed_interp": d["pos_embed_interp"]}
    sd = {k: v.detach().to("cpu", torch.float32).contiguous()
          for k, v in model.backbone.state_dict().items() if v.is_floating_point()}
    sd.update({k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()
               if not v.is_floating_point()})
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "dinofeat": json.dumps(meta)})
    atomic_write_json(folder / CONFIG_NAME, config, indent=2)
    atomic_write_bytes(folder / "README.md", model_card(
        model, config, repo_id=repo_id, license=license).encode("utf-8"))
    return folder


def push_to_hub(model: "DinoModel", repo_id: str, *, private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None,
                commit_message: str | None = None, license: str = "apache-2.0",
                create: bool = True) -> str:
    """Save ``model`` with :func:`save_pretrained` and upload the folder to hub repo
    ``repo_id`` (created when missing, ``private`` as asked) in one commit. Returns the
    commit URL. ``$HF_ENDPOINT``, ``$HF_TOKEN`` and ``hf auth login`` are honoured."""
    from huggingface_hub import HfApi

    if not _REPO_ID.match(repo_id):
        raise ValueError(f"repo id {repo_id!r}: expected ORG/NAME")
    endpoint = weights.hub_endpoint()
    if weights.hub_offline():
        raise RuntimeError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set")
    if not weights.endpoint_reachable(endpoint):
        raise ConnectionError(f"cannot push to {repo_id}: {endpoint} cannot be reached "
                              f"within {weights.PROBE_TIMEOUT_S:g} s (no network?)")
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="dinofeat-push-") as tmp:
        save_pretrained(model, tmp, repo_id=repo_id, license=license)
        if create:
            api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=tmp, repo_id=repo_id, revision=revision,
                                 commit_message=commit_message or f"dinofeat: {model.name}")
    return str(info)
