"""From images to feature vectors: batching, decoding workers, streaming.

:class:`EmbedStream` is the engine behind ``embed`` / ``iter_embed`` /
``patch_features`` of every model (:class:`~dinofeat.model.DinoModel` and
:class:`~dinofeat.export.OnnxModel` alike): it resolves the input
(:func:`dinofeat.images.resolve_images`), decodes and preprocesses in ``DataLoader``
workers (``uint8`` until the model's device), normalises there, runs a function of the
normalised batch under ``torch.inference_mode`` (and autocast when a lower precision is
asked for) and yields ``(keys, features)`` batch by batch, in input order.

What that function computes for ``embed`` is a :class:`~dinofeat.features.FeatureSpec`
(pooling, blocks, multi-scale, normalisation, preprocessing); :func:`embed` and
:func:`iter_embed` take one, or the same settings as keywords.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch

from . import images as _images
from . import runtime
from .accel import fast_inference
from .runtime import AUTOCAST_DTYPES, resolve_device
from .features import (GEM_P, MULTISCALE_FACTORS, POOLS, FeatureSpec, crop_to_patches, gem,
                       multiscale_features, pooled_features, resolve_preprocessing)
from .utils import get_logger
from .zoo import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import FeatureModel

__all__ = ["POOLS", "PRECISIONS", "MULTISCALE_FACTORS", "GEM_P", "gem", "crop_to_patches",
           "feature_dim", "EmbedStream", "resolve_preprocessing", "embed", "iter_embed",
           "pooled_features", "multiscale_features", "collect", "patch_fn", "RUN_OPTIONS"]

# the compute dtype of each precision name of dinofeat.runtime (fp32: no autocast)
PRECISIONS = {k: v or torch.float32 for k, v in AUTOCAST_DTYPES.items()}
# Keywords of embed/iter_embed that say how to run, not what to compute.
RUN_OPTIONS = ("batch_size", "num_workers", "precision", "device", "progress",
               "skip_unreadable", "decode")

log = get_logger(__name__)


def feature_dim(model: "FeatureModel", pool: str = "cls", n_last_blocks: int = 1,
                avgpool: bool = False) -> int:
    """Length of the vectors ``embed`` returns for these options
    (``FeatureSpec(pool=..., ...).dim(model)``)."""
    return FeatureSpec(pool=pool, n_last_blocks=n_last_blocks, avgpool=avgpool).dim(model)


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

    ``transform`` replaces the preprocessing's resize and crop by any callable on
    ``uint8 [3, H, W]`` (training augmentation, a square resize...); the preprocessing's
    mean and std still normalise. With ``positions`` the keys are the input positions
    (also for files), which tells repeated paths apart.
    """

    model: "FeatureModel"
    images: Any
    fn: Callable[[torch.Tensor], torch.Tensor]
    preprocessing: None | str | Preprocessing = None
    size: int | None = None
    batch_size: int = 64
    num_workers: int | None = None
    precision: str = "fp32"
    device: str | torch.device | None = None
    progress: bool | None = None
    skip_unreadable: bool | None = None
    desc: str = "embed"
    start: int = 0  # with `stop`: only embed positions [start, stop) of the input
    stop: int | None = None
    quiet: bool = False  # no skip warnings (a caller that reports them itself)
    spec: FeatureSpec | None = None  # what fn computes, when it is embed's
    transform: Callable | None = None
    positions: bool = False
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
        runtime.check_precision(self.precision)
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        # "cuda" without an index: this process's GPU under torchrun (dinofeat.runtime)
        self.device = resolve_device(self.device) if self.device is not None else self.model.device
        pre = resolve_preprocessing(self.model, self.preprocessing)
        self.normalization = (pre.mean, pre.std)
        if self.transform is None:
            self.transform = _images.ImageTransform(pre, self.model.patch_size, self.size)

    @property
    def sources(self) -> list[_images.ImageSource]:
        """Every input, in order (``.key`` is the path or position)."""
        return self.resolved.sources

    def __len__(self) -> int:
        return (self.stop if self.stop is not None else len(self.resolved)) - self.start

    def _progress_bar(self):
        from tqdm.auto import tqdm
        import sys
        show = self.progress if self.progress is not None else (
            sys.stderr.isatty() and len(self) > self.batch_size)
        return tqdm(total=len(self), unit="img", desc=self.desc, disable=not show,
                    dynamic_ncols=True, smoothing=0.1)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        # inference mode only around the model: a generator that yielded inside it would
        # leave the caller's code (a training step on the features...) in it too
        module = self.model if isinstance(self.model, torch.nn.Module) else None
        with torch.inference_mode(), fast_inference(module, self.precision, self.device):
            out = self.fn(x)
        return out.float() if out.is_floating_point() else out

    def _channels_last(self) -> torch.memory_format:
        # convolutional backbones (ResNet) run faster on channels-last batches
        return torch.contiguous_format if self.model.has_tokens else torch.channels_last

    def __iter__(self) -> Iterator[tuple[list, torch.Tensor]]:
        model = self.model
        if model.device != self.device:
            model.to(self.device)
        fmt = self._channels_last()
        if fmt == torch.channels_last:
            model.to(memory_format=torch.channels_last)
        bar = self._progress_bar()
        try:
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
        plan = self.decode_plan(sources)
        loader: Iterable[_images.ImageBatch]
        if plan.mode == "turns":
            loader = _images.ThreadedBatches(sources, self.transform, batch_size=self.batch_size,
                                             threads=plan.workers, decode=self.decode)
        else:
            loader = _images.image_loader(
                sources, self.transform, batch_size=self.batch_size, num_workers=plan.workers,
                pin_memory=self.device.type == "cuda", decode=self.decode)
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and plan.threads != threads:
            torch.set_num_threads(plan.threads)
        try:
            yield from self._iter_batches(loader, sources, fmt, bar)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

    def decode_plan(self, sources=None) -> _images.DecodePlan:
        """Decoding workers and model threads for this stream
        (:func:`dinofeat.images.plan_decoding` with the model's estimated cost)."""
        sources = self.resolved.sources if sources is None else sources
        model_s = None
        # __post_init__ made device a torch.device and transform an ImageTransform (or the
        # caller's own callable, which has no output_size)
        transform: Any = self.transform
        size = getattr(transform, "output_size", None)
        if torch.device(self.device or "cpu").type == "cpu" and self.num_workers is None \
                and size is not None and len(sources) > self.batch_size \
                and isinstance(getattr(self.model, "backbone", None), torch.nn.Module):
            from .accel import model_seconds_per_image
            h, w = size(*((transform.resize_size,) * 2))
            model_s = model_seconds_per_image(self.model, h, w,  # type: ignore[arg-type]
                                              self.precision)
        return _images.plan_decoding(sources, self.transform, batch_size=self.batch_size,
                                     model_s=model_s, decode=self.decode,
                                     num_workers=self.num_workers,
                                     device_type=torch.device(self.device or "cpu").type)

    def _iter_batches(self, loader, sources, fmt, bar):
        mean, std = self.normalization
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
                x = _images.normalize_batch(imgs, mean, std, device=self.device,
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
            keys = [self.start + p for p in order] if self.positions else \
                [sources[p].key for p in order]
            yield keys, torch.stack([outs[p] for p in order])


def collect(stream: EmbedStream) -> tuple[list, torch.Tensor | None]:
    """Run a stream to the end: ``(keys, stacked outputs)``; ``None`` for the outputs when
    no image could be read."""
    keys: list = []
    chunks: list[torch.Tensor] = []
    for k, out in stream:
        keys.extend(k)
        chunks.append(out)
    return keys, (torch.cat(chunks) if chunks else None)


def patch_fn(model: "FeatureModel", blocks: int | Sequence[int] | None = None, *,
             norm: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalised batch -> patch tokens on their grid, ``[B, h, w, D]`` (output tokens, or
    those of block ``blocks``), or ``[B, len(blocks), h, w, D]`` for a list of blocks."""
    if not model.has_tokens:
        raise TypeError(f"patch features need a transformer; {model.name} is a ResNet")
    if blocks is not None and not model.is_vit:
        raise TypeError(f"blocks= needs a ViT; {model.name} is not one")
    depth = model.depth
    many = blocks is not None and not isinstance(blocks, int)
    wanted = None if blocks is None else ([blocks] if isinstance(blocks, int) else list(blocks))
    if wanted is not None:
        if depth is None:
            raise TypeError(f"blocks={blocks!r} needs the model's blocks, which {model.name} "
                            "does not expose (an ONNX export holds only the output tokens: "
                            "use blocks=None, or the PyTorch weights)")
        if not wanted:
            raise ValueError("blocks= is an empty list")
        for b in wanted:
            if not isinstance(b, int) or not -depth <= b < depth:
                raise ValueError(f"block index {b!r} out of range for {depth} blocks "
                                 f"(use 0..{depth - 1} or negative indices)")
        wanted = [b % depth for b in wanted]

    p = model.patch_size
    if not p:
        raise TypeError(f"patch features need a patch grid; {model.name} has none")

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = crop_to_patches(x, p)
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if wanted is None:
            toks = [model.forward_tokens(x)]
        else:
            got = model.intermediate_tokens(x, sorted(set(wanted)), norm=norm)
            by_index = dict(zip(sorted(set(wanted)), got))
            toks = [by_index[b] for b in wanted]
        grids = [t[:, -h * w:].reshape(x.shape[0], h, w, -1) for t in toks]
        return torch.stack(grids, dim=1) if many else grids[0]

    return fn


def iter_embed(model: "FeatureModel", images: Any, spec: FeatureSpec | None = None, *,
               batch_size: int = 64, num_workers: int | None = None, precision: str = "fp32",
               device: "str | torch.device | None" = None, progress: bool | None = None,
               skip_unreadable: bool | None = None, decode: str = "reduced",
               **overrides: Any) -> EmbedStream:
    """An :class:`EmbedStream` of ``model``'s features of ``images`` as ``spec`` (default
    :class:`FeatureSpec()`) with ``overrides`` (its field names: ``pool``, ``normalize``,
    ``multiscale``, ``n_last_blocks``, ``avgpool``, ``layout``, ``preprocessing``,
    ``size``) says. The other keywords say how to run it (``decode``: ``"reduced"``
    decodes large JPEGs at a reduced scale, ``"full"`` every pixel; see
    :func:`dinofeat.images.image_loader`). ``stream.spec`` is the spec used."""
    spec = FeatureSpec.from_options(spec, **overrides)
    fn = spec.function(model)
    return EmbedStream(model, images, fn, preprocessing=spec.preprocessing, size=spec.size,
                       batch_size=batch_size, num_workers=num_workers, precision=precision,
                       device=device, progress=progress, skip_unreadable=skip_unreadable,
                       spec=spec, decode=decode)


def embed(model: "FeatureModel", images: Any, spec: FeatureSpec | None = None, *,
          return_keys: bool = False, **options: Any):
    """All features of :func:`iter_embed` at once: ``Tensor [N, D']`` (CPU, float32), one
    row per readable image in input order; with ``return_keys`` also the path (or input
    position) of every row."""
    stream = iter_embed(model, images, spec, **options)
    keys, feats = collect(stream)
    if feats is None:  # no readable image: an empty matrix of the right width
        feats = torch.zeros(0, FeatureSpec.from_options(spec, **{
            k: v for k, v in options.items() if k not in RUN_OPTIONS}).dim(model))
    return (feats, keys) if return_keys else feats
