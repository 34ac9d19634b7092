"""dinofeat.accel: the platform self-check, the kernels it picks, and the accuracy each
precision is held to (fp32 fast path <= 1e-4 abs, bf16 cosine >= 0.9999 on a
ViT-S/16-sized model), and that the user's global settings survive dinofeat calls."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from dinofeat import accel
from dinofeat.backbones import build_backbone
from dinofeat.model import DinoModel


@pytest.fixture(scope="module")
def vit_s16():
    """A ViT-S/16 (12 blocks, dim 384, 6 heads) with the DINO release's random init and
    two smooth 224x224 images, normalised."""
    torch.manual_seed(0)
    model = DinoModel(build_backbone("vit_s16"), name="vit_s16-random").eval()
    g = torch.Generator().manual_seed(1)
    y, x = torch.meshgrid(torch.linspace(-1, 1, 224), torch.linspace(-1, 1, 224),
                          indexing="ij")
    base = torch.stack([torch.sin(3 * x + c) * torch.cos(2 * y - c) for c in range(3)])
    imgs = torch.stack([base, base.flip(-1) * 0.7]) + 0.3 * torch.randn(2, 3, 224, 224,
                                                                        generator=g)
    return model, imgs


@pytest.fixture(scope="module")
def reference(vit_s16):
    """The plain computation of vit_s16's features: default matmul kernels, fused
    attention, fp32."""
    model, x = vit_s16
    with torch.inference_mode(), accel._onednn_setting("none"), \
            accel.attention_mode(model, fused=True):
        return model.backbone(x)


# ----------------------------------------------------------------- self-check
def test_relative_error_tells_fp32_from_bf16():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 384, generator=g), torch.randn(384, 32, generator=g)
    ref = a.double() @ b.double()
    fp32 = accel._relative_error(a @ b, a, b, ref)
    bf16 = accel._relative_error((a.bfloat16() @ b.bfloat16()).float(), a, b, ref)
    assert fp32 < 1e-6 < accel.FP32_LEVEL
    assert bf16 > 10 * accel.FP32_LEVEL  # bf16's unit roundoff is 2**-9 ~ 2e-3


def test_self_check_on_this_machine():
    check = accel.check_onednn_fp32()
    if not check.available:
        pytest.skip(check.reason)
    assert check.default_error < accel.FP32_LEVEL
    # the verdict follows the measured errors
    assert check.fp32_level == (max(check.linear_error, check.bmm_error) <= accel.FP32_LEVEL)
    assert torch.backends.mkldnn.matmul.fp32_precision == "none"  # restored


def test_self_check_rejects_reduced_precision(monkeypatch):
    """On a CPU where the oneDNN switch computes in bf16 (AMX), the check must say no and
    fast_math must leave fp32 on the default kernels."""
    real = accel._matmul_errors

    def errors():
        if torch.backends.mkldnn.matmul.fp32_precision == "bf16":
            return 3e-3, 2e-3  # what bf16 arithmetic gives
        return real()

    monkeypatch.setattr(accel, "_matmul_errors", errors)
    if not accel._onednn_switch_exists():
        pytest.skip("no oneDNN switch in this PyTorch")
    check = accel.check_onednn_fp32()
    assert check.available and not check.fp32_level and "reduced precision" in check.reason
    accel.onednn_fp32_available.cache_clear()
    try:
        assert accel.onednn_fp32_available() is False
        with accel.fast_math("cpu"):
            assert torch.backends.mkldnn.matmul.fp32_precision == "none"
    finally:
        accel.onednn_fp32_available.cache_clear()


def test_fast_math_restores_user_setting():
    if not accel._onednn_switch_exists():
        pytest.skip("no oneDNN switch in this PyTorch")
    old = torch.backends.mkldnn.matmul.fp32_precision
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        with accel.fast_math("cpu"):
            inside = torch.backends.mkldnn.matmul.fp32_precision
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        assert inside == ("bf16" if accel.onednn_fp32_available() else "ieee")
        with pytest.raises(RuntimeError, match="boom"), accel.fast_math("cpu"):
            raise RuntimeError("boom")
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
        with accel.fast_math("cuda"):  # GPUs: no change (no TF32 for fp32)
            assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old


def test_fast_math_from_several_threads_restores_user_setting():
    """Calls overlapping in two threads: the switch stays on while either is inside and
    the user's value comes back after the last one leaves."""
    import threading
    if not accel.onednn_fp32_available():
        pytest.skip("oneDNN fp32 path not used on this machine")
    old = torch.backends.mkldnn.matmul.fp32_precision
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with accel.fast_math("cpu"):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with accel.fast_math("cpu"):
            b_in.set()
            a_out.wait(5)
            seen["b_after_a_left"] = torch.backends.mkldnn.matmul.fp32_precision

    try:
        torch.backends.mkldnn.matmul.fp32_precision = "ieee"
        threads = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert seen["b_after_a_left"] == "bf16"
        assert torch.backends.mkldnn.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old


def test_bad_precision():
    with pytest.raises(ValueError, match="precision"):
        with accel.fast_inference(None, "int8"):
            pass


# -------------------------------------------------------------- kernel choice
def test_attention_mode_switches_and_restores(vit_s16):
    model, _ = vit_s16
    mods = accel._attention_modules(model)
    assert len(mods) == 12
    before = [m.fused_attn for m in mods]
    with accel.attention_mode(model, fused=False):
        assert not any(m.fused_attn for m in mods)
    assert [m.fused_attn for m in mods] == before


def test_fast_inference_picks_attention_per_platform(vit_s16):
    model, _ = vit_s16
    mods = accel._attention_modules(model)
    assert accel.uses_explicit_attention("cpu", "bf16")
    assert accel.uses_explicit_attention("cpu", "bf16", tokens=197)
    assert not accel.uses_explicit_attention("cpu", "bf16", tokens=785)
    assert not accel.uses_explicit_attention("cpu", "fp32")
    assert not accel.uses_explicit_attention("cuda", "fp16")
    with accel.fast_inference(model, "bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with accel.fast_inference(model, "fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert all(m.fused_attn for m in mods)


def test_attention_choice_by_length(vit_s16):
    model, _ = vit_s16
    mods = accel._attention_modules(model)
    flags = []
    with torch.inference_mode(), accel.fast_inference(model, "bf16", "cpu"):
        for size in (224, 464):
            handle = mods[0].proj.register_forward_pre_hook(  # after the kernel ran
                lambda m, a: flags.append(mods[0].fused_attn))
            try:
                model.backbone(torch.randn(1, 3, size, size))
            finally:
                handle.remove()
    assert flags == [False, True]  # explicit for 197 tokens, fused for 842
    assert all(m.fused_attn for m in mods)


def test_explicit_attention_equals_fused_in_fp32(vit_s16):
    model, x = vit_s16
    x = x[:1, :, :64, :64]
    with torch.inference_mode():
        fused = model.backbone(x)
        with accel.attention_mode(model, fused=False):
            explicit = model.backbone(x)
    assert (fused - explicit).abs().max() < 1e-5


# ------------------------------------------------------------------- accuracy
def test_fp32_fast_path_within_1e4(vit_s16, reference):
    model, x = vit_s16
    ref = reference
    with torch.inference_mode(), accel.fast_inference(model, "fp32"):
        fast = model.backbone(x)
    tol = accel.FEATURE_TOLERANCES["fp32"][1]
    assert (fast - ref).abs().max() <= tol
    with torch.inference_mode():  # DinoModel's own forward runs the fast path too
        assert (model(x) - ref).abs().max() <= tol


def test_bf16_cosine_at_least_09999(vit_s16, reference):
    model, x = vit_s16
    ref = reference
    with torch.inference_mode(), accel.fast_inference(model, "bf16"):
        fast = model.backbone(x).float()
    cos = F.cosine_similarity(fast, ref, dim=-1)
    assert cos.min() >= accel.FEATURE_TOLERANCES["bf16"][1], cos
    assert (fast - ref).abs().max() > 1e-4  # really computed in bf16


def test_embed_runs_fast_path_and_restores(vit_s16, reference):
    model, x = vit_s16
    ref = F.normalize(reference, dim=-1)
    old = torch.backends.mkldnn.matmul.fp32_precision
    feats = model.embed(x, precision="bf16", batch_size=2)
    assert torch.backends.mkldnn.matmul.fp32_precision == old
    assert all(m.fused_attn for m in accel._attention_modules(model))
    assert F.cosine_similarity(feats, ref, dim=-1).min() >= 0.9999


def test_configure_cpu_and_report():
    old = torch.backends.mkldnn.matmul.fp32_precision
    threads = torch.get_num_threads()
    try:
        report = accel.configure_cpu(num_threads=threads)
        assert report["threads"] == threads
        assert set(report["onednn_fp32"]) >= {"available", "fp32_level", "reason"}
        expected = "bf16" if accel.onednn_fp32_available() else old
        assert torch.backends.mkldnn.matmul.fp32_precision == expected
        with pytest.raises(ValueError):
            accel.configure_cpu(num_threads=0)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old
        torch.set_num_threads(threads)


def test_compile_model_keeps_state_dict():
    torch.manual_seed(0)
    model = DinoModel(build_backbone("vit_tiny16", img_size=32), name="t").eval()
    keys = list(model.state_dict())
    accel.compile_model(model)
    assert list(model.state_dict()) == keys
    assert hasattr(model.backbone.forward_tokens, "_torchdynamo_orig_callable")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_gpu(vit_s16, reference):  # pragma: no cover - no GPU in CI
    model, x = vit_s16
    ref = reference
    model.cuda()
    try:
        with torch.inference_mode(), accel.fast_inference(model, "fp16"):
            fast = model.backbone(x.cuda()).float().cpu()
    finally:
        model.cpu()
    assert F.cosine_similarity(fast, ref, dim=-1).min() >= 0.9999


# ------------------------------------------------------------------------ probes
def test_probes_measure_once_and_are_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOFEAT_PROBE", "1")
    monkeypatch.setenv("DINOFEAT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(accel, "_busy", lambda load: False)  # the CI machine may be busy
    assert accel.probing_enabled()
    path = accel.probe_cache_path()
    assert path.parent == tmp_path and path.name.startswith("probes-")
    calls = []

    def run():
        calls.append(1)
        return {"choice": "a", "seconds": {"a": 1.0, "b": 2.0}}

    assert accel.probe("test/x", run)["choice"] == "a"
    assert accel.probe("test/x", run)["choice"] == "a" and len(calls) == 1
    assert accel.attention_kernel("cpu", "bf16", 197) in ("fused", "explicit")
    assert accel.attention_kernel("cuda", "bf16", 197) == "fused"
    assert accel.exact_search_kernel(32) in ("faiss", "torch")
    rep = accel.platform_report()
    assert {"test/x", "attention/cpu/bf16/256", "exact_search/32"} <= set(rep["probes"])
    assert rep["probes"]["attention/cpu/bf16/256"]["seconds"].keys() == {"fused", "explicit"}
    accel._probe_mem.clear()  # a new process reads the file
    assert accel.probe("test/x", run)["choice"] == "a" and len(calls) == 1
    accel.clear_probes()
    assert not path.exists()
    monkeypatch.setenv("DINOFEAT_PROBE", "0")
    assert accel.probe("test/x", run) is None
    assert accel.exact_search_kernel(32) == "faiss"


def test_probe_on_a_busy_machine_is_not_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("DINOFEAT_PROBE", "1")
    monkeypatch.setenv("DINOFEAT_CACHE_DIR", str(tmp_path))
    cores = len(os.sched_getaffinity(0))
    assert accel._busy([2.0 * cores, 0, 0]) and not accel._busy([0.5 * cores, 0, 0])
    monkeypatch.setattr(accel, "_busy", lambda load: True)
    calls = []

    def run():
        calls.append(1)
        return {"choice": "a"}

    assert accel.probe("test/busy", run)["choice"] == "a"
    assert accel.probe("test/busy", run)["choice"] == "a" and len(calls) == 1  # this process
    assert not accel.probe_cache_path().exists()
    accel._probe_mem.clear()  # the next process measures again
    accel.probe("test/busy", run)
    assert len(calls) == 2


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_torch_exact_search_matches_faiss(metric, monkeypatch):
    import faiss
    import numpy as np
    monkeypatch.setattr(accel, "SEARCH_CHUNK", 700)  # several database chunks
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((2000, 48)).astype(np.float32)
    xq = rng.standard_normal((300, 48)).astype(np.float32)
    index = faiss.IndexFlatIP(48) if metric == "ip" else faiss.IndexFlatL2(48)
    index.add(xb)
    s_ref, i_ref = index.search(xq, 7)
    s, i = accel.exact_search(xb, xq, 7, metric)
    assert (i == i_ref).all()
    assert np.abs(s - s_ref).max() < 1e-3


def test_model_cost_estimate(vit_s16):
    model, _ = vit_s16
    flops = accel.model_flops(model, 224, 224)
    assert 8.5e9 < flops < 10e9  # ViT-S/16 at 224: ~9.2 GFLOP (multiply + add)
    assert accel.model_seconds_per_image(model, 224, 224, "fp32") > 0


def test_doctor_shows_choices(tmp_path, monkeypatch, capsys):
    import json

    from dinofeat.cli import main
    assert main(["doctor", "--no-probe"]) == 0
    assert "probing is off" in capsys.readouterr().out
    monkeypatch.setenv("DINOFEAT_PROBE", "1")
    monkeypatch.setenv("DINOFEAT_CACHE_DIR", str(tmp_path))
    accel.probe("attention/cpu/bf16/256", lambda: {"choice": "fused",
                                                   "seconds": {"fused": 0.1, "explicit": 0.2}})
    assert main(["doctor", "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "attention/cpu/bf16/256" in out and "fused" in out and "explicit 200.0 ms" in out
    assert main(["doctor", "--no-probe", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["probes"]["attention/cpu/bf16/256"]["choice"] == "fused"
