"""The DINO training loop: exact resume, schedules in the log, teacher switches, bad data,
non-finite losses, release checkpoints, the CLI. Tiny ViT (vit_tiny16 at 32 px global /
16 px local crops), small head, a few generated images, CPU only."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinofeat
from dinofeat.weights import read_checkpoint
from dinofeat.training.checkpoint import load_checkpoint
from dinofeat.training.config import TrainConfig
from dinofeat.training.loop import NonFiniteLossError, TrainState, build_networks, train

REPO = Path(__file__).resolve().parents[1]
WATCHED = ("backbone.vit.cls_token", "backbone.vit.blocks.0.attn.qkv.weight",
           "head.mlp.0.weight", "head.last_layer.weight_v")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: results must not depend on it, and the shared CPU is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` small random photos in two class folders; one of them greyscale."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        d = folder / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        h, w = 36 + (i % 3) * 4, 44
        if i == 3:
            img = Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8), "L")
        else:
            base = rng.integers(0, 255, (1, 1, 3)) * (i % 2)
            img = Image.fromarray(np.clip(rng.integers(0, 120, (h, w, 3)) + base, 0, 255)
                                  .astype(np.uint8))
        p = d / f"img{i:03d}.png"
        img.save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train_images")
    make_images(d, 16)
    return d


def tiny_config(data, out, **kw) -> TrainConfig:
    base = dict(arch="vit_tiny16", out_dim=64, hidden_dim=64, bottleneck_dim=32,
                global_crop_size=32, local_crop_size=16, local_crops_number=2,
                batch_size_per_gpu=4, epochs=2, warmup_epochs=1, momentum_teacher=0.99,
                warmup_teacher_temp=0.03, teacher_temp=0.05, warmup_teacher_temp_epochs=2,
                num_workers=0, log_every=1, precision="fp32", saveckp_freq=0,
                data=str(data), output_dir=str(out))
    base.update(kw)
    return TrainConfig(**base)


class Recorder:
    """Callback keeping, after every step, a few student/teacher tensors and the
    optimiser's lr/weight decay per group."""

    def __init__(self):
        self.steps: list[dict] = []

    def __call__(self, state: TrainState) -> None:
        if state.event != "step":
            return
        s = dict(state.student.named_parameters())
        t = dict(state.teacher.named_parameters())
        self.steps.append({
            "iteration": state.iteration - 1, "epoch": state.epoch, "step": state.step - 1,
            "student": {k: s[k].detach().clone() for k in WATCHED},
            "teacher": {k: t[k].detach().clone() for k in WATCHED},
            "groups": [(g["lr"], g["weight_decay"]) for g in state.optimizer.param_groups],
            "center": state.dino_loss.center.clone(),
        })


def read_log(run: Path, kind: str) -> list[dict]:
    with open(run / "log.jsonl") as f:
        return [r for r in map(json.loads, f) if r.get("type") == kind]


def assert_same_state(a: dict, b: dict) -> None:
    """Two training checkpoints hold bit-identical networks, centre and optimiser."""
    for key in ("student", "teacher"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), f"{key}.{k} differs"
    assert torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), \
                f"optimizer state {i}.{k} differs"
    assert a["epoch"] == b["epoch"] and a["iteration"] == b["iteration"]


@pytest.fixture(scope="module")
def reference(image_dir, tmp_path_factory):
    """One uninterrupted run (2 epochs x 4 steps) with every step recorded."""
    out = tmp_path_factory.mktemp("ref") / "run"
    rec = Recorder()
    result = train(tiny_config(image_dir, out), callbacks=[rec])
    return {"out": out, "result": result, "rec": rec,
            "ckpt": load_checkpoint(out / "checkpoint.pth")}


# ----------------------------------------------------------------- end to end
def test_end_to_end_run_writes_a_loadable_checkpoint(reference):
    res, out = reference["result"], reference["out"]
    assert res.run_dir == out and res.epoch == 2 and res.iteration == 8
    assert [h["epoch"] for h in res.history] == [0, 1]
    assert all(math.isfinite(h["loss"]) for h in res.history)
    assert res.skipped_images == 0 and res.collapsed is False
    assert {"checkpoint.pth", "config.json", "log.jsonl"} <= {p.name for p in out.iterdir()}
    assert TrainConfig.from_json_file(out / "config.json") == tiny_config(
        reference["ckpt"]["config"]["data"], out)

    ckpt = read_checkpoint(out / "checkpoint.pth")  # weights_only=True: plain data only
    assert all(k.split(".")[0] in ("backbone", "head") for k in ckpt["teacher"])
    meta = ckpt["dinofeat"]
    assert meta["arch"] == "vit_tiny16" and meta["pos_embed_interp"] == "dino"
    assert meta["preprocessing"]["crop_size"] == 32 and meta["preprocessing"]["mode"] == "dino"

    model = dinofeat.load(out, device="cpu")
    assert model.embed_dim == 192 and model.patch_size == 16
    assert model.preprocessing.crop_size == 32 and model.preprocessing.resize_size == 37
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, ckpt["teacher"][f"backbone.{k}"]), k
    x = torch.randn(2, 3, 32, 32)
    student, teacher = build_networks(TrainConfig(**ckpt["config"]))
    teacher.backbone.load_state_dict(model.backbone.state_dict())
    teacher.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), teacher.backbone(x), rtol=1e-4, atol=1e-5)


def test_logged_schedules_follow_the_formulas(reference):
    """lr, weight decay, teacher momentum and temperature of every step, recomputed from
    the paper's formulas, and the values actually written into the optimiser."""
    cfg = tiny_config("x", "y")
    steps = read_log(reference["out"], "step")
    assert [r["iteration"] for r in steps] == list(range(8))
    ipe, total = 4, 8
    peak = cfg.lr * cfg.batch_size_per_gpu / 256
    for r, rec in zip(steps, reference["rec"].steps):
        i = r["iteration"]
        if i < ipe:  # linear warm-up from 0, reaching the peak at its last step
            lr = peak * i / (ipe - 1)
        else:
            j, n = i - ipe, total - ipe
            lr = cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * j / n))
        wd = cfg.weight_decay_end + 0.5 * (cfg.weight_decay - cfg.weight_decay_end) * (
            1 + math.cos(math.pi * i / total))
        mom = 1 - (1 - cfg.momentum_teacher) * (math.cos(math.pi * i / total) + 1) / 2
        e = r["epoch"]
        temp = cfg.warmup_teacher_temp + (cfg.teacher_temp - cfg.warmup_teacher_temp) * e / (
            cfg.warmup_teacher_temp_epochs - 1)
        assert r["lr"] == pytest.approx(lr, rel=1e-9, abs=1e-15)
        assert r["wd"] == pytest.approx(wd, rel=1e-9)
        assert r["momentum"] == pytest.approx(mom, rel=1e-12)
        assert r["teacher_temp"] == pytest.approx(temp, rel=1e-9)
        # written into the optimiser: lr everywhere, weight decay on the decayed group only
        (lr0, wd0), (lr1, wd1) = rec["groups"]
        assert lr0 == lr1 == pytest.approx(r["lr"], rel=1e-12, abs=1e-15)
        assert wd0 == pytest.approx(r["wd"], rel=1e-12) and wd1 == 0.0
        for field in ("loss", "images_per_s", "rss_mb", "teacher_entropy", "center_norm",
                      "teacher_std", "time"):
            assert math.isfinite(r[field]), field
        assert 0 < r["teacher_entropy"] <= math.log(cfg.out_dim) + 1e-5
    epochs = read_log(reference["out"], "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all("collapsed" in e and e["skipped_images"] == 0 for e in epochs)


def test_momentum_teacher_is_the_ema_and_last_layer_frozen_first_epoch(reference):
    steps = reference["rec"].steps
    logged = {r["iteration"]: r for r in read_log(reference["out"], "step")}
    for prev, cur in zip(steps, steps[1:]):
        m = logged[cur["iteration"]]["momentum"]
        for k in WATCHED:
            expect = m * prev["teacher"][k] + (1 - m) * cur["student"][k]
            assert torch.allclose(cur["teacher"][k], expect, rtol=1e-6, atol=1e-8), k
    # freeze_last_layer = 1: the head's last layer does not move during epoch 0
    first = steps[0]["student"]["head.last_layer.weight_v"]
    assert all(torch.equal(s["student"]["head.last_layer.weight_v"], first)
               for s in steps if s["epoch"] == 0)
    assert not torch.equal(steps[-1]["student"]["head.last_layer.weight_v"], first)
    # the centre moves every step (C <- 0.9 C + 0.1 mean)
    assert not torch.equal(steps[0]["center"], steps[1]["center"])


# ----------------------------------------------------------------- exact resume
class Stop(Exception):
    pass


def test_resume_after_a_crash_mid_epoch_is_bit_identical(reference, image_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(image_dir, out, save_every_iters=1)

    def crash(state: TrainState) -> None:
        if state.event == "step" and state.iteration == 6:  # epoch 1, after its 2nd step
            raise Stop

    with pytest.raises(Stop):
        train(cfg, callbacks=[crash])
    ck = load_checkpoint(out / "checkpoint.pth")
    assert (ck["epoch"], ck["epoch_step"], ck["iteration"]) == (1, 2, 6)
    res = train(cfg)  # the same call again resumes
    assert res.resumed_from == str(out / "checkpoint.pth")
    assert res.epoch == 2 and res.iteration == 8
    assert_same_state(load_checkpoint(out / "checkpoint.pth"), reference["ckpt"])
    assert [h["loss"] for h in res.history] == [h["loss"] for h in reference["result"].history]
    # the log has every step once, with the uninterrupted run's losses
    ref_losses = [r["loss"] for r in read_log(reference["out"], "step")]
    steps = read_log(out, "step")
    assert [r["iteration"] for r in steps] == list(range(8))
    assert [r["loss"] for r in steps] == ref_losses


def test_resume_after_sigkill_is_bit_identical(reference, image_dir, tmp_path):
    """A real process, with 2 data-loading workers, killed with SIGKILL mid-epoch; the
    same training started again (here in-process, without workers) ends identical."""
    out = tmp_path / "run"
    cfg = tiny_config(image_dir, out, save_every_iters=1, num_workers=2)
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    marker = tmp_path / "reached"
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent(f"""
        import time, torch
        from pathlib import Path
        from dinofeat.training.config import TrainConfig
        from dinofeat.training.loop import train
        torch.set_num_threads(1)
        def hang(state):
            if state.event == "step" and state.iteration == 5:
                Path({str(marker)!r}).write_text("x")
                time.sleep(600)
        train(TrainConfig.from_json_file({str(cfg_file)!r}), callbacks=[hang])
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    errors = tmp_path / "stderr.txt"
    with open(errors, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"training process ended early: {errors.read_text()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("training process did not reach iteration 5 in time")
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ck = load_checkpoint(out / "checkpoint.pth")
    assert (ck["epoch"], ck["epoch_step"]) == (1, 1)
    res = train(cfg.replace(num_workers=0))
    assert res.epoch == 2
    assert_same_state(load_checkpoint(out / "checkpoint.pth"), reference["ckpt"])


# ----------------------------------------------------------------- failures
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(image_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(image_dir, out, epochs=1, warmup_epochs=0, warmup_teacher_temp_epochs=0,
                      save_every_iters=1)

    def poison(state: TrainState) -> None:
        if state.event == "step" and state.iteration == 2:
            with torch.no_grad():
                state.student.head.mlp[0].weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="iteration 2 "):
        train(cfg, callbacks=[poison])
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["iteration"] == 2 and ck["epoch_step"] == 2
    for part in ("student", "teacher"):
        assert all(torch.isfinite(v).all() for v in ck[part].values() if v.is_floating_point())
    assert not list(out.glob(".*.tmp"))  # no half-written files left behind


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    good = make_images(tmp_path / "imgs", 6, seed=1)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"this is not a jpeg")
    png = (tmp_path / "imgs" / "class0" / "img000.png").read_bytes()
    (tmp_path / "imgs" / "cut.png").write_bytes(png[: len(png) // 2])
    lst = tmp_path / "list.txt"  # a .txt list with relative paths, a comment, a blank line
    rel = [str(p.relative_to(tmp_path)) for p in good]
    lst.write_text("# training list\n" + "\n".join(rel[:3] + ["imgs/broken.jpg", ""] +
                                                   rel[3:] + ["imgs/cut.png"]) + "\n")
    res = train(tiny_config(lst, tmp_path / "run", epochs=1, warmup_epochs=0,
                            warmup_teacher_temp_epochs=0))
    # 8 listed images, 2 unreadable; batch 4 x 2 steps visits each exactly once
    assert res.skipped_images == 2
    assert res.history[0]["skipped_images"] == 2
    assert math.isfinite(res.history[0]["loss"])


# ----------------------------------------------------------------- teacher switches
@pytest.mark.parametrize("mode", ["prev_iter", "prev_epoch"])
def test_teacher_switches_at_the_right_boundaries(image_dir, tmp_path, mode):
    rec = Recorder()
    with pytest.warns(UserWarning) if mode == "prev_iter" else _nothing():
        train(tiny_config(image_dir, tmp_path / "run", teacher=mode, max_iters_per_epoch=2,
                          saveckp_freq=1), callbacks=[rec])
    assert (tmp_path / "run" / "checkpoint0001.pth").is_file()  # numbered copies
    assert load_checkpoint(tmp_path / "run" / "checkpoint0002.pth")["epoch"] == 2
    st = rec.steps
    assert [(s["epoch"], s["step"]) for s in st] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in WATCHED)  # noqa: E731
    if mode == "prev_iter":
        # during step i the teacher is the student as it was after step i - 1
        for prev, cur in zip(st, st[1:]):
            assert same(cur["teacher"], prev["student"])
            assert not same(cur["teacher"], cur["student"])
    else:
        # constant within an epoch; epoch 1 uses the student at the end of epoch 0
        assert same(st[0]["teacher"], st[1]["teacher"])
        assert not same(st[1]["teacher"], st[1]["student"])
        assert same(st[2]["teacher"], st[1]["student"])
        assert same(st[3]["teacher"], st[1]["student"])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ----------------------------------------------------------------- accumulation, precision
def test_gradient_accumulation_equals_the_larger_batch(image_dir, tmp_path):
    """2 micro-batches of 4 = one batch of 8 (SGD, frozen zero centre, no drop-path:
    nothing else differs)."""
    common = dict(optimizer="sgd", lr=5.0, warmup_epochs=0, epochs=1, max_iters_per_epoch=1,
                  center_momentum=1.0, drop_path_rate=0.0, freeze_last_layer=0,
                  weight_decay=0.0, weight_decay_end=0.0, warmup_teacher_temp_epochs=0)
    with pytest.warns(UserWarning, match="center-momentum"):
        big = train(tiny_config(image_dir, tmp_path / "big", batch_size_per_gpu=8, **common))
        acc = train(tiny_config(image_dir, tmp_path / "acc", batch_size_per_gpu=4,
                                grad_accum_steps=2, **common))
    a = load_checkpoint(big.run_dir / "checkpoint.pth")["student"]
    b = load_checkpoint(acc.run_dir / "checkpoint.pth")["student"]
    init, _ = _initial_student(tiny_config(image_dir, tmp_path / "x", **common))
    moved = 0
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
        moved += not torch.equal(a[k], init[k])
    assert moved > len(a) // 2  # the step really changed the weights
    assert big.history[0]["loss"] == pytest.approx(acc.history[0]["loss"], rel=1e-5)


def _initial_student(cfg):
    torch.manual_seed(cfg.seed)
    s, t = build_networks(cfg)
    return s.state_dict(), t.state_dict()


def test_bf16_autocast_step_runs_on_cpu(image_dir, tmp_path):
    res = train(tiny_config(image_dir, tmp_path / "run", precision="bf16", epochs=1,
                            warmup_epochs=0, warmup_teacher_temp_epochs=0,
                            max_iters_per_epoch=1))
    assert math.isfinite(res.history[0]["loss"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_loss_scaling_on_gpu(image_dir, tmp_path):
    res = train(tiny_config(image_dir, tmp_path / "run", precision="fp16", device="cuda",
                            epochs=1, warmup_epochs=0, warmup_teacher_temp_epochs=0,
                            max_iters_per_epoch=2))
    ck = load_checkpoint(res.run_dir / "checkpoint.pth")
    assert ck["scaler"] is not None and ck["scaler"]["scale"] > 0
    assert math.isfinite(res.history[0]["loss"])


# ----------------------------------------------------------------- release checkpoints
def test_continue_from_an_original_release_checkpoint(image_dir, tmp_path):
    cfg = tiny_config(image_dir, tmp_path / "run", epochs=2, max_iters_per_epoch=2)
    torch.manual_seed(123)
    student, teacher = build_networks(cfg)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    from dinofeat.training.optim import build_optimizer, param_groups
    opt = build_optimizer(cfg, param_groups(student))
    opt_state = opt.state_dict()
    for g in opt_state["param_groups"]:  # the release's groups: no dinofeat flags
        g.pop("decay")
    center = torch.randn(1, cfg.out_dim)
    release = {  # the original layout: DDP-prefixed student, argparse args, dino_loss dict
        "student": {f"module.{k}": v for k, v in student.state_dict().items()},
        "teacher": teacher.state_dict(),
        "optimizer": opt_state, "epoch": 1,
        "args": argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=64,
                                   norm_last_layer=True, use_bn_in_head=False),
        "dino_loss": {"center": center}, "fp16_scaler": None,
    }
    path = tmp_path / "dino_full_checkpoint.pth"
    torch.save(release, path)

    rec = Recorder()
    centers = []
    res = train(cfg, resume_from=str(path),
                callbacks=[rec, lambda s: centers.append(s.dino_loss.center.clone())])
    assert [h["epoch"] for h in res.history] == [1] and res.iteration == 4
    first = rec.steps[0]
    assert first["iteration"] == 2  # epoch 1 of 2 steps per epoch
    assert first["groups"][0][1] > 0.04 and first["groups"][1][1] == 0.0  # no decay on norms
    m = json.loads((res.run_dir / "log.jsonl").read_text().splitlines()[1])["momentum"]
    t0 = dict(teacher.named_parameters())
    for k in WATCHED:  # the release teacher, moved by one EMA step
        expect = m * t0[k].detach() + (1 - m) * first["student"][k]
        assert torch.allclose(first["teacher"][k], expect, rtol=1e-6, atol=1e-8), k
    # the release centre was the start: C1 = 0.9 C0 + 0.1 mean(teacher outputs), and the
    # outputs are cosines (unit bottleneck, unit-norm last layer): |t| <= 1
    assert (centers[0] - 0.9 * center).abs().max() <= 0.1 + 1e-5

    with pytest.raises(ValueError, match="out_dim=64"):
        train(cfg.replace(out_dim=128, output_dir=str(tmp_path / "other")),
              resume_from=str(path))


def test_resume_refuses_a_checkpoint_of_other_networks(reference, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    cfg = tiny_config(reference["ckpt"]["config"]["data"], out, out_dim=128, epochs=3)
    with pytest.raises(ValueError, match="out_dim"):
        train(cfg)
    with pytest.raises(ValueError, match="arch: vit_tiny16 in the checkpoint, vit_tiny8 now"):
        train(cfg.replace(out_dim=64, arch="vit_tiny8"))
    # another spelling of the same network resumes (here: nothing left to do)
    res = train(cfg.replace(out_dim=64, arch="vit_tiny", patch_size=16, epochs=2))
    assert res.epoch == 2 and res.resumed_from and len(res.history) == 2


# ----------------------------------------------------------------- CLI
def test_cli_train_runs_and_help_lists_every_option(image_dir, tmp_path, capsys):
    from dinofeat.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    from dinofeat.training.config import cli_option
    for name in TrainConfig.__dataclass_fields__:
        assert cli_option(name) in help_text, name
    assert "(default: 0.996)" in help_text and "--preset" in help_text

    out = tmp_path / "cli_run"
    rc = main(["train", "--arch", "vit_tiny16", "--data", str(image_dir), "--out", str(out),
               "--out-dim", "64", "--hidden-dim", "64", "--bottleneck-dim", "32",
               "--global-crop-size", "32", "--local-crop-size", "16",
               "--local-crops-number", "2", "--batch-size", "8", "--epochs", "1",
               "--warmup-epochs", "0", "--max-iters-per-epoch", "1", "--num-workers", "0",
               "--precision", "fp32"])
    assert rc == 0
    assert "1 epoch, 1 step" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoint.pth")["config"]["batch_size_per_gpu"] == 8

    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(out),
                 "--epochs", "1", "--warmup-epochs", "0"]) == 2
    assert "training data not found" in capsys.readouterr().err


def test_cli_preset_then_explicit_options(tmp_path):
    from dinofeat.cli import build_parser
    args = build_parser().parse_args(["train", "--preset", "vit_s16_300ep", "--epochs", "40",
                                      "--data", "x"])
    cfg = TrainConfig.from_args(args)
    assert cfg.epochs == 40 and cfg.teacher_temp == 0.07 and cfg.norm_last_layer is False
    assert cfg.warmup_teacher_temp_epochs == 30


def test_dinofeat_train_is_callable_and_a_package():
    assert callable(dinofeat.train)
    assert dinofeat.training.TrainConfig is TrainConfig
    with pytest.raises(ValueError, match="no training data"):
        dinofeat.train(epochs=1, warmup_epochs=0)


# ----------------------------------------------------------------- online k-NN
def test_online_knn_matches_an_independent_evaluation(image_dir, tmp_path):
    """The k-NN accuracy logged by the run equals DINO's weighted vote (k=20, T=0.07)
    computed afterwards from the saved teacher with dinofeat.load(...).embed."""
    from dinofeat.eval.knn import knn_accuracy, knn_classify
    knn_root = tmp_path / "knn"
    make_images(knn_root / "train", 12, seed=5)
    make_images(knn_root / "val", 6, seed=6)
    res = train(tiny_config(image_dir, tmp_path / "run", epochs=1, warmup_epochs=0,
                            warmup_teacher_temp_epochs=0, max_iters_per_epoch=1,
                            knn_eval_data=str(knn_root), knn_eval_every=1))
    logged = res.history[-1]
    assert res.knn["knn_top1"] == logged["knn_top1"]
    assert logged["knn_train"] == 12 and logged["knn_val"] == 6 and logged["knn_k"] == 12

    model = dinofeat.load(res.run_dir, device="cpu")
    feats, labels = {}, {}
    for split in ("train", "val"):
        paths = sorted((knn_root / split).rglob("*.png"))
        feats[split] = model.embed(paths, num_workers=0, progress=False)
        labels[split] = torch.tensor([int(p.parent.name[-1]) for p in paths])
    scores = knn_classify(feats["train"], labels["train"], feats["val"], k=12, T=0.07,
                          num_classes=2)
    acc = knn_accuracy(scores, labels["val"], (1,))
    assert logged["knn_top1"] == pytest.approx(acc[1])
