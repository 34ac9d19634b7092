"""Linear probing of frozen DINO features (paper section 3.8) and linear heads.

The backbone stays frozen; a single linear layer is trained on its features:

* ViT features: the [CLS] tokens of the last ``n_last_blocks`` blocks (each through the
  final LayerNorm) concatenated; with ``avgpool`` the average of the last block's patch
  tokens is added. The paper uses ``n=4`` without avgpool for ViT-S and ``n=1`` with
  avgpool for ViT-B. Other backbones (ResNet-50, XCiT) use their pooled feature.
* **Feature layout with avgpool.** The release builds the ``n=1`` + avgpool feature by
  stacking ``cls [B, D]`` and ``avg [B, D]`` along a new last axis and flattening, which
  *interleaves* them: ``[cls_0, avg_0, cls_1, avg_1, ...]`` -- not ``cat(cls, avg)``.
  The released ViT-B linear heads expect that order, so dinofeat uses it for ``n=1``
  (``layout="interleaved"``). The release cannot combine avgpool with ``n > 1`` (its
  concatenation fails on the shapes); dinofeat allows it with the plain concatenation
  ``[cls_{L-n+1}, ..., cls_L, avg_L]`` (``layout="concat"``). The layout is saved with
  the head.
* Training (release protocol): SGD, momentum 0.9, no weight decay, learning rate
  ``0.001 x batch / 256``, cosine annealing to 0 over the epochs (stepped once per epoch),
  100 epochs, cross-entropy; weights initialised N(0, 0.01), bias 0. Training images get
  ``RandomResizedCrop(crop_size)`` (scale 0.08-1, bilinear) + horizontal flip; evaluation
  uses the model's own preprocessing (resize 256 bicubic, centre crop 224).
* ``precompute=True`` trades faithfulness for speed: features of the centre-cropped
  training images are computed once and the classifier is trained on them for all
  epochs (no augmentation).

Heads are saved as safetensors (``linear.weight``, ``linear.bias``) with a JSON
description (class names, ``n_last_blocks``, ``avgpool``, layout, model identity) in the
file's metadata and in a ``.json`` file next to it. The original released linear heads
(``*_linearweights.pth``: ``state_dict`` with ``module.linear.weight``/``bias``) load too;
their ``n_last_blocks``/``avgpool`` are inferred from the weight's width (``4 x D``: n=4;
``2 x D``: n=1 with avgpool, the ViT-B recipe; ``D``: n=1) unless given.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..features import FeatureSpec
from ..utils import atomic_path, atomic_write_json, get_logger
from .folders import LabeledImages

__all__ = [
    "LinearClassifier",
    "LinearProbe",
    "LinearProbeConfig",
    "linear_features",
    "linear_feature_dim",
    "linear_spec",
    "attach_classifier",
    "train_linear_on_features",
    "train_linear_probe",
    "evaluate_linear",
    "load_linear_head",
]

log = get_logger(__name__)

HEAD_FORMAT = "dinofeat-linear-head/1"


# ------------------------------------------------------------------------ features
def linear_spec(n_last_blocks: int = 1, avgpool: bool = False, layout: str | None = None
                ) -> FeatureSpec:
    """The :class:`~dinofeat.features.FeatureSpec` of a linear head's features: [CLS] of
    the last ``n_last_blocks`` blocks (+ the average patch token with ``avgpool``, in
    ``layout``), not L2-normalised."""
    return FeatureSpec(pool="cls", normalize=False, n_last_blocks=n_last_blocks,
                       avgpool=avgpool, layout=layout)


def linear_feature_dim(embed_dim: int, n_last_blocks: int, avgpool: bool, is_vit: bool = True
                       ) -> int:
    """Width of :func:`linear_features`: ``D x (n + avgpool)`` for ViTs, ``D`` otherwise
    (with a model at hand, ``linear_spec(n, avgpool).dim(model)`` says the same)."""
    return embed_dim * (n_last_blocks + int(avgpool)) if is_vit else embed_dim


def linear_features(model, x: torch.Tensor, n_last_blocks: int = 1, avgpool: bool = False,
                    layout: str | None = None) -> torch.Tensor:
    """Features of normalised images ``x [B, 3, H, W]`` for a linear head:
    ``[B, D x (n_last_blocks + avgpool)]``, i.e.
    ``linear_spec(n_last_blocks, avgpool, layout).pooled_features(model, x)`` (see the
    module docstring for the layout). Non-ViT backbones give ``model(x)``."""
    spec = linear_spec(n_last_blocks, avgpool, layout)
    if not model.is_vit and (n_last_blocks != 1 or avgpool):
        raise ValueError(f"{getattr(model, 'name', 'this model')} is not a ViT: linear "
                         "features are its pooled output (n_last_blocks=1, no avgpool)")
    spec.check_model(model)
    return spec.pooled_features(model, x)


# -------------------------------------------------------------------------- heads
class LinearClassifier(nn.Module):
    """One linear layer on frozen features: ``[B, in_dim] -> logits [B, num_classes]``.
    Initialised as the release does: weights N(0, 0.01), bias 0."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        if in_dim < 1 or num_classes < 1:
            raise ValueError(f"in_dim and num_classes must be >= 1, got {in_dim}, {num_classes}")
        self.num_classes = num_classes
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class LinearProbe(nn.Module):
    """A trained linear head together with how its features are made.

    Attributes: ``classifier`` (:class:`LinearClassifier`), ``class_names``,
    ``n_last_blocks``, ``avgpool``, ``layout`` and ``model_info`` (the backbone's
    ``describe()`` when known)."""

    def __init__(self, classifier: LinearClassifier, class_names: Sequence[str], *,
                 n_last_blocks: int = 1, avgpool: bool = False, layout: str | None = None,
                 model_info: dict | None = None):
        super().__init__()
        if len(class_names) != classifier.num_classes:
            raise ValueError(f"{len(class_names)} class names for a head with "
                             f"{classifier.num_classes} outputs")
        self.classifier = classifier
        self.class_names = [str(c) for c in class_names]
        self.spec = linear_spec(int(n_last_blocks), bool(avgpool),
                                None if layout == "cls" else layout)
        self.n_last_blocks = self.spec.n_last_blocks
        self.avgpool = self.spec.avgpool
        self.layout = self.spec.layout or "cls"  # the name saved heads use without avgpool
        self.model_info = model_info or {}

    @property
    def in_dim(self) -> int:
        return self.classifier.linear.in_features

    def features(self, model, x: torch.Tensor) -> torch.Tensor:
        """Frozen-backbone features of normalised images ``x [B, 3, H, W]``."""
        return linear_features(model, x, self.n_last_blocks, self.avgpool, self.spec.layout)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Features ``[B, in_dim]`` -> logits ``[B, C]``."""
        return self.classifier(feats)

    def check_model(self, model) -> None:
        """Raise a clear ``ValueError`` when ``model``'s features cannot feed this head."""
        dim = self.spec.dim(model)
        if dim != self.in_dim:
            raise ValueError(f"linear head expects {self.in_dim}-dim features but "
                             f"{getattr(model, 'name', 'the model')} gives {dim} with "
                             f"n_last_blocks={self.n_last_blocks}, avgpool={self.avgpool} "
                             f"(embed_dim {model.embed_dim})")
        want = self.model_info.get("weights_hash")
        have = getattr(model, "weights_hash", None) if want else None
        if want and have and want != have:
            log.warning("linear head was trained on weights %s, this model has %s",
                        want, have)

    def describe(self) -> dict[str, Any]:
        return {"format": HEAD_FORMAT, "class_names": self.class_names,
                "num_classes": len(self.class_names), "in_dim": self.in_dim,
                "n_last_blocks": self.n_last_blocks, "avgpool": self.avgpool,
                "layout": self.layout, "model": self.model_info}

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write ``path`` (safetensors, description in its metadata) and ``path.json``
        (same description), each atomically."""
        from safetensors.torch import save_file
        path = Path(path)
        info = {**self.describe(), **(extra or {})}
        sd = {k: v.detach().cpu().contiguous().float()
              for k, v in self.classifier.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp), metadata={"dinofeat_linear": json.dumps(info)})
        atomic_write_json(path.with_suffix(path.suffix + ".json"), info)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, embed_dim: int | None = None,
             n_last_blocks: int | None = None, avgpool: bool | None = None,
             class_names: Sequence[str] | None = None) -> "LinearProbe":
        """Read a head saved by :meth:`save` or an original release ``.pth`` head (see
        the module docstring; ``embed_dim`` lets ``n_last_blocks``/``avgpool`` be
        inferred for the latter)."""
        return load_linear_head(path, embed_dim=embed_dim, n_last_blocks=n_last_blocks,
                                avgpool=avgpool, class_names=class_names)


def attach_classifier(model, head, *, n_last_blocks: int | None = None,
                      avgpool: bool | None = None, class_names=None) -> LinearProbe:
    """Attach a linear head to ``model`` for ``model.classify``: a :class:`LinearProbe`, a
    head saved by ``dinofeat eval linear`` (``.safetensors``) or an original release
    ``*_linearweights.pth`` (``n_last_blocks``/``avgpool`` inferred from its width unless
    given). Checks that the head fits the model's features (a ``ValueError`` naming the
    file otherwise); returns the head, also kept as ``model.classifier``."""
    source = None
    if not isinstance(head, LinearProbe):
        source = head
        head = LinearProbe.load(head, embed_dim=model.embed_dim, n_last_blocks=n_last_blocks,
                                avgpool=avgpool, class_names=class_names)
    try:
        head.check_model(model)
    except ValueError as e:
        if source is None:
            raise
        raise ValueError(f"{source}: {e}") from None
    model.classifier = head.to(model.device).eval()
    return head


def _release_head_tensors(ckpt: dict, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, dict):
        raise ValueError(f"{source}: 'state_dict' is not a mapping")
    weight = bias = None
    for k, v in sd.items():
        name = k
        for p in ("module.", "_orig_mod.", "classifier.", "head."):
            name = name.removeprefix(p)
        if name == "linear.weight":
            weight = v
        elif name == "linear.bias":
            bias = v
    if weight is None or bias is None:
        raise ValueError(f"{source}: no linear.weight / linear.bias tensors (keys: "
                         f"{', '.join(list(sd)[:6])})")
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ValueError(f"{source}: linear.weight {tuple(weight.shape)} and linear.bias "
                         f"{tuple(bias.shape)} do not form a linear layer")
    return weight, bias


def load_linear_head(path: str | os.PathLike, *, embed_dim: int | None = None,
                     n_last_blocks: int | None = None, avgpool: bool | None = None,
                     class_names: Sequence[str] | None = None) -> LinearProbe:
    """Load a linear head (see :meth:`LinearProbe.load`)."""
    from ..weights import read_checkpoint
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such linear head file: {path}")
    info: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        tensors = read_checkpoint(path)
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("dinofeat_linear")
        if raw:
            info = json.loads(raw)
        elif path.with_suffix(path.suffix + ".json").is_file():
            info = json.loads(path.with_suffix(path.suffix + ".json").read_text())
        weight, bias = _release_head_tensors(tensors, str(path))
    else:
        weight, bias = _release_head_tensors(read_checkpoint(path), str(path))
    num_classes, in_dim = weight.shape
    n = n_last_blocks if n_last_blocks is not None else info.get("n_last_blocks")
    ap = avgpool if avgpool is not None else info.get("avgpool")
    if n is None or ap is None:
        if embed_dim is None:
            raise ValueError(f"{path}: says nothing about n_last_blocks/avgpool; pass them or "
                             "embed_dim so they can be inferred")
        if in_dim % embed_dim:
            raise ValueError(f"{path}: head width {in_dim} is not a multiple of the model's "
                             f"embed_dim {embed_dim}")
        ratio = in_dim // embed_dim
        # The release's recipes: ViT-S n=4 (4D), ViT-B n=1 + avgpool (2D), ResNet (D).
        guess = {1: (1, False), 2: (1, True), 4: (4, False)}.get(ratio, (ratio, False))
        n = guess[0] if n is None else n
        ap = guess[1] if ap is None else ap
        log.info("%s: inferred n_last_blocks=%d, avgpool=%s from width %d", path.name, n, ap,
                 in_dim)
    names = list(class_names) if class_names is not None else info.get("class_names") or [
        str(i) for i in range(num_classes)]
    clf = LinearClassifier(in_dim, num_classes)
    with torch.no_grad():
        clf.linear.weight.copy_(weight.float())
        clf.linear.bias.copy_(bias.float())
    return LinearProbe(clf, names, n_last_blocks=int(n), avgpool=bool(ap),
                       layout=info.get("layout"), model_info=info.get("model"))


# ------------------------------------------------------------------------ training
@dataclass
class LinearProbeConfig:
    """Options of :func:`train_linear_probe` (release defaults)."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 0.001  # for a batch of 256; the optimiser uses lr * batch_size / 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    n_last_blocks: int = 4
    avgpool: bool = False
    val_freq: int = 1
    precompute: bool = False
    num_workers: int | None = None
    seed: int = 0
    precision: str = "fp32"  # of the frozen backbone's forward pass (the head trains in fp32)

    def scaled_lr(self) -> float:
        return self.lr * self.batch_size / 256.0


def _optimizer(clf: nn.Module, cfg: LinearProbeConfig):
    opt = torch.optim.SGD(clf.parameters(), lr=cfg.scaled_lr(), momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs, eta_min=0.0)
    return opt, sched


@torch.no_grad()
def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from .knn import knn_accuracy
    acc = knn_accuracy(logits, labels, topk=(1, 5))
    loss = F.cross_entropy(logits, labels.to(logits.device)).item() if len(labels) else math.nan
    return {"acc1": acc[1], "acc5": acc[5], "loss": loss}


def train_linear_on_features(train_feats: torch.Tensor, train_labels: torch.Tensor,
                             num_classes: int, *, config: LinearProbeConfig | None = None,
                             val_feats: torch.Tensor | None = None,
                             val_labels: torch.Tensor | None = None,
                             device: str | torch.device | None = None,
                             progress: bool = False) -> tuple[LinearClassifier, list[dict]]:
    """Train a :class:`LinearClassifier` on fixed features ``[N, D]`` with the release
    optimiser and schedule (``config``). Returns the classifier (after the last epoch)
    and one history entry per epoch (loss, lr, and val acc1/acc5 every ``val_freq``)."""
    cfg = config or LinearProbeConfig()
    dev = torch.device(device) if device is not None else train_feats.device
    x = train_feats.to(dev, torch.float32)
    y = torch.as_tensor(train_labels).long().to(dev)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"train_feats must be [N, D] and train_labels [N]; got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    clf = LinearClassifier(x.shape[1], num_classes).to(dev)
    opt, sched = _optimizer(clf, cfg)
    history = []
    epochs = range(cfg.epochs)
    if progress:
        from tqdm.auto import tqdm
        epochs = tqdm(epochs, desc="linear probe", unit="epoch")
    for epoch in epochs:
        clf.train()
        perm = torch.randperm(len(y), generator=gen).to(dev)
        total, seen = 0.0, 0
        lr = opt.param_groups[0]["lr"]
        for b0 in range(0, len(y), cfg.batch_size):
            idx = perm[b0:b0 + cfg.batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        sched.step()
        entry = {"epoch": epoch, "lr": lr, "train_loss": total / max(seen, 1)}
        if val_feats is not None and (epoch % cfg.val_freq == 0 or epoch == cfg.epochs - 1):
            clf.eval()
            with torch.no_grad():
                logits = clf(val_feats.to(dev, torch.float32))
            entry.update({f"val_{k}": v for k, v in _accuracy(logits, val_labels).items()})
        history.append(entry)
    clf.eval()
    return clf, history


def _train_transform(preprocessing) -> Callable:
    """Release training augmentation on ``uint8 [3, H, W]``: RandomResizedCrop(crop) with
    torchvision's defaults (scale 0.08-1, ratio 3/4-4/3, bilinear) + horizontal flip."""
    from torchvision.transforms import v2

    from ..images import rgb_to_gray3
    steps: list = [rgb_to_gray3] if preprocessing.grayscale else []
    steps += [v2.RandomResizedCrop(preprocessing.crop_size, antialias=True),
              v2.RandomHorizontalFlip()]
    return v2.Compose(steps)


def _image_features(model, paths: Sequence[Path], labels: Sequence[int], transform,
                    feature_fn: Callable, *, batch_size: int, num_workers: int | None,
                    desc: str, progress: bool, precision: str = "fp32"
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(feature_fn(x) [N', D], labels [N'], skipped)`` for the readable ``paths``."""
    from .features import extract_with_transform
    feats, kept, skipped = extract_with_transform(
        model, paths, transform, feature_fn, batch_size=batch_size, num_workers=num_workers,
        desc=desc, progress=progress, precision=precision)
    return feats, torch.tensor([labels[i] for i in kept], dtype=torch.long), skipped


def train_linear_probe(model: Any, train: LabeledImages, val: LabeledImages | None = None,
                       *, config: LinearProbeConfig | None = None,
                       output_dir: str | os.PathLike | None = None,
                       progress: bool = True) -> tuple[LinearProbe, dict]:
    """Train a linear head on ``model``'s frozen features (release protocol).

    Args:
        model: a :class:`~dinofeat.model.DinoModel` (frozen, eval mode).
        train: the labelled training images, a
            :class:`~dinofeat.eval.folders.LabeledImages`.
        val: labelled validation images (optional).
        config: :class:`LinearProbeConfig`.
        output_dir: where ``checkpoint.pth`` (resumable, written after every epoch),
            ``linear_head.safetensors`` and ``log.jsonl`` go; a rerun resumes.

    Returns ``(probe, results)``: ``results`` holds the final and best validation
    top-1/top-5 and the per-epoch history. Validation features are computed once (the
    backbone is frozen and evaluation preprocessing deterministic).
    """
    from ..weights import read_checkpoint
    from ..images import ImageTransform
    cfg = config or LinearProbeConfig()
    model.eval()  # frozen: features are computed under no_grad, never trained
    device = model.device
    num_classes = len(train.classes)

    def feature_fn(x):
        return linear_features(model, x, cfg.n_last_blocks, cfg.avgpool)

    eval_tf = ImageTransform(model.preprocessing, model.patch_size)
    skipped: dict[str, list[str]] = {}
    val_x = val_y = None
    if val is not None:
        val_x, val_y, skipped["val"] = _image_features(
            model, val.paths, val.labels, eval_tf, feature_fn, batch_size=cfg.batch_size,
            num_workers=cfg.num_workers, desc="val features", progress=progress,
            precision=cfg.precision)
    out = Path(output_dir) if output_dir is not None else None
    t0 = time.time()
    if cfg.precompute:
        tr_x, tr_y, skipped["train"] = _image_features(
            model, train.paths, train.labels, eval_tf, feature_fn, batch_size=cfg.batch_size,
            num_workers=cfg.num_workers, desc="train features", progress=progress,
            precision=cfg.precision)
        clf, history = train_linear_on_features(tr_x, tr_y, num_classes, config=cfg,
                                                val_feats=val_x, val_labels=val_y,
                                                device=device, progress=progress)
    else:
        torch.manual_seed(cfg.seed)
        in_dim = linear_spec(cfg.n_last_blocks, cfg.avgpool).dim(model)
        clf = LinearClassifier(in_dim, num_classes).to(device)
        opt, sched = _optimizer(clf, cfg)
        history: list[dict] = []
        start = 0
        ckpt_path = out / "checkpoint.pth" if out is not None else None
        if ckpt_path is not None and ckpt_path.is_file():
            ck = read_checkpoint(ckpt_path)
            saved = ck.get("config", {})
            if (saved.get("n_last_blocks"), saved.get("avgpool"), saved.get("epochs")) != (
                    cfg.n_last_blocks, cfg.avgpool, cfg.epochs) or \
                    ck["state_dict"]["linear.weight"].shape != clf.linear.weight.shape:
                raise ValueError(f"{ckpt_path} belongs to a run with other settings "
                                 f"({saved}); use another --out folder")
            clf.load_state_dict(ck["state_dict"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start = int(ck["epoch"])
            history = json.loads(ck.get("history", "[]"))
            log.info("resuming the linear probe from %s at epoch %d", ckpt_path, start)
        train_tf = _train_transform(model.preprocessing)
        skipped["train"] = []
        for epoch in range(start, cfg.epochs):
            # A fresh, reproducible shuffle each epoch (also after a resume).
            order = torch.randperm(len(train.paths), generator=torch.Generator().manual_seed(
                cfg.seed * 100003 + epoch)).tolist()
            paths = [train.paths[i] for i in order]
            labels = [train.labels[i] for i in order]
            clf.train()
            lr = opt.param_groups[0]["lr"]
            stats: dict = {}
            skipped_epoch = _train_epoch(model, clf, opt, paths, labels, train_tf, feature_fn,
                                         cfg, progress, epoch, stats)
            total, seen = stats["loss_sum"], stats["seen"]
            if epoch == start:
                skipped["train"] = skipped_epoch
            sched.step()
            entry = {"epoch": epoch, "lr": lr, "train_loss": total / max(seen, 1)}
            if val_x is not None and (epoch % cfg.val_freq == 0 or epoch == cfg.epochs - 1):
                clf.eval()
                with torch.no_grad():
                    entry.update({f"val_{k}": v for k, v in
                                  _accuracy(clf(val_x.to(device)), val_y).items()})
            history.append(entry)
            log.info("epoch %d/%d: loss %.4f%s", epoch + 1, cfg.epochs, entry["train_loss"],
                     f", val top-1 {entry['val_acc1']:.2f}" if "val_acc1" in entry else "")
            if ckpt_path is not None:
                with atomic_path(ckpt_path) as tmp:
                    torch.save({"epoch": epoch + 1, "state_dict": clf.state_dict(),
                                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                "config": asdict(cfg), "history": json.dumps(history)}, tmp)
        clf.eval()
    probe = LinearProbe(clf.cpu(), train.classes, n_last_blocks=cfg.n_last_blocks,
                        avgpool=cfg.avgpool, model_info=model.describe())
    vals = [h for h in history if "val_acc1" in h]
    results = {
        "task": "linear", "model": model.describe(), "config": asdict(cfg),
        "lr_used": cfg.scaled_lr(), "num_classes": num_classes,
        "n_train": len(train.paths), "n_val": len(val.paths) if val is not None else 0,
        "skipped": {k: len(v) for k, v in skipped.items()},
        "final": {k[4:]: v for k, v in vals[-1].items() if k.startswith("val_")} if vals else None,
        "best_acc1": max((h["val_acc1"] for h in vals), default=None),
        "seconds": round(time.time() - t0, 1), "history": history,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        probe.save(out / "linear_head.safetensors",
                   extra={"final": results["final"], "best_acc1": results["best_acc1"]})
        with atomic_path(out / "log.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
    return probe, results


def _train_epoch(model, clf, opt, paths, labels, transform, feature_fn, cfg, progress, epoch,
                 stats: dict) -> list[str]:
    """One epoch: frozen features of augmented images (the same stream as ``embed``),
    one optimiser step of the head per batch."""
    from ..embedding import EmbedStream
    stream = EmbedStream(model, [Path(p) for p in paths], feature_fn, transform=transform,
                         batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                         precision=cfg.precision, progress=progress if progress else False,
                         skip_unreadable=True, quiet=True, positions=True,
                         desc=f"epoch {epoch + 1}/{cfg.epochs}")
    loss_sum, seen = 0.0, 0
    for positions, feats in stream:
        # made in inference mode: a plain copy can enter autograd
        x = feats.clone().to(model.device)
        y = torch.tensor([labels[i] for i in positions], device=model.device)
        loss = F.cross_entropy(clf(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(positions)
        seen += len(positions)
    stats.update(loss_sum=loss_sum, seen=seen)
    return [f"{paths[s.position]}: {s.reason}" for s in stream.skipped]


@torch.no_grad()
def evaluate_linear(model, probe: LinearProbe, val, *, batch_size: int = 64,
                    num_workers: int | None = None, progress: bool = True,
                    precision: str = "fp32") -> dict:
    """Top-1/top-5 of a trained or released head on the labelled images ``val`` (class
    names of ``val`` are matched to the head's by name)."""
    from ..images import ImageTransform
    probe.check_model(model)
    index = {c: i for i, c in enumerate(probe.class_names)}
    missing = [c for c in val.classes if c not in index]
    numbered = probe.class_names == [str(i) for i in range(len(probe.class_names))]
    if missing and numbered and len(val.classes) <= len(probe.class_names):
        # A head without class names (the release's): its class i is the i-th sorted
        # class folder, as torchvision's ImageFolder numbered them when it was trained.
        log.info("head has no class names: matching the %d class folders by sorted order",
                 len(val.classes))
        index = {c: i for i, c in enumerate(val.classes)}
    elif missing:
        raise ValueError(f"validation classes not known to the head: {', '.join(missing[:5])}")
    labels = [index[val.classes[lab]] for lab in val.labels]
    probe = probe.to(model.device)
    x, y, skipped = _image_features(
        model, val.paths, labels, ImageTransform(model.preprocessing, model.patch_size),
        lambda x: probe.features(model, x), batch_size=batch_size, num_workers=num_workers,
        desc="val features", progress=progress, precision=precision)
    acc = _accuracy(probe(x), y)
    return {"task": "linear", "model": model.describe(), "head": probe.describe() | {
        "class_names": None}, "n_val": len(y), "skipped": len(skipped), "final": acc}
