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
* **Attention.** Each block picks fused ``scaled_dot_product_attention`` or an explicit
  ``softmax(q k^T) v`` from the length of the sequence it gets, for the call only: on CPU
  the faster of the two as *measured on this machine* (:func:`attention_kernel`, a probe
  per precision and sequence-length bucket); fused on GPU. Without probing
  (``DINOFEAT_PROBE=0``) the fixed rule measured on AMD Zen 4 applies: explicit in
  bf16/fp16 up to :data:`EXPLICIT_ATTENTION_MAX_TOKENS` tokens. (On an Intel Xeon with
  AMX the fused kernel won at every length: the rule of one CPU is wrong on another.)
* **Linear layers (CPU).** ``nn.Linear`` or pre-packed oneDNN weights with the MLP's GELU
  fused into its first layer (:mod:`dinofeat.onednn`), whichever a probe finds faster
  and as accurate on this machine (:func:`linear_kernel`). On an Intel Xeon with AMX the
  packed path ran a ViT-S/16 MLP 2.7x faster in bf16 and 1.7x in fp32.
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

**Probes.** Every dispatch decision above (the attention kernel, the linear kernel, and the exact-search kernel of
:class:`~dinofeat.KNNIndex`, the GEMM rate behind the decoding/model core split, the
embedding batch) is a short timed probe run at first use, under a second each, and cached
per machine and software version (:func:`probe_cache_path`, under ``~/.cache/dinofeat``);
:func:`platform_report` and ``dinofeat doctor`` show the choices and the timings.
``DINOFEAT_PROBE=0`` turns probing off (the test suite does).

``torch.compile`` is optional (:func:`compile_model`): it gains ~1.1x after a cold
compile of tens of seconds, so it is never on by default.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import onednn
from .runtime import AUTOCAST_DTYPES, PRECISIONS, ieee_fp32  # the one precision table
from .utils import get_logger

__all__ = ["PRECISIONS", "AUTOCAST_DTYPES", "FEATURE_TOLERANCES", "MatmulCheck",
           "check_onednn_fp32", "onednn_fp32_available", "fast_math", "attention_mode",
           "uses_explicit_attention", "EXPLICIT_ATTENTION_MAX_TOKENS", "fast_inference",
           "configure_cpu", "compile_model", "platform_report", "PROBE_ENV",
           "probing_enabled", "probe_cache_path", "probe", "clear_probes", "attention_kernel",
           "linear_kernel",
           "exact_search_kernel", "exact_search", "gemm_gflops", "model_flops",
           "model_seconds_per_image", "embed_batch_size"]

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
    """Whether dinofeat routes fp32 matmuls to oneDNN on this CPU: the numerical
    self-check (:func:`check_onednn_fp32`, run once per process) must show fp32-level
    error, and, where probing is on, a timed probe must show oneDNN faster than the
    default kernel on a ViT-sized ``linear`` (cached per machine, :func:`probe`)."""
    check = check_onednn_fp32()
    log.debug("oneDNN fp32 self-check: %s", check)
    if not check.fp32_level:
        return False
    result = probe("onednn_fp32", _probe_onednn_fp32)
    return True if result is None else result["choice"] == "onednn"


def _probe_onednn_fp32() -> dict[str, Any]:
    x, w = torch.randn(1576, 384), torch.randn(1536, 384)
    fns = {"default": lambda: torch.nn.functional.linear(x, w)}

    def onednn():
        with _onednn_setting(_ONEDNN_SETTING):
            return torch.nn.functional.linear(x, w)

    fns["onednn"] = onednn
    t = _race(fns, repeats=5)
    choice = "onednn" if t["onednn"] < 0.97 * t["default"] else "default"
    return {"choice": choice, "seconds": t}


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
    ``softmax(q k^T) v`` instead of fused SDPA. On CPU with probing on (the default), the
    faster of the two as measured on this machine for this precision and sequence length
    (:func:`attention_kernel`); without probes, the fixed rule measured on AMD Zen 4:
    explicit in bf16/fp16 up to :data:`EXPLICIT_ATTENTION_MAX_TOKENS` tokens
    (``tokens=None``: the rule for short sequences). Fused on GPU."""
    if torch.device(device).type != "cpu":
        return False
    if tokens is not None and probing_enabled():
        return attention_kernel(device, precision, tokens) == "explicit"
    if precision not in ("bf16", "fp16"):
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
        if model is not None and dev.type == "cpu" and (
                probing_enabled() or uses_explicit_attention(dev, precision)):
            stack.enter_context(_attention_by_length(model, dev, precision))
        if model is not None and dev.type == "cpu" and _may_pack(precision):
            stack.enter_context(onednn.packed_linears(model, _packed_rows))
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


def platform_report(probe_now: bool = False) -> dict[str, Any]:
    """What :func:`fast_inference` chooses on this machine and why, JSON-able: the oneDNN
    self-check, and every probed decision (kernel chosen and the timings behind it) from
    the probe cache. ``probe_now=True`` runs the probes of the common cases first (ViT-S
    attention lengths in fp32 and bf16, the oneDNN route, exact search, GEMM rates,
    the embed batch): a few seconds once per machine."""
    check = check_onednn_fp32()
    if probe_now and probing_enabled():
        onednn_fp32_available()
        for prec in ("fp32", "bf16"):
            gemm_gflops(prec)
            linear_kernel(prec)  # the rows of a ViT-S/16 batch of 32
            for tokens in (197, 785, 3601):
                attention_kernel("cpu", prec, tokens)
        exact_search_kernel(384)
        embed_batch_size(384, 197, "bf16")
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "cpu": _cpu_info()[0],
        "onednn_fp32": check.to_dict(),
        "onednn_fp32_used": onednn_fp32_available() if probe_now else None,
        "probing": probing_enabled(),
        "probe_cache": str(probe_cache_path()),
        "probes": dict(sorted(_load_probes().items())),
        "attention_rule_without_probes": {
            "cpu_fp32": "fused SDPA",
            "cpu_bf16": f"explicit softmax(qk^T)v up to {EXPLICIT_ATTENTION_MAX_TOKENS} "
                        "tokens, fused SDPA above",
            "cuda": "fused SDPA (flash / memory-efficient)"},
    }


# ----------------------------------------------------------------------- probes
#: Environment variable: ``0`` turns probing off (fixed rules instead; the test suite
#: does this), anything else or unset leaves it on.
PROBE_ENV = "DINOFEAT_PROBE"
_probe_lock = threading.RLock()  # probes may use other probes
_probe_mem: dict[str, Any] = {}


def probing_enabled() -> bool:
    """Whether dispatch decisions are measured on this machine (``DINOFEAT_PROBE`` not
    ``0``/``false``/``off``)."""
    return os.environ.get(PROBE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


@functools.lru_cache(maxsize=1)
def _cpu_info() -> tuple[str, tuple[str, ...]]:
    name, flags = "unknown", ()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = tuple(sorted(f for f in line.split(":", 1)[1].split()
                                     if f.startswith(("avx", "amx", "fma"))))
    return name, flags


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def _machine_key() -> str:
    """What a probe's result depends on: CPU model and vector flags, core count, torch
    and faiss versions, the GPU. Computed once per process: every packed linear layer
    looks its probe up on every call."""
    faiss_version = ""
    with contextlib.suppress(Exception):
        import faiss
        faiss_version = faiss.__version__
    cores = _cores()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
    name, flags = _cpu_info()
    text = json.dumps([name, flags, cores, torch.__version__, faiss_version, gpu])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def probe_cache_path() -> Path:
    """The probe cache of this machine and software: ``$DINOFEAT_CACHE_DIR`` or
    ``$XDG_CACHE_HOME/dinofeat`` (``~/.cache/dinofeat``), file ``probes-<key>.json``
    with ``<key>`` a hash of the CPU model and flags, core count, torch and faiss
    versions and GPU name (another machine or version gets its own file)."""
    base = os.environ.get("DINOFEAT_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "dinofeat")
    return Path(base) / f"probes-{_machine_key()}.json"


def _load_probes() -> dict[str, Any]:
    path = probe_cache_path()
    if _probe_mem.get("_path") != str(path):
        _probe_mem.clear()
        _probe_mem["_path"] = str(path)
        data: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                data = loaded
        _probe_mem["data"] = data
    return _probe_mem["data"]


def probe(name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """The cached result of the probe ``name`` (a dict with at least ``choice``), running
    ``run`` at first use on this machine and saving it (:func:`probe_cache_path`).
    ``None`` when probing is off. A probe run while the machine is busy (load average
    above :data:`BUSY_LOAD_PER_CORE` per core) serves this process only and is measured
    again by the next. A cache that cannot be written only costs re-probing."""
    if not probing_enabled():
        return None
    with _probe_lock:
        data = _load_probes()
        if name in data:
            return data[name]
        t0 = time.perf_counter()
        with torch.inference_mode():
            result = dict(run())
        result["probe_seconds"] = round(time.perf_counter() - t0, 4)
        result["threads"] = torch.get_num_threads()
        result["load_average"] = [round(x, 2) for x in os.getloadavg()] \
            if hasattr(os, "getloadavg") else None
        data[name] = result
        log.debug("probe %s: %s", name, result)
        if _busy(result["load_average"]):
            # timings taken while other work competed for the cores can pick the wrong
            # kernel: used by this process, measured again by the next one
            log.debug("probe %s not saved: machine busy (load %s)", name,
                      result["load_average"])
            return result
        try:
            from .utils import atomic_write_json
            path = probe_cache_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, data)
        except OSError as e:
            log.debug("probe cache %s not written: %s", probe_cache_path(), e)
        return result


#: A probe taken while the 1-minute load average exceeds this many times the cores is not
#: saved (:func:`probe`).
BUSY_LOAD_PER_CORE = 1.25


def _busy(load: list[float] | None) -> bool:
    return bool(load) and load[0] > BUSY_LOAD_PER_CORE * _cores()


def _race(fns: dict[str, Callable[[], Any]], repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` seconds of each function, run interleaved after one warm-up."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: round(v, 6) for k, v in best.items()}


def _bucket(n: int, lo: int = 64, hi: int = 8192) -> int:
    """The power of two at or above ``n`` (clamped to ``[lo, hi]``): probe buckets."""
    b = lo
    while b < n and b < hi:
        b *= 2
    return b


def attention_kernel(device: torch.device | str, precision: str, tokens: int) -> str:
    """``"fused"`` (``scaled_dot_product_attention``) or ``"explicit"``
    (``softmax(q k^T) v``) for ``tokens``-long sequences at ``precision`` on ``device``:
    on CPU the faster in a probe at this sequence-length bucket (a power of two; heads of
    64 channels; cached per machine); on GPU always fused (flash / memory-efficient
    kernels). Without probing, the fixed rule of :func:`uses_explicit_attention`."""
    dev = torch.device(device)
    if dev.type != "cpu":
        return "fused"
    if not probing_enabled():
        return "explicit" if uses_explicit_attention(dev, precision, tokens) else "fused"
    bucket = _bucket(tokens)
    res = probe(f"attention/cpu/{precision}/{bucket}",
                lambda: _probe_attention(precision, bucket))
    return res["choice"] if res else "fused"


def _probe_attention(precision: str, tokens: int) -> dict[str, Any]:
    # q, k, v as a ViT block has them: views of one qkv projection [B, N, 3, heads, 64]
    # (strided, as timm's Attention gets them), 6 heads; a 3/4-full bucket (192 of 256: a
    # /16 model at 224 has 197 tokens); about the same work at every length (a slice of
    # the queries for long sequences), so the probe stays well under a second
    n = max(2, tokens * 3 // 4 + 1)
    heads = 6
    # about a ViT-S/16 batch of 32 at 224 (~2^23 scores): smaller problems finish in
    # ~2 ms, where timer and scheduling noise decided the choice
    batch = max(1, (1 << 23) // (n * n * heads))
    rows = min(n, max(64, (1 << 23) // (n * heads * batch)))
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, n, 3, heads, 64, generator=g)
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is not None:
        qkv = qkv.to(dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = q[:, :, :rows]
    scale = 64 ** -0.5

    def fused():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).reshape(batch, rows, heads * 64)

    def explicit():
        o = ((q * scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        return o.transpose(1, 2).reshape(batch, rows, heads * 64)

    t = _race({"fused": fused, "explicit": explicit}, repeats=5)
    # the fused kernel is PyTorch's own choice: the explicit product must win clearly
    choice = "explicit" if t["explicit"] < 0.9 * t["fused"] else "fused"
    return {"choice": choice, "seconds": t, "tokens": n, "heads": heads,
            "batch": batch, "query_rows": rows}


def linear_kernel(precision: str, rows: int = 6304) -> str:
    """``"onednn"`` (pre-packed oneDNN weights, the MLP's GELU fused into its first layer:
    :mod:`dinofeat.onednn`) or ``"aten"`` (``nn.Linear`` as it is) for inference on CPU
    at ``precision`` on inputs of ``rows`` rows (tokens x images; default: a ViT-S/16
    batch of 32): oneDNN when a probe on a ViT-S-sized MLP at this row bucket (a power of
    two, from 1024 to 65536) finds it at least 3% faster and as accurate as
    ``nn.Linear`` against a float64 computation (cached per machine). The gain grows with
    the rows (on the Intel AMX machine: a tie at 3k rows, 1.2-1.7x from 6k). ``"aten"``
    without probing, for fp16, or when the operators are missing."""
    if not _may_pack(precision):
        return "aten"
    bucket = _bucket(rows, lo=1024, hi=65536)
    res = probe(f"linear/cpu/{precision}/{bucket}", lambda: _probe_linear(precision, bucket))
    return res["choice"] if res else "aten"


def _may_pack(precision: str) -> bool:
    return precision in ("fp32", "bf16") and probing_enabled() and onednn.available()


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _packed_rows(dtype: torch.dtype, rows: int) -> bool:
    """:func:`dinofeat.onednn.packed_linears`' ``when``: the probed choice per row bucket."""
    name = _DTYPE_NAMES.get(dtype)
    return name is not None and linear_kernel(name, rows) == "onednn"


def _probe_linear(precision: str, bucket: int) -> dict[str, Any]:
    from timm.layers import Mlp
    g = torch.Generator().manual_seed(0)
    mlp = Mlp(384, 1536).eval()
    rows = bucket * 3 // 4 + 1  # a 3/4-full bucket: 6145 of 8192 for a batch of 32 x 197
    x = torch.randn(rows, 384, generator=g)
    head = x[:512]
    with torch.no_grad():  # accuracy on the first rows: float64 at every size costs
        ref = mlp.double()(head.double())
        mlp.float()
    dtype = AUTOCAST_DTYPES.get(precision)

    def run(inp: torch.Tensor = x) -> torch.Tensor:
        with fast_math("cpu", precision), contextlib.ExitStack() as stack:
            if dtype is not None:
                stack.enter_context(torch.autocast("cpu", dtype=dtype))
            return mlp(inp)

    def packed(inp: torch.Tensor = x) -> torch.Tensor:
        with onednn.packed_linears(mlp):
            return run(inp)

    try:
        err = {k: float((fn(head).double() - ref).abs().max()) for k, fn in
               (("aten", run), ("onednn", packed))}
    except RuntimeError as e:  # an operator this build cannot run
        return {"choice": "aten", "reason": f"oneDNN failed: {e}"}
    t = _race({"aten": run, "onednn": packed}, repeats=3 if rows > 8192 else 5)
    scale = float(ref.abs().max())
    accurate = err["onednn"] <= max(2 * err["aten"], 1e-5 * scale)  # fp32: ~1e-7 each
    faster = t["onednn"] < 0.97 * t["aten"]
    return {"choice": "onednn" if accurate and faster else "aten", "seconds": t,
            "rows": rows, "max_abs_error": err, "accurate": accurate}


def clear_probes() -> None:
    """Forget every probe result of this machine (the next use measures again)."""
    with _probe_lock:
        _probe_mem.clear()
        with contextlib.suppress(FileNotFoundError):
            probe_cache_path().unlink()
    onednn_fp32_available.cache_clear()


def exact_search_kernel(dim: int) -> str:
    """``"faiss"`` (``IndexFlat`` search) or ``"torch"`` (``matmul`` + ``topk`` in chunks,
    :func:`exact_search`) for exact inner-product search of ``dim``-dimensional vectors
    on CPU: the faster in a probe (65,536 vectors, 256 queries, top 20, faiss with
    ``KNNIndex``'s BLAS settings; cached per machine and dimension). ``"faiss"`` without
    probing."""
    res = probe(f"exact_search/{int(dim)}", lambda: _probe_exact_search(int(dim)))
    return res["choice"] if res else "faiss"


def _probe_exact_search(dim: int) -> dict[str, Any]:
    import faiss

    from .search.factory import configure_threads, threads_configured
    if not threads_configured():  # faiss's BLAS blocks as KNNIndex runs them
        configure_threads()
    # 65,536 vectors and 256 queries (a torch query block): at 16,384 x 128 the two
    # kernels tied on the Intel AMX machine while faiss was 1.4x faster at 200,000
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(65536, dim, generator=g).numpy()
    xq = torch.randn(256, dim, generator=g).numpy()
    index = faiss.IndexFlatIP(dim)
    index.add(xb)
    fns = {"faiss": lambda: index.search(xq, 20), "torch": lambda: exact_search(xb, xq, 20)}
    t = _race(fns, repeats=2)
    return {"choice": "torch" if t["torch"] < t["faiss"] else "faiss", "seconds": t,
            "vectors": len(xb), "queries": len(xq)}


#: Rows of the database multiplied at once by :func:`exact_search`: a 256 x 131072 fp32
#: score block is 128 MiB, which bounds the memory; smaller blocks were slower (more
#: top-k merging per query).
SEARCH_CHUNK = 131072
SEARCH_QUERY_CHUNK = 256


def exact_search(xb: Any, xq: Any, k: int, metric: str = "ip") -> tuple[Any, Any]:
    """Exact top-``k`` of queries ``xq [Q, D]`` against ``xb [N, D]`` (numpy float32 or
    tensors) with torch ``matmul`` + ``topk`` in chunks: inner product (largest first)
    or ``metric="l2"`` squared distance (smallest first). Returns numpy ``(scores
    [Q, k'], rows [Q, k'])`` with ``k' = min(k, N)``, as faiss ``IndexFlat.search``."""
    import numpy as np
    b = torch.as_tensor(xb, dtype=torch.float32)
    q = torch.as_tensor(xq, dtype=torch.float32)
    k = min(int(k), b.shape[0])
    l2 = metric == "l2"
    bn = (b * b).sum(1) if l2 else None
    out_s, out_i = [], []
    with torch.inference_mode():
        for qlo in range(0, q.shape[0], SEARCH_QUERY_CHUNK):
            qc = q[qlo:qlo + SEARCH_QUERY_CHUNK]
            best_s = best_i = None
            for lo in range(0, b.shape[0], SEARCH_CHUNK):
                s = qc @ b[lo:lo + SEARCH_CHUNK].T
                if l2:  # |q - b|^2 = |q|^2 - 2 q.b + |b|^2; ranking by -(|b|^2 - 2 q.b)
                    s = 2 * s - bn[lo:lo + SEARCH_CHUNK]
                top_s, top_i = s.topk(min(k, s.shape[1]), dim=1)
                top_i += lo
                if best_s is not None:
                    top_s, sel = torch.cat([best_s, top_s], 1).topk(k, dim=1)
                    top_i = torch.cat([best_i, top_i], 1).gather(1, sel)
                best_s, best_i = top_s, top_i
            if l2:
                best_s = (qc * qc).sum(1, keepdim=True) - best_s
            out_s.append(best_s)
            out_i.append(best_i)
    return (torch.cat(out_s).numpy().astype(np.float32), torch.cat(out_i).numpy().astype(np.int64))


_DEFAULT_GFLOPS_PER_CORE = {"fp32": 60.0, "bf16": 200.0, "fp16": 200.0}


def gemm_gflops(precision: str = "fp32") -> float:
    """Measured GFLOP/s (counting multiply and add) of a ViT-sized ``linear`` at
    ``precision`` on the CPU with the current threads and dinofeat's kernels (cached
    per machine); a conservative fixed figure per core without probing."""
    res = probe(f"gemm/{precision}", lambda: _probe_gemm(precision))
    if res is None:
        return _DEFAULT_GFLOPS_PER_CORE.get(precision, 60.0) * torch.get_num_threads()
    return float(res["gflops"])


def _probe_gemm(precision: str) -> dict[str, Any]:
    x, lin = torch.randn(768, 384), nn.Linear(384, 1536, bias=False)
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is not None:
        x, lin = x.to(dtype), lin.to(dtype)
    with contextlib.ExitStack() as stack:  # the kernel dinofeat's own linears use
        stack.enter_context(fast_math("cpu", "fp32" if dtype is None else precision))
        if linear_kernel(precision) == "onednn":
            stack.enter_context(onednn.packed_linears(lin))
        t = _race({"linear": lambda: lin(x)}, repeats=5)["linear"]
    gflops = 2 * 768 * 384 * 1536 / t / 1e9
    return {"choice": f"{gflops:.0f} GFLOP/s", "gflops": round(gflops, 1), "seconds": t}


def model_flops(model: nn.Module, height: int = 224, width: int = 224) -> float:
    """Multiply-adds x 2 of one forward pass of ``model`` (a DinoModel or a backbone) on
    a ``height x width`` image: linear layers and attention for a ViT; for other
    networks twice the parameter count per 16x16 patch (a rough figure)."""
    backbone = getattr(model, "backbone", model)
    patch = getattr(backbone, "patch_size", None) or 16
    tokens = (height // patch) * (width // patch) + 1
    linear = sum(m.weight.numel() for m in backbone.modules() if isinstance(m, nn.Linear))
    depth = getattr(backbone, "depth", None)
    dim = getattr(backbone, "embed_dim", None)
    if linear and depth and dim:
        return float(2 * linear * tokens + 4 * depth * tokens * tokens * dim)
    params = sum(p.numel() for p in backbone.parameters())
    return float(2 * params * (height * width) / 256)


def model_seconds_per_image(model: nn.Module, height: int, width: int,
                            precision: str = "fp32") -> float:
    """Estimated core-seconds of the model per image: :func:`model_flops` at the
    measured :func:`gemm_gflops` per core, with a 0.7 factor for what is not GEMM
    (attention, GELU, LayerNorm). Used to split the cores between decoding and the
    model (:func:`dinofeat.images.plan_decoding`)."""
    per_core = gemm_gflops(precision) / max(1, torch.get_num_threads())
    return model_flops(model, height, width) / (0.7 * per_core * 1e9)


def embed_batch_size(dim: int, tokens: int, precision: str = "fp32",
                     candidates: tuple[int, ...] = (4, 8, 16, 32, 64)) -> int:
    """The embedding batch for a ``dim``-wide model with ``tokens`` tokens: going up
    ``candidates``, the last batch whose MLP ``linear`` (``[batch * tokens, dim] x
    [dim, 4 dim]``) ran more than 5% faster per row than the one before (cached per
    machine, width and length bucket): a larger batch costs memory and latency for
    nothing once the GEMM is at speed. 64 without probing."""
    bucket = _bucket(tokens)
    res = probe(f"embed_batch/{precision}/{dim}/{bucket}",
                lambda: _probe_batch(dim, bucket, precision, candidates))
    return int(res["choice"]) if res else 64


def _probe_batch(dim: int, tokens: int, precision: str,
                 candidates: tuple[int, ...]) -> dict[str, Any]:
    dtype = AUTOCAST_DTYPES.get(precision) or torch.float32
    w = torch.randn(4 * dim, dim).to(dtype)
    rates: dict[int, float] = {}
    choice = candidates[0]
    with fast_math("cpu", precision):
        for b in candidates:
            x = torch.randn(b * (tokens * 3 // 4 + 1), dim).to(dtype)
            sec = _race({"x": lambda x=x: torch.nn.functional.linear(x, w)}, repeats=2)["x"]
            rates[b] = round(2 * x.shape[0] * dim * 4 * dim / sec / 1e9, 1)
            if len(rates) > 1 and rates[b] < 1.05 * max(r for c, r in rates.items() if c != b):
                break  # at speed: larger batches add memory and latency only
            choice = b
    return {"choice": choice, "gflops_by_batch": {str(b): r for b, r in rates.items()}}
