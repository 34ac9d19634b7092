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


_RESUME_WORKER = """
import os, sys
import torch
from dinofeat.training.config import TrainConfig
from dinofeat.training.loop import train
torch.set_num_threads(1)
rank = int(os.environ["RANK"])
tmp, stop = sys.argv[1], sys.argv[2] == "stop"
cfg = TrainConfig.from_json_file(tmp + "/cfg.json")
# rank 1 looks at another folder: as on a second machine without the run folder
out = cfg.output_dir if rank == 0 else cfg.output_dir + "_elsewhere"

class Stop(Exception):
    pass

def cb(state):
    if state.event != "epoch":
        return
    if stop:
        raise Stop
    torch.save({"center": state.dino_loss.center.cpu(),
                "student": {k: v.cpu() for k, v in state.student.state_dict().items()},
                "teacher": {k: v.cpu() for k, v in state.teacher.state_dict().items()},
                "iteration": state.iteration, "epoch": state.epoch},
               tmp + f"/resumed{rank}.pt")

try:
    res = train(cfg, callbacks=[cb], output_dir=out)
except Stop:
    pass
"""


@pytest.mark.slow
def test_resume_under_two_processes_follows_rank_0(tmp_path):
    """Rank 0 decides to resume and every rank continues from its checkpoint (teacher,
    centre, student, optimizer), even a rank whose disk has no checkpoint."""
    data = tmp_path / "imgs"
    make_images(data, 16, seed=4)
    cfg = tiny_config(data, tmp_path / "run", batch_size_per_gpu=4, epochs=2,
                      drop_path_rate=0.0)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    script = tmp_path / "worker.py"
    script.write_text(_RESUME_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def launch(mode):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", "2", str(script), str(tmp_path), mode],
                              env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=400)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch("stop")  # epoch 1 done and saved by rank 0 only
    assert (tmp_path / "run" / "checkpoint.pth").is_file()
    assert not (tmp_path / "run_elsewhere").exists()
    launch("go")
    r0 = torch.load(tmp_path / "resumed0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "resumed1.pt", weights_only=True)
    assert r0["epoch"] == r1["epoch"] == 1  # both ran only the second epoch
    assert r0["iteration"] == r1["iteration"] == 4  # 16 images / (2 x 4) x 2 epochs
    assert torch.equal(r0["center"], r1["center"])
    for part in ("student", "teacher"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part}.{k} differs between ranks"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r.get("type") == "event"] == ["start", "resume"]


_KNN_WORKER = """
import sys, json
import torch
import torch.distributed as dist
from dinofeat.backbones import build_backbone
from dinofeat.training.knn import online_knn
from dinofeat.zoo import Preprocessing
torch.set_num_threads(1)
rank, world, init, root, out, fail = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                      sys.argv[4], sys.argv[5], sys.argv[6] == "fail")
if world > 1:
    dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=world)
torch.manual_seed(0)
net = build_backbone("vit_tiny", 16, img_size=32)
if fail and rank == 1:  # this process alone breaks
    def boom(*a, **k):
        raise MemoryError("out of memory (simulated)")
    net.forward = boom
prep = Preprocessing(mode="dino", resize_size=36, crop_size=32)
try:
    res = online_knn(net, root, prep, torch.device("cpu"), batch_size=4, k=5)
except Exception as e:
    res = {"error": f"{type(e).__name__}: {e}"}
json.dump(res, open(out, "w"))
if world > 1:  # leave the group together: a gloo group torn down at exit can abort
    dist.barrier()
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_online_knn_is_shared_by_the_processes_and_fails_on_all(tmp_path):
    """Two processes each embed half of the k-NN sets and give the one-process result;
    an exception on one process is raised on both (no process waits for the other)."""
    knn_root = tmp_path / "knn"
    make_images(knn_root / "train", 11, seed=5)  # odd counts: unequal shares
    make_images(knn_root / "val", 7, seed=6)
    script = tmp_path / "knn_worker.py"
    script.write_text(_KNN_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def run(world, mode):
        init = tmp_path / f"init_{mode}_{world}"
        outs = [tmp_path / f"{mode}{world}_{r}.json" for r in range(world)]
        procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(init),
                                   str(knn_root), str(outs[r]), mode], env=env,
                                  stderr=subprocess.PIPE, text=True) for r in range(world)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
        return [json.loads(o.read_text()) for o in outs]

    (alone,) = run(1, "ok")
    assert alone["knn_train"] == 11 and alone["knn_val"] == 7 and alone["knn_k"] == 5
    shared = run(2, "ok")
    assert shared[0] == shared[1]
    for key in ("knn_top1", "knn_top5", "knn_train", "knn_val", "knn_k"):
        assert shared[0][key] == pytest.approx(alone[key]), key
    failed = run(2, "fail")
    assert failed[1]["error"].startswith("MemoryError: out of memory (simulated)")
    assert failed[0]["error"].startswith("OnlineKnnError: online k-NN (features) failed on "
                                         "process 1: MemoryError")
