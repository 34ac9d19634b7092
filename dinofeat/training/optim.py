"""Optimisers and the gradient/parameter operations of a DINO step.

- :func:`param_groups`: weight decay on weight matrices only (none on biases and
  one-dimensional parameters such as norms);
- :func:`build_optimizer`: AdamW (fused on CUDA), SGD with momentum 0.9, or :class:`LARS`;
- :func:`apply_schedules`: put an iteration's lr and weight decay into the optimiser;
- :func:`clip_gradients`: clip each parameter's gradient norm on its own;
- :func:`cancel_last_layer_gradients`: freeze the head's last layer in the first epoch(s);
- :func:`ema_update`: the momentum teacher ``theta_t <- m theta_t + (1 - m) theta_s``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["param_groups", "build_optimizer", "apply_schedules", "LARS", "clip_gradients",
           "cancel_last_layer_gradients", "ema_update"]


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / torch.compile wrapper."""
    for attr in ("module", "_orig_mod"):
        while hasattr(module, attr) and isinstance(getattr(module, attr), nn.Module):
            module = getattr(module, attr)
    return module


def param_groups(module: nn.Module) -> list[dict]:
    """Two optimiser groups of the trainable parameters of ``module``.

    ``[{"params": [...], "decay": True}, {"params": [...], "weight_decay": 0.0,
    "decay": False, "lars_exclude": True}]``: biases (names ending in ``.bias``) and 1-D
    parameters (norm gains) get no weight decay and, under LARS, no trust-ratio adaptation.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias") or p.ndim <= 1:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "decay": True},
            {"params": no_decay, "weight_decay": 0.0, "decay": False, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For each parameter ``p`` with gradient ``g`` (unless it is 1-D or its group has
    ``lars_exclude``): ``u = g + wd * p``, scaled by the trust ratio
    ``eta * ||p|| / ||u||`` (1 when either norm is 0); then ``buf = momentum * buf + u`` and
    ``p -= lr * buf``. Excluded parameters get plain SGD with momentum, no weight decay.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, eta: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"LARS: bad hyper-parameters lr={lr} weight_decay={weight_decay} "
                             f"momentum={momentum} eta={eta}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not group["lars_exclude"] and p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    one = torch.ones_like(p_norm)
                    trust = torch.where((p_norm > 0) & (u_norm > 0),
                                        group["eta"] * p_norm / u_norm, one)
                    update = update.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(cfg, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` names, over ``groups`` (from :func:`param_groups`).

    Initial lr / weight decay are ``cfg.lr`` / ``cfg.weight_decay``; the training loop sets
    both every iteration with :func:`apply_schedules`. AdamW uses the fused kernel when
    ``cfg.fused_optimizer`` is on and every parameter is on CUDA.
    """
    groups = [dict(g) for g in groups]
    for g in groups:
        g.setdefault("weight_decay", cfg.weight_decay if g.get("decay", True) else 0.0)
    params = [p for g in groups for p in g["params"]]
    if cfg.optimizer == "adamw":
        fused = bool(cfg.fused_optimizer and params and all(p.is_cuda for p in params))
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)
    if cfg.optimizer == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr)
    raise ValueError(f"--optimizer: unknown value {cfg.optimizer!r}; choose adamw, sgd or lars")


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Set ``lr`` on every group and ``weight_decay`` on the groups that decay."""
    for g in optimizer.param_groups:
        g["lr"] = lr
        if g.get("decay", True):
            g["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients(module: nn.Module, clip: float) -> torch.Tensor:
    """Clip every parameter's gradient to norm ``clip`` on its own (not a global norm).

    A gradient with L2 norm ``n`` is multiplied by ``clip / (n + 1e-6)`` when that factor is
    below 1; others are left untouched. ``clip <= 0`` only measures. Returns the norms before
    clipping as a 1-D fp32 tensor on the gradients' device (no host sync: read it only
    when needed), one per parameter with a gradient, in ``named_parameters`` order. (With
    fp16 loss scaling, unscale the gradients first.)
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch._foreach_norm(grads)
    if clip > 0:
        factors = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, factors)
    return torch.stack([n.float() for n in norms])


def cancel_last_layer_gradients(module: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    """Drop the gradients of the head's last layer while ``epoch < freeze_last_layer``.

    Parameters whose name contains ``last_layer`` get ``grad = None``, so the optimiser
    skips them (no weight decay or momentum update either).
    """
    if epoch >= freeze_last_layer:
        return
    for name, p in module.named_parameters():
        if "last_layer" in name:
            p.grad = None


def _strip_prefixes(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- momentum * theta_t + (1 - momentum) * theta_s`` for every teacher
    parameter, matched to the student's by name (DDP/compile prefixes ignored; student-only
    parameters such as a predictor are skipped). Buffers are not averaged.
    """
    student_params = {_strip_prefixes(n): p for n, p in student.named_parameters()}
    t_params: list[torch.Tensor] = []
    s_params: list[torch.Tensor] = []
    for name, p in teacher.named_parameters():
        key = _strip_prefixes(name)
        if key not in student_params:
            raise KeyError(f"ema_update: teacher parameter {key!r} has no student counterpart")
        s = student_params[key]
        if s.shape != p.shape:
            raise ValueError(f"ema_update: {key!r} is {tuple(p.shape)} in the teacher but "
                             f"{tuple(s.shape)} in the student")
        t_params.append(p)
        s_params.append(s.detach().to(p.dtype))
    if not t_params:
        return
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

