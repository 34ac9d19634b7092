"""DINO training components against independent computations of the paper's formulas:
loss, centre update, teacher temperature, schedules and teacher momentum,
parameter groups, per-parameter clipping, last-layer freeze, EMA, head (3.2), multi-crop
augmentation statistics (3.3) and the collapse/loss ablations (issue 11)."""

from __future__ import annotations

import copy
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from dinofeat.training import (LARS, PRESETS, DINOHead, DINOLoss, MultiCropAugmentation,
                            MultiCropNetwork, Predictor, TrainConfig, apply_schedules,
                            build_optimizer, build_schedules, cancel_last_layer_gradients,
                            clip_gradients, cosine_schedule, ema_update, param_groups,
                            WeightNormLinear)
from dinofeat.training.augment import RandomGaussianBlur, blur_kernel_size
from dinofeat.training.loss import batch_softmax, sinkhorn_knopp


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a shared CPU OpenMP threads
    spinning against other processes make these tests many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ helpers (numpy, float64)


def np_softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def np_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def random_outputs(ncrops=4, b=5, k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ncrops * b, k, generator=g), torch.randn(2 * b, k, generator=g)


def reference_dino_loss(student, teacher, center, ncrops, tau_s, tau_t):
    """The loss term by term: pairs (q, v) with v != q, each averaged over the batch."""
    s = student.double().numpy().reshape(ncrops, -1, student.shape[-1])
    t = teacher.double().numpy().reshape(2, -1, teacher.shape[-1])
    c = center.double().numpy()
    terms = []
    for q in range(2):
        p_t = np_softmax((t[q] - c) / tau_t)
        for v in range(ncrops):
            if v == q:
                continue
            terms.append(np.mean(np.sum(-p_t * np_log_softmax(s[v] / tau_s), axis=-1)))
    assert len(terms) == 2 * ncrops - 2
    return float(np.mean(terms))


# ------------------------------------------------------------------------------ loss


def test_loss_equals_formula_and_teacher_gets_no_gradient():
    ncrops, b, k = 4, 5, 16
    student, teacher = random_outputs(ncrops, b, k)
    loss_fn = DINOLoss(k, ncrops, 0.04, 0.04, 0, 10, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, k) * 0.3)
    expected = reference_dino_loss(student, teacher, loss_fn.center.clone(), ncrops, 0.1, 0.04)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss = loss_fn(student, teacher, epoch=0)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert teacher.grad is None and student.grad is not None
    # the same-view pairs are excluded: changing student crop 0 only through teacher view 1
    assert loss_fn.n_terms == 2 * ncrops - 2


def test_loss_with_no_local_crops_uses_two_terms():
    student, teacher = random_outputs(2, 3, 8, seed=1)
    loss_fn = DINOLoss(8, 2, 0.04, 0.04, 0, 5)
    expected = reference_dino_loss(student, teacher, torch.zeros(1, 8), 2, 0.1, 0.04)
    assert loss_fn(student, teacher, 0).item() == pytest.approx(expected, rel=1e-5)
    assert loss_fn.n_terms == 2


def test_centre_update_formula():
    ncrops, b, k, m = 3, 4, 8, 0.9
    student, teacher = random_outputs(ncrops, b, k, seed=2)
    loss_fn = DINOLoss(k, ncrops, 0.04, 0.04, 0, 10, center_momentum=m)
    c0 = torch.randn(1, k)
    loss_fn.center.copy_(c0)
    loss_fn(student, teacher, 0)
    expected = m * c0.double().numpy() + (1 - m) * teacher.double().numpy().mean(0, keepdims=True)
    np.testing.assert_allclose(loss_fn.center.double().numpy(), expected, rtol=1e-6, atol=1e-7)
    # the centre used for this step's loss was the old one (updated afterwards)
    loss_fn.center.copy_(c0)
    ref = reference_dino_loss(student, teacher, c0, ncrops, 0.1, 0.04)
    assert loss_fn(student, teacher, 0).item() == pytest.approx(ref, rel=1e-5)


def test_teacher_temperature_warmup():
    loss_fn = DINOLoss(8, 4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=30, nepochs=100)
    for e in [0, 1, 10, 29]:  # linspace(0.04, 0.07, 30)
        assert loss_fn.teacher_temperature(e) == pytest.approx(0.04 + 0.03 * e / 29)
    for e in [30, 50, 99, 150]:
        assert loss_fn.teacher_temperature(e) == pytest.approx(0.07)
    no_sharpen = DINOLoss(8, 4, 0.04, 0.07, 30, 100, student_temp=0.1, sharpen=False)
    assert no_sharpen.teacher_temperature(0) == no_sharpen.teacher_temperature(60) == 0.1


def test_teacher_temperature_enters_the_loss():
    ncrops, b, k = 3, 4, 8
    student, teacher = random_outputs(ncrops, b, k, seed=3)
    loss_fn = DINOLoss(k, ncrops, 0.04, 0.07, 10, 20)
    for epoch in (0, 5, 15):
        loss_fn.center.zero_()
        tau = loss_fn.teacher_temperature(epoch)
        ref = reference_dino_loss(student, teacher, torch.zeros(1, k), ncrops, 0.1, tau)
        assert loss_fn(student, teacher, epoch).item() == pytest.approx(ref, rel=1e-5)


def test_loss_rejects_mismatched_shapes():
    loss_fn = DINOLoss(8, 4, 0.04, 0.04, 0, 10)
    with pytest.raises(ValueError, match="ncrops"):
        loss_fn(torch.randn(9, 8), torch.randn(6, 8), 0)
    with pytest.raises(ValueError, match="dimension 8"):
        loss_fn(torch.randn(12, 7), torch.randn(6, 7), 0)


def test_monitoring_stats():
    ncrops, b, k = 3, 6, 10
    student, teacher = random_outputs(ncrops, b, k, seed=4)
    loss_fn = DINOLoss(k, ncrops, 0.04, 0.04, 0, 10)
    loss = loss_fn(student, teacher, 0)
    stats = loss_fn.last_stats
    p = np_softmax(teacher.double().numpy() / 0.04)
    entropy = -(p * np.log(p)).sum(-1)
    assert stats["teacher_entropy"] == pytest.approx(entropy.mean(), rel=1e-4)
    assert stats["teacher_prob_std"] == pytest.approx(p.std(0, ddof=1).mean(), rel=1e-4)
    assert stats["center_norm"] == 0.0  # taken before this step's centre update
    assert stats["loss"] == pytest.approx(loss.item())
    # KL = cross-entropy - teacher entropy, averaged over the same pairs
    assert stats["kl"] == pytest.approx(loss.item() - entropy.mean(), rel=1e-4)
    # a teacher that gives every image the same flat output is uniform: entropy log K
    loss_fn.center.zero_()
    loss_fn(student, torch.zeros(2 * b, k), 0)
    assert loss_fn.last_stats["teacher_entropy"] == pytest.approx(math.log(k), rel=1e-5)
    assert loss_fn.last_stats["teacher_prob_std"] == pytest.approx(0.0, abs=1e-7)


# -------------------------------------------------------- collapse / loss ablations


def np_sinkhorn(logits, iters):
    """SwAV's Sinkhorn-Knopp as written in its paper, in plain numpy (prototypes x samples)."""
    q = np.exp(logits - logits.max()).T  # [K, N]
    q /= q.sum()
    k, n = q.shape
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= n
    return (q * n).T


def test_sinkhorn_rows_and_columns_normalised():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(24, 12, generator=g) * 3
    q3 = sinkhorn_knopp(logits, 3)
    np.testing.assert_allclose(q3.double().numpy(), np_sinkhorn(logits.double().numpy(), 3),
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(q3.sum(1).numpy(), 1.0, rtol=1e-5)
    n, k = logits.shape
    col_err = [float((sinkhorn_knopp(logits, it).sum(0) - n / k).abs().max())
               for it in (1, 3, 30)]
    assert col_err[0] > col_err[1] > col_err[2] and col_err[2] < 1e-3
    # stable where exp() of the raw logits would overflow / underflow
    q = sinkhorn_knopp(logits / 0.01, 3)
    assert torch.isfinite(q).all()
    np.testing.assert_allclose(q.sum(1).numpy(), 1.0, rtol=1e-5)


def test_batch_softmax():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(8, 5, generator=g) * 2
    p = np_softmax(logits.double().numpy(), axis=0)      # softmax over the batch
    p = p / p.sum(axis=1, keepdims=True)                  # each image a distribution
    np.testing.assert_allclose(batch_softmax(logits).double().numpy(), p, rtol=1e-5)


@pytest.mark.parametrize("collapse", ["batch_softmax", "sinkhorn", "none"])
def test_loss_with_other_collapse_modes(collapse):
    ncrops, b, k, tau_t = 3, 4, 8, 0.05
    student, teacher = random_outputs(ncrops, b, k, seed=7)
    loss_fn = DINOLoss(k, ncrops, tau_t, tau_t, 0, 10, collapse=collapse)
    t = teacher.double().numpy() / tau_t
    if collapse == "batch_softmax":
        p = np_softmax(t, axis=0)
        p = p / p.sum(1, keepdims=True)
    elif collapse == "sinkhorn":
        p = np_sinkhorn(t, 3)
    else:
        p = np_softmax(t)
    p = p.reshape(2, b, k)
    s = student.double().numpy().reshape(ncrops, b, k)
    terms = [np.mean(np.sum(-p[q] * np_log_softmax(s[v] / 0.1), -1))
             for q in range(2) for v in range(ncrops) if v != q]
    assert loss_fn(student, teacher, 0).item() == pytest.approx(np.mean(terms), rel=1e-4)
    assert torch.equal(loss_fn.center, torch.zeros(1, k))  # no centre in these modes


def test_mse_loss_between_l2_normalised_outputs():
    ncrops, b, k = 4, 3, 8
    student, teacher = random_outputs(ncrops, b, k, seed=8)
    loss_fn = DINOLoss(k, ncrops, 0.04, 0.04, 0, 10, loss="mse")
    c = torch.randn(1, k) * 0.2
    loss_fn.center.copy_(c)
    s = student.double().numpy().reshape(ncrops, b, k)
    t = (teacher.double().numpy() - c.double().numpy()).reshape(2, b, k)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    terms = [np.mean(np.sum((unit(s[v]) - unit(t[q])) ** 2, -1))
             for q in range(2) for v in range(ncrops) if v != q]
    student.requires_grad_(True)
    loss = loss_fn(student, teacher, 0)
    assert loss.item() == pytest.approx(np.mean(terms), rel=1e-5)
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_loss_stays_fp32_under_autocast():
    student, teacher = random_outputs(3, 4, 8, seed=9)
    loss_fn = DINOLoss(8, 3, 0.04, 0.04, 0, 10)
    ref = reference_dino_loss(student, teacher, torch.zeros(1, 8), 3, 0.1, 0.04)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(student.bfloat16(), teacher.bfloat16(), 0)
    assert loss.dtype == torch.float32
    ref_bf16 = reference_dino_loss(student.bfloat16().float(), teacher.bfloat16().float(),
                                   torch.zeros(1, 8), 3, 0.1, 0.04)
    assert loss.item() == pytest.approx(ref_bf16, rel=1e-5)
    assert loss.item() == pytest.approx(ref, rel=0.05)


# ---------------------------------------------------------------------- schedules


def test_cosine_schedule_closed_form():
    base, final, epochs, ipe, warm = 2.0, 0.1, 6, 5, 2
    s = cosine_schedule(base, final, epochs, ipe, warmup_epochs=warm, warmup_start=0.5)
    assert s.shape == (epochs * ipe,)
    w = warm * ipe
    for i in range(w):  # linear from 0.5, reaching base at the last warm-up step
        assert s[i] == pytest.approx(0.5 + (base - 0.5) * i / (w - 1))
    n = epochs * ipe - w
    for j in [0, 1, 7, n // 2, n - 1]:
        assert s[w + j] == pytest.approx(final + (base - final) * (1 + math.cos(math.pi * j / n)) / 2)
    assert len(cosine_schedule(1, 0, 3, 4, warmup_epochs=5)) == 12  # warm-up longer than run


def test_build_schedules_release_values():
    cfg = TrainConfig(lr=0.0005, min_lr=1e-6, warmup_epochs=10, epochs=100,
                      weight_decay=0.04, weight_decay_end=0.4, momentum_teacher=0.996)
    ipe, total_batch = 20, 1024
    sch = build_schedules(cfg, ipe, total_batch)
    total = 100 * ipe
    assert len(sch) == total and sch.iters_per_epoch == ipe
    peak = 0.0005 * 1024 / 256
    assert peak == pytest.approx(cfg.peak_lr(world_size=16))  # 64/GPU x 16 GPUs
    assert sch.lr[0] == 0.0
    assert sch.lr[10 * ipe - 1] == pytest.approx(peak)      # end of warm-up
    assert sch.lr[10 * ipe] == pytest.approx(peak)
    assert sch.lr.max() == pytest.approx(peak)
    n = total - 10 * ipe
    assert sch.lr[-1] == pytest.approx(1e-6 + (peak - 1e-6) * (1 + math.cos(math.pi * (n - 1) / n)) / 2)
    assert sch.lr[-1] == pytest.approx(1e-6, abs=2e-8)
    assert sch.wd[0] == pytest.approx(0.04) and sch.wd[-1] == pytest.approx(0.4, abs=1e-5)
    for i in [0, 1, 333, 1000, 1999]:  # lambda_i = 1 - (1 - m0)(cos(pi i / I) + 1) / 2
        assert sch.momentum[i] == pytest.approx(1 - 0.004 * (math.cos(math.pi * i / total) + 1) / 2)
        assert sch.wd[i] == pytest.approx(0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * i / total)) / 2)
    assert sch.at(10 ** 9) == (sch.lr[-1], sch.wd[-1], sch.momentum[-1])
    with pytest.raises(ValueError, match="iters_per_epoch"):
        build_schedules(cfg, 0, 256)


# ---------------------------------------------------------------------- optimiser


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.token = nn.Parameter(torch.zeros(1, 1, 3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_param_groups_and_apply_schedules():
    toy = _Toy()
    decay, no_decay = param_groups(toy)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([toy.fc.weight, toy.token])
    assert ids(no_decay["params"]) == ids([toy.fc.bias, toy.norm.weight, toy.norm.bias])
    assert no_decay["weight_decay"] == 0.0
    opt = build_optimizer(TrainConfig(), param_groups(toy))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.04 and opt.param_groups[1]["weight_decay"] == 0
    apply_schedules(opt, lr=0.123, weight_decay=0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.123, 0.123]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    sgd = build_optimizer(TrainConfig(optimizer="sgd"), param_groups(toy))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert isinstance(build_optimizer(TrainConfig(optimizer="lars"), param_groups(toy)), LARS)


def test_lars_step_formula():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(3))
    gw, gb = torch.randn(3, 4), torch.randn(3)
    w.grad, b.grad = gw.clone(), gb.clone()
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = LARS([{"params": [w]}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.1, weight_decay=0.01, momentum=0.9, eta=0.001)
    opt.step()
    u = gw + 0.01 * w0
    expected_w = w0 - 0.1 * (0.001 * w0.norm() / u.norm()) * u
    torch.testing.assert_close(w.detach(), expected_w)
    torch.testing.assert_close(b.detach(), b0 - 0.1 * gb)  # plain SGD on 1-D params
    w.grad, b.grad = gw.clone(), gb.clone()
    w1 = w.detach().clone()
    opt.step()  # momentum buffer: 0.9 * first update + second update
    u2 = gw + 0.01 * w1
    buf = 0.9 * (0.001 * w0.norm() / u.norm()) * u + (0.001 * w1.norm() / u2.norm()) * u2
    torch.testing.assert_close(w.detach(), w1 - 0.1 * buf)


def test_per_parameter_clipping():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    targets = [0.5, 5.0, 2.9, 10.0]  # norms of weight0, bias0, weight1, bias1
    torch.manual_seed(1)
    for p, n in zip(model.parameters(), targets):
        g = torch.randn_like(p)
        p.grad = g / g.norm() * n
    before = [p.grad.clone() for p in model.parameters()]
    norms = clip_gradients(model, 3.0)
    assert isinstance(norms, torch.Tensor)  # stays on the device: no host sync per step
    assert norms.tolist() == pytest.approx(targets, rel=1e-5)
    for p, g0, n in zip(model.parameters(), before, targets):
        if n <= 3.0:
            assert torch.equal(p.grad, g0)  # untouched
        else:
            assert p.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
            torch.testing.assert_close(p.grad, g0 * (3.0 / (n + 1e-6)))  # same direction
    # a global-norm clip would have scaled the small gradients too
    assert torch.equal(list(model.parameters())[0].grad, before[0])
    assert clip_gradients(model, 0).tolist() == pytest.approx([0.5, 3.0, 2.9, 3.0], rel=1e-5)


def _head_net(out_dim=16, norm_last_layer=True):
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8))
    head = DINOHead(8, out_dim, nlayers=2, hidden_dim=12, bottleneck_dim=6,
                    norm_last_layer=norm_last_layer)
    return MultiCropNetwork(backbone, head)


def test_last_layer_frozen_only_in_first_epochs():
    net = _head_net(norm_last_layer=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = [torch.randn(4, 3, 4, 4)]
    for epoch in range(3):
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt.zero_grad()
        net(x).square().sum().backward()
        cancel_last_layer_gradients(net, epoch, freeze_last_layer=2)
        opt.step()
        for n, p in net.named_parameters():
            changed = not torch.equal(before[n], p.detach())
            if "last_layer" in n:
                assert changed == (epoch >= 2), (n, epoch)
            else:
                assert changed, (n, epoch)


def test_ema_update():
    student = _head_net()
    student.predictor = Predictor(6, 10)  # student-only parameters are skipped
    teacher = _head_net()
    t0 = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    s0 = dict(student.named_parameters())
    ema_update(teacher, student, 0.9)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), 0.9 * t0[n] + 0.1 * s0[n].detach())
        assert not p.requires_grad or p.grad is None
    ema_update(teacher, student, 0.0)  # momentum 0: the teacher becomes the student
    for n, p in teacher.named_parameters():
        assert torch.equal(p.detach(), s0[n].detach())
    other = MultiCropNetwork(nn.Sequential(nn.Flatten(), nn.Linear(48, 8)), DINOHead(8, 32, nlayers=2))
    with pytest.raises(ValueError, match="shape|student"):
        ema_update(other, student, 0.5)


# --------------------------------------------------------------------------- head


def test_head_shapes_names_and_weight_norm():
    head = DINOHead(24, out_dim=40, hidden_dim=32, bottleneck_dim=8)
    names = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert names == {"mlp.0.weight": (32, 24), "mlp.0.bias": (32,), "mlp.2.weight": (32, 32),
                     "mlp.2.bias": (32,), "mlp.4.weight": (8, 32), "mlp.4.bias": (8,),
                     "last_layer.weight_g": (40, 1), "last_layer.weight_v": (40, 8)}
    assert not head.last_layer.weight_g.requires_grad
    assert torch.equal(head.last_layer.weight_g, torch.ones(40, 1))
    x = torch.randn(5, 24)
    out = head(x)
    assert out.shape == (5, 40)
    z = head.bottleneck(x)
    np.testing.assert_allclose(z.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
    v = head.last_layer.weight_v.detach()
    torch.testing.assert_close(out.detach(), z.detach() @ (v / v.norm(dim=1, keepdim=True)).T)
    # with a fixed unit gain and a unit bottleneck, every logit is a cosine: |logit| <= 1
    assert out.abs().max() <= 1 + 1e-5
    for name, p in head.mlp.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0
    w = torch.cat([head.mlp[i].weight.flatten() for i in (0, 2, 4)])
    assert w.std().item() == pytest.approx(0.02, rel=0.1)
    free = DINOHead(24, 40, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    free(x).sum().backward()
    assert free.last_layer.weight_g.grad is not None
    bn = DINOHead(24, 40, use_bn=True, hidden_dim=32, bottleneck_dim=8, nlayers=3)
    assert {"mlp.0.weight", "mlp.1.running_mean", "mlp.3.weight", "mlp.6.weight"} <= set(bn.state_dict())
    assert set(DINOHead(24, 40, nlayers=1, bottleneck_dim=8).state_dict()) == {
        "mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"}


def test_weight_norm_matches_torch_weight_norm():
    """Our weight_g / weight_v load into (and compute the same as) torch's weight norm,
    the layout the release checkpoints were saved with."""
    ours = DINOHead(6, 10, nlayers=2, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False)
    with torch.no_grad():
        ours.last_layer.weight_g.mul_(torch.rand(10, 1) + 0.5)
    ref = nn.Linear(4, 10, bias=False)
    ref = torch.nn.utils.parametrizations.weight_norm(ref, dim=0)
    with torch.no_grad():
        ref.parametrizations.weight.original0.copy_(ours.last_layer.weight_g)
        ref.parametrizations.weight.original1.copy_(ours.last_layer.weight_v)
    z = torch.randn(3, 4)
    torch.testing.assert_close(ours.last_layer(z), ref(z))


class _CountingBackbone(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.proj = nn.Linear(3, dim)
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.proj(x.mean(dim=(2, 3)))


def test_multicrop_network_groups_resolutions():
    backbone = _CountingBackbone()
    net = MultiCropNetwork(backbone, DINOHead(8, 16, nlayers=2, hidden_dim=12, bottleneck_dim=6))
    crops = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 16, 16)] + \
            [torch.randn(3, 3, 8, 8) for _ in range(4)]
    out = net(crops)
    assert out.shape == (18, 16)
    assert backbone.calls == [(6, 3, 16, 16), (12, 3, 8, 8)]
    separate = torch.cat([net.head(backbone(c)) for c in crops])
    torch.testing.assert_close(out, separate)
    keys = set(net.state_dict())
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    assert "head.last_layer.weight_g" in keys


def test_multicrop_network_with_vit_and_predictor():
    from dinofeat.backbones import build_backbone
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=8, img_size=32)
    head = DINOHead(vit.embed_dim, 32, hidden_dim=16, bottleneck_dim=8)
    net = MultiCropNetwork(vit, head, Predictor(8, 16))
    crops = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 3
    out = net(crops)
    assert out.shape == (10, 32) and torch.isfinite(out).all()
    assert any(k.startswith("predictor.") for k in net.state_dict())
    feats = vit(torch.cat(crops[:2]))
    z = torch.nn.functional.normalize(net.predictor(head.bottleneck(feats)), dim=-1)
    torch.testing.assert_close(out[:4], head.last_layer(z))


# ------------------------------------------------------------------- augmentation


def _denorm(x, mean, std):
    return x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)


def test_crops_sizes_counts_and_normalisation():
    aug = MultiCropAugmentation(local_crops_number=3, global_crop_size=32, local_crop_size=16)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), np.uint8))
    crops = aug(img)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops) and aug.ncrops == 5
    # a black image stays black through every step: each crop is exactly -mean / std
    black = aug(torch.zeros(3, 20, 20, dtype=torch.uint8))
    mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
    for c in black:
        torch.testing.assert_close(c, (-mean / std).view(3, 1, 1).expand_as(c))
    assert len(MultiCropAugmentation(local_crops_number=0, global_crop_size=16)(img)) == 2


def test_augmentation_is_seedable():
    aug = MultiCropAugmentation(local_crops_number=2, global_crop_size=24, local_crop_size=8)
    img = torch.randint(0, 256, (3, 30, 30), dtype=torch.uint8)
    torch.manual_seed(3)
    a = aug(img)
    torch.manual_seed(3)
    b = aug(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], aug(img)[2])


def test_grayscale_inputs_give_three_equal_channels():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    aug = MultiCropAugmentation(local_crops_number=2, global_crop_size=16, local_crop_size=8,
                                mean=mean, std=std)
    gray = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    for img in (gray, gray[0], Image.fromarray(gray[0].numpy(), mode="L")):
        for c in aug(img):
            x = _denorm(c, mean, std)
            assert x.shape[0] == 3
            torch.testing.assert_close(x[0], x[1], atol=1e-5, rtol=0)
            torch.testing.assert_close(x[1], x[2], atol=1e-5, rtol=0)
    colour_to_gray = MultiCropAugmentation(local_crops_number=1, global_crop_size=16,
                                           local_crop_size=8, mean=mean, std=std,
                                           grayscale=True)
    rgb = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    for c in colour_to_gray(rgb):
        x = _denorm(c, mean, std)
        torch.testing.assert_close(x[0], x[2], atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.rand(3, 8, 8))


def test_augmentation_probabilities(monkeypatch):
    """Solarisation ~0.2 on global 2 only, grayscale ~0.2 everywhere (measured on the
    pixels), blur p 1 / 0.1 / 0.5 (counted), over 300 seeded images."""
    n, nlocal = 300, 2
    aug = MultiCropAugmentation(local_crops_number=nlocal, global_crop_size=12,
                                local_crop_size=8)
    blur_calls: dict[int, int] = {}
    sigmas: list[float] = []
    original = RandomGaussianBlur.blur

    def counting(self, img, sigma):
        blur_calls[id(self)] = blur_calls.get(id(self), 0) + 1
        sigmas.append(sigma)
        return original(self, img, sigma)

    monkeypatch.setattr(RandomGaussianBlur, "blur", counting)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    # white: colour jitter keeps it >= 0.6 * 255 > 128, so solarisation always shows
    white = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    # dark red: only the grayscale step makes the three channels equal (no jitter brightness
    # reaches 255, so solarisation cannot turn it black)
    red = torch.zeros(3, 16, 16, dtype=torch.uint8)
    red[0] = 100
    torch.manual_seed(0)
    solarised = np.zeros(2 + nlocal)
    grayscaled = np.zeros(2 + nlocal)
    for _ in range(n):
        for i, c in enumerate(aug(white)):
            solarised[i] += float(_denorm(c, mean, std).max() < 0.5)
        for i, c in enumerate(aug(red)):
            x = _denorm(c, mean, std)
            grayscaled[i] += float((x.max(0).values - x.min(0).values).max() < 1e-4)
    solarised /= n
    grayscaled /= n
    tol = 3 * math.sqrt(0.2 * 0.8 / n)  # three binomial standard deviations
    assert abs(solarised[1] - 0.2) < tol
    assert solarised[0] == 0 and (solarised[2:] == 0).all()
    assert np.all(np.abs(grayscaled - 0.2) < tol), grayscaled
    def blur_of(pipeline):
        for step in pipeline.transforms:
            for t in getattr(step, "transforms", [step]):
                if isinstance(t, RandomGaussianBlur):
                    return t
        raise AssertionError("no blur step")

    calls = [blur_calls.get(id(blur_of(t)), 0) for t in
             (aug.global_transform1, aug.global_transform2, aug.local_transform)]
    rates = np.array(calls) / np.array([2 * n, 2 * n, 2 * n * nlocal])
    assert rates[0] == 1.0
    assert abs(rates[1] - 0.1) < 3 * math.sqrt(0.1 * 0.9 / (2 * n))
    assert abs(rates[2] - 0.5) < 3 * math.sqrt(0.25 / (2 * n * nlocal))
    # sigma ~ U[0.1, 2]: range, mean and variance within 4 standard errors
    s = np.array(sigmas)
    assert s.min() >= 0.1 and s.max() <= 2.0
    assert abs(s.mean() - 1.05) < 4 * (1.9 / math.sqrt(12)) / math.sqrt(len(s))
    assert abs(s.var() - 1.9 ** 2 / 12) < 4 * (1.9 ** 2 / math.sqrt(180)) / math.sqrt(len(s))


def test_blur_kernel_rule():
    assert blur_kernel_size(2.0, 224) == 13      # 2 * ceil(3 * 2) + 1
    assert blur_kernel_size(2.0, 96) == 13
    assert blur_kernel_size(2.0, 8) == 7         # capped at the crop (odd)
    assert blur_kernel_size(0.5, 64) == 5


# ------------------------------------------------------------------------- config


def test_config_defaults_are_the_release():
    cfg = TrainConfig()
    release = dict(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True,
                   momentum_teacher=0.996, use_bn_in_head=False, warmup_teacher_temp=0.04,
                   teacher_temp=0.04, warmup_teacher_temp_epochs=0, student_temp=0.1,
                   center_momentum=0.9, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0,
                   batch_size_per_gpu=64, epochs=100, freeze_last_layer=1, lr=0.0005,
                   warmup_epochs=10, min_lr=1e-6, optimizer="adamw", drop_path_rate=0.1,
                   global_crops_scale=(0.4, 1.0), local_crops_number=8,
                   local_crops_scale=(0.05, 0.4), global_crop_size=224, local_crop_size=96,
                   collapse="center", sharpen=True, teacher="momentum", loss="ce",
                   head_layers=3, hidden_dim=2048, bottleneck_dim=256, l2_bottleneck=True)
    assert {k: getattr(cfg, k) for k in release} == release
    assert cfg.ncrops == 10 and cfg.validate() is cfg
    import dataclasses
    assert all(f.metadata.get("help") for f in dataclasses.fields(TrainConfig))


def test_config_round_trip_and_errors(tmp_path):
    import json
    cfg = TrainConfig(arch="vit_b8", local_crops_number=0, global_crops_scale=(0.14, 1.0))
    assert cfg.patch_size == 8  # the patch in the name wins over the default
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert TrainConfig.from_json_file(tmp_path / "config.json") == cfg
    assert cfg.replace(epochs=5).epochs == 5 and cfg.epochs == 100
    with pytest.raises(ValueError, match="'batchsize'"):
        TrainConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="'lr' must be a number"):
        TrainConfig().replace(lr="fast")
    with pytest.raises(ValueError, match="--optimizer"):
        TrainConfig(optimizer="adam").validate()
    with pytest.raises(ValueError, match="--local-crops-scale"):
        TrainConfig(local_crops_scale=(0.5, 0.2)).validate()
    with pytest.raises(ValueError, match="--warmup-epochs"):
        TrainConfig(epochs=5).validate()
    with pytest.raises(ValueError, match="--arch"):
        TrainConfig(arch="alexnet").validate()
    with pytest.raises(ValueError, match="--knn-eval-every"):
        TrainConfig(knn_eval_every=5).validate()
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        TrainConfig.from_json_file(tmp_path / "bad.json")


def test_config_warns_on_settings_the_paper_found_unstable():
    with pytest.warns(UserWarning, match="unstable per the paper"):
        TrainConfig(teacher_temp=0.08).validate()
    with pytest.warns(UserWarning, match="0.999"):
        TrainConfig(center_momentum=0.999).validate()
    with pytest.warns(UserWarning, match="collapse"):
        TrainConfig(l2_bottleneck=False).validate()
    with pytest.warns(UserWarning, match=r"\(0.14, 1\)"):
        TrainConfig(local_crops_number=0).validate()


def test_presets():
    for name in PRESETS:
        TrainConfig.from_preset(name).validate()
    s300 = TrainConfig.from_preset("vit_s16_300ep")
    assert (s300.epochs, s300.teacher_temp, s300.warmup_teacher_temp_epochs,
            s300.norm_last_layer) == (300, 0.07, 30, False)
    r50 = TrainConfig.from_preset("resnet50", epochs=3)
    assert (r50.optimizer, r50.lr, r50.weight_decay, r50.weight_decay_end, r50.epochs) == \
        ("sgd", 0.03, 1e-4, 1e-4, 3)
    assert r50.global_crops_scale == (0.14, 1.0) and r50.local_crops_scale == (0.05, 0.14)
    with pytest.raises(ValueError, match="unknown preset"):
        TrainConfig.from_preset("vit_huge")


def test_small_data_preset():
    from dinofeat.training import small_data_preset
    p = small_data_preset(32, 256)
    assert (p["patch_size"], p["global_crop_size"], p["local_crop_size"]) == (4, 32, 12)
    assert p["momentum_teacher"] == pytest.approx(0.9995)  # the release's value at batch 256
    assert small_data_preset(32, 1024)["momentum_teacher"] == pytest.approx(0.996)
    p64 = small_data_preset(64, 256, dataset_size=60000)
    assert (p64["patch_size"], p64["global_crop_size"], p64["local_crop_size"]) == (8, 64, 24)
    assert p64["momentum_teacher"] == pytest.approx(1 - 1 / (60000 // 256), abs=1e-6)
    cfg = TrainConfig.from_preset("small_data", global_crop_size=64, batch_size_per_gpu=128,
                                  dataset_size=60000, epochs=20)
    assert (cfg.patch_size, cfg.local_crop_size, cfg.warmup_epochs, cfg.epochs) == (8, 24, 2, 20)
    cfg.validate()
    with pytest.raises(ValueError, match="too small"):
        small_data_preset(4, 16)


def test_argparse_generation():
    import argparse
    from dinofeat.training import add_arguments
    parser = add_arguments(argparse.ArgumentParser())
    help_text = parser.format_help()
    assert "--momentum-teacher" in help_text and "(default: 0.996)" in help_text
    args = parser.parse_args(["--arch", "vit_tiny", "--patch_size", "8", "--no-norm-last-layer",
                              "--global-crops-scale", "0.14", "1", "--out", "runs/x",
                              "--max-iters-per-epoch", "4", "--collapse", "sinkhorn"])
    cfg = TrainConfig.from_args(args)
    assert (cfg.arch, cfg.patch_size, cfg.norm_last_layer, cfg.global_crops_scale,
            cfg.output_dir, cfg.max_iters_per_epoch, cfg.collapse) == \
        ("vit_tiny", 8, False, (0.14, 1.0), "runs/x", 4, "sinkhorn")
    assert cfg.epochs == 100  # untouched options keep their defaults
    preset = TrainConfig.from_args(parser.parse_args(["--preset", "vit_s16_300ep", "--epochs", "7"]))
    assert (preset.epochs, preset.teacher_temp) == (7, 0.07)
    with pytest.raises(SystemExit):
        parser.parse_args(["--optimizer", "adam"])


def test_autocast_choice():
    assert TrainConfig(precision="fp16").autocast_dtype("cpu") is None
    assert TrainConfig(precision="fp16").autocast_dtype("cuda") is torch.float16
    assert TrainConfig(precision="bf16").autocast_dtype("cpu") is torch.bfloat16
    assert TrainConfig(precision="fp32").autocast_dtype("cuda") is None
    assert TrainConfig().uses_loss_scaling("cuda") and not TrainConfig().uses_loss_scaling("cpu")


def test_adamw_not_fused_on_cpu():
    opt = build_optimizer(TrainConfig(), param_groups(_Toy()))
    assert not opt.defaults.get("fused")


def test_training_step_end_to_end():
    """One real step with every component: finite loss, teacher moved by EMA only."""
    from dinofeat.backbones import build_backbone
    torch.manual_seed(0)
    cfg = TrainConfig.from_preset("small_data", global_crop_size=16, batch_size_per_gpu=4,
                                  local_crops_number=2, out_dim=64, hidden_dim=32,
                                  bottleneck_dim=16, arch="vit_tiny", patch_size=4)
    student = MultiCropNetwork(build_backbone(cfg.arch, cfg.patch_size, img_size=16,
                                              drop_path_rate=cfg.drop_path_rate),
                               DINOHead(192, cfg.out_dim, hidden_dim=32, bottleneck_dim=16))
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    aug = MultiCropAugmentation.from_config(cfg)
    views = [aug(torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)) for _ in range(4)]
    crops = [torch.stack(v) for v in zip(*views)]
    loss_fn = DINOLoss.from_config(cfg)
    opt = build_optimizer(cfg, param_groups(student))
    sch = build_schedules(cfg, iters_per_epoch=3, total_batch=4)
    lr, wd, m = sch.at(5)
    apply_schedules(opt, lr, wd)
    t_before = {n: p.clone() for n, p in teacher.named_parameters()}
    loss = loss_fn(student(crops), teacher(crops[:2]), epoch=0)
    assert torch.isfinite(loss)
    loss.backward()
    clip_gradients(student, cfg.clip_grad)
    cancel_last_layer_gradients(student, 0, cfg.freeze_last_layer)
    opt.step()
    ema_update(teacher, student, m)
    s = dict(student.named_parameters())
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p, m * t_before[n] + (1 - m) * s[n].detach())


# -------------------------------------------------------------------- distributed


_WORKER = """
import importlib, os, sys, types
import torch
import torch.distributed as dist
# a light child: loss.py and dinofeat/runtime.py need only torch and numpy, so bare
# package shells stand in for dinofeat/__init__.py and dinofeat/training/__init__.py
training_dir = os.path.dirname(sys.argv[1])
for name, folder in (("dinofeat", os.path.dirname(training_dir)),
                     ("dinofeat.training", training_dir)):
    pkg = types.ModuleType(name)
    pkg.__path__ = [folder]
    sys.modules[name] = pkg
loss_mod = importlib.import_module("dinofeat.training.loss")
rank, world, init_file, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                        world_size=world)
b, k = 3, 6
g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
teacher = torch.randn(2 * b, k, generator=g)
student = torch.randn(3 * b, k, generator=g)
loss_fn = loss_mod.DINOLoss(k, 3, 0.04, 0.04, 0, 10, center_momentum=0.5)
loss_fn(student, teacher, 0)
q = loss_mod.sinkhorn_knopp(teacher * 2, 3)
torch.save({"teacher": teacher, "center": loss_fn.center, "sinkhorn": q}, out)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_centre_and_sinkhorn_are_global_across_processes(tmp_path):
    """Two gloo processes with different batches: the centre moves to the mean of both
    batches, and Sinkhorn-Knopp equals the one over the concatenated batch."""
    import subprocess
    import sys
    import dinofeat.training.loss as loss_module
    world = 2
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), loss_module.__file__, str(r),
                               str(world), str(tmp_path / "init"), str(tmp_path / f"r{r}.pt")],
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
             for r in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    res = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(world)]
    everything = torch.cat([r["teacher"] for r in res])
    expected_center = 0.5 * everything.mean(0, keepdim=True)  # m C0 + (1 - m) mean, C0 = 0
    for r in res:
        torch.testing.assert_close(r["center"], expected_center)
    torch.testing.assert_close(torch.cat([r["sinkhorn"] for r in res]),
                               sinkhorn_knopp(everything * 2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_adamw_and_fp16_loss():
    cfg = TrainConfig()
    net = _head_net().cuda()
    opt = build_optimizer(cfg, param_groups(net))
    assert opt.defaults.get("fused")
    student, teacher = random_outputs(3, 4, 16, seed=10)
    loss_fn = DINOLoss(16, 3, 0.04, 0.04, 0, 10).cuda()
    ref = reference_dino_loss(student.half().float(), teacher.half().float(),
                              torch.zeros(1, 16), 3, 0.1, 0.04)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = loss_fn(student.cuda().half(), teacher.cuda().half(), 0)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref, rel=1e-5)
    net(torch.randn(2, 3, 4, 4, device="cuda")).sum().backward()
    clip_gradients(net, 0.01)
    assert all(p.grad.norm() <= 0.01 + 1e-6 for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("loss_type", ["ce", "mse"])
def test_loss_and_clipping_make_no_host_sync(monkeypatch, loss_type):
    """No operation that waits for the GPU in every step: boolean-mask indexing, .item(),
    .tolist(), .nonzero() or a tensor's truth value (checked on CPU by trapping them)."""
    from dinofeat.training.loss import DINOLoss

    def trap(name):
        def f(*a, **k):
            raise AssertionError(f"host sync: Tensor.{name}")
        return f
    loss_fn = DINOLoss(16, 4, 0.04, 0.04, 0, 10, loss=loss_type)
    net = nn.Linear(8, 16)
    x = torch.randn(12, 8)
    getitem = torch.Tensor.__getitem__

    def no_mask(self, idx):
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
            raise AssertionError("host sync: boolean-mask indexing")
        return getitem(self, idx)
    for name in ("item", "tolist", "nonzero", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    monkeypatch.setattr(torch.Tensor, "__getitem__", no_mask)
    out = net(x)
    loss = loss_fn(out, out[:6].detach(), 0)
    loss.backward()
    clip_gradients(net, 0.5)
    monkeypatch.undo()
    assert math.isfinite(loss.item())


def test_last_layer_initialised_like_nn_linear():
    # the release builds its weight-normed last layer after the trunc-normal(0.02) pass, so
    # V keeps nn.Linear's default: kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in))
    in_dim, out_dim = 256, 4096
    torch.manual_seed(3)
    layer = WeightNormLinear(in_dim, out_dim, fix_gain=True)
    torch.manual_seed(3)
    ref = nn.Linear(in_dim, out_dim, bias=False)
    torch.testing.assert_close(layer.weight_v.detach(), ref.weight.detach(), rtol=0, atol=0)
    v = DINOHead(24, out_dim, hidden_dim=32, bottleneck_dim=in_dim).last_layer.weight_v.detach()
    bound = 1 / math.sqrt(in_dim)
    assert v.abs().max().item() <= bound
    # uniform on [-b, b]: std b/sqrt(3), row norm sqrt(in) * b / sqrt(3) = 1/sqrt(3) ~ 0.577
    assert v.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    norms = v.norm(dim=1)
    assert norms.mean().item() == pytest.approx(1 / math.sqrt(3), rel=0.02)
    assert norms.min().item() > 0.45  # trunc-normal 0.02 would give ~0.32
    # the quartiles of a uniform distribution, not a bell curve
    q = torch.quantile(v.flatten()[:100_000], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(q, torch.tensor([-bound / 2, bound / 2]), atol=bound * 0.03, rtol=0)


def test_short_run_scales_warmups_unless_set(caplog, tmp_path):
    import argparse
    import logging

    from dinofeat.training.config import add_arguments
    parser = add_arguments(argparse.ArgumentParser())
    with caplog.at_level(logging.INFO, logger="dinofeat"):
        cfg = TrainConfig.from_args(parser.parse_args(["--epochs", "1"])).validate()
    assert (cfg.epochs, cfg.warmup_epochs) == (1, 1)
    lines = [r.getMessage() for r in caplog.records if "warm-up" in r.getMessage()]
    assert len(lines) == 1 and "learning-rate warm-up 10 -> 1 epoch" in lines[0]
    # a preset's teacher-temperature warm-up (30 epochs) is scaled too: a tenth of the run
    cfg = TrainConfig.from_args(parser.parse_args(["--preset", "vit_s16_300ep", "--epochs",
                                                   "20"])).validate()
    assert (cfg.warmup_epochs, cfg.warmup_teacher_temp_epochs) == (10, 2)
    # long enough runs keep the release's warm-ups
    cfg = TrainConfig.from_args(parser.parse_args(["--epochs", "12"]))
    assert cfg.warmup_epochs == 10
    # set explicitly (command line or config file): the error stays
    with pytest.raises(ValueError, match="warm-up epochs exceed --epochs 1"):
        TrainConfig.from_args(parser.parse_args(["--epochs", "1", "--warmup-epochs", "5"])
                              ).validate()
    f = tmp_path / "c.json"
    f.write_text('{"warmup_epochs": 5}')
    with pytest.raises(ValueError, match="warm-up epochs exceed --epochs 2"):
        TrainConfig.from_args(parser.parse_args(["--config", str(f), "--epochs", "2"])
                              ).validate()


def test_help_says_defaults_are_not_the_papers_recipe():
    import argparse

    from dinofeat.training.config import PRESETS, add_arguments
    text = " ".join(add_arguments(argparse.ArgumentParser()).format_help().split())
    assert "not the paper's ViT-S/16 recipe; that one is --preset vit_s16_800ep" in text
    paper = PRESETS["vit_s16_800ep"]
    assert (paper["epochs"], paper["local_crops_number"]) == (800, 10)
    assert (TrainConfig().epochs, TrainConfig().local_crops_number) == (100, 8)


def test_fashion_mnist_recipes_come_from_the_one_preset():
    from dinofeat.demo import RECIPES
    from dinofeat.training.config import PRESETS
    cfg = TrainConfig.from_preset("fashion_mnist").validate()
    assert (cfg.arch, cfg.patch_size, cfg.batch_augment) == ("vit_mini7", 7, True)
    for recipe in RECIPES.values():
        for k, v in recipe.options.items():
            assert PRESETS["fashion_mnist"][k] == v, (recipe.name, k)


def test_crop_areas_and_colour_jitter_follow_the_recipe(monkeypatch):
    """Crop areas within the global (0.4, 1) / local (0.05, 0.4) scale ranges with their
    means near the middle, aspect ratios within (3/4, 4/3); colour jitter applied at rate
    0.8 with brightness/contrast factors in [0.6, 1.4], saturation in [0.8, 1.2] and hue
    in [-0.1, 0.1], all four in a random order."""
    from torchvision import transforms as v1
    areas: list[tuple[int, float, float]] = []
    orig_params = v1.RandomResizedCrop.get_params

    def record(img, scale, ratio):
        top, left, h, w = orig_params(img, scale, ratio)
        areas.append((round(scale[0] * 100), h * w / (img.size[0] * img.size[1]), w / h))
        return top, left, h, w
    jitters: list = []
    orig_jitter = v1.ColorJitter.get_params

    def record_jitter(*ranges):
        out = orig_jitter(*ranges)
        jitters.append(out)
        return out
    monkeypatch.setattr(v1.RandomResizedCrop, "get_params", staticmethod(record))
    monkeypatch.setattr(v1.ColorJitter, "get_params", staticmethod(record_jitter))
    aug = MultiCropAugmentation(local_crops_number=2, global_crop_size=32, local_crop_size=16)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), np.uint8))
    torch.manual_seed(0)
    n = 200
    for _ in range(n):
        aug(img)
    glob = np.array([a for s, a, _ in areas if s == 40])
    loc = np.array([a for s, a, _ in areas if s == 5])
    ratios = np.array([r for _, _, r in areas])
    assert len(glob) == 2 * n and len(loc) == 2 * n
    assert glob.min() >= 0.4 - 0.02 and glob.max() <= 1.0
    assert loc.min() >= 0.05 - 0.01 and loc.max() <= 0.4 + 0.01
    # the box is drawn with a uniform area fraction, rejected when it does not fit: the
    # mean stays near the middle of the range (large global boxes are rejected more often)
    assert 0.55 < glob.mean() < 0.72 and 0.19 < loc.mean() < 0.26
    assert ratios.min() >= 0.74 and ratios.max() <= 1.35
    rate = len(jitters) / (4 * n)
    assert abs(rate - 0.8) < 3 * math.sqrt(0.8 * 0.2 / (4 * n))
    b = np.array([j[1] for j in jitters])
    c = np.array([j[2] for j in jitters])
    s = np.array([j[3] for j in jitters])
    h = np.array([j[4] for j in jitters])
    assert b.min() >= 0.6 and b.max() <= 1.4 and c.min() >= 0.6 and c.max() <= 1.4
    assert s.min() >= 0.8 and s.max() <= 1.2 and h.min() >= -0.1 and h.max() <= 0.1
    assert abs(b.mean() - 1) < 0.05 and abs(h.mean()) < 0.015
    firsts = {int(j[0][0]) for j in jitters}
    assert firsts == {0, 1, 2, 3}  # every operation comes first sometimes
