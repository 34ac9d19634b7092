"""oneDNN linear layers with pre-packed weights, for inference on CPU.

PyTorch's ``nn.Linear`` on CPU re-lays out its weight for the GEMM kernel on every call,
copies the broadcast bias into the output first, and runs the activation after the MLP's
first layer as a separate pass over a ``[tokens, 4 * dim]`` tensor. oneDNN, which PyTorch
ships, can do all three once: the weight is reordered into the kernel's blocked layout
ahead of time (``torch.ops.mkldnn._reorder_linear_weight``), and
``torch.ops.mkldnn._linear_pointwise`` computes ``act(x W^T + b)`` in one call with the
bias and GELU as post-ops. Measured on an Intel Xeon with AMX (2 threads, ViT-S/16 MLP at
batch 32): the first MLP layer plus its GELU took 23.5 ms in bf16 with ``nn.Linear`` and
6.5 ms packed and fused. The operators are those PyTorch's own compiler uses for frozen CPU
graphs; no kernel is written here.

:func:`packed_linears` installs the packed forward on a model's ``nn.Linear`` modules (and
the fused GELU on timm's ``Mlp``) for the duration of a ``with`` block:

* only without gradients, on CPU tensors, in fp32 or bf16 (autocast's bf16 included):
  anything else (training, CUDA, fp16) runs the module's own forward;
* the packed weight is cached per module (outside it) and packed again when the parameter
  changes (a new tensor or an in-place update);
* nesting and threads are counted per model: the last one to leave restores the modules;
* memory: the packed copy of a weight is kept (per dtype) as long as its module lives, so
  a model used in fp32 holds its linear weights twice (ViT-S/16: +85 MB; bf16: +42 MB).

Whether to use it on a machine is a measured choice (``dinofeat.accel.linear_kernel``):
this module only provides the mechanism.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn

__all__ = ["available", "packed_linears", "linear", "mlp_gelu"]

_lock = threading.Lock()
# per model: how many users are inside, and the modules patched (with what they had)
_installed: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()
# per linear module: packed weights by dtype (outside the module, so that copying or
# pickling a model never meets an opaque oneDNN tensor)
_packs: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def available() -> bool:
    """Whether this PyTorch build has oneDNN and the two operators used here."""
    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    try:
        return all(hasattr(ops, n) for n in ("_linear_pointwise", "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):
        return False


def _compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype to compute ``x``'s linear layer in, or ``None`` for "not here"."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.numel() == 0:
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype == torch.bfloat16 else None
    return x.dtype if x.dtype in (torch.float32, torch.bfloat16) else None


def _identity(t: torch.Tensor) -> tuple[int, int]:
    """What changes when a parameter does: its storage and its in-place version (tensors
    made under ``inference_mode`` have no version counter: storage only)."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:
        return t.data_ptr(), -1


def _packed(module: nn.Linear, dtype: torch.dtype, rows: int) -> tuple[torch.Tensor,
                                                                       torch.Tensor | None]:
    """``module``'s weight reordered for oneDNN and its bias, in ``dtype``: cached for the
    module, and packed again when the weight or bias is another tensor or was changed in
    place (its version counter)."""
    w, b = module.weight, module.bias
    key = (_identity(w), None if b is None else _identity(b))
    with _lock:
        cache: dict[torch.dtype, Any] = _packs.setdefault(module, {})
    hit = cache.get(dtype)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    with torch.no_grad():
        wp = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype).contiguous(),
                                                     max(1, rows))
        bp = None if b is None else b.detach().to(dtype).contiguous()
    cache[dtype] = (key, wp, bp)
    return wp, bp


def linear(module: nn.Linear, x: torch.Tensor, dtype: torch.dtype,
           activation: str = "none") -> torch.Tensor:
    """``activation(x W^T + b)`` of ``module`` with its packed weight: ``x [..., in]`` ->
    ``[..., out]`` in ``dtype``. ``activation``: ``"none"`` or ``"gelu"`` (exact erf
    GELU, as ``nn.GELU()``)."""
    rows = x.numel() // x.shape[-1]
    w, b = _packed(module, dtype, rows)
    flat = x.reshape(rows, x.shape[-1]).to(dtype)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if activation == "gelu":
        y = torch.ops.mkldnn._linear_pointwise(flat, w, b, "gelu", [], "none")
    else:
        y = torch.ops.mkldnn._linear_pointwise(flat, w, b, "none", [], "")
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _fusable_mlp(module: nn.Module) -> bool:
    """A timm ``Mlp`` whose activation is the exact GELU and whose middle does nothing at
    inference (dropout, no norm): ``fc2(gelu(fc1(x)))``."""
    act = getattr(module, "act", None)
    return (all(isinstance(getattr(module, n, None), nn.Linear) for n in ("fc1", "fc2"))
            and isinstance(act, nn.GELU) and act.approximate == "none"
            and isinstance(getattr(module, "norm", nn.Identity()), nn.Identity)
            and all(isinstance(getattr(module, n, nn.Identity()), (nn.Dropout, nn.Identity))
                    for n in ("drop1", "drop2")))


def mlp_gelu(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fusable timm ``Mlp`` (``fc2(gelu(fc1(x)))``) with packed weights and the GELU
    fused into the first layer."""
    fc1, fc2 = module.fc1, module.fc2
    assert isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
    return linear(fc2, linear(fc1, x, dtype, "gelu"), dtype)


#: ``when(dtype, rows)``: whether a call with ``rows`` rows in ``dtype`` uses the packed
#: path (the caller's measured choice); the default: always.
When = Callable[[torch.dtype, int], bool]


def _always(dtype: torch.dtype, rows: int) -> bool:
    return True


def _dtype_here(x: torch.Tensor, when: When) -> torch.dtype | None:
    dtype = _compute_dtype(x)
    if dtype is None or not when(dtype, x.numel() // max(1, x.shape[-1])):
        return None
    return dtype


def _linear_forward(module: nn.Linear, own: Callable, when: When) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = _dtype_here(x, when)
        return own(x) if dtype is None else linear(module, x, dtype)
    return forward


def _mlp_forward(module: nn.Module, own: Callable, when: When) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        dtype = None if module.training else _dtype_here(x, when)
        return own(x) if dtype is None else mlp_gelu(module, x, dtype)
    return forward


def _targets(model: nn.Module, when: When) -> list[tuple[nn.Module, Callable]]:
    out: list[tuple[nn.Module, Callable]] = []
    for m in model.modules():
        if "forward" in m.__dict__:  # its forward was replaced already (compiled, user's)
            continue
        if isinstance(m, nn.Linear):
            out.append((m, _linear_forward(m, m.forward, when)))
        elif _fusable_mlp(m):
            out.append((m, _mlp_forward(m, m.forward, when)))
    return out


@contextlib.contextmanager
def packed_linears(model: nn.Module, when: When = _always) -> Iterator[None]:
    """Inside: ``model``'s linear layers (and timm MLPs) compute with packed oneDNN
    weights when called without gradients on CPU in fp32 or bf16 and ``when(dtype,
    rows)`` says so (the gain depends on the number of rows: see
    ``dinofeat.accel.linear_kernel``); restored when the last user of ``model`` (nested
    or in another thread) leaves; ``when`` is the first user's. Does nothing when
    :func:`available` is false."""
    if not available():
        yield
        return
    compiled = any(hasattr(m.__dict__.get("forward"), "_torchdynamo_orig_callable")
                   for m in model.modules())
    if compiled:  # torch.compile traces the modules' own code
        yield
        return
    with _lock:
        entry = _installed.get(model)
        if entry is None:
            patched = _targets(model, when)
            for m, fwd in patched:
                m.forward = fwd  # an instance attribute: nn.Module.__call__ finds it first
            entry = _installed[model] = [0, [m for m, _ in patched]]
        entry[0] += 1
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                del _installed[model]
                for m in entry[1]:
                    m.__dict__.pop("forward", None)
