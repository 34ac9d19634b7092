"""dinofeat.onednn: pre-packed oneDNN linear layers for CPU inference, against the plain
``nn.Linear`` computation (float64 as the independent reference), and the bookkeeping
around them: gradients, restoring modules, weight changes, threads."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from dinofeat import accel, onednn
from dinofeat.backbones import build_backbone
from dinofeat.model import DinoModel

pytestmark = pytest.mark.skipif(not onednn.available(), reason="no oneDNN operators")


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return Mlp(64, 256).eval()


def test_fp32_linear_and_fused_mlp_match_float64():
    mlp, x = _mlp(), _x(3, 50, 64)
    with torch.no_grad():
        ref = mlp.double()(x.double())
    mlp.float()
    with torch.inference_mode():
        plain = mlp(x)
        with onednn.packed_linears(mlp):
            packed = mlp(x)
    assert packed.dtype == torch.float32 and packed.shape == (3, 50, 64)
    scale = float(ref.abs().max())
    assert float((packed.double() - ref).abs().max()) <= 1e-5 * scale
    assert float((plain.double() - ref).abs().max()) <= 1e-5 * scale
    # the fused GELU is the exact (erf) one: tanh's approximation differs by ~1e-3
    tanh = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")).detach()
    assert float((tanh.double() - ref).abs().max()) > 10 * float((packed.double() - ref)
                                                                   .abs().max())


def test_bf16_under_autocast_is_as_accurate_as_autocast():
    mlp, x = _mlp(), _x(400, 64)
    with torch.no_grad():
        ref = mlp.double()(x.double())
    mlp.float()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = mlp(x)
        with onednn.packed_linears(mlp):
            packed = mlp(x)
    assert packed.dtype == torch.bfloat16
    err_plain = float((plain.double() - ref).abs().max())
    err_packed = float((packed.double() - ref).abs().max())
    assert 1e-4 < err_packed <= 2 * err_plain  # really bf16, and no worse than autocast


def test_gradients_fp16_and_training_use_the_modules_own_forward():
    mlp, x = _mlp(), _x(10, 64)
    with onednn.packed_linears(mlp):
        y = mlp(x)  # gradients on: nn.Linear itself
        assert y.grad_fn is not None
        y.sum().backward()
        assert mlp.fc1.weight.grad is not None
    mlp.half()
    with onednn.packed_linears(mlp), torch.no_grad():
        y16 = mlp(x.half())  # fp16: not a dtype packed here, the modules' own forward
    assert y16.dtype == torch.float16 and onednn._packs.get(mlp.fc1, {}).get(
        torch.float16) is None
    mlp.train()
    with onednn.packed_linears(mlp), torch.no_grad():
        mlp.float()(x)  # training mode: the Mlp's own forward (dropout would apply)


def test_modules_restored_nested_and_compiled_forward_kept():
    mlp = _mlp()
    own = object()
    lin = nn.Linear(4, 4)
    lin.forward = own  # a user's (or torch.compile's) replacement is left alone
    model = nn.Sequential(mlp, lin)
    with onednn.packed_linears(model):
        assert "forward" in mlp.__dict__ and "forward" in mlp.fc1.__dict__
        with onednn.packed_linears(model):
            pass
        assert "forward" in mlp.__dict__  # the outer user is still inside
    assert all("forward" not in m.__dict__ for m in mlp.modules())
    assert lin.forward is own


def test_weight_changes_are_followed():
    lin, x = nn.Linear(8, 5).eval(), _x(6, 8)
    with onednn.packed_linears(lin), torch.no_grad():
        a = lin(x)
        lin.weight.mul_(2)  # in place
        b = lin(x)
        lin.weight = nn.Parameter(torch.zeros(5, 8))  # another tensor
        c = lin(x)
    assert torch.allclose(b - lin.bias, 2 * (a - lin.bias), atol=1e-5)
    assert torch.allclose(c, lin.bias.expand(6, 5))


def test_copy_after_use():
    mlp, x = _mlp(), _x(4, 64)
    with onednn.packed_linears(mlp), torch.inference_mode():
        y = mlp(x)
    twin = copy.deepcopy(mlp)  # no packed tensor travels with the module
    with onednn.packed_linears(twin), torch.inference_mode():
        assert torch.allclose(twin(x), y, atol=1e-6)


def test_threads_share_a_model():
    mlp, x = _mlp(), _x(64, 64)
    with torch.inference_mode():
        ref = mlp(x)
    out, errors = [], []

    def work():
        try:
            for _ in range(20):
                with onednn.packed_linears(mlp), torch.inference_mode():
                    out.append(mlp(x))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 60
    assert all(torch.allclose(o, ref, atol=1e-5) for o in out)
    assert all("forward" not in m.__dict__ for m in mlp.modules())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_vit_features_through_fast_inference(precision, monkeypatch):
    """A ViT-S/16 with every linear packed (as when the probe picks oneDNN) stays within
    the precision's feature tolerance of the plain fp32 computation."""
    torch.manual_seed(0)
    model = DinoModel(build_backbone("vit_s16"), name="r").eval()
    x = _x(2, 3, 224, 224, seed=1)
    with torch.inference_mode():
        ref = model.backbone(x)
    monkeypatch.setattr(accel, "_may_pack", lambda p: True)
    rows_seen = []
    monkeypatch.setattr(accel, "linear_kernel",
                        lambda p, rows=0: rows_seen.append(rows) or "onednn")
    with torch.inference_mode(), accel.fast_inference(model, precision):
        assert "forward" in model.backbone.vit.blocks[0].mlp.__dict__
        fast = model.backbone(x).float()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert 2 * 197 in rows_seen and 2 in rows_seen  # all tokens; the [CLS]-only last block
    kind, tol = accel.FEATURE_TOLERANCES[precision]
    if kind == "max_abs":
        assert float((fast - ref).abs().max()) <= tol
    else:
        assert float(F.cosine_similarity(fast, ref).min()) >= tol


def test_probe_records_its_evidence(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOFEAT_PROBE", "1")
    monkeypatch.setenv("DINOFEAT_CACHE_DIR", str(tmp_path))
    choice = accel.linear_kernel("bf16", rows=1000)
    rec = accel.platform_report()["probes"]["linear/cpu/bf16/1024"]
    assert rec["rows"] == 769
    assert choice == rec["choice"] in ("onednn", "aten")
    assert set(rec["seconds"]) == {"aten", "onednn"} and rec["accurate"] in (True, False)
    if choice == "onednn":
        assert rec["accurate"] and rec["seconds"]["onednn"] < rec["seconds"]["aten"]
    assert accel.linear_kernel("fp16") == "aten"
    # the packed path per call follows the probe of the call's row bucket
    assert accel._packed_rows(torch.bfloat16, 1000) == (choice == "onednn")
    assert not accel._packed_rows(torch.float16, 1000)
    monkeypatch.setenv("DINOFEAT_PROBE", "0")
    assert accel.linear_kernel("bf16") == "aten"  # no probing: nn.Linear as it is
