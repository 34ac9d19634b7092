"""From images to feature vectors: pooling, multi-scale, batching and streaming.

:class:`EmbedStream` is the engine behind ``DinoModel.embed`` / ``iter_embed`` /
``patch_features``: it resolves the input (:func:`dinofeat.images.resolve_images`),
decodes and preprocesses in ``DataLoader`` workers (``uint8`` until the model's device),
normalises there, runs the backbone under ``torch.inference_mode`` (and autocast when a
lower precision is asked for) and yields ``(keys, features)`` batch by batch, in input
order. The pooling functions below are the paper's representations:

* ``pool="cls"``: the final-normed [CLS] token (k-NN, retrieval; DESIGN 3.7);
* ``n_last_blocks=n``: the [CLS] tokens of the last ``n`` blocks, each through the final
  LayerNorm, concatenated (linear evaluation of ViT-S: ``n = 4``);
* ``avgpool=True``: [CLS] of the last block with the average of its patch tokens, in the
  release's *interleaved* layout ``[cls_0, avg_0, cls_1, avg_1, ...]`` (what
  ``torch.cat((cls[..., None], avg[..., None]), -1).reshape(B, -1)`` gives), so the
  published ViT-B linear heads apply unchanged;
* ``pool="mean"``: the average output patch token; ``pool="gem"``: GeM (p = 4) over the
  output patch tokens, ``(mean(max(x, 1e-6) ** 4)) ** (1 / 4)`` per channel;
  ``pool="cls+gem"``: [CLS] followed by GeM (copy detection);
* ``multiscale=True``: the chosen representation of the input tensor resized (bilinear)
  by 1, 1/sqrt(2) and 1/2, averaged (then L2-normalised when ``normalize``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from . import images as _images
from .utils import get_logger
from .zoo import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    from .model import DinoModel

__all__ = ["POOLS", "PRECISIONS", "MULTISCALE_FACTORS", "GEM_P", "gem", "crop_to_patches",
           "feature_dim", "EmbedStream", "resolve_preprocessing"]

POOLS = ("cls", "mean", "gem", "cls+gem")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MULTISCALE_FACTORS = (1.0, 1.0 / math.sqrt(2.0), 0.5)
GEM_P = 4.0

log = get_logger(__name__)


def gem(tokens: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling of patch tokens ``[B, N, D]`` -> ``[B, D]`` (in fp32):
    ``(mean_n max(x, eps) ** p) ** (1 / p)``."""
    return tokens.float().clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def crop_to_patches(x: torch.Tensor, patch_size: int | None) -> torch.Tensor:
    """Crop ``[B, C, H, W]`` to the top-left ``(H // p * p, W // p * p)``: exactly the
    pixels a stride-``p`` patch convolution uses, which is what the original DINO ViT does
    with a remainder (timm's patch embedding refuses one)."""
    if not patch_size:
        return x
    h, w = x.shape[-2] // patch_size * patch_size, x.shape[-1] // patch_size * patch_size
    if h == 0 or w == 0:
        raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than one {patch_size}-pixel "
                         "patch")
    return x[..., :h, :w]


def feature_dim(model: "DinoModel", pool: str = "cls", n_last_blocks: int = 1,
                avgpool: bool = False) -> int:
    """Length of the vectors ``embed`` returns for these options."""
    d = model.embed_dim
    if n_last_blocks > 1 or avgpool:
        return d * n_last_blocks + (d if avgpool else 0)
    return 2 * d if pool == "cls+gem" else d


def resolve_preprocessing(model: "DinoModel", preprocessing: None | str | Preprocessing
                          ) -> Preprocessing:
    """The model's own preprocessing, with ``mode`` replaced by a string, or a given one."""
    if preprocessing is None:
        return model.preprocessing
    if isinstance(preprocessing, str):
        if preprocessing not in ("dino", "whole"):
            raise ValueError(f"preprocessing must be 'dino', 'whole' or a Preprocessing, got "
                             f"{preprocessing!r}")
        return model.preprocessing.replace(mode=preprocessing)
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    raise TypeError(f"preprocessing must be None, 'dino', 'whole' or a Preprocessing, got "
                    f"{type(preprocessing).__name__}")


def _check_options(model: "DinoModel", pool: str, n_last_blocks: int, avgpool: bool) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if not isinstance(n_last_blocks, int) or n_last_blocks < 1:
        raise ValueError(f"n_last_blocks must be a positive integer, got {n_last_blocks!r}")
    if (n_last_blocks > 1 or avgpool) and pool != "cls":
        raise ValueError("n_last_blocks/avgpool build the linear-evaluation [CLS] "
                         f"representation; they cannot be combined with pool={pool!r}")
    if avgpool and n_last_blocks > 1:
        raise ValueError("avgpool=True is defined (as in the DINO release) for the last block "
                         "only: use n_last_blocks=1 with it")
    if not model.is_vit:
        if n_last_blocks > 1 or avgpool:
            raise TypeError(f"n_last_blocks/avgpool need a ViT; {model.name} is not one")
        if pool != "cls" and not hasattr(model.backbone, "forward_tokens"):
            raise TypeError(f"pool={pool!r} needs patch tokens; {model.name} is a ResNet "
                            "(its feature is the global average pool: use pool='cls')")
    if model.is_vit and n_last_blocks > model.backbone.depth:
        raise ValueError(f"n_last_blocks={n_last_blocks} but the model has "
                         f"{model.backbone.depth} blocks")


def pooled_features(model: "DinoModel", x: torch.Tensor, *, pool: str = "cls",
                    n_last_blocks: int = 1, avgpool: bool = False) -> torch.Tensor:
    """Normalised images ``[B, 3, H, W]`` -> representation ``[B, D']`` (not L2-normed).
    See the module docstring for the options."""
    x = crop_to_patches(x, model.patch_size)
    if n_last_blocks > 1 or avgpool:
        blocks = model.intermediate_tokens(x, n_last_blocks, norm=True)
        cls = torch.cat([t[:, 0] for t in blocks], dim=-1)
        if avgpool:
            avg = blocks[-1][:, 1:].mean(dim=1)
            cls = torch.stack([cls, avg], dim=-1).reshape(x.shape[0], -1)
        return cls
    if pool == "cls":
        return model(x)
    tokens = model.forward_tokens(x)
    patches = tokens[:, 1:]
    if pool == "mean":
        return patches.mean(dim=1)
    g = gem(patches)
    return g if pool == "gem" else torch.cat([tokens[:, 0].float(), g], dim=-1)


def multiscale_features(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        scales: Sequence[float] = MULTISCALE_FACTORS) -> torch.Tensor:
    """Average of ``fn`` over bilinear rescalings of ``x`` by ``scales``."""
    total = None
    for s in scales:
        xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                            align_corners=False)
        f = fn(xs).float()
        total = f if total is None else total + f
    return total / len(scales)


@contextlib.contextmanager
def _autocast(device: torch.device, precision: str, model=None):
    """Autocast for ``precision`` plus the platform's fastest correct kernels
    (:func:`dinofeat.accel.fast_inference`); global settings are restored on exit."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    from .accel import fast_inference
    with fast_inference(model, precision, device):
        yield


@dataclass
class EmbedStream:
    """Images in, ``(keys, tensor)`` batches out, in input order.

    Iterate it for ``(keys, out)`` pairs: ``keys`` is a list with the path (a
    ``pathlib.Path``) of every image of the batch, or its position in the input for
    in-memory images; ``out`` is a CPU ``float32`` tensor whose first dimension matches
    ``keys``. Unreadable images are left out of the batches: with ``skip_unreadable`` they
    are collected in :attr:`skipped` (a list of
    :class:`~dinofeat.images.SkippedImage`, filled as the stream advances) and logged
    (each file named once, as it is met, and a count at the end); otherwise the first one
    raises :class:`~dinofeat.images.ImageReadError` naming it.

    ``fn`` maps a normalised batch ``[B, 3, H, W]`` on ``device`` to ``[B, ...]``; images
    of different sizes ("whole" preprocessing) go through it in same-size groups, and
    their outputs are put back in input order (so every group's output must have the same
    trailing shape, else a ``ValueError`` says so).
    """

    model: "DinoModel"
    images: Any
    fn: Callable[[torch.Tensor], torch.Tensor]
    preprocessing: Preprocessing | None = None
    size: int | None = None
    batch_size: int = 64
    num_workers: int | None = None
    precision: str = "fp32"
    device: torch.device | None = None
    progress: bool | None = None
    skip_unreadable: bool | None = None
    desc: str = "embed"
    start: int = 0  # with `stop`: only embed positions [start, stop) of the input
    stop: int | None = None
    quiet: bool = False  # no skip warnings (a caller that reports them itself)
    decode: str = "reduced"  # dinofeat.images.DECODE_MODES
    skipped: list = field(default_factory=list)

    def __post_init__(self):
        self.resolved = _images.resolve_images(self.images)
        n = len(self.resolved)
        self.stop = n if self.stop is None else min(self.stop, n)
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"bad range [{self.start}, {self.stop}) for {n} images")
        if self.skip_unreadable is None:
            self.skip_unreadable = self.resolved.from_folder
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{self.precision!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        self.device = torch.device(self.device) if self.device is not None else self.model.device
        self.transform = _images.ImageTransform(
            resolve_preprocessing(self.model, self.preprocessing), self.model.patch_size,
            self.size)

    @property
    def sources(self) -> list[_images.ImageSource]:
        """Every input, in order (``.key`` is the path or position)."""
        return self.resolved.sources

    def __len__(self) -> int:
        return self.stop - self.start

    def _progress_bar(self):
        from tqdm.auto import tqdm
        import sys
        show = self.progress if self.progress is not None else (
            sys.stderr.isatty() and len(self) > self.batch_size)
        return tqdm(total=len(self), unit="img", desc=self.desc, disable=not show,
                    dynamic_ncols=True, smoothing=0.1)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.precision, self.model):
            out = self.fn(x)
        return out.float() if out.is_floating_point() else out

    def _channels_last(self) -> torch.memory_format:
        return torch.channels_last if not self.model.is_vit and \
            not hasattr(self.model.backbone, "forward_tokens") else torch.contiguous_format

    def __iter__(self) -> Iterator[tuple[list, torch.Tensor]]:
        model = self.model
        if model.device != self.device:
            model.to(self.device)
        fmt = self._channels_last()
        if fmt == torch.channels_last:
            model.to(memory_format=torch.channels_last)
        bar = self._progress_bar()
        try:
            with torch.inference_mode():
                if self.resolved.tensor is not None:
                    yield from self._iter_tensor(bar, fmt)
                else:
                    yield from self._iter_loader(bar, fmt)
        finally:
            bar.close()
        if self.skipped and not self.quiet:  # each file was named once as it was met
            log.warning("skipped %d unreadable image(s) of %d", len(self.skipped), len(self))

    def _iter_tensor(self, bar, fmt):
        t = self.resolved.tensor
        for lo in range(self.start, self.stop, self.batch_size):
            hi = min(lo + self.batch_size, self.stop)
            x = t[lo:hi].to(self.device, torch.float32, non_blocking=True)
            out = self._run(x.contiguous(memory_format=fmt)).cpu()
            bar.update(hi - lo)
            yield list(range(lo, hi)), out

    def _iter_loader(self, bar, fmt):
        sources = self.resolved.sources[self.start:self.stop]
        pre = self.transform.preprocessing
        plan = self.decode_plan(sources)
        loader = _images.image_loader(
            sources, self.transform, batch_size=self.batch_size, num_workers=plan.workers,
            pin_memory=self.device.type == "cuda", decode=self.decode)
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and plan.threads != threads:
            torch.set_num_threads(plan.threads)
        try:
            yield from self._iter_batches(loader, sources, pre, fmt, bar)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def decode_plan(self, sources=None) -> _images.DecodePlan:
        """Decoding workers and model threads for this stream
        (:func:`dinofeat.images.plan_decoding` with the model's estimated cost)."""
        sources = self.resolved.sources if sources is None else sources
        model_s = None
        if self.device.type == "cpu" and self.num_workers is None and \
                len(sources) > self.batch_size:
            from .accel import model_seconds_per_image
            h, w = self.transform.output_size(*((self.transform.resize_size,) * 2))
            if isinstance(getattr(self.model, "backbone", None), torch.nn.Module):
                model_s = model_seconds_per_image(self.model, h, w, self.precision)
        return _images.plan_decoding(sources, self.transform, batch_size=self.batch_size,
                                     model_s=model_s, decode=self.decode,
                                     num_workers=self.num_workers)

    def _iter_batches(self, loader, sources, pre, fmt, bar):
        for batch in loader:
            for pos, reason in batch.failed:
                src = sources[pos]
                if not self.skip_unreadable:
                    raise _images.ImageReadError(src.name, reason)
                if not self.quiet:
                    log.warning("skipping unreadable image %s: %s", src.name, reason)
                self.skipped.append(_images.SkippedImage(self.start + pos, src.key, reason))
            outs: dict[int, torch.Tensor] = {}
            for positions, imgs in batch.groups:
                x = _images.normalize_batch(imgs, pre.mean, pre.std, device=self.device,
                                            memory_format=fmt)
                res = self._run(x).cpu()
                outs.update(zip(positions, res.unbind(0)))
            bar.update(len(batch.positions))
            order = [p for p in batch.positions if p in outs]
            if not order:
                continue
            shapes = {tuple(outs[p].shape) for p in order}
            if len(shapes) > 1:
                raise ValueError(f"images of different sizes give outputs of shapes "
                                 f"{sorted(shapes)}; use a fixed size or one image at a time")
            yield [sources[p].key for p in order], torch.stack([outs[p] for p in order])


def collect(stream: EmbedStream) -> tuple[list, torch.Tensor | None]:
    """Run a stream to the end: ``(keys, stacked outputs)``; ``None`` for the outputs when
    no image could be read."""
    keys: list = []
    chunks: list[torch.Tensor] = []
    for k, out in stream:
        keys.extend(k)
        chunks.append(out)
    return keys, (torch.cat(chunks) if chunks else None)


def embed_fn(model: "DinoModel", *, pool: str = "cls", normalize: bool = True,
             multiscale: bool = False, n_last_blocks: int = 1, avgpool: bool = False
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function ``embed`` applies to each normalised batch (options checked here)."""
    _check_options(model, pool, n_last_blocks, avgpool)

    def single(x: torch.Tensor) -> torch.Tensor:
        return pooled_features(model, x, pool=pool, n_last_blocks=n_last_blocks,
                               avgpool=avgpool).float()

    def fn(x: torch.Tensor) -> torch.Tensor:
        f = multiscale_features(single, x) if multiscale else single(x)
        return F.normalize(f, dim=-1) if normalize else f

    return fn


def patch_fn(model: "DinoModel", blocks: int | Sequence[int] | None = None, *,
             norm: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised batch -> patch tokens on their grid, ``[B, h, w, D]`` (output tokens, or
    those of block ``blocks``), or ``[B, len(blocks), h, w, D]`` for a list of blocks."""
    if not hasattr(model.backbone, "forward_tokens"):
        raise TypeError(f"patch features need a transformer; {model.name} is a ResNet")
    if blocks is not None and not model.is_vit:
        raise TypeError(f"blocks= needs a ViT; {model.name} is not one")
    depth = getattr(model.backbone, "depth", None)
    many = blocks is not None and not isinstance(blocks, int)
    wanted = None if blocks is None else ([blocks] if isinstance(blocks, int) else list(blocks))
    if wanted is not None:
        if not wanted:
            raise ValueError("blocks= is an empty list")
        for b in wanted:
            if not isinstance(b, int) or not -depth <= b < depth:
                raise ValueError(f"block index {b!r} out of range for {depth} blocks "
                                 f"(use 0..{depth - 1} or negative indices)")
        wanted = [b % depth for b in wanted]

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = crop_to_patches(x, model.patch_size)
        h, w = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
        if wanted is None:
            toks = [model.forward_tokens(x)]
        else:
            got = model.intermediate_tokens(x, sorted(set(wanted)), norm=norm)
            by_index = dict(zip(sorted(set(wanted)), got))
            toks = [by_index[b] for b in wanted]
        grids = [t[:, -h * w:].reshape(x.shape[0], h, w, -1) for t in toks]
        return torch.stack(grids, dim=1) if many else grids[0]

    return fn
