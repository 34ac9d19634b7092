"""Finding, fetching and reading weights, safely.

Where weights come from, in order (:func:`fetch_weights`):

1. ``$DINOFEAT_WEIGHTS_DIR``: a folder holding ``<zoo name>.safetensors``/``.pth`` or the
   release file under its original name (for machines without network access);
2. a file shipped inside the package (``dinofeat/shipped_weights/``);
3. the Hugging Face hub (the timm copies, ``timm/vit_small_patch16_224.dino`` ...) through
   ``huggingface_hub``: its cache (:func:`hf_cache_dir`), ``HF_HUB_OFFLINE``,
   ``HF_HUB_CACHE`` and ``HF_HOME`` are honoured, read when called;
4. the original release URL through torch's hub cache (``$TORCH_HOME/hub/checkpoints``),
   its SHA-256 checked when the zoo knows it.

Files are read with :func:`read_checkpoint`: safetensors, or ``torch.load`` with
``weights_only=True`` admitting only ``argparse.Namespace`` beyond tensors and plain
containers (the ``args`` entry of original DINO checkpoints). Nothing is ever unpickled
freely: a file that needs any other object is refused with the object named.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .zoo import ModelSpec

__all__ = [
    "WeightsNotFoundError",
    "CheckpointError",
    "fetch_weights",
    "read_checkpoint",
    "backbone_state_dict",
    "infer_architecture",
    "sha256_file",
    "hf_cache_dir",
    "WEIGHTS_DIR_ENV",
]

WEIGHTS_DIR_ENV = "DINOFEAT_WEIGHTS_DIR"
PACKAGE_WEIGHTS = Path(__file__).parent / "shipped_weights"

# Types admitted by torch.load(weights_only=True) beyond tensors and containers.
SAFE_GLOBALS: list = [argparse.Namespace]


class WeightsNotFoundError(FileNotFoundError):
    """No copy of a model's weights could be found or downloaded."""


class CheckpointError(ValueError):
    """A weights file is corrupt, truncated, unsafe or of the wrong layout."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _env_true(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now; huggingface_hub's own
    flag, read when it was imported, when neither is set."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if (flag := _env_true(name)) is not None:
            return flag
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def hf_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache folder weights are looked up in.

    ``cache_dir`` when given, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``: the rules of
    huggingface_hub, applied when called (huggingface_hub reads them once, at import), so
    a program may set these variables after importing it."""
    def expand(p: str | os.PathLike) -> Path:
        return Path(os.path.expandvars(os.path.expanduser(os.fspath(p))))

    if cache_dir is not None:
        return expand(cache_dir)
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return expand(os.environ[name])
    if os.environ.get("HF_HOME"):
        return expand(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return expand(xdg) / "huggingface" / "hub"


def _from_weights_dir(spec: ModelSpec) -> Path | None:
    folder = os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        return None
    names = [f"{spec.name}.safetensors", f"{spec.name}.pth"]
    if spec.backbone_url:
        names.append(spec.backbone_url.rsplit("/", 1)[-1])
    for name in names:
        p = Path(folder) / name
        if p.is_file():
            return p
    return None


def fetch_weights(spec: ModelSpec, revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> Path:
    """Local path of the weights of zoo entry ``spec``, downloading them if allowed.

    Sources, in order: ``$DINOFEAT_WEIGHTS_DIR``; a file shipped in the package; the
    Hugging Face hub copy (``spec.hf_hub_id`` at ``revision``, default
    ``spec.hf_revision``) through huggingface_hub and its cache (:func:`hf_cache_dir`);
    the original release URL through torch's hub cache (``$TORCH_HOME/hub/checkpoints``).
    With ``HF_HUB_OFFLINE=1`` only what is already on disk is used.

    Raises :class:`WeightsNotFoundError` naming the model, every place searched and the
    ways to provide the file when no copy is reachable; :class:`CheckpointError` when a
    release file's SHA-256 differs from the zoo's."""
    tried: list[str] = []
    if (p := _from_weights_dir(spec)) is not None:
        return p
    tried.append(f"${WEIGHTS_DIR_ENV}: {os.environ.get(WEIGHTS_DIR_ENV) or '(not set)'}")
    if spec.local_file:
        p = PACKAGE_WEIGHTS / spec.local_file
        if p.is_file():
            return p
        tried.append(f"packaged file {p}: missing")
    offline = _offline()
    if spec.hf_hub_id:
        from huggingface_hub import hf_hub_download
        rev = revision or spec.hf_revision
        where = hf_cache_dir(cache_dir)
        try:
            return Path(hf_hub_download(spec.hf_hub_id, "model.safetensors", revision=rev,
                                        cache_dir=where, local_files_only=offline))
        except Exception as e:  # noqa: BLE001 - network, offline mode, missing repo: reported
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            tried.append(f"Hugging Face hub {spec.hf_hub_id} (revision {rev}, cache folder "
                         f"{where}): {type(e).__name__}: {first}")
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    if spec.backbone_url:
        target = ckpt_dir / spec.backbone_url.rsplit("/", 1)[-1]
        if target.is_file():
            _check_sha(target, spec)
            return target
        if offline:
            tried.append(f"release URL {spec.backbone_url}: not in the torch hub cache "
                         f"{ckpt_dir}, and HF_HUB_OFFLINE is set (no download)")
        else:
            try:
                ckpt_dir.mkdir(parents=True, exist_ok=True)
                # torch checks the hash on its temporary file and only then moves it in place
                torch.hub.download_url_to_file(spec.backbone_url, str(target),
                                               hash_prefix=spec.sha256, progress=True)
                return target
            except RuntimeError as e:
                if "invalid hash value" in str(e):
                    raise CheckpointError(
                        f"download of {spec.backbone_url} for {spec.name}: SHA-256 differs "
                        f"from the zoo's value {spec.sha256} ({e}); nothing was saved") from None
                tried.append(f"release URL {spec.backbone_url} (torch hub cache {ckpt_dir}): "
                             f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - no network, HTTP error: reported below
                tried.append(f"release URL {spec.backbone_url} (torch hub cache {ckpt_dir}): "
                             f"{type(e).__name__}: {e}")
    lines = "\n  - ".join(tried)
    release = spec.backbone_url.rsplit("/", 1)[-1] if spec.backbone_url else None
    hf_way = (f"pre-fill the Hugging Face cache on a machine with network access "
              f"(hf download {spec.hf_hub_id} model.safetensors) and copy the "
              f"cache folder to {hf_cache_dir(cache_dir)} (or point HF_HUB_CACHE/HF_HOME at "
              "it); ") if spec.hf_hub_id else ""
    release_way = (f"put the release file {release} into {ckpt_dir}; ") if release else ""
    raise WeightsNotFoundError(
        f"could not find weights for {spec.name!r}. Searched:\n  - {lines}\n"
        "Ways to supply them: dinofeat.load('/path/to/weights.pth' or '.safetensors'); "
        f"{hf_way}{release_way}or put '{spec.name}.safetensors'"
        f"{f' or {release}' if release else ''} in a folder and set ${WEIGHTS_DIR_ENV} to it.")


def _check_sha(path: Path, spec: ModelSpec) -> None:
    if spec.sha256 and sha256_file(path) != spec.sha256:
        raise CheckpointError(f"{path}: SHA-256 does not match the zoo's value for "
                              f"{spec.name} ({spec.sha256}); delete it and download again")


def _torch_load_problem(path: Path, e: Exception) -> str:
    """One sentence saying why ``torch.load(path, weights_only=True)`` failed."""
    msg = str(e)
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    m = re.search(r"GLOBAL ([\w\.]+) was not an allowed global", msg) or re.search(
        r"Unsupported global: GLOBAL ([\w\.]+)", msg)
    if m:
        return (f"{path}: refused to load: it needs {m.group(1)} to be unpickled, which could "
                "run code. dinofeat only reads tensors, plain containers and "
                "argparse.Namespace. If you trust the file, convert it to safetensors in the "
                "program that made it.")
    if (op := re.search(r"Unsupported operand (\d+)", msg)) is not None:
        return (f"{path}: refused to load: pickle opcode {op.group(1)} is not allowed in a "
                "weights-only read. The file is corrupt, or a pickle not written by "
                "torch.save (dinofeat never unpickles arbitrary objects).")
    if "weights only load failed" in msg.lower():
        return (f"{path}: refused to load: it holds something other than tensors and plain "
                f"containers ({msg.split('error:')[-1].strip().splitlines()[0][:200]}).")
    return (f"{path}: cannot be read as a checkpoint (truncated or corrupt?): "
            f"{type(e).__name__}: {first}")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a weights file without executing anything it contains.

    ``.safetensors`` -> ``{name: tensor}``; anything else goes through
    ``torch.load(weights_only=True)``. A file that would need arbitrary objects to
    unpickle, a truncated file or a non-checkpoint raises :class:`CheckpointError` naming
    the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such weights file: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a weights file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file "
                                  f"(truncated or corrupt?): {e}") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except EOFError:
        raise CheckpointError(f"{path}: the file ends early (truncated download or copy?)"
                              ) from None
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear message
        raise CheckpointError(_torch_load_problem(path, e)) from None
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "vit.", "net.")


def _is_state_dict(d: Any) -> bool:
    return isinstance(d, Mapping) and len(d) > 0 and all(
        isinstance(v, torch.Tensor) for v in d.values())


def backbone_state_dict(ckpt: Mapping[str, Any], checkpoint_key: str = "teacher",
                        source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The backbone's tensors from any supported checkpoint layout.

    Handles release backbones (flat timm/torchvision names), release full training
    checkpoints (``teacher``/``student`` entries whose keys carry ``module.`` and
    ``backbone.`` prefixes and a ``head.*`` projection head), dinofeat's own training
    checkpoints, ``state_dict``/``model`` wrappers and safetensors. Head and classifier
    keys are dropped."""
    sd: Any = ckpt
    if _is_state_dict(sd):
        if checkpoint_key != "teacher":
            raise CheckpointError(f"{source}: holds a single set of backbone weights, no "
                                  f"{checkpoint_key!r} entry (only training checkpoints have "
                                  "teacher and student)")
    else:
        if checkpoint_key in sd and isinstance(sd[checkpoint_key], Mapping):
            sd = sd[checkpoint_key]
        elif checkpoint_key != "teacher" or "student" in sd:
            raise CheckpointError(f"{source}: no entry {checkpoint_key!r}; entries: "
                                  f"{', '.join(map(str, sd))}")
        else:
            for key in ("state_dict", "model"):
                if key in sd and isinstance(sd[key], Mapping):
                    sd = sd[key]
                    break
    if not _is_state_dict(sd):
        tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)} if isinstance(
            sd, Mapping) else {}
        if not tensors:
            raise CheckpointError(f"{source}: found no tensors (entries: "
                                  f"{', '.join(map(str, ckpt))})")
        sd = tensors
    out: dict[str, torch.Tensor] = {}
    has_backbone_prefix = any(k.replace("module.", "", 1).startswith("backbone.") for k in sd)
    for k, v in sd.items():
        k2 = k
        changed = True
        while changed:
            changed = False
            for p in _STRIP_PREFIXES:
                if k2.startswith(p):
                    k2 = k2[len(p):]
                    changed = True
        if has_backbone_prefix and not k.replace("module.", "", 1).startswith("backbone."):
            continue  # projection head, predictor... of a training checkpoint
        if k2.split(".")[0] in ("head", "fc"):
            continue  # classifier of a timm/torchvision model
        out[k2] = v
    if not out:
        raise CheckpointError(f"{source}: no backbone tensors found")
    return out


def infer_architecture(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Architecture facts read off the tensors of a backbone state dict.

    Returns ``{"family": "vit", "embed_dim", "depth", "num_heads", "patch_size",
    "trained_grid"}``, ``{"family": "resnet", "embed_dim": 2048}`` or
    ``{"family": "xcit", ...}``."""
    from .backbones import HEADS_BY_DIM, trained_grid_from_pos_embed

    if "layer4.2.conv3.weight" in sd or "layer4.0.downsample.0.weight" in sd:
        return {"family": "resnet", "embed_dim": 2048}
    if any(k.startswith("cls_attn_blocks.") for k in sd):
        dim = sd["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        proj = [v for k, v in sd.items() if k.startswith("patch_embed.proj.") and v.ndim == 4]
        # XCiT patch embedding: a stack of stride-2 convolutions (4 for /16, 3 for /8)
        patch = 2 ** len(proj) if proj else None
        return {"family": "xcit", "embed_dim": dim, "depth": depth, "patch_size": patch}
    if "pos_embed" in sd and "patch_embed.proj.weight" in sd:
        w = sd["patch_embed.proj.weight"]
        dim, patch = w.shape[0], w.shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        if dim not in HEADS_BY_DIM:
            raise CheckpointError(f"ViT with embedding dim {dim}: number of heads unknown; "
                                  "pass arch= explicitly")
        return {"family": "vit", "embed_dim": dim, "depth": depth,
                "num_heads": HEADS_BY_DIM[dim], "patch_size": patch,
                "trained_grid": trained_grid_from_pos_embed(sd["pos_embed"])}
    raise CheckpointError("cannot tell the architecture from the tensors (no pos_embed/"
                          "patch_embed, no ResNet layer4); pass arch= explicitly")


def read_dinofeat_metadata(path: str | os.PathLike, ckpt: Mapping[str, Any] | None = None
                           ) -> dict[str, Any]:
    """dinofeat's own description of a weights file (architecture name, preprocessing,
    position-embedding rule), or ``{}`` for files written by others.

    safetensors keep it as JSON under the ``"dinofeat"`` metadata key; ``.pth``
    checkpoints written by ``dinofeat.train`` keep it as a plain dict under ``"dinofeat"``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        import json

        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("dinofeat")
        except Exception:  # noqa: BLE001 - unreadable metadata is just absent
            return {}
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {}
    meta = (ckpt or {}).get("dinofeat")
    return dict(meta) if isinstance(meta, Mapping) else {}
