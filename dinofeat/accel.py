"""The fastest correct kernels for the platform, chosen without the user asking.

Every inference call of dinofeat (``embed``, ``patch_features``, ``attention_maps``, the
CLI) runs its model under :func:`fast_inference`, which picks, per call:

* **fp32 matmuls on oneDNN (CPU).** PyTorch's default fp32 GEMM on CPU is MKL, which runs
  at AVX2 speed on AMD CPUs (~190 GFLOP/s on the project's 2-core Zen machines); oneDNN's
  fp32 kernel reaches ~410. The only switch that routes fp32 ``linear``/``matmul`` to
  oneDNN is ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``, and on CPUs with
  AMX (or other native bf16 GEMMs) the same switch really computes in bf16 (relative
  error ~4e-3). So the switch is kept only where a numerical self-check
  (:func:`check_onednn_fp32`: a linear layer and a batched matmul compared with float64)
  shows fp32-level error; elsewhere fp32 stays on the default kernels. The setting is
  made on entry and the user's own value restored on exit, so code outside dinofeat
  calls sees its own global setting.
* **Attention.** Fused ``scaled_dot_product_attention`` (timm's ``fused_attn``) in fp32 on
  CPU and always on GPU (flash / memory-efficient kernels); in bf16/fp16 on CPU an explicit
  ``softmax(q k^T) v`` is faster than PyTorch's fused CPU kernel for short sequences (up
  to :data:`EXPLICIT_ATTENTION_MAX_TOKENS`, e.g. the 197 tokens of a /16 model at 224;
  measured in ``benchmarks/run.py``), so each block picks its kernel from the length of
  the sequence it gets, for the call only.
* **Autocast** for ``precision="bf16"`` (CPU and GPU) or ``"fp16"`` (GPU); the output is
  cast back to fp32 by the callers.

Accuracy delivered (tests/test_accel.py checks each on a ViT-S/16-sized random model):

=========  =====================================================================
precision  features compared with the default-kernel fp32 computation
=========  =====================================================================
fp32       max abs difference <= 1e-4 (oneDNN fp32 kernels: different summation order)
bf16       cosine similarity >= 0.9999 per image (ViT-S/16 at 224; ~0.99997 measured)
fp16       cosine similarity >= 0.9999 (GPU only)
=========  =====================================================================

``torch.compile`` is optional (:func:`compile_model`): it gains ~1.1x after a cold
compile of tens of seconds, so it is never on by default.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import torch
from torch import nn

from .runtime import AUTOCAST_DTYPES, PRECISIONS, ieee_fp32  # the one precision table
from .utils import get_logger

__all__ = ["PRECISIONS", "AUTOCAST_DTYPES", "FEATURE_TOLERANCES", "MatmulCheck",
           "check_onednn_fp32", "onednn_fp32_available", "fast_math", "attention_mode",
           "uses_explicit_attention", "EXPLICIT_ATTENTION_MAX_TOKENS", "fast_inference",
           "configure_cpu", "compile_model", "platform_report"]

log = get_logger(__name__)


#: The accuracy each precision is held to (features against the default-kernel fp32
#: computation): ``("max_abs", bound)`` or ``("min_cosine", bound)``.
FEATURE_TOLERANCES: dict[str, tuple[str, float]] = {
    "fp32": ("max_abs", 1e-4),
    "bf16": ("min_cosine", 0.9999),
    "fp16": ("min_cosine", 0.9999),
}

#: Largest error, relative to ``|A| |B|`` (the scale of the products summed), that counts
#: as fp32 arithmetic. fp32 rounding gives ~1e-7 here, at most ``k * 2**-24`` ~ 2e-5 for
#: the ``k = 384`` terms of the check; bf16 inputs give ~2e-3.
FP32_LEVEL = 1e-4

_ONEDNN_SETTING = "bf16"  # the value of torch.backends.mkldnn.matmul.fp32_precision used
_lock = threading.Lock()


@dataclass(frozen=True)
class MatmulCheck:
    """Result of :func:`check_onednn_fp32`.

    Attributes:
        available: the oneDNN switch exists in this PyTorch build and was tried.
        linear_error, bmm_error: largest error of ``F.linear`` and of a batched
            ``matmul`` under the switch, relative to ``|A| |B|`` (float64 reference).
        default_error: the same for the default kernels (the fp32 baseline).
        fp32_level: both errors are at most :data:`FP32_LEVEL`: the switch is used.
        reason: why it is or is not used, in words.
    """

    available: bool
    linear_error: float
    bmm_error: float
    default_error: float
    fp32_level: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _relative_error(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    ref: torch.Tensor) -> float:
    """``max |got - ref| / (|a| |b|)`` elementwise, for ``ref = a @ b`` in float64."""
    scale = a.double().abs() @ b.double().abs()
    return float(((got.double() - ref).abs() / scale.clamp_min(1e-300)).max())


def _matmul_errors() -> tuple[float, float]:
    """Errors of ``F.linear`` (``[197, 384] x [384, 384]^T``, ViT-sized) and of a batched
    matmul (``[6, 197, 64] x [6, 64, 197]``) with the current settings."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(197, 384, generator=g)
    w = torch.randn(384, 384, generator=g)
    bias = torch.randn(384, generator=g)
    ref = x.double() @ w.double().t() + bias.double()
    lin = torch.nn.functional.linear(x, w, bias)
    lin_err = _relative_error(lin - bias, x, w.t(), ref - bias.double())
    q = torch.randn(6, 197, 64, generator=g)
    k = torch.randn(6, 64, 197, generator=g)
    bmm_ref = q.double() @ k.double()
    bmm_err = _relative_error(q @ k, q, k, bmm_ref)
    return lin_err, bmm_err


def _onednn_switch_exists() -> bool:
    try:
        cur = torch.backends.mkldnn.matmul.fp32_precision
    except AttributeError:
        return False
    return cur is not None and torch.backends.mkldnn.is_available()


@contextlib.contextmanager
def _onednn_setting(value: str) -> Iterator[None]:
    with _lock:
        old = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = value
    try:
        yield
    finally:
        with _lock:
            torch.backends.mkldnn.matmul.fp32_precision = old


_active = {"depth": 0, "saved": None}  # nesting/threads sharing the switch (under _lock)


@contextlib.contextmanager
def _onednn_fast() -> Iterator[None]:
    """The oneDNN switch on while any dinofeat call (in any thread) is inside; the value
    found before the first one entered is put back when the last one leaves."""
    with _lock:
        if _active["depth"] == 0:
            _active["saved"] = torch.backends.mkldnn.matmul.fp32_precision
            torch.backends.mkldnn.matmul.fp32_precision = _ONEDNN_SETTING
        _active["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _active["depth"] -= 1
            if _active["depth"] == 0:
                torch.backends.mkldnn.matmul.fp32_precision = _active["saved"]


def check_onednn_fp32() -> MatmulCheck:
    """Whether routing fp32 matmuls to oneDNN keeps fp32 accuracy on this CPU.

    Runs a ViT-sized ``linear`` and batched ``matmul`` (a few milliseconds) with
    ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` and compares them with
    float64; the global setting is restored afterwards. Not cached: see
    :func:`onednn_fp32_available` for the cached answer used by :func:`fast_math`.
    """
    if not _onednn_switch_exists():
        return MatmulCheck(False, float("nan"), float("nan"), float("nan"), False,
                           "this PyTorch has no torch.backends.mkldnn.matmul.fp32_precision "
                           "or no oneDNN")
    with _onednn_setting("none"):
        default_err = max(_matmul_errors())
    try:
        with _onednn_setting(_ONEDNN_SETTING):
            lin_err, bmm_err = _matmul_errors()
    except RuntimeError as e:  # an unsupported combination in some build
        return MatmulCheck(False, float("nan"), float("nan"), default_err, False,
                           f"oneDNN fp32 path failed: {e}")
    ok = max(lin_err, bmm_err) <= FP32_LEVEL
    reason = ("oneDNN computes fp32 matmuls at fp32 accuracy on this CPU: used" if ok else
              "oneDNN would compute fp32 matmuls in reduced precision here (e.g. AMX "
              "bf16): fp32 stays on the default kernels")
    return MatmulCheck(True, lin_err, bmm_err, default_err, ok, reason)


@functools.lru_cache(maxsize=1)
def onednn_fp32_available() -> bool:
    """Cached :func:`check_onednn_fp32` verdict (run once per process, at first use)."""
    check = check_onednn_fp32()
    log.debug("oneDNN fp32 self-check: %s", check)
    return check.fp32_level


@contextlib.contextmanager
def fast_math(device: torch.device | str = "cpu", precision: str = "fp32") -> Iterator[None]:
    """Inside: the fastest matmul kernels that keep ``precision``'s accuracy on
    ``device``; outside, the user's global settings are untouched.

    On CPU, fp32 matmuls go to oneDNN when :func:`onednn_fp32_available` (a one-time
    numerical self-check) says it is exact to fp32 level. On GPU fp32 is IEEE fp32: TF32
    is switched off inside (cuDNN convolutions default to TF32, which would break the
    fp32 tolerance); speed comes from ``precision="bf16"``/``"fp16"`` autocast.
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{precision!r}")
    dev = torch.device(device)
    if dev.type == "cpu" and onednn_fp32_available():
        with _onednn_fast():
            yield
    elif dev.type == "cuda":
        with ieee_fp32():
            yield
    else:
        yield


#: Longest token sequence for which the explicit ``softmax(q k^T) v`` beats PyTorch's
#: fused CPU attention in bf16 (measured per CPU-second on the project's machine: explicit
#: ahead at 197 and 401 tokens, fused ahead from 785 tokens on, e.g. ViT-S/8 at 224 and
#: attention maps at 480 px).
EXPLICIT_ATTENTION_MAX_TOKENS = 512


def uses_explicit_attention(device: torch.device | str, precision: str,
                            tokens: int | None = None) -> bool:
    """Whether :func:`fast_inference` computes attention as an explicit
    ``softmax(q k^T) v`` instead of fused SDPA: on CPU in bf16/fp16 for sequences of at
    most :data:`EXPLICIT_ATTENTION_MAX_TOKENS` tokens (``tokens=None``: the rule for short
    sequences), where PyTorch's fused CPU kernel is slower (docs/benchmarks.md); fused
    everywhere else."""
    if torch.device(device).type != "cpu" or precision not in ("bf16", "fp16"):
        return False
    return tokens is None or tokens <= EXPLICIT_ATTENTION_MAX_TOKENS


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """timm attention modules (those with a ``fused_attn`` switch) inside ``model``."""
    return [m for m in model.modules() if hasattr(m, "fused_attn") and hasattr(m, "qkv")]


@contextlib.contextmanager
def attention_mode(model: nn.Module, fused: bool) -> Iterator[None]:
    """Switch every timm attention block of ``model`` to fused SDPA (``fused=True``) or
    the explicit ``softmax(q k^T) v`` (``False``) inside the block; restore on exit."""
    mods = _attention_modules(model)
    old = [m.fused_attn for m in mods]
    for m in mods:
        m.fused_attn = fused
    try:
        yield
    finally:
        for m, o in zip(mods, old):
            m.fused_attn = o


@contextlib.contextmanager
def _attention_by_length(model: nn.Module, device: torch.device,
                         precision: str) -> Iterator[None]:
    """Choose each attention block's kernel from the length of the sequence it gets
    (forward pre-hooks, removed on exit; the blocks' own settings restored)."""
    mods = _attention_modules(model)
    old = [m.fused_attn for m in mods]

    def choose(module: nn.Module, args) -> None:
        x = args[0] if args else None
        tokens = x.shape[1] if isinstance(x, torch.Tensor) and x.dim() == 3 else None
        module.fused_attn = not uses_explicit_attention(device, precision, tokens)

    handles = [m.register_forward_pre_hook(choose) for m in mods]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m, o in zip(mods, old):
            m.fused_attn = o


@contextlib.contextmanager
def fast_inference(model: nn.Module | None = None, precision: str = "fp32",
                   device: torch.device | str | None = None) -> Iterator[None]:
    """Everything dinofeat does to run ``model`` fast at ``precision`` on ``device``:
    :func:`fast_math`, the attention kernel (:func:`uses_explicit_attention`) and
    autocast for bf16/fp16. Outputs of autocast regions may be bf16/fp16: cast them.

    ``device`` defaults to the model's (or CPU without a model). fp16 on CPU works but is
    slow (PyTorch has few fast CPU fp16 kernels): use bf16 there::

        with dinofeat.accel.fast_inference(model, "bf16"), torch.inference_mode():
            feats = model(x).float()
    """
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{precision!r}")
    if device is None:
        p = next(model.parameters(), None) if model is not None else None
        device = p.device if p is not None else torch.device("cpu")
    dev = torch.device(device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(fast_math(dev, precision))
        if model is not None and uses_explicit_attention(dev, precision):
            stack.enter_context(_attention_by_length(model, dev, precision))
        dtype = AUTOCAST_DTYPES[precision]
        if dtype is not None:
            stack.enter_context(torch.autocast(device_type=dev.type, dtype=dtype))
        yield


def configure_cpu(num_threads: int | None = None) -> dict[str, Any]:
    """Make the oneDNN fp32 choice *global* for this process (for code that calls the
    backbone directly and wants the speed without :func:`fast_inference`), and optionally
    set the number of intra-op threads. Does nothing to matmuls when the self-check
    fails. Returns :func:`platform_report`."""
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        torch.set_num_threads(num_threads)
    if onednn_fp32_available():
        torch.backends.mkldnn.matmul.fp32_precision = _ONEDNN_SETTING
    return platform_report()


def compile_model(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile the backbone's forward with ``torch.compile`` in place (parameter names,
    state dict and everything else unchanged) and return ``model``. Optional: the first
    call of every new input shape compiles (tens of seconds on CPU) for ~1.1x after.
    ``compile_kwargs`` go to ``torch.compile``."""
    backbone = getattr(model, "backbone", model)
    for name in ("forward_tokens", "forward"):
        fn = getattr(backbone, name, None)
        if fn is not None and not hasattr(fn, "_torchdynamo_orig_callable"):
            setattr(backbone, name, torch.compile(fn, **compile_kwargs))
    return model


def platform_report() -> dict[str, Any]:
    """What :func:`fast_inference` chooses on this machine, JSON-able."""
    check = check_onednn_fp32()
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "onednn_fp32": check.to_dict(),
        "attention": {"cpu_fp32": "fused SDPA",
                      "cpu_bf16": f"explicit softmax(qk^T)v up to "
                                  f"{EXPLICIT_ATTENTION_MAX_TOKENS} tokens, fused SDPA above",
                      "cuda": "fused SDPA (flash / memory-efficient)"},
    }
