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
import contextvars
import hashlib
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from .zoo import ModelSpec


class _LazyTorch:
    """torch, imported on first use: ``dinofeat models`` lists the local copies of the
    weights (paths only) without paying for ``import torch``."""

    def __getattr__(self, name: str) -> Any:
        import torch as module
        return getattr(module, name)


torch: Any = sys.modules.get("torch") or _LazyTorch()


def _torch_hub_dir() -> Path:
    """``torch.hub.get_dir()``; computed as torch does ($TORCH_HOME/hub, else
    $XDG_CACHE_HOME/torch/hub, else ~/.cache/torch/hub) while torch is not imported."""
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub"

__all__ = [
    "WeightsNotFoundError",
    "is_transformers_vit",
    "CheckpointError",
    "fetch_weights",
    "read_checkpoint",
    "backbone_state_dict",
    "infer_architecture",
    "sha256_file",
    "hf_cache_dir",
    "WEIGHTS_DIR_ENV",
    "transformers_vit_to_timm",
    "hub_endpoint",
    "hub_offline",
    "endpoint_reachable",
    "set_interface",
    "reset_interface",
    "how_to_pass_weights",
    "local_weights",
    "local_weights_all",
]

WEIGHTS_DIR_ENV = "DINOFEAT_WEIGHTS_DIR"
PACKAGE_WEIGHTS = Path(__file__).parent / "shipped_weights"

# Types admitted by torch.load(weights_only=True) beyond tensors and containers.
SAFE_GLOBALS: list = [argparse.Namespace]


class WeightsNotFoundError(FileNotFoundError):
    """No copy of a model's weights could be found or downloaded. ``searched`` lists
    every place tried (one line each)."""

    def __init__(self, message: str, searched: list[str] | None = None):
        super().__init__(message)
        self.searched = list(searched or [])


# Errors name what the user can type: Python code or command-line options. The CLI sets
# "cli" once at start; a context variable keeps threads of a library user unaffected.
_INTERFACE: contextvars.ContextVar[str] = contextvars.ContextVar("dinofeat_interface",
                                                                 default="python")


def set_interface(name: str) -> contextvars.Token:
    """Word errors for ``"python"`` (default) or ``"cli"`` (the ``dinofeat`` command);
    returns the token that :func:`reset_interface` takes to restore the previous one."""
    if name not in ("python", "cli"):
        raise ValueError(f"interface must be 'python' or 'cli', got {name!r}")
    return _INTERFACE.set(name)


def reset_interface(token: contextvars.Token) -> None:
    _INTERFACE.reset(token)


def how_to_pass_weights() -> str:
    """How a user of the current interface names a weights file instead of a zoo name."""
    if _INTERFACE.get() == "cli":
        return "pass a weights file or folder with --model PATH (--weights PATH)"
    return "pass a weights file or folder: dinofeat.load('/path/to/weights.safetensors')"


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


def hub_offline() -> bool:
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


def hub_endpoint() -> str:
    """The Hugging Face hub address: ``$HF_ENDPOINT`` as set now, else huggingface_hub's."""
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants
    return str(constants.ENDPOINT).rstrip("/")


PROBE_TIMEOUT_S = 3.0
_probed: dict[tuple[str, int], tuple[float, bool]] = {}


def endpoint_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or to the HTTPS/HTTP proxy in the
    environment) opens within ``timeout`` seconds.

    One short probe instead of the HTTP clients' retries: without it a machine without
    network spends about half a minute in huggingface_hub's back-off before failing. The
    answer is remembered for a minute. Name resolution runs in a thread so that a stalled
    DNS server cannot hold the caller beyond ``timeout`` either."""
    import urllib.request
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return True  # file:// and the like: nothing to probe, the reader reports
    proxy = urllib.request.getproxies().get(parts.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = parts.hostname
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    now = time.monotonic()
    if (hit := _probed.get((host, port))) is not None and now - hit[0] < 60:
        return hit[1]
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=attempt, daemon=True, name="dinofeat-probe")
    t.start()
    t.join(timeout)
    ok = bool(result and result[0])
    _probed[(host, port)] = (now, ok)
    return ok


def _hf_file_sha_ok(path: Path, spec: ModelSpec) -> None:
    if spec.hf_sha256 and sha256_file(path) != spec.hf_sha256:
        raise CheckpointError(f"{path}: SHA-256 does not match the zoo's value for {spec.name} "
                              f"({spec.hf_sha256}, {spec.hf_hub_id} at {spec.hf_revision}); "
                              "the hub copy changed or the download is corrupt: delete it "
                              "and download again, or pin another revision")


def local_weights_all(cache_dir: str | os.PathLike | None = None) -> dict[str, Path | None]:
    """:func:`local_weights` of every zoo entry, by name."""
    from .zoo import MODELS
    return {name: local_weights(spec, cache_dir) for name, spec in MODELS.items()}


def local_weights(spec: ModelSpec, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Where a copy of zoo entry ``spec``'s weights already is on this machine (the
    sources of :func:`fetch_weights` that need no network), or ``None``."""
    if (p := _from_weights_dir(spec)) is not None:
        return p
    if spec.local_file and (PACKAGE_WEIGHTS / spec.local_file).is_file():
        return PACKAGE_WEIGHTS / spec.local_file
    cache = hf_cache_dir(cache_dir)
    # the hub cache keeps each repo in models--ORG--NAME: without that folder there is
    # nothing to look up, and `dinofeat models` need not import huggingface_hub at all
    if spec.hf_hub_id and (cache / ("models--" + spec.hf_hub_id.replace("/", "--"))).is_dir():
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(spec.hf_hub_id, "model.safetensors", cache_dir=cache,
                                     revision=spec.hf_revision)
        if isinstance(hit, str):
            return Path(hit)
    if spec.backbone_url:
        target = _torch_hub_dir() / "checkpoints" / spec.backbone_url.rsplit("/", 1)[-1]
        if target.is_file():
            return target
    return None


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
    With ``HF_HUB_OFFLINE=1`` only what is already on disk is used; a server that does
    not answer a connection within a few seconds is treated the same way (no retries).

    Raises :class:`WeightsNotFoundError` naming the model, every place searched and the
    ways to provide the file when no copy is reachable; :class:`CheckpointError` when a
    file's SHA-256 differs from the zoo's."""
    tried: list[str] = []
    if (p := _from_weights_dir(spec)) is not None:
        return p
    tried.append(f"${WEIGHTS_DIR_ENV}: {os.environ.get(WEIGHTS_DIR_ENV) or '(not set)'}")
    if spec.local_file:
        p = PACKAGE_WEIGHTS / spec.local_file
        if p.is_file():
            return p
        tried.append(f"packaged file {p}: missing")
    offline = hub_offline()
    unreachable: list[str] = []
    if spec.hf_hub_id:
        from huggingface_hub import hf_hub_download
        rev = revision or spec.hf_revision
        where = hf_cache_dir(cache_dir)
        endpoint = hub_endpoint()
        cached_only = offline or not endpoint_reachable(endpoint)
        if cached_only and not offline:
            unreachable.append(endpoint)
        try:
            path = Path(hf_hub_download(spec.hf_hub_id, "model.safetensors", revision=rev,
                                        cache_dir=where, local_files_only=cached_only,
                                        endpoint=endpoint))
            if revision is None:
                _hf_file_sha_ok(path, spec)
            return path
        except CheckpointError:
            raise
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = (f"not in the cache, and {endpoint} cannot be reached" if cached_only and
                   not offline else f"{type(e).__name__}: {first}")
            tried.append(f"Hugging Face hub {spec.hf_hub_id} (revision {rev}, cache folder "
                         f"{where}): {why}")
    ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
    if spec.backbone_url:
        target = ckpt_dir / spec.backbone_url.rsplit("/", 1)[-1]
        if target.is_file():
            _check_sha(target, spec)
            return target
        if offline:
            tried.append(f"release URL {spec.backbone_url}: not in the torch hub cache "
                         f"{ckpt_dir}, and HF_HUB_OFFLINE is set (no download)")
        elif not endpoint_reachable(spec.backbone_url):
            unreachable.append(spec.backbone_url.split("/")[2] or spec.backbone_url)
            tried.append(f"release URL {spec.backbone_url}: not in the torch hub cache "
                         f"{ckpt_dir}, and the server cannot be reached")
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
            except Exception as e:
                tried.append(f"release URL {spec.backbone_url} (torch hub cache {ckpt_dir}): "
                             f"{type(e).__name__}: {e}")
    if unreachable:  # no network: one line, the way out first
        raise WeightsNotFoundError(
            f"no copy of the weights of {spec.name!r} on this machine and no network "
            f"({', '.join(unreachable)} not reachable within {PROBE_TIMEOUT_S:g} s): "
            f"{how_to_pass_weights()}, set ${WEIGHTS_DIR_ENV}, or see 'Machines without "
            "network access' in docs/weights.md", searched=tried)
    lines = "\n  - ".join(tried)
    release = spec.backbone_url.rsplit("/", 1)[-1] if spec.backbone_url else None
    hf_way = (f"pre-fill the Hugging Face cache on a machine with network access "
              f"(hf download {spec.hf_hub_id} model.safetensors) and copy the "
              f"cache folder to {hf_cache_dir(cache_dir)} (or point HF_HUB_CACHE/HF_HOME at "
              "it); ") if spec.hf_hub_id else ""
    release_way = (f"put the release file {release} into {ckpt_dir}; ") if release else ""
    raise WeightsNotFoundError(
        f"could not find weights for {spec.name!r}. Searched:\n  - {lines}\n"
        f"Ways to supply them: {how_to_pass_weights()}; "
        f"{hf_way}{release_way}or put '{spec.name}.safetensors'"
        f"{f' or {release}' if release else ''} in a folder and set ${WEIGHTS_DIR_ENV} to it.",
        searched=tried)


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
    except Exception as e:
        raise CheckpointError(_torch_load_problem(path, e)) from None
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


# Hugging Face transformers ViT (ViTModel / ViTForImageClassification, the layout of the
# facebook/dino-* copies) -> timm's names. Files written by save_pretrained use the first
# spelling of each pair; the second is the module layout of transformers 5.
_HF_BLOCK = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "attention.attention.query": "q", "attention.q_proj": "q",
    "attention.attention.key": "k", "attention.k_proj": "k",
    "attention.attention.value": "v", "attention.v_proj": "v",
}
_HF_BLOCK_KEY = re.compile(r"(?:encoder\.layer|encoder\.layers|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def is_transformers_vit(sd: Mapping[str, Any]) -> bool:
    return "embeddings.patch_embeddings.projection.weight" in sd


def transformers_vit_to_timm(sd: Mapping[str, torch.Tensor], source: str = "checkpoint"
                             ) -> dict[str, torch.Tensor]:
    """A transformers ``ViTModel`` state dict under timm's (and the DINO release's) names:
    query, key and value are stacked into one ``qkv`` projection; the pooler, a
    classifier and the mask token are dropped (DINO's feature is the normed [CLS])."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for k, v in sd.items():
        if k == "embeddings.cls_token":
            out["cls_token"] = v
        elif k == "embeddings.position_embeddings":
            out["pos_embed"] = v
        elif k.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("layernorm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith(("pooler.", "classifier.")) or k == "embeddings.mask_token":
            continue
        elif (m := _HF_BLOCK_KEY.match(k)) and m.group(2) in _HF_BLOCK:
            i, part, kind = int(m.group(1)), _HF_BLOCK[m.group(2)], m.group(3)
            if part in ("q", "k", "v"):
                qkv.setdefault((i, kind), {})[part] = v
            else:
                out[f"blocks.{i}.{part}.{kind}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{source}: transformers ViT layout with tensors dinofeat does "
                              f"not know: {', '.join(sorted(unknown)[:8])}")
    for (i, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: block {i} lacks attention "
                                  f"{', '.join(sorted({'q', 'k', 'v'} - set(parts)))} {kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


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
    if is_transformers_vit(out):
        return transformers_vit_to_timm(out, source)
    return out


def infer_architecture(sd: Mapping[str, torch.Tensor], num_heads: int | None = None
                       ) -> dict[str, Any]:
    """Architecture facts read off the tensors of a backbone state dict (a ViT's number
    of heads, which the tensors do not show, follows from its width unless given).

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
        if num_heads is None and dim not in HEADS_BY_DIM:
            raise CheckpointError(f"ViT with embedding dim {dim}: number of heads unknown; "
                                  "pass arch= explicitly")
        return {"family": "vit", "embed_dim": dim, "depth": depth,
                "num_heads": num_heads or HEADS_BY_DIM[dim], "patch_size": patch,
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
        except Exception:
            return {}
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return {}
    meta = (ckpt or {}).get("dinofeat")
    return dict(meta) if isinstance(meta, Mapping) else {}
