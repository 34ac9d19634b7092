"""Two-process training with torchrun on gloo (CPU): the processes stay in step (same
centre, teacher and student on both ranks), and the run equals one process with the same
total batch (DDP averages the gradients, the centre update averages over both ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dinofeat.training.checkpoint import load_checkpoint
from dinofeat.training.config import TrainConfig
from dinofeat.training.loop import train

from test_train_loop import make_images, tiny_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path):
    data = tmp_path / "imgs"
    make_images(data, 16, seed=3)
    # SGD (Adam would hide a wrong gradient scale), no drop-path (per-process random
    # streams), centre momentum 0.9: the all-reduced centre matters from step 1
    common = dict(optimizer="sgd", lr=5.0, warmup_epochs=0, epochs=1, drop_path_rate=0.0,
                  freeze_last_layer=0, warmup_teacher_temp_epochs=0, momentum_teacher=0.9)
    cfg2 = tiny_config(data, tmp_path / "ddp", batch_size_per_gpu=4, **common)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg2.to_dict()))
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import torch
        from dinofeat.training.config import TrainConfig
        from dinofeat.training.loop import train
        torch.set_num_threads(1)
        def dump(state):
            if state.event == "epoch":
                torch.save({{"center": state.dino_loss.center.cpu(),
                            "student": {{k: v.cpu() for k, v in state.student.state_dict().items()}},
                            "teacher": {{k: v.cpu() for k, v in state.teacher.state_dict().items()}}}},
                           {str(tmp_path)!r} + f"/rank{{state.rank}}.pt")
        res = train(TrainConfig.from_json_file({str(tmp_path / "cfg.json")!r}), callbacks=[dump])
        # one file per rank: two processes printing to one pipe interleave their lines
        with open({str(tmp_path)!r} + f"/result{{os.environ['RANK']}}.txt", "w") as f:
            f.write(f"{{res.iteration}} {{res.history[-1]['loss']}}")
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # 16 images / (2 processes x 4) = 2 steps
        assert (tmp_path / f"result{rank}.txt").read_text().split()[0] == "2"

    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["center"], r1["center"])
    for part in ("student", "teacher"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k} differs between ranks"
    ck = load_checkpoint(tmp_path / "ddp" / "checkpoint.pth")  # written by rank 0 only
    assert ck["data"]["world_size"] == 2 and len(ck["rng"]) == 2
    log_lines = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert sum('"type": "step"' in line for line in log_lines) == 2

    # one process, batch 8: the same images per step, the same result up to rounding
    one = train(tiny_config(data, tmp_path / "single", batch_size_per_gpu=8, **common))
    ck1 = load_checkpoint(one.run_dir / "checkpoint.pth")
    assert torch.allclose(ck1["dino_loss"]["center"], r0["center"], rtol=1e-4, atol=1e-6)
    for k, v in ck1["student"].items():
        assert torch.allclose(v, ck["student"][k], rtol=1e-4, atol=1e-6), k
    assert one.history[0]["loss"] == pytest.approx(
        json.loads([ln for ln in log_lines if '"type": "epoch"' in ln][0])["loss"], rel=1e-5)
