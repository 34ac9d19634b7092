"""DINO on real data, offline: the Fashion-MNIST recipes, their evaluation, and the demo.

Fashion-MNIST (70,000 real 28x28 grey photos of clothing, 10 classes; a Debian package,
see :mod:`dinofeat.datasets`) is the real data every machine of this project can reach.
This module holds what the demo (``dinofeat demo``), the benchmark
(``benchmarks/fashion_mnist.py``) and the shipped ``vit_t_fmnist`` model share:

* :data:`RECIPES`: DINO recipes for 28x28 images on a CPU (a small ViT with 7x7-pixel
  patches, 2 global 28-px crops + local 12-px crops, a short schedule);
* :func:`fashion_mnist_preprocessing`: how the models see a 28x28 photo (as it is: no
  resize, no crop; grey repeated to three channels; the training set's mean/std);
* :func:`knn_evaluation`: DINO's weighted k-NN (k = 20, T = 0.07) of a model's [CLS] features,
  computed through ``model.embed`` on PIL images, the path users take;
* :func:`silhouette_jaccard`: the paper's attention-mask property on real data;
* :func:`run_demo`: the short end-to-end demo (train, index, evaluate, search, pictures).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .utils import atomic_path, atomic_write_json, get_logger
from .zoo import Preprocessing

__all__ = ["Recipe", "RECIPES", "fashion_mnist_stats", "fashion_mnist_preprocessing",
           "recipe_config", "export_training_images", "to_pil", "knn_evaluation",
           "silhouette_jaccard", "random_weights_model", "neighbour_grid",
           "attention_picture", "bank_index", "search_pictures", "DemoResult", "demo_split",
           "run_demo", "set_threads", "pixel_knn", "knn_top1"]

log = get_logger("dinofeat.demo")

def _fmnist_preset() -> dict[str, Any]:
    from .training.config import PRESETS
    return dict(PRESETS["fashion_mnist"])


#: The architecture of the Fashion-MNIST recipes (see :data:`dinofeat.backbones.VIT_SIZES`).
FMNIST_ARCH = _fmnist_preset()["arch"]


@dataclass(frozen=True)
class Recipe:
    """A DINO recipe for Fashion-MNIST: training options and a length in steps.

    ``steps`` optimiser steps of ``batch`` images run as ``chunks`` equal "epochs" of the
    training loop (``max_iters_per_epoch = steps // chunks``; each chunk draws a fresh
    shuffle of the training images), so that the per-iteration schedules span the whole
    run, the learning-rate warm-up lasts one chunk, and the loop's end-of-epoch hooks
    (checkpoint, curves) run ``chunks`` times.
    """

    name: str
    steps: int
    description: str
    batch: int = 64
    chunks: int = 10
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < self.chunks or self.steps % self.chunks:
            raise ValueError(f"recipe {self.name}: steps ({self.steps}) must be a multiple of "
                             f"chunks ({self.chunks})")

    @property
    def images_seen(self) -> int:
        return self.steps * self.batch


# Options shared by every recipe: the ``fashion_mnist`` preset of
# :data:`dinofeat.training.config.PRESETS` (where the reasoning behind each value is).
_COMMON: dict[str, Any] = {k: v for k, v in _fmnist_preset().items()
                           if k not in ("epochs", "mean", "std")}

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("demo", steps=300, chunks=6, description="the offline demo: a few minutes on a "
           "CPU, a few thousand images", options=dict(_COMMON)),
    Recipe("bench", steps=1500, description="the 30-minute CPU benchmark "
           "(benchmarks/fashion_mnist.py): 1.6 passes over the 60,000 photos",
           options=dict(_COMMON)),
    Recipe("ship", steps=3000, description="the shipped vit_t_fmnist model: the bench "
           "recipe twice as long (3.2 passes, about an hour on one CPU thread)",
           options=dict(_COMMON)),
]}


# ------------------------------------------------------------------ data and config
def fashion_mnist_stats(images: np.ndarray) -> tuple[float, float]:
    """``(mean, std)`` of the pixels of ``images`` (uint8) on the 0..1 scale, rounded to 4
    decimals (the training set gives 0.2860 and 0.3530)."""
    flat = np.asarray(images, dtype=np.uint8).reshape(-1)
    counts = sum(np.bincount(flat[i:i + 2 ** 22], minlength=256)  # in chunks: bounded memory
                 for i in range(0, len(flat), 2 ** 22))
    levels = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum()
    mean = float((counts * levels).sum() / n)
    var = float((counts * (levels - mean) ** 2).sum() / n)
    return round(mean, 4), round(math.sqrt(var), 4)


def fashion_mnist_preprocessing(mean: float, std: float, size: int = 28) -> Preprocessing:
    """How a Fashion-MNIST model sees an image: grey (three equal channels), the short side
    resized to ``size`` (a 28x28 photo is left as it is) and centre-cropped to ``size``,
    normalised with the grey-level ``mean``/``std``."""
    return Preprocessing(mode="dino", resize_size=size, crop_size=size,
                         interpolation="bicubic", mean=(mean,) * 3, std=(std,) * 3,
                         grayscale=True)


def recipe_config(recipe: str | Recipe, *, data: str | os.PathLike,
                  output_dir: str | os.PathLike, mean: float, std: float,
                  **overrides: Any):
    """The :class:`~dinofeat.training.config.TrainConfig` of ``recipe`` (a name of
    :data:`RECIPES` or a :class:`Recipe`) for the images ``data`` (a folder or a ``.txt``
    list), normalised with ``mean``/``std``; ``overrides`` (any TrainConfig field) win."""
    from .training.config import TrainConfig
    r = RECIPES[recipe] if isinstance(recipe, str) else recipe
    opts = dict(r.options)
    opts.update(batch_size_per_gpu=r.batch, epochs=r.chunks,
                max_iters_per_epoch=r.steps // r.chunks, mean=(mean,) * 3, std=(std,) * 3,
                data=str(data), output_dir=str(output_dir))
    opts.update(overrides)
    return TrainConfig(**opts).validate()


def export_training_images(images: np.ndarray, folder: str | os.PathLike) -> Path:
    """Write ``images`` (uint8 ``[N, 28, 28]``) as PNG files in ``folder`` without labels
    (the export resumes: files already there are kept). Returns ``folder``."""
    from .datasets import export_image_folder
    folder = Path(folder)
    width = len(str(len(images) - 1))
    last = folder / f"img_{len(images) - 1:0{width}d}.png"
    if not last.exists():
        log.info("writing %d training images as PNG files to %s", len(images), folder)
        export_image_folder(images, None, folder)
    return folder


def to_pil(images: np.ndarray) -> list:
    """uint8 ``[N, H, W]`` -> a list of grey PIL images (mode ``L``), as a user has them."""
    from PIL import Image
    return [Image.fromarray(np.ascontiguousarray(a)) for a in images]


def set_threads(n: int | None) -> int:
    """Set torch's intra-op CPU threads (``None``: keep the default); returns the count.

    On a CPU shared with other heavy processes, one thread per process avoids the cost
    of OpenMP threads waiting on each other (measured here: 2.5x faster training steps
    with 1 thread than with 2 when the load average was 12 on 2 cores)."""
    if n is not None:
        if n < 1:
            raise ValueError(f"threads must be at least 1, got {n}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def random_weights_model(arch: str, preprocessing: Preprocessing, seed: int = 0,
                         img_size: int = 28):
    """The same network with DINO's random initialisation (what training starts from), as
    a :class:`~dinofeat.model.DinoModel` in eval mode."""
    from .backbones import build_backbone
    from .model import DinoModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_backbone(arch, img_size=img_size)
    return DinoModel(backbone, name=f"{arch} (random weights)",
                     preprocessing=preprocessing).eval()


# ------------------------------------------------------------------ evaluation
def knn_evaluation(model, bank_images: np.ndarray, bank_labels: np.ndarray,
                   test_images: np.ndarray, test_labels: np.ndarray, *, k: int = 20,
                   T: float = 0.07, batch_size: int = 256, progress: bool = False,
                   precision: str = "fp32") -> dict[str, Any]:
    """DINO's weighted k-NN (k = 20, T = 0.07) with ``bank_images`` as the memory bank.

    Features are ``model.embed`` of the images as grey PIL images (the model's own
    preprocessing, L2-normalised [CLS]); the vote is
    :func:`dinofeat.eval.knn_classify`. Returns top-1/top-5 (percent), the sizes and the
    embedding time."""
    from .eval.knn import knn_accuracy, knn_classify
    t0 = time.perf_counter()
    kw = dict(batch_size=batch_size, progress=progress, precision=precision)
    bank = model.embed(to_pil(bank_images), **kw)
    test = model.embed(to_pil(test_images), **kw)
    embed_s = time.perf_counter() - t0
    scores = knn_classify(bank, torch.as_tensor(bank_labels), test, k=k, T=T,
                          num_classes=int(max(bank_labels.max(), test_labels.max())) + 1)
    acc = knn_accuracy(scores, torch.as_tensor(test_labels), (1, 5))
    return {"top1": acc[1], "top5": acc[5], "k": k, "T": T, "bank": len(bank_images),
            "test": len(test_images), "embed_s": embed_s}


def knn_top1(bank: torch.Tensor, bank_labels: np.ndarray, test: torch.Tensor,
             test_labels: np.ndarray, *, k: int = 20, T: float = 0.07) -> float:
    """k-NN top-1 (percent) of features ``test`` against the memory bank ``bank``:
    :func:`dinofeat.eval.knn_classify` (cosine, ``k`` neighbours, weights exp(s/T))."""
    from .eval.knn import knn_accuracy, knn_classify
    n_cls = int(max(np.max(bank_labels), np.max(test_labels))) + 1
    scores = knn_classify(bank, torch.as_tensor(bank_labels), test, k=k, T=T,
                          num_classes=n_cls)
    return knn_accuracy(scores, torch.as_tensor(test_labels), (1,))[1]


def pixel_knn(bank_images: np.ndarray, bank_labels: np.ndarray, test_images: np.ndarray,
              test_labels: np.ndarray, centre: bool = True) -> float:
    """The raw-pixel baseline: :func:`knn_top1` of the flattened pixels (L2-normalised
    by the k-NN), ``centre``: minus the mean bank image first (the stronger baseline)."""
    a = torch.from_numpy(bank_images.reshape(len(bank_images), -1)).float()
    b = torch.from_numpy(test_images.reshape(len(test_images), -1)).float()
    if centre:
        mu = a.mean(0, keepdim=True)
        a, b = a - mu, b - mu
    return knn_top1(a, bank_labels, b, test_labels)


def silhouette_jaccard(model, images: np.ndarray, *, threshold: float = 0.6,
                       progress: bool = False) -> dict[str, float]:
    """How well the last block's [CLS] attention finds the garment (the paper's 60%-mass masks, on real data).

    For every image (uint8 ``[N, H, W]``, dark background): the silhouette is the set of
    pixels above 0; :meth:`~dinofeat.model.DinoModel.attention_maps` gives each head's
    mask (the fewest patches holding ``threshold`` of its attention mass, at pixel
    resolution). Returned, each averaged over the images:

    * ``per_head``: the mean over heads of Jaccard(head mask, silhouette) (the headline);
    * ``best_head``: the largest of the heads' Jaccard;
    * ``mean_map``: Jaccard of the mask of the head-averaged map (the same ``threshold``);
    * ``mask_area``: fraction of pixels the head masks cover (mean over heads);
    * ``silhouette_area``: fraction of pixels in the silhouette.

    Pixels the patch grid drops (a remainder below one patch) are left out of both sets.
    """
    from tqdm.auto import tqdm

    from .attention import mass_masks
    per_head, best, mean_map, area, sil_area = [], [], [], [], []
    for img in tqdm(images, desc="attention", unit="img", disable=not progress):
        maps = model.attention_maps(np.ascontiguousarray(img), threshold=threshold)
        H, W = maps.masks.shape[-2:]
        sil = np.asarray(img)[:H, :W] > 0
        inter = (maps.masks & sil).sum(axis=(1, 2))
        union = (maps.masks | sil).sum(axis=(1, 2))
        j = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        per_head.append(j.mean())
        best.append(j.max())
        p = maps.patch_size
        mm = mass_masks(maps.grid.mean(axis=0), threshold)
        mm = np.repeat(np.repeat(mm, p, axis=0), p, axis=1)
        u = (mm | sil).sum()
        mean_map.append((mm & sil).sum() / u if u else 1.0)
        area.append(maps.masks.mean())
        sil_area.append(sil.mean())
    f = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"per_head": f(per_head), "best_head": f(best), "mean_map": f(mean_map),
            "mask_area": f(area), "silhouette_area": f(sil_area), "images": len(images),
            "threshold": threshold}


# ------------------------------------------------------------------ pictures
def _upscale(img: np.ndarray, factor: int) -> np.ndarray:
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def _rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img, dtype=np.uint8)
    return np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img[..., :3]


def neighbour_grid(queries: Sequence[np.ndarray], neighbours: Sequence[Sequence[np.ndarray]],
                   hits: Sequence[Sequence[bool]], path: str | os.PathLike,
                   scale: int = 3, pad: int = 2) -> Path:
    """A PNG with one row per query: the query (blue frame), then its neighbours, nearest
    first, framed green when they share the query's class and red otherwise.

    ``queries``: images ``[H, W]`` or ``[H, W, 3]`` (uint8); ``neighbours[i]``: the
    neighbour images of query ``i``; ``hits[i][j]``: whether neighbour ``j`` has the
    query's class."""
    from PIL import Image
    rows = len(queries)
    cols = 1 + max((len(n) for n in neighbours), default=0)
    h, w = np.asarray(queries[0]).shape[:2]
    ch, cw = h * scale + 2 * pad, w * scale + 2 * pad
    gap = 2 * pad
    canvas = np.full((rows * ch, cols * cw + gap, 3), 255, np.uint8)
    colours = {"query": (40, 90, 220), True: (30, 170, 60), False: (220, 40, 40)}

    def put(r: int, c: int, img: np.ndarray, colour) -> None:
        y, x = r * ch, c * cw + (gap if c else 0)
        canvas[y:y + ch, x:x + cw] = colour
        canvas[y + pad:y + pad + h * scale, x + pad:x + pad + w * scale] = _upscale(
            _rgb(img), scale)

    for r, q in enumerate(queries):
        put(r, 0, q, colours["query"])
        for c, (img, hit) in enumerate(zip(neighbours[r], hits[r]), start=1):
            put(r, c, img, colours[bool(hit)])
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path


def attention_picture(maps, path: str | os.PathLike, scale: int = 4) -> Path:
    """One PNG per image: the image, the head-averaged attention over it, then every
    head's attention map and its 60%-mass mask (upscaled ``scale`` times, nearest)."""
    from PIL import Image

    from .attention import colorize, overlay
    img = _rgb(maps.image)
    tiles = [img, overlay(img, maps.mean)]
    tiles += [colorize(m) for m in maps.heads]
    tiles += [_rgb(m.astype(np.uint8) * 255) for m in maps.masks]
    sep = np.full((img.shape[0], 1, 3), 255, np.uint8)
    strip = np.concatenate([x for t in tiles for x in (t, sep)][:-1], axis=1)
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(_upscale(strip, scale)).save(tmp, format="PNG")
    return path


def search_pictures(model, index, bank_images: np.ndarray, bank_labels: np.ndarray,
                    query_images: np.ndarray, query_labels: np.ndarray,
                    out_dir: str | os.PathLike, *, neighbours: int = 8,
                    query_feats: torch.Tensor | None = None,
                    attention_dir: str = "attention") -> list[Path]:
    """Search ``index`` (built from ``bank_images``, uint8 ``[N, H, W]``, in order) with
    ``query_images`` and draw what a person wants to see: ``out_dir/neighbours.png`` (each
    query and its ``neighbours`` nearest bank photos, green when ``bank_labels`` equals the
    query's label) and, per query, ``out_dir/<attention_dir>/query_N.png`` (image, mean
    attention, each head and its 60%-mass mask) with the maps' own PNGs in
    ``query_N/``. ``query_feats`` (``[Q, D]``) skips embedding the queries again.
    Returns the files written."""
    out = Path(out_dir)
    if query_feats is None:
        query_feats = model.embed(to_pil(query_images))
    _, ids = index.search(query_feats, k=neighbours, model_info=model)
    rows = [[bank_images[i] for i in row if i >= 0] for row in ids]
    hits = [[bank_labels[i] == y for i in row if i >= 0] for y, row in zip(query_labels, ids)]
    files = [neighbour_grid(list(query_images), rows, hits, out / "neighbours.png")]
    for n, img in enumerate(query_images):
        maps = model.attention_maps(img)
        files.append(attention_picture(maps, out / attention_dir / f"query_{n}.png"))
        maps.save(out / attention_dir / f"query_{n}")
    return files


# ------------------------------------------------------------------ the demo
@dataclass
class DemoResult:
    """What :func:`run_demo` measured and wrote."""

    out_dir: Path
    knn_top1: float
    random_knn_top1: float
    pixels_knn_top1: float
    train_seconds: float
    total_seconds: float
    steps: int
    images_seen: int
    bank: int
    test: int
    files: list[Path] = field(default_factory=list)
    shipped_knn_top1: float | None = None

    def summary(self) -> str:
        rows = [(f"DINO, this demo ({self.steps} steps x {self.images_seen // max(self.steps, 1)}"
                 f" photos, {self.train_seconds / 60:.1f} min)", self.knn_top1),
                ("the same network with random weights", self.random_knn_top1),
                ("raw pixels (minus the mean image), same bank", self.pixels_knn_top1)]
        if self.shipped_knn_top1 is not None:
            rows.append(("vit_t_fmnist (same code, recipe 'ship', shipped)",
                         self.shipped_knn_top1))
        width = max(len(r[0]) for r in rows)
        return "\n".join([f"k-NN top-1 on {self.test} Fashion-MNIST test photos (memory "
                          f"bank: {self.bank} training photos, k=20, T=0.07):"] +
                         [f"  {name.ljust(width)}  {acc:6.2f}%" for name, acc in rows])


def _shipped_available() -> bool:
    from .weights import PACKAGE_WEIGHTS
    from .zoo import MODELS
    spec = MODELS.get("vit_t_fmnist")
    return bool(spec and spec.local_file and (PACKAGE_WEIGHTS / spec.local_file).is_file())


def bank_index(model, images: np.ndarray, labels: np.ndarray, progress: bool = False,
               feats: torch.Tensor | None = None):
    """A cosine :class:`~dinofeat.KNNIndex` of ``model.embed`` of ``images`` (uint8
    ``[N, H, W]``, as grey PIL photos; ``feats``: already computed), labelled with the
    Fashion-MNIST class names of ``labels``; ids are the positions in ``images``."""
    from .datasets import FASHION_MNIST_CLASSES
    from .search import KNNIndex
    if feats is None:
        feats = model.embed(to_pil(images), batch_size=256, progress=progress)
    index = KNNIndex(feats.shape[1], metric="cosine", model_info=model)
    index.add(feats, labels=[FASHION_MNIST_CLASSES[int(y)] for y in labels])
    return index


def _model_knn(model, bank: np.ndarray, bank_labels: np.ndarray, test: np.ndarray,
               test_labels: np.ndarray, progress: bool
               ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``(top-1, bank features, test features)`` of ``model`` by :func:`knn_top1`."""
    kw = dict(batch_size=256, progress=progress)
    bank_feats = model.embed(to_pil(bank), **kw)
    test_feats = model.embed(to_pil(test), **kw)
    return knn_top1(bank_feats, bank_labels, test_feats, test_labels), bank_feats, test_feats


def demo_split(n_train: int, n_test: int, train_images: int, bank: int, test: int,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted indices ``(pretraining photos, memory-bank photos, test photos)`` of the demo:
    the first ``train_images`` and the first ``bank`` of one random permutation of the
    training set (the bank is labelled, the pretraining set is not; they overlap as a
    user's collection would), and ``test`` random test photos."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_train)
    return (np.sort(order[:min(train_images, n_train)]), np.sort(order[:min(bank, n_train)]),
            np.sort(rng.permutation(n_test)[:min(test, n_test)]))


def run_demo(out_dir: str | os.PathLike = "dinofeat-demo", *, steps: int | None = None,
             train_images: int = 6000, bank: int = 5000, test: int = 1000, queries: int = 6,
             neighbours: int = 8, batch: int | None = None, threads: int | None = None,
             seed: int = 0, compare_shipped: bool = True,
             data_root: str | os.PathLike | None = None, progress: bool = True,
             echo: Callable[[str], Any] = print) -> DemoResult:
    """The offline demo, end to end on Fashion-MNIST (a few minutes on a 2-core CPU).

    1. export ``train_images`` training photos (no labels) and pretrain a small ViT on them
       with DINO (recipe ``"demo"``: ``steps`` optimiser steps of ``batch`` images, by
       default 300 x 64: about 5 minutes on 2 cores; DINO's k-NN first dips below the
       random network's and passes it after ~300 steps, see docs/benchmarks.md);
    2. embed ``bank`` labelled training photos into a :class:`~dinofeat.KNNIndex` and
       classify ``test`` test photos by DINO's k-NN vote, next to the same network with
       random weights and (``compare_shipped``) the shipped ``vit_t_fmnist``, trained by
       the same code for longer;
    3. search the index with ``queries`` test photos: ``neighbours.png`` (each query and
       its ``neighbours`` nearest training photos, green = same class);
    4. attention maps of the queries: ``attention/query_N.png`` (image, mean map, every
       head's map and mask) and the per-head PNGs of
       :meth:`~dinofeat.attention.AttentionMaps.save`.

    Also written: the teacher backbone ``model.safetensors`` (``dinofeat.load`` reads it),
    the index ``train.idx`` (``dinofeat search``), ``results.json`` and the training run
    (``run/``). Returns a :class:`DemoResult`.
    """
    from .datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
    from .model import DinoModel, save_safetensors
    from .training.loop import train

    t_start = time.perf_counter()
    out = Path(out_dir)
    recipe = RECIPES["demo"]
    if steps is not None:
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        chunks = min(recipe.chunks, steps)
        recipe = dataclasses.replace(recipe, steps=steps - steps % chunks, chunks=chunks)
    if batch is not None:
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        recipe = dataclasses.replace(recipe, batch=batch)
    for name, v in (("train_images", train_images), ("bank", bank), ("test", test)):
        if v < 1:
            raise ValueError(f"{name} must be at least 1, got {v}")
    if train_images < recipe.batch:
        raise ValueError(f"train_images ({train_images}) must hold at least one batch "
                         f"({recipe.batch})")
    if not 1 <= queries <= test or neighbours < 1:
        raise ValueError("queries must lie in [1, test] and neighbours be at least 1")
    out.mkdir(parents=True, exist_ok=True)
    set_threads(threads)

    x_train, y_train = load_fashion_mnist("train", data_root)
    x_test, y_test = load_fashion_mnist("test", data_root)
    pretrain, bank_idx, test_idx = demo_split(len(x_train), len(x_test), train_images, bank,
                                              test, seed)
    mean, std = fashion_mnist_stats(x_train)
    prep = fashion_mnist_preprocessing(mean, std)

    # 1. pretraining, without labels
    data = export_training_images(x_train[pretrain], out / "data")
    echo(f"[1/4] DINO pretraining: {recipe.steps} steps x {recipe.batch} images "
         f"({len(pretrain)} unlabelled training photos, {FMNIST_ARCH}, CPU threads: "
         f"{torch.get_num_threads()})")
    cfg = recipe_config(recipe, data=data, output_dir=out / "run", mean=mean, std=std,
                        seed=seed, resume=False)
    t0 = time.perf_counter()
    train(cfg)
    train_s = time.perf_counter() - t0
    from .model import load
    trained = load(out / "run", device="cpu")
    model = DinoModel(trained.backbone, name="fmnist-demo", preprocessing=prep).eval()
    files = [save_safetensors(model, out / "model.safetensors")]
    model = load(files[0], device="cpu")  # evaluate what was saved

    # 2. k-NN index and accuracy, next to random weights
    echo(f"[2/4] k-NN index of {len(bank_idx)} labelled training photos; "
         f"classifying {len(test_idx)} test photos")
    split = (x_train[bank_idx], y_train[bank_idx], x_test[test_idx], y_test[test_idx])
    acc, bank_feats, test_feats = _model_knn(model, *split, progress)
    index = bank_index(model, x_train[bank_idx], y_train[bank_idx], feats=bank_feats)
    rand = random_weights_model(FMNIST_ARCH, prep, seed=seed)
    rand_acc = _model_knn(rand, *split, progress)[0]
    pixels_acc = pixel_knn(*split)
    files.append(index.save(out / "train.idx"))
    shipped_acc = None
    if compare_shipped and _shipped_available():
        shipped_acc = _model_knn(load("vit_t_fmnist", device="cpu"), *split, progress)[0]

    # 3. search, 4. attention maps
    echo(f"[3/4] searching the index with {queries} test photos")
    q = np.linspace(0, len(test_idx) - 1, queries).round().astype(int)
    echo("[4/4] attention maps of the queries")
    files += search_pictures(model, index, x_train[bank_idx], y_train[bank_idx],
                             x_test[test_idx[q]], y_test[test_idx[q]], out,
                             neighbours=neighbours, query_feats=test_feats[q])
    total_s = time.perf_counter() - t_start
    result = DemoResult(out_dir=out, knn_top1=acc, random_knn_top1=rand_acc,
                        pixels_knn_top1=pixels_acc, train_seconds=train_s, total_seconds=total_s, steps=recipe.steps,
                        images_seen=recipe.images_seen, bank=len(bank_idx),
                        test=len(test_idx), files=files, shipped_knn_top1=shipped_acc)
    atomic_write_json(out / "results.json", {
        "knn_top1": acc, "random_knn_top1": rand_acc, "pixels_knn_top1": pixels_acc,
        "dino_minus_random": acc - rand_acc, "shipped_knn_top1": shipped_acc,
        "k": 20, "T": 0.07, "load_average": [round(v, 2) for v in os.getloadavg()],
        "train_seconds": train_s,
        "total_seconds": total_s, "steps": recipe.steps, "batch": recipe.batch,
        "pretrain_images": len(pretrain), "bank": len(bank_idx), "test": len(test_idx),
        "threads": torch.get_num_threads(), "arch": FMNIST_ARCH,
        "query_classes": [FASHION_MNIST_CLASSES[int(y_test[test_idx[i]])] for i in q]})
    return result
