"""Export a DINO ViT for deployment: ONNX and TorchScript, and running the ONNX file.

:func:`export_model` writes a file whose graph maps a normalised image batch
``input [B, 3, H, W]`` (any batch, any ``H, W`` of at least one patch; a remainder that
is not a whole patch is dropped, as the original ViT does) to

* ``cls``: the final-normed [CLS] token ``[B, D]`` (the DINO feature),
* ``patch_tokens``: the final-normed patch tokens ``[B, N, D]`` (``N = h * w``,
  row-major over the ``h x w = H // p x W // p`` grid),
* ``cls_attention`` (with ``attention=True``): the last block's softmax attention of the
  [CLS] query over all tokens, ``[B, heads, 1 + N]`` (the attention maps' source).

Batch and image size are dynamic. Position embeddings are resized inside the graph with
DINO's rule (bicubic with scale factor ``(h + 0.1) / h0``; the trained grid unchanged,
see :mod:`dinofeat.backbones`), written as two small interpolation matrices computed
from the grid size (:func:`bicubic_matrix`), so one file serves every input size and
gives PyTorch's numbers at each. Every export is checked against the PyTorch model on
random inputs at two sizes and the largest difference is reported
(:class:`ExportReport`).

:class:`OnnxModel` (what ``dinofeat.load("model.onnx")`` returns) runs an exported file
with ONNX Runtime and offers ``embed``/``iter_embed`` with the same image handling as
:class:`~dinofeat.model.DinoModel` (preprocessing comes from the file's metadata).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from .utils import atomic_path, get_logger

if TYPE_CHECKING:  # pragma: no cover
    from .features import FeatureSpec
    from .model import DinoModel

__all__ = ["FORMATS", "ExportReport", "ExportedViT", "bicubic_matrix", "export_model",
           "export_onnx", "export_torchscript", "OnnxModel", "load_onnx"]

log = get_logger(__name__)

FORMATS = ("onnx", "torchscript")
OUTPUT_NAMES = ("cls", "patch_tokens", "cls_attention")
_CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic convolution constant


def _cubic_near(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution weight for ``|x| <= 1``."""
    a = _CUBIC_A
    return ((a + 2) * t - (a + 3)) * t * t + 1


def _cubic_far(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution weight for ``1 < |x| < 2``."""
    a = _CUBIC_A
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a


def bicubic_matrix(positions: torch.Tensor, in_size: int,
                   identity: torch.Tensor | None = None) -> torch.Tensor:
    """The ``[n, in_size]`` matrix of DINO's position-embedding resize along one axis.

    ``positions``: ``arange(n)`` as float32 (``n``, the output size, may be a traced,
    dynamic size). Row ``i`` holds the bicubic weights (``A = -0.75``, borders
    replicated, ``align_corners=False``) that ``F.interpolate(..., scale_factor=s,
    mode="bicubic")`` uses with ``s = (n + 0.1) / in_size``. ``identity`` (a bool tensor
    ``[1]``; default ``n == in_size``) gives the identity instead: DINO keeps the
    trained grid as it is, but resizes *both* axes as soon as either differs, so callers
    pass ``h == h0 and w == w0``. Computed with tensor operations only, so that exported
    graphs stay dynamic in ``n``.
    """
    n = positions[-1:].to(torch.float64) + 1.0  # [1], a tensor even when traced
    if identity is None:
        identity = n == in_size
    inv_scale = torch.where(identity, torch.ones_like(n), in_size / (n + 0.1))
    src = (positions + 0.5) * inv_scale.to(torch.float32) - 0.5
    base = torch.floor(src)
    t = src - base
    weights = torch.stack([_cubic_far(t + 1), _cubic_near(t), _cubic_near(1 - t),
                           _cubic_far(2 - t)], dim=1)  # [n, 4]
    idx = base.to(torch.int64)[:, None] + torch.arange(-1, 3)[None, :]  # [n, 4]
    idx = idx.clamp(0, in_size - 1)
    cols = torch.arange(in_size)[None, None, :]  # [1, 1, in]
    return ((idx[:, :, None] == cols).to(torch.float32) * weights[:, :, None]).sum(dim=1)


class ExportedViT(nn.Module):
    """A :class:`~dinofeat.backbones.DinoVisionTransformer` as an export-friendly graph:
    ``[B, 3, H, W]`` -> ``(cls [B, D], patch_tokens [B, N, D][, cls_attention
    [B, heads, 1 + N]])``. Shares the backbone's parameters (no copy)."""

    def __init__(self, backbone: nn.Module, attention: bool = False):
        super().__init__()
        from .backbones import DinoVisionTransformer
        if not isinstance(backbone, DinoVisionTransformer):
            raise TypeError(f"export supports ViT backbones; got {type(backbone).__name__} "
                            "(ResNet/XCiT: use torch.onnx.export on the backbone directly)")
        if backbone.pos_embed_interp != "dino":
            raise ValueError("export reproduces DINO's position-embedding interpolation; "
                             f"this model uses {backbone.pos_embed_interp!r}")
        self.backbone = backbone
        self.attention = attention

    def pos_embed(self, h_pos: torch.Tensor, w_pos: torch.Tensor) -> torch.Tensor:
        """Position embeddings ``[1, 1 + h*w, D]`` for the grid given by ``arange(h)``,
        ``arange(w)`` (float32)."""
        vit = self.backbone.vit
        h0, w0 = self.backbone.trained_grid
        pos = vit.pos_embed
        if pos is None:  # timm allows ViTs without them; every DINO ViT has them
            raise ValueError("export needs a ViT with learned position embeddings")
        dim = pos.shape[-1]
        grid = pos[0, 1:].reshape(h0, w0, dim)
        same = (h_pos[-1:] + 1 == h0) & (w_pos[-1:] + 1 == w0)  # the trained grid
        mh = bicubic_matrix(h_pos, h0, same)  # [h, h0]
        mw = bicubic_matrix(w_pos, w0, same)  # [w, w0]
        rows = torch.matmul(mh, grid.reshape(h0, w0 * dim)).reshape(-1, w0, dim)  # [h, w0, D]
        full = torch.matmul(mw[None], rows)  # [h, w, D]
        return torch.cat([pos[:, :1], full.reshape(1, -1, dim)], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vit = self.backbone.vit
        feats = vit.patch_embed.proj(x)  # [B, D, h, w]; a partial patch is dropped
        h_pos = torch.arange(feats.shape[2]).to(torch.float32)
        w_pos = torch.arange(feats.shape[3]).to(torch.float32)
        tokens = feats.flatten(2).transpose(1, 2)  # [B, h*w, D]
        if vit.cls_token is None:  # timm allows ViTs without one; every DINO ViT has it
            raise ValueError("export needs a ViT with a [CLS] token")
        cls = vit.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed(h_pos, w_pos)
        # timm Blocks; nn.Module types their attributes (attn, norm1) as Tensor | Module
        blocks: list[Any] = list(vit.blocks)
        for blk in blocks[:-1]:
            x = blk(x)
        last = blocks[-1]
        attn = None
        if self.attention:
            from .backbones import attention_qk
            q, k = attention_qk(last.attn, last.norm1(x))
            attn = ((q[:, :, :1] * last.attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            attn = attn[:, :, 0]
        x = vit.norm(last(x))
        out = (x[:, 0], x[:, 1:])
        return out + (attn,) if attn is not None else out


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how closely the file matches PyTorch.

    ``max_abs_diff``: per output name, the largest absolute difference between the
    exported file and the PyTorch model over the checked inputs (``checked_shapes``)."""

    path: str
    format: str
    outputs: list[str]
    checked_shapes: list[list[int]]
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_diff.items())
        shapes = ", ".join("x".join(map(str, s)) for s in self.checked_shapes)
        return (f"{self.format} model written to {self.path}; parity with PyTorch on inputs "
                f"{shapes}: max abs difference {diffs}")


def _metadata(model: "DinoModel", attention: bool) -> dict[str, Any]:
    from .version import __version__
    return {"name": model.name, "embed_dim": model.embed_dim, "patch_size": model.patch_size,
            "num_heads": model.num_heads, "preprocessing": model.preprocessing.to_dict(),
            "weights_hash": model.weights_hash, "outputs": _output_names(attention),
            "dinofeat_version": __version__}


def _output_names(attention: bool) -> list[str]:
    return list(OUTPUT_NAMES if attention else OUTPUT_NAMES[:2])


def _check_inputs(model: "DinoModel", sizes: Sequence[int] | None) -> list[torch.Tensor]:
    p = model.patch_size
    if p is None:
        raise TypeError(f"export supports ViT backbones; {model.name} has no patches")
    crop = model.preprocessing.crop_size
    sizes = sizes or (crop, crop + 2 * p)
    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, sizes[0], sizes[0])] + [(1, 3, s, s + p) for s in sizes[1:]]
    return [torch.randn(*s, generator=g) for s in shapes]


def _reference(model: "DinoModel", x: torch.Tensor, attention: bool) -> list[np.ndarray]:
    with torch.inference_mode():
        tokens = model.backbone.forward_tokens(x)
        outs = [tokens[:, 0], tokens[:, 1:]]
        if attention:
            outs.append(model.backbone.last_cls_attention(x))
    return [o.float().numpy() for o in outs]


def export_onnx(model: "DinoModel", path: str | os.PathLike, *, attention: bool = False,
                opset: int = 18, check_sizes: Sequence[int] | None = None) -> ExportReport:
    """Write ``model`` as ONNX (dynamic batch and image size) to ``path`` and check it
    with ONNX Runtime against PyTorch. See the module docstring for inputs and outputs;
    dinofeat metadata (name, preprocessing, dims) is stored in the file's
    ``metadata_props`` under ``"dinofeat"``. Needs ``pip install dinofeat[onnx]``."""
    import time
    try:
        import onnx
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise ImportError("ONNX export needs the onnx package: pip install 'dinofeat[onnx]'"
                          ) from e
    t0 = time.perf_counter()
    path = Path(path)
    wrapper = ExportedViT(model.backbone, attention=attention).eval().cpu()
    names = _output_names(attention)
    example = torch.randn(2, 3, model.preprocessing.crop_size, model.preprocessing.crop_size)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (example,), str(tmp), input_names=["input"], output_names=names,
            opset_version=opset, dynamo=False,
            dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                          **{n: {0: "batch", 1: "tokens"} if n == "patch_tokens" else
                             {0: "batch"} for n in names}})
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key = "dinofeat"
        entry.value = json.dumps(_metadata(model, attention))
        onnx.save(proto, str(tmp))
    report = ExportReport(str(path), "onnx", names, [], seconds=0.0)
    session = _ort_session(path)
    _parity(report, model, attention, check_sizes,
            lambda x: session.run(None, {"input": x.numpy()}))
    report.seconds = time.perf_counter() - t0
    return report


def export_torchscript(model: "DinoModel", path: str | os.PathLike, *,
                       attention: bool = False,
                       check_sizes: Sequence[int] | None = None) -> ExportReport:
    """Write ``model`` as a traced TorchScript module (``torch.jit.load`` runs it without
    dinofeat) with dynamic batch and image size, checked against PyTorch. The dinofeat
    metadata is stored as the extra file ``dinofeat.json``."""
    import time
    t0 = time.perf_counter()
    path = Path(path)
    wrapper = ExportedViT(model.backbone, attention=attention).eval().cpu()
    crop = model.preprocessing.crop_size
    example = torch.randn(2, 3, crop, crop)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape arithmetic
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    meta = json.dumps(_metadata(model, attention))
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
        torch.jit.save(traced, str(tmp), _extra_files={"dinofeat.json": meta})
    names = _output_names(attention)
    report = ExportReport(str(path), "torchscript", names, [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path))

    def run(x: torch.Tensor) -> list[np.ndarray]:
        with torch.inference_mode():
            return [o.float().numpy() for o in loaded(x)]

    _parity(report, model, attention, check_sizes, run)
    report.seconds = time.perf_counter() - t0
    return report


def _parity(report: ExportReport, model: "DinoModel", attention: bool,
            sizes: Sequence[int] | None, run) -> None:
    model.backbone.cpu().eval()
    for x in _check_inputs(model, sizes):
        got = run(x)
        ref = _reference(model, x, attention)
        report.checked_shapes.append(list(x.shape))
        for name, g, r in zip(report.outputs, got, ref):
            if g.shape != r.shape:
                raise RuntimeError(f"exported {name} has shape {g.shape} for input "
                                   f"{tuple(x.shape)}; PyTorch gives {r.shape}")
            d = float(np.abs(g - r).max())
            report.max_abs_diff[name] = max(report.max_abs_diff.get(name, 0.0), d)


def export_model(model: "DinoModel", path: str | os.PathLike, format: str | None = None, *,
                 attention: bool = False, check_sizes: Sequence[int] | None = None
                 ) -> ExportReport:
    """Export ``model`` (a ViT :class:`~dinofeat.model.DinoModel`) to ``path`` as
    ``format`` ``"onnx"`` or ``"torchscript"`` (default: from the suffix, ``.onnx`` or
    ``.pt``/``.ts``), with the parity check. ``check_sizes``: square image sizes to
    check at (default: the model's crop size and one two patches larger, non-square)."""
    path = Path(path)
    if format is None:
        format = "onnx" if path.suffix.lower() == ".onnx" else (
            "torchscript" if path.suffix.lower() in (".pt", ".ts", ".torchscript") else None)
        if format is None:
            raise ValueError(f"cannot tell the export format from {path.name!r}: use a "
                             ".onnx or .pt file name, or pass format=")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not model.is_vit:
        raise TypeError(f"export needs a ViT; {model.name} is not one (ResNet/XCiT: use "
                        "torch.onnx.export on model.backbone directly)")
    if format == "onnx":
        return export_onnx(model, path, attention=attention, check_sizes=check_sizes)
    return export_torchscript(model, path, attention=attention, check_sizes=check_sizes)


# ------------------------------------------------------------------ running ONNX
def _ort_session(path: str | os.PathLike, num_threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover
        raise ImportError("running ONNX models needs onnxruntime: pip install "
                          "'dinofeat[onnx]'") from e
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if num_threads:
        opts.intra_op_num_threads = num_threads
    try:
        return ort.InferenceSession(str(path), sess_options=opts,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise ValueError(f"{path}: not a loadable ONNX model ({e})") from e


def _external_tensors(graph) -> list[str]:
    """Names of the tensors of ``graph`` (subgraphs included) whose data lives in an
    external file (``data_location == EXTERNAL``)."""
    from onnx import AttributeProto, TensorProto
    found: list[str] = []
    tensors = list(graph.initializer) + [s.values for s in graph.sparse_initializer]
    for node in graph.node:
        for a in node.attribute:
            if a.type == AttributeProto.TENSOR:
                tensors.append(a.t)
            tensors.extend(a.tensors)
            for g in ([a.g] if a.type == AttributeProto.GRAPH else []) + list(a.graphs):
                found += _external_tensors(g)
    found += [t.name or "<unnamed>" for t in tensors
              if t.data_location == TensorProto.EXTERNAL or len(t.external_data)]
    return found


class OnnxModel:
    """An exported DINO ViT run by ONNX Runtime on CPU (``dinofeat.load("x.onnx")``).

    ``model(x)`` maps a normalised ``float32`` batch ``[B, 3, H, W]`` (tensor or array)
    to the [CLS] features ``[B, D]``; :meth:`forward_tokens` to all final-normed tokens;
    :meth:`embed` / :meth:`iter_embed` take images like
    :meth:`dinofeat.DinoModel.embed` (paths, folders, PIL images, arrays, tensors) with
    ``pool`` ``"cls"``, ``"mean"``, ``"gem"``, ``"cls+gem"`` and the file's own
    preprocessing. Precision is that of the file (fp32).
    """

    is_vit = True
    has_tokens = True

    def __init__(self, path: str | os.PathLike, num_threads: int | None = None):
        import onnx
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such ONNX file: {self.path}")
        try:
            proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
            raise ValueError(f"{self.path}: not a readable ONNX file (truncated or not "
                             f"ONNX?): {type(e).__name__}: {e}") from None
        external = _external_tensors(proto.graph)
        if external:
            raise ValueError(
                f"{self.path}: tensor(s) {', '.join(external[:3])} keep their data in "
                "external files; dinofeat's exports never do, and such a file could make "
                "ONNX Runtime read any file on this machine, so it is refused")
        meta = {p.key: p.value for p in proto.metadata_props}
        if "dinofeat" not in meta:
            raise ValueError(f"{self.path}: ONNX file without dinofeat metadata (write it "
                             "with 'dinofeat export --format onnx')")
        self.meta = json.loads(meta["dinofeat"])
        from .zoo import Preprocessing
        try:
            self.preprocessing = Preprocessing.from_dict(self.meta["preprocessing"])
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{self.path}: bad preprocessing in its dinofeat metadata: {e}") \
                from None
        self.name = self.meta["name"]
        self.embed_dim = int(self.meta["embed_dim"])
        self.patch_size = int(self.meta["patch_size"])
        self.num_heads = self.meta.get("num_heads")
        self.session = _ort_session(self.path, num_threads)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.source = str(self.path)  # recorded by indexes, to reload the model
        self.device = torch.device("cpu")
        self.depth = None  # the export does not say; only the last block is reachable

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, name={self.name!r}, embed_dim={self.embed_dim})"

    @property
    def weights_hash(self) -> str:
        return self.meta.get("weights_hash", "")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "weights_hash": self.weights_hash,
                "embed_dim": self.embed_dim, "patch_size": self.patch_size,
                "preprocessing": self.preprocessing.to_dict(), "runtime": "onnxruntime"}

    def to(self, device, *args, **kwargs) -> "OnnxModel":
        if torch.device(device).type != "cpu":
            raise ValueError("OnnxModel runs on CPU (ONNX Runtime's CPU provider)")
        return self

    def eval(self) -> "OnnxModel":
        return self

    def _run(self, x) -> list[torch.Tensor]:
        arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else \
            np.asarray(x, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise ValueError(f"expected a normalised batch [B, 3, H, W], got {arr.shape}")
        outs = self.session.run(None, {"input": np.ascontiguousarray(arr)})
        return [torch.from_numpy(o) for o in outs]

    def __call__(self, x) -> torch.Tensor:
        return self._run(x)[0]

    forward = __call__

    def forward_tokens(self, x) -> torch.Tensor:
        """All final-normed tokens ``[B, 1 + N, D]`` ([CLS] first)."""
        cls, patches = self._run(x)[:2]
        return torch.cat([cls[:, None], patches], dim=1)

    def last_cls_attention(self, x) -> torch.Tensor:
        if "cls_attention" not in self.output_names:
            raise TypeError(f"{self.path} was exported without attention (use "
                            "'dinofeat export --attention')")
        return self._run(x)[self.output_names.index("cls_attention")]

    def intermediate_tokens(self, x, n: int | Sequence[int] = 1,
                            norm: bool = True) -> list[torch.Tensor]:
        """The last block's final-normed tokens, the only block an exported file gives:
        ``n`` must be 1 (or ``[-1]``) and ``norm`` true."""
        last = n == 1 or (not isinstance(n, int) and list(n) in ([-1],))
        if not last or not norm:
            raise TypeError(f"{self.path} is an ONNX export, which holds only the last block's "
                            f"normed tokens: n_last_blocks/blocks={n!r}"
                            f"{'' if norm else ', norm=False'} needs the PyTorch weights")
        return [self.forward_tokens(x)]

    def _check_run(self, precision: str = "fp32", device=None) -> None:
        if precision != "fp32":
            raise ValueError(f"precision={precision!r}: {self.path} is an ONNX export run in "
                             "fp32 by ONNX Runtime; use precision='fp32' (or the PyTorch "
                             "weights for bf16/fp16)")
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"device={str(device)!r}: ONNX models run on CPU here; load the "
                             "PyTorch weights for a GPU")

    def iter_embed(self, images, spec: "FeatureSpec | None" = None, **options):
        """Like :meth:`dinofeat.DinoModel.iter_embed`, with the same options. Features
        that need intermediate blocks (``n_last_blocks > 1``) and precisions other than
        fp32 are refused with an error naming the option."""
        from .embedding import iter_embed
        self._check_run(options.get("precision", "fp32"), options.get("device"))
        options["precision"], options["device"] = "fp32", torch.device("cpu")
        return iter_embed(self, images, spec, **options)

    def embed(self, images, spec: "FeatureSpec | None" = None, **options):
        """Feature vectors ``[N, D']`` of ``images``, as :meth:`dinofeat.DinoModel.embed`
        (see :meth:`iter_embed` for what an export cannot do)."""
        from .embedding import embed
        self._check_run(options.get("precision", "fp32"), options.get("device"))
        options["precision"], options["device"] = "fp32", torch.device("cpu")
        return embed(self, images, spec, **options)

    def patch_features(self, images, *, blocks=None, norm: bool = True, preprocessing=None,
                       size: int | None = None, batch_size: int = 16,
                       num_workers: int | None = None, precision: str = "fp32",
                       device=None, progress: bool | None = None) -> torch.Tensor:
        """Output patch tokens on their grid ``[N, h, w, D]``, as
        :meth:`dinofeat.DinoModel.patch_features` (``blocks`` other than the last need
        the PyTorch weights)."""
        from .embedding import EmbedStream, collect, patch_fn
        self._check_run(precision, device)
        stream = EmbedStream(self, images, patch_fn(self, blocks, norm=norm),
                             preprocessing=preprocessing, size=size, batch_size=batch_size,
                             num_workers=num_workers, device=torch.device("cpu"),
                             progress=progress, skip_unreadable=False, desc="patches")
        feats = collect(stream)[1]
        if feats is None:  # unreadable images raise above: only an empty input gets here
            raise ValueError("patch_features: no images given")
        return feats

    def attention_maps(self, img, *, size: int | None = None, threshold: float = 0.6,
                       device=None, precision: str = "fp32"):
        """The last block's [CLS] attention maps, as
        :meth:`dinofeat.DinoModel.attention_maps`; the file must have been exported with
        ``dinofeat export --attention`` (else a ``TypeError`` says so)."""
        from .attention import attention_maps
        self._check_run(precision, device)
        return attention_maps(self, img, size=size, threshold=threshold)


def load_onnx(path: str | os.PathLike, num_threads: int | None = None) -> OnnxModel:
    """An :class:`OnnxModel` for a file written by :func:`export_onnx`."""
    return OnnxModel(path, num_threads=num_threads)
