"""dinofeat.runtime: device choice under launchers, process-group set-up, precision names,
CUDA numeric settings; checked on CPU with the launchers' environment variables set and
torch.cuda's answers replaced where a GPU would be needed."""

from __future__ import annotations

import datetime

import pytest
import torch

from dinofeat import runtime

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    for v in LAUNCH_VARS:
        monkeypatch.delenv(v, raising=False)

    def set_env(**kw):
        for k, v in kw.items():
            monkeypatch.setenv(k, str(v))
    return set_env


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs (device choice only; nothing runs on them)."""
    calls = {"set_device": []}

    def install(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "set_device",
                            lambda d: calls["set_device"].append(torch.device(d)))
        return calls
    return install


def test_precision_names_and_dtypes():
    assert runtime.PRECISIONS == ("fp32", "bf16", "fp16")
    assert runtime.autocast_dtype("fp32") is None
    assert runtime.autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert runtime.autocast_dtype("fp16", "cuda") is torch.float16
    assert runtime.autocast_dtype("fp16", "cpu") is torch.float16
    assert runtime.autocast_dtype("fp16", "cpu", cpu_fp16=False) is None  # training on CPU
    assert runtime.needs_loss_scaling("fp16", "cuda")
    assert not runtime.needs_loss_scaling("fp16", "cpu")
    assert not runtime.needs_loss_scaling("bf16", "cuda")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16.*'fp8'"):
        runtime.check_precision("fp8")
    with runtime.autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.bfloat16
    with runtime.autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype is torch.float32


def test_one_list_of_precisions_everywhere():
    from dinofeat.training.config import PRECISIONS, TrainConfig
    # training.config keeps a torch-free copy (so `--help` imports no torch); it must
    # equal the one list
    assert PRECISIONS == runtime.PRECISIONS
    cfg = TrainConfig(precision="fp16")
    assert cfg.autocast_dtype("cuda") is torch.float16 and cfg.autocast_dtype("cpu") is None
    assert cfg.uses_loss_scaling("cuda") and not cfg.uses_loss_scaling("cpu")


def test_launcher_ranks(env):
    assert runtime.launcher_ranks() == (0, 1, None)
    env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1)
    assert runtime.launcher_ranks() == (3, 4, 1)
    env(RANK=5)
    with pytest.raises(ValueError, match="RANK=5 is not in 0..WORLD_SIZE-1"):
        runtime.launcher_ranks()
    env(RANK="two")
    with pytest.raises(ValueError, match="RANK='two' is not an integer"):
        runtime.launcher_ranks()


def test_device_is_the_local_rank_gpu_under_torchrun(env, fake_gpus):
    fake_gpus(8)
    assert runtime.default_device() == torch.device("cuda", 0)  # alone: the current GPU
    env(RANK=11, WORLD_SIZE=16, LOCAL_RANK=3)
    assert runtime.default_device() == torch.device("cuda", 3)
    assert runtime.resolve_device("cuda") == torch.device("cuda", 3)  # not cuda:0
    assert runtime.resolve_device("cuda:5") == torch.device("cuda", 5)  # explicit wins
    assert runtime.resolve_device("cpu") == torch.device("cpu")


def test_without_local_rank_the_gpu_is_rank_modulo_device_count(env, fake_gpus):
    fake_gpus(4)
    env(RANK=6, WORLD_SIZE=8)  # srun / mpirun: no LOCAL_RANK
    assert runtime.local_device_index() == 2
    assert runtime.default_device() == torch.device("cuda", 2)


def test_no_cuda_means_cpu_even_under_torchrun(env, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1)
    assert runtime.default_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        runtime.resolve_device("cuda")


def test_load_defaults_to_the_local_rank_device(env, fake_gpus, monkeypatch, tmp_path):
    import dinofeat
    from dinofeat.model import DinoModel
    fake_gpus(4)
    env(RANK=2, WORLD_SIZE=4, LOCAL_RANK=2)
    moved = []
    monkeypatch.setattr(DinoModel, "to", lambda self, d: moved.append(d) or self)
    from dinofeat.backbones import build_backbone
    from dinofeat.model import save_safetensors
    m = DinoModel(build_backbone("vit_tiny", 16, img_size=32), name="t")
    save_safetensors(m, tmp_path / "t.safetensors")
    dinofeat.load(tmp_path / "t.safetensors", arch="vit_tiny16")
    assert moved == [torch.device("cuda", 2)]


def test_init_process_group_alone_does_nothing(env):
    assert runtime.init_process_group("cpu") == (0, 1, False)
    env(RANK=0, WORLD_SIZE=1)
    assert runtime.init_process_group("cpu") == (0, 1, False)


def test_init_process_group_needs_the_rendezvous_address(env):
    env(RANK=0, WORLD_SIZE=2)
    with pytest.raises(ValueError, match="MASTER_ADDR is not"):
        runtime.init_process_group("cpu")


def test_init_process_group_binds_this_rank_gpu(env, fake_gpus, monkeypatch):
    calls = fake_gpus(4)
    env(RANK=5, WORLD_SIZE=8, MASTER_ADDR="127.0.0.1", MASTER_PORT=29500)  # no LOCAL_RANK
    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda **kw: seen.update(kw))
    assert runtime.init_process_group("cuda") == (5, 8, True)
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 1)
    assert seen["rank"] == 5 and seen["world_size"] == 8
    assert calls["set_device"] == [torch.device("cuda", 1)]
    seen.clear()
    runtime.init_process_group("cpu", timeout=datetime.timedelta(hours=2))
    assert seen["backend"] == "gloo" and "device_id" not in seen
    assert seen["timeout"] == datetime.timedelta(hours=2)


@pytest.fixture
def restore_cuda_flags():
    saved = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
             torch.backends.cudnn.rnn.fp32_precision, torch.backends.cudnn.benchmark)
    yield
    (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
     torch.backends.cudnn.rnn.fp32_precision, torch.backends.cudnn.benchmark) = saved


def test_configure_cuda_states_ieee_fp32_and_benchmark(fake_gpus, restore_cuda_flags):
    fake_gpus(2)
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # cuDNN's own default
    runtime.configure_cuda("cpu", benchmark=True)       # nothing happens off CUDA
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    runtime.configure_cuda(torch.device("cuda", 1), benchmark=True)
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "ieee"
    assert torch.backends.cudnn.benchmark is True
    runtime.configure_cuda(torch.device("cuda", 1), benchmark=False)
    assert torch.backends.cudnn.benchmark is False


def test_training_sets_benchmark_for_convolutional_backbones(monkeypatch):
    from dinofeat.training import loop
    asked = []
    monkeypatch.setattr(runtime, "configure_cuda",
                        lambda dev, benchmark=False: asked.append(benchmark))
    for arch, want in (("resnet50", True), ("xcit_small_12", True), ("vit_small", False)):
        family, _, _ = loop.parse_arch(arch, 16)
        asked.clear()
        # the same expression the loop uses (kept in one place: _Run.setup)
        runtime.configure_cuda("cuda", benchmark=family in loop.CUDNN_BENCHMARK_FAMILIES)
        assert asked == [want], arch


def test_small_data_preset_keeps_mixed_precision_on_gpus():
    from dinofeat.training import TrainConfig, small_data_preset
    assert "precision" not in small_data_preset(32, 256)
    cfg = TrainConfig.from_preset("small_data")
    assert cfg.autocast_dtype("cuda") is torch.float16 and cfg.uses_loss_scaling("cuda")
    assert cfg.autocast_dtype("cpu") is None  # CPU: fp32, as before


def test_inference_on_cuda_is_ieee_fp32_inside_and_restored_after(restore_cuda_flags):
    from dinofeat.accel import fast_math
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # cuDNN's own default
    with fast_math("cuda"):
        assert torch.backends.cudnn.conv.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # the user's setting is back


def test_cli_features_take_this_process_gpu_under_srun(env, fake_gpus):
    import argparse

    from dinofeat.cli.common import features_device
    fake_gpus(4)
    env(RANK=5, WORLD_SIZE=8)  # no LOCAL_RANK: srun / mpirun
    args = argparse.Namespace(device=None)
    features_device(args)
    assert args.device == "cuda:1"
    args = argparse.Namespace(device="cpu")
    features_device(args)
    assert args.device == "cpu"  # an explicit choice is kept
