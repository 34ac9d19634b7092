"""DinoModel: a backbone with its preprocessing, and :func:`load`.

``DinoModel`` is an ``nn.Module``: ``model(x)`` maps a normalised batch ``[B, 3, H, W]``
to the [CLS] feature ``[B, D]``; ``model.last_self_attention(x)`` gives the last block's
softmax attention ``[B, heads, 1 + N, 1 + N]``. Higher-level verbs (``embed``,
``patch_features``, ``attention_maps``) build on these.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from . import weights
from .accel import fast_math
from .backbones import DinoVisionTransformer, build_backbone
from .zoo import MODELS, ModelSpec, Preprocessing, get_spec

if TYPE_CHECKING:  # pragma: no cover
    from .attention import AttentionMaps
    from .export import OnnxModel
    from .features import FeatureSpec

__all__ = ["DinoModel", "load", "CHECKPOINT_NAMES"]

# File names looked for when load() is given a training run folder.
CHECKPOINT_NAMES = ("checkpoint.pth", "teacher_backbone.safetensors", "model.safetensors")


class DinoModel(nn.Module):
    """A DINO backbone together with the preprocessing its features expect.

    Attributes:
        backbone: maps ``[B, 3, H, W]`` to ``[B, embed_dim]``.
        name: zoo name or file the weights came from.
        spec: the zoo entry (``None`` for files not in the zoo).
        preprocessing: the :class:`~dinofeat.zoo.Preprocessing` ``embed`` applies.
    """

    def __init__(self, backbone: nn.Module, *, name: str = "custom",
                 spec: ModelSpec | None = None,
                 preprocessing: Preprocessing | None = None,
                 source: str | None = None):
        super().__init__()
        # Any: its attributes (embed_dim, patch_size, vit...) depend on the architecture
        self.backbone: Any = backbone
        self.name = name
        self.spec = spec
        self.preprocessing = preprocessing or (spec.preprocessing if spec else Preprocessing())
        self.source = source
        self.training_summary: dict[str, Any] | None = None  # recipe and k-NN of its run
        self._weights_hash: str | None = None

    # ----------------------------------------------------------------- facts
    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)

    @property
    def patch_size(self) -> int | None:
        return getattr(self.backbone, "patch_size", None)

    @property
    def is_vit(self) -> bool:
        return isinstance(self.backbone, DinoVisionTransformer)

    @property
    def has_tokens(self) -> bool:
        """Whether the backbone gives patch tokens (ViT, XCiT; not a ResNet)."""
        return hasattr(self.backbone, "forward_tokens")

    @property
    def depth(self) -> int | None:
        """Number of blocks of a ViT (``None`` for other backbones)."""
        return int(self.backbone.depth) if self.is_vit else None

    @property
    def num_heads(self) -> int | None:
        return getattr(self.backbone, "num_heads", None)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def weights_hash(self) -> str:
        """SHA-256 (first 16 hex digits) of the backbone's tensors, names and shapes:
        identifies the weights whatever file format they came in."""
        if self._weights_hash is None:
            h = hashlib.sha256()
            for k, v in sorted(self.backbone.state_dict().items()):
                h.update(k.encode())
                h.update(str(tuple(v.shape)).encode())
                h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._weights_hash = h.hexdigest()[:16]
        return self._weights_hash

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of the model (stored next to features and indexes)."""
        return {"name": self.name, "weights_hash": self.weights_hash,
                "embed_dim": self.embed_dim, "patch_size": self.patch_size,
                "preprocessing": self.preprocessing.to_dict()}

    def _require_vit(self, what: str) -> DinoVisionTransformer:
        if not self.is_vit:
            raise TypeError(f"{what} needs a ViT; {self.name} is a "
                            f"{type(self.backbone).__name__.strip('_')} (no self-attention)")
        return self.backbone

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` -> [CLS] features ``[B, D]``."""
        with fast_math(x.device):  # fastest fp32-exact kernels (dinofeat.accel)
            return self.backbone(x)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` -> final-normed tokens ``[B, 1 + h*w, D]``
        ([CLS] first, then the patch tokens in row-major grid order)."""
        if not hasattr(self.backbone, "forward_tokens"):
            raise TypeError(f"{self.name} has no tokens (it is a ResNet)")
        with fast_math(x.device):
            return self.backbone.forward_tokens(x)

    def last_self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the last block ``[B, heads, 1 + N, 1 + N]`` for normalised
        images ``[B, 3, H, W]`` (``N = (H // p) * (W // p)``)."""
        vit = self._require_vit("last_self_attention")
        with fast_math(x.device):
            return vit.last_self_attention(x)

    def last_cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The [CLS] query row of :meth:`last_self_attention`, ``[B, heads, 1 + N]``."""
        vit = self._require_vit("last_cls_attention")
        with fast_math(x.device):
            return vit.last_cls_attention(x)

    def intermediate_tokens(self, x: torch.Tensor, n: int | Sequence[int] = 1,
                            norm: bool = True) -> list[torch.Tensor]:
        """Normed tokens ``[B, 1 + N, D]`` of the last ``n`` blocks, or of the blocks with
        the indices ``n`` (a list)."""
        vit = self._require_vit("intermediate_tokens")
        with fast_math(x.device):
            return vit.intermediate_tokens(x, n, norm=norm)

    # ------------------------------------------------- features (dinofeat.embedding)
    def iter_embed(self, images, spec: "FeatureSpec | None" = None, **options):
        """Embed images batch by batch, without holding all features.

        Takes the same arguments as :meth:`embed` (except ``return_keys``) and returns a
        :class:`~dinofeat.embedding.EmbedStream`. Iterating it yields
        ``(keys, feats)``: ``keys`` lists the ``pathlib.Path`` of each image of the batch
        (for file and folder inputs) or its position in the input (in-memory images);
        ``feats`` is a CPU ``float32`` tensor ``[len(keys), D']``. Batches come in input
        order. Unreadable files are left out; with ``skip_unreadable`` (the default for a
        folder) each one is recorded in ``stream.skipped`` (a list of
        :class:`~dinofeat.images.SkippedImage` with ``.key`` and ``.reason``, complete
        once the iteration ends), otherwise the first raises
        :class:`~dinofeat.images.ImageReadError`. ``len(stream)`` is the number of inputs,
        ``stream.sources`` lists them, ``stream.spec`` is the
        :class:`~dinofeat.features.FeatureSpec` used::

            stream = model.iter_embed("photos/")
            for paths, feats in stream:
                index.add(feats, paths)
            print(len(stream.skipped), "unreadable")
        """
        from .embedding import iter_embed
        return iter_embed(self, images, spec, **options)

    def embed(self, images: Any, spec: "FeatureSpec | None" = None, **options):
        """Feature vectors of images: ``Tensor [N, D']`` (CPU, float32), one row per
        readable image, in input order (a folder: sorted paths).

        Args:
            images: a path, a folder (recursive), a list of paths/PIL images/arrays, a
                ``PIL.Image``, a ``uint8`` array ``H x W x C``, a ``uint8`` tensor
                ``[N, 3, H, W]`` of raw pixels, or a float tensor ``[N, 3, H, W]`` taken to
                be already preprocessed and normalised (used as is).
            spec: a :class:`~dinofeat.features.FeatureSpec` saying how the vectors are
                made (default: ``FeatureSpec()``, the normalised [CLS] token). Its fields
                may also be given, or overridden, as keywords:
            pool: ``"cls"`` (default; k-NN), ``"mean"`` (average patch token), ``"gem"``
                (GeM p = 4 over output patch tokens) or ``"cls+gem"`` (copy detection).
            normalize: L2-normalise each vector.
            n_last_blocks: the linear-evaluation representation: the [CLS] of the last
                ``n`` blocks concatenated (ViT-S: 4).
            avgpool: the linear-evaluation representation of ViT-B: the last [CLS] with
                the average patch token (``layout``: ``"interleaved"``, the release's,
                for ``n_last_blocks=1``; ``"concat"``, the default for more blocks).
            multiscale: average over input scales 1, 1/sqrt(2), 1/2 (bilinear; retrieval).
            preprocessing: ``None`` (the model's own), ``"dino"`` (resize 256, crop 224),
                ``"whole"`` (whole image, long side ``size``, sides rounded down to the
                patch size) or a :class:`~dinofeat.zoo.Preprocessing`.
            size: crop size (``"dino"``) or long side (``"whole"``).
            batch_size: images per forward pass.
            num_workers: decoding runs in this many processes (default: none for one
                batch, else up to 8).
            precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast; output fp32).
            device: run there (moves the model); default: where the model is.
            progress: tqdm bar with images/s (default: when stderr is a terminal).
            skip_unreadable: skip (and log) unreadable files instead of raising
                :class:`~dinofeat.images.ImageReadError`; default: on for a folder.
            return_keys: also return the path (or input position) of every row.

        An image's vector does not depend on the batch it is in (up to float rounding).
        """
        from .embedding import embed
        return embed(self, images, spec, **options)

    def patch_features(self, images, *, blocks: "int | list[int] | None" = None,
                       norm: bool = True, preprocessing: "None | str | Preprocessing" = None,
                       size: int | None = None, batch_size: int = 16,
                       num_workers: int | None = None, precision: str = "fp32",
                       device: str | torch.device | None = None,
                       progress: bool | None = None) -> torch.Tensor:
        """Patch tokens on their grid: ``Tensor [N, h, w, D]`` (CPU, float32).

        ``blocks=None``: the output tokens (after the final LayerNorm); an int: that
        block's tokens (negative counts from the end), through the final LayerNorm when
        ``norm``; a list of ints: ``[N, len(blocks), h, w, D]``. The grid is that of the
        preprocessed image (``h = H // patch``); images are prepared as in :meth:`embed`
        (use ``preprocessing="whole"`` to keep the whole image); images giving different
        grids raise a ``ValueError`` (pass them one at a time). Unreadable images raise.
        """
        from .embedding import EmbedStream, collect, patch_fn
        stream = EmbedStream(self, images, patch_fn(self, blocks, norm=norm),
                             preprocessing=preprocessing, size=size, batch_size=batch_size,
                             num_workers=num_workers, precision=precision, device=device,
                             progress=progress, skip_unreadable=False, desc="patches")
        feats = collect(stream)[1]
        if feats is None:  # unreadable images raise above: only an empty input gets here
            raise ValueError("patch_features: no images given")
        return feats

    def attention_maps(self, img, *, size: int | None = None, threshold: float = 0.6,
                       device: str | torch.device | None = None,
                       precision: str = "fp32") -> "AttentionMaps":
        """The last block's [CLS] attention of every head at the image's own resolution:
        an :class:`~dinofeat.attention.AttentionMaps` with ``.heads`` (``[heads, H, W]``),
        ``.mean``, ``.masks`` (smallest patch sets holding ``threshold`` of each head's
        mass), ``.image`` and ``.save(dir)``. ``size`` resizes the short side first; the
        image is then cropped to a multiple of the patch size. ViTs only. See
        :func:`dinofeat.attention.attention_maps`."""
        from .attention import attention_maps
        return attention_maps(self, img, size=size, threshold=threshold, device=device,
                              precision=precision)

    # ------------------------------------------------------- linear classifier
    def attach_classifier(self, head, *, n_last_blocks: int | None = None,
                          avgpool: bool | None = None, class_names=None):
        """Deprecated: use :func:`dinofeat.eval.linear.attach_classifier` (``model`` first);
        same arguments and result."""
        import warnings

        from .eval.linear import attach_classifier  # here, so that the model never sits
        # above the evaluation suite at import time
        warnings.warn("DinoModel.attach_classifier is deprecated; use "
                      "dinofeat.eval.linear.attach_classifier(model, head)",
                      DeprecationWarning, stacklevel=2)
        return attach_classifier(self, head, n_last_blocks=n_last_blocks, avgpool=avgpool,
                                 class_names=class_names)

    def classify(self, images, k: int = 5, **embed_kw) -> list[list[tuple[str, float]]]:
        """Top-``k`` ``(class name, probability)`` pairs per image from the attached head
        (softmax of its logits), best first. ``images`` as for :meth:`embed` (the model's
        own preprocessing; ``batch_size``, ``num_workers``, ``precision``... pass
        through). Unreadable images raise."""
        from .embedding import EmbedStream, collect, crop_to_patches
        head = getattr(self, "classifier", None)
        if head is None:
            raise RuntimeError("no classifier attached: call "
                               "dinofeat.eval.linear.attach_classifier(model, path) with a "
                               "linear head first")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")

        def logits(x: torch.Tensor) -> torch.Tensor:
            x = crop_to_patches(x, self.patch_size)
            return head(head.features(self, x).float())

        embed_kw.setdefault("desc", "classify")
        _, out = collect(EmbedStream(self, images, logits, skip_unreadable=False, **embed_kw))
        if out is None:  # unreadable images raise above: only an empty input gets here
            raise ValueError("classify: no images given")
        probs = out.softmax(dim=1)
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[(head.class_names[i], float(p)) for p, i in zip(ps.tolist(), ix.tolist())]
                for ps, ix in zip(top.values, top.indices)]

    # ------------------------------------------------------------ publishing
    def save_pretrained(self, folder: str | os.PathLike, *, license: str = "apache-2.0"
                        ) -> Path:
        """Write ``model.safetensors``, ``config.json`` and a README.md model card to
        ``folder`` (:func:`dinofeat.pretrained.save_pretrained`); ``dinofeat.load(folder)``
        restores this model, and timm reads the weights too."""
        from .pretrained import save_pretrained
        return save_pretrained(self, folder, license=license)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None,
                    token: str | bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, license: str = "apache-2.0") -> str:
        """Upload the :meth:`save_pretrained` folder to Hugging Face hub repo ``repo_id``
        (created when missing); returns the commit URL. Load it back with
        ``dinofeat.load("hf-hub:" + repo_id)``."""
        from .pretrained import push_to_hub
        return push_to_hub(self, repo_id, private=private, token=token, revision=revision,
                           commit_message=commit_message, license=license)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}"


# --------------------------------------------------------------------- loading
def _build_for_state(sd: dict[str, torch.Tensor], arch: str | None,
                     pos_embed_interp: str, num_heads: int | None = None) -> nn.Module:
    if arch is not None:
        spec = MODELS.get(arch)
        if spec is not None and spec.arch == "xcit":
            return build_backbone(arch)
        if arch not in MODELS or MODELS[arch].arch != "vit":
            # a ViT trained at another resolution (dinofeat.train on 32 px crops...) gets
            # position embeddings for the grid its file holds
            kw: dict[str, Any] = {}
            if "pos_embed" in sd and "patch_embed.proj.weight" in sd:
                from .backbones import trained_grid_from_pos_embed
                kw["img_size"] = trained_grid_from_pos_embed(sd["pos_embed"]) * int(
                    sd["patch_embed.proj.weight"].shape[-1])
            return build_backbone(arch, pos_embed_interp=pos_embed_interp, **kw)
    facts = weights.infer_architecture(sd, num_heads=num_heads)
    if facts["family"] == "resnet":
        return build_backbone("resnet50")
    if facts["family"] == "xcit":
        size = "s12" if facts["embed_dim"] == 384 else "m24"
        return build_backbone(f"xcit_{size}_{facts['patch_size']}")
    if arch is not None:
        spec = MODELS[arch]
        if (spec.embed_dim, spec.patch_size, spec.depth) != (
                facts["embed_dim"], facts["patch_size"], facts["depth"]):
            raise weights.CheckpointError(
                f"weights are a ViT with dim {facts['embed_dim']}, patch "
                f"{facts['patch_size']} and {facts['depth']} blocks, but arch={arch!r} has "
                f"dim {spec.embed_dim}, patch {spec.patch_size} and {spec.depth} blocks")
    return DinoVisionTransformer(
        patch_size=facts["patch_size"], embed_dim=facts["embed_dim"], depth=facts["depth"],
        num_heads=facts["num_heads"], img_size=facts["trained_grid"] * facts["patch_size"],
        pos_embed_interp=pos_embed_interp)


def _load_strict(backbone: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    if hasattr(backbone, "remap_state_dict"):  # XCiT: original names -> timm's
        # nn.Module types a dynamic attribute as Tensor | Module; hasattr cannot narrow it
        sd = backbone.remap_state_dict(sd)  # type: ignore[operator]
    expected = backbone.state_dict()
    # BatchNorm step counters are bookkeeping, absent from some files: keep the model's
    missing = sorted(k for k in set(expected) - set(sd) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(sd) - set(expected))
    bad_shape = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                       for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if bad_shape:
            parts.append(f"shape mismatches ({len(bad_shape)}): {'; '.join(bad_shape)}")
        raise weights.CheckpointError(f"{source}: weights do not fit the architecture "
                                  f"{type(backbone).__name__}:\n  " + "\n  ".join(parts))
    for k, v in sd.items():
        if not v.is_floating_point() and expected[k].is_floating_point():
            raise weights.CheckpointError(f"{source}: tensor {k} has dtype {v.dtype}, expected "
                                      "a floating-point tensor")
    full = {k: v.to(expected[k].dtype) for k, v in sd.items()}
    full.update({k: torch.zeros(expected[k].shape, dtype=expected[k].dtype, device="cpu")
                 for k in set(expected) - set(sd)})
    # assign: the backbone may have been built on the meta device (see load)
    backbone.load_state_dict(full, strict=True, assign=True)
    left = [n for n, t in [*backbone.named_parameters(), *backbone.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{source}: no values for {', '.join(left)} after loading")


def _resolve_file(path: Path) -> Path:
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path} is a folder without a checkpoint "
                                f"({' or '.join(CHECKPOINT_NAMES)})")
    return path


def load(name_or_path: str | os.PathLike = "vit_s16", device: str | torch.device | None = None,
         *, arch: str | None = None, checkpoint_key: str = "teacher",
         revision: str | None = None, cache_dir: str | os.PathLike | None = None,
         pos_embed_interp: str | None = None,
         preprocessing: Preprocessing | None = None, token: str | bool | None = None,
         layer_norm_eps: float | str | None = None) -> "DinoModel | OnnxModel":
    """Load a DINO backbone as a :class:`DinoModel` in eval mode (an
    :class:`~dinofeat.export.OnnxModel` for a ``.onnx`` file; both are
    :class:`~dinofeat.protocol.FeatureModel` s).

    Args:
        name_or_path: a zoo name (``dinofeat.list_models()``), a weights file (original
            release backbone ``.pth`` or full checkpoint, dinofeat training checkpoint,
            ``.safetensors``), a training run folder, a pretrained folder (``config.json``
            with ``model.safetensors``: written by :meth:`DinoModel.save_pretrained`,
            timm or transformers' ``ViTModel.save_pretrained``) or a Hugging Face hub
            repo (``hf-hub:org/name[@revision]``, or ``org/name`` when no such local path
            exists). A ``.onnx`` file written by ``dinofeat export`` gives a
            :class:`~dinofeat.export.OnnxModel` (ONNX Runtime, CPU) with the same ``embed``.
        device: where to put the model (default: CUDA if available, else CPU; under
            ``torchrun`` this process's GPU, ``LOCAL_RANK``).
        arch: architecture for files; inferred from the tensors when omitted.
        checkpoint_key: ``"teacher"`` (default) or ``"student"`` for training checkpoints.
        revision: Hugging Face hub revision (branch, tag or commit) for zoo models and
            hub repos.
        cache_dir: Hugging Face cache folder (default: huggingface_hub's).
        pos_embed_interp: ``"dino"`` (original, default) or ``"timm"``.
        preprocessing: override the model's own preprocessing.
        token: Hugging Face token for private hub repos (default: huggingface_hub's).
        layer_norm_eps: LayerNorm epsilon of a ViT: ``None`` gives 1e-6, DINO's training
            value, also for transformers configs that say 1e-12 (the converted
            ``facebook/dino-*`` copies); ``"config"`` takes the folder's ``config.json``
            value; a number sets it.
    """
    from . import pretrained
    spec: ModelSpec | None = None
    folder: pretrained.PretrainedFolder | None = None
    name = str(name_or_path)
    hub = None if (isinstance(name_or_path, str) and name_or_path in MODELS) else \
        pretrained.parse_hub_name(name_or_path)
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        spec = get_spec(name_or_path)
        path = weights.fetch_weights(spec, revision=revision, cache_dir=cache_dir)
    elif hub is not None:
        try:
            path = pretrained.download(hub[0], hub[1] or revision, cache_dir=cache_dir,
                                       token=token)
        except weights.WeightsNotFoundError as e:
            if name.startswith(pretrained.HUB_PREFIX):
                raise
            raise weights.WeightsNotFoundError(  # a plain org/name: maybe a mistyped path
                f"no such weights file or folder: {name}; as a Hugging Face hub repo: {e}",
                searched=[f"local path {name}: missing", *e.searched]) from None
    else:
        path = Path(name_or_path)
        if not path.exists():
            if isinstance(name_or_path, str) and os.sep not in name_or_path and \
                    "." not in Path(name_or_path).name:
                raise KeyError(f"unknown model {name_or_path!r}; valid names: "
                               f"{', '.join(MODELS)} (or a path to a weights file, or "
                               "hf-hub:ORG/NAME)")
            raise FileNotFoundError(f"no such weights file or folder: {path}")
    if path.is_dir():
        folder = pretrained.read_folder(path)
    path = folder.weights if folder else _resolve_file(path)
    if path.suffix.lower() == ".onnx":  # an exported model: ONNX Runtime on CPU
        from .export import load_onnx
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"{path}: ONNX models run on CPU here; load the PyTorch "
                             "weights for a GPU")
        return load_onnx(path)
    ckpt = weights.read_checkpoint(path)
    meta = {**weights.read_dinofeat_metadata(path, ckpt), **(folder.meta if folder else {})}
    sd = weights.backbone_state_dict(ckpt, checkpoint_key=checkpoint_key, source=str(path))
    arch = arch or (spec.name if spec else meta.get("arch"))
    interp = pos_embed_interp or (spec.pos_embed_interp if spec and spec.arch == "vit"
                                  else meta.get("pos_embed_interp", "dino"))
    try:
        with torch.device("meta"):  # shapes only: every value comes from the file, no random init
            backbone = _build_for_state(sd, arch, interp,
                                        num_heads=folder.num_heads if folder else None)
    except weights.CheckpointError as e:  # name the file
        raise weights.CheckpointError(f"{path}: {e}") from None
    _load_strict(backbone, sd, str(path))
    eps = folder.layer_norm_eps if (folder and layer_norm_eps == "config") else layer_norm_eps
    if eps == "config":  # no config value: keep DINO's
        eps = None
    if eps is None and folder is not None and folder.kind == "dinofeat":
        eps = folder.layer_norm_eps  # what the saved model computed with
    if eps is not None:
        pretrained.set_layer_norm_eps(backbone, float(eps))
    if preprocessing is None and folder is not None and folder.preprocessing is not None:
        preprocessing = folder.preprocessing
    if preprocessing is None and meta.get("preprocessing"):
        try:
            preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        except (TypeError, ValueError) as e:
            raise weights.CheckpointError(f"{path}: bad preprocessing in its metadata: {e}") \
                from None
    if hub is not None:  # the repo id is the name users know it by
        meta["name"] = hub[0]
    model = DinoModel(backbone, name=spec.name if spec else meta.get("name", name), spec=spec,
                      preprocessing=preprocessing, source=str(path))
    model.training_summary = pretrained.training_summary(ckpt)
    from .runtime import resolve_device
    return model.to(resolve_device(device)).eval()


def save_safetensors(model: DinoModel, path: str | os.PathLike, *,
                     extra: dict[str, Any] | None = None) -> Path:
    """Write the backbone as safetensors with dinofeat metadata (arch, preprocessing), so
    that :func:`load` restores the same model with its preprocessing."""
    from safetensors.torch import save_file

    from .utils import atomic_path
    meta = {"name": model.name, "preprocessing": model.preprocessing.to_dict(),
            "pos_embed_interp": getattr(model.backbone, "pos_embed_interp", "dino")}
    meta.update(extra or {})
    sd = {k: v.detach().cpu().contiguous() for k, v in model.backbone.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata={"dinofeat": json.dumps(meta)})
    return path
