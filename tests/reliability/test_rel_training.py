"""Training under faults: SIGKILL at random steps and in the middle of a checkpoint
write, a full disk while saving, a non-finite loss (through the CLI). After each fault
the checkpoint on disk loads and is the last complete one, and resuming ends
bit-identical to a run that was never interrupted: nothing done before the last
checkpoint is lost.

The killed runs are real processes (forked from the test process, so they do not pay the
import time again) killed with ``SIGKILL``; the slow checkpoint writer is a hook on
``torch.save`` inside that process, so that the kill lands while ``atomic_path`` is
writing the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _zoo import picture
from dinofeat.cli import main
from dinofeat.training import checkpoint as C
from dinofeat.training.checkpoint import load_checkpoint
from dinofeat.training.config import TrainConfig
from dinofeat.training.loop import train

STEPS = 8  # 2 epochs x 4 steps


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train-faults") / "imgs"
    d.mkdir()
    for i in range(8):
        Image.fromarray(picture(36, 40, seed=40 + i)).save(d / f"{i}.png")
    return d


def config(images: Path, out: Path, **kw) -> TrainConfig:
    base = dict(arch="vit_mini16", out_dim=32, hidden_dim=32, bottleneck_dim=16,
                global_crop_size=32, local_crop_size=16, local_crops_number=1,
                batch_size_per_gpu=2, epochs=2, warmup_epochs=1, warmup_teacher_temp_epochs=0,
                num_workers=0, log_every=1, precision="fp32", saveckp_freq=0,
                save_every_iters=1, momentum_teacher=0.99, data=str(images),
                output_dir=str(out))
    base.update(kw)
    return TrainConfig(**base)


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> dict:
    """The uninterrupted run's final checkpoint and per-step losses."""
    out = tmp_path_factory.mktemp("train-ref") / "run"
    with one_thread():
        train(config(images, out))
    return {"ckpt": load_checkpoint(out / "checkpoint.pth"), "losses": _losses(out)}


def _losses(run: Path) -> dict[int, float]:
    out = {}
    with open(run / "log.jsonl") as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("type") == "step":
                out[r["iteration"]] = r["loss"]
    return out


def same_state(a: dict, b: dict) -> bool:
    if (a["epoch"], a["iteration"]) != (b["epoch"], b["iteration"]):
        return False
    for part in ("student", "teacher"):
        if a[part].keys() != b[part].keys():
            return False
        if not all(torch.equal(a[part][k], b[part][k]) for k in a[part]):
            return False
    if not torch.equal(a["dino_loss"]["center"], b["dino_loss"]["center"]):
        return False
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    return sa.keys() == sb.keys() and all(
        torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
        for i in sa for k in sa[i])


# ---------------------------------------------------------------- forked victims
def _victim(cfg_dict: dict, slow_save: str | None) -> None:
    """Child process: train, pausing 0.15 s after each step; with ``slow_save`` (a folder),
    every checkpoint is written slowly, in 20 chunks, after creating
    ``<folder>/writing-<n>``."""
    torch.set_num_threads(1)
    if slow_save:
        real_save = torch.save
        count = [0]

        def slow(obj, f, *a, **kw):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **kw)
            data = buf.getvalue()
            count[0] += 1
            Path(slow_save, f"writing-{count[0]}").write_text(str(len(data)))
            with open(f, "wb") as out:
                step = len(data) // 20 + 1
                for i in range(0, len(data), step):
                    out.write(data[i:i + step])
                    out.flush()
                    time.sleep(0.02)

        C.torch.save = slow
    def pace(state) -> None:  # keeps the run going long enough for the kill to land
        if state.event == "step":
            time.sleep(0.15)

    try:
        train(TrainConfig.from_dict(cfg_dict), callbacks=[pace])
    finally:
        os._exit(0)


def _start(cfg: TrainConfig, slow_save: Path | None = None):
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_victim, args=(cfg.to_dict(), str(slow_save) if slow_save else None))
    p.start()
    return p


def _wait(cond, proc, timeout: float = 240.0) -> None:
    end = time.time() + timeout
    while not cond():
        if not proc.is_alive():
            raise AssertionError("the training process ended before the kill point")
        if time.time() > end:
            proc.kill()
            raise AssertionError("the training process did not reach the kill point")
        time.sleep(0.01)


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL


def _logged_steps(run: Path) -> int:
    return len(_losses(run)) if (run / "log.jsonl").exists() else 0


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume(images, reference, tmp_path, tally):
    """Three SIGKILLs at random steps (and random moments inside them) of one run; after
    each the checkpoint loads and holds every step but the one in flight; the last
    resume ends bit-identical to the uninterrupted run."""
    rng = random.Random(1234)
    out = tmp_path / "run"
    cfg = config(images, out)
    kills, lost_steps = [], 0
    points = sorted(rng.sample(range(1, STEPS - 1), 3))
    for point in points:
        proc = _start(cfg)
        _wait(lambda point=point: _logged_steps(out) >= point, proc)
        time.sleep(rng.uniform(0.0, 0.3))
        _kill(proc)
        # the checkpoint is never corrupt (none yet if the first save had not finished)
        saved = load_checkpoint(out / "checkpoint.pth")["iteration"] \
            if (out / "checkpoint.pth").exists() else 0
        done = max(_losses(out))  # the last step that finished and was logged
        assert saved >= done, (saved, done)  # all but the step whose save was in flight
        lost_steps += max(0, done - saved)
        kills.append((point, saved))
    with one_thread():
        res = train(cfg)
    assert res.iteration == STEPS
    final = load_checkpoint(out / "checkpoint.pth")
    assert same_state(final, reference["ckpt"]), kills
    assert _losses(out) == reference["losses"]  # every step logged once, same losses
    tally.add("training: SIGKILL at random steps", faults=len(points), checks=2 * len(points) + 2,
              lost=lost_steps)
    tally.note("training kills", f"killed at logged steps {points}; checkpoints then held "
               f"iterations {[k[1] for k in kills]}")


@pytest.mark.slow
@pytest.mark.parametrize("save_no", [2, 5])
def test_sigkill_during_a_checkpoint_write(images, reference, tmp_path, save_no, tally):
    """The kill lands while the checkpoint's temporary file is half written: the previous
    checkpoint is intact, the half file is never taken for a checkpoint, and the resumed
    run ends identical (the stale temporary file is cleaned up)."""
    out = tmp_path / "run"
    signals = tmp_path / "signals"
    signals.mkdir()
    cfg = config(images, out)
    proc = _start(cfg, slow_save=signals)
    marker = signals / f"writing-{save_no}"
    _wait(marker.exists, proc)
    size = int(marker.read_text())
    time.sleep(random.Random(save_no).uniform(0.1, 0.3))  # inside the 20 x 20 ms write
    _kill(proc)
    temps = list(out.glob(".checkpoint.pth.*.tmp"))
    assert temps and 0 < temps[0].stat().st_size < size  # killed mid-write
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["iteration"] == save_no - 1  # the previous save, complete
    with one_thread():
        train(cfg)
    assert same_state(load_checkpoint(out / "checkpoint.pth"), reference["ckpt"])
    assert not list(out.glob(".*.tmp")), "stale temporary checkpoint left behind"
    tally.add("training: SIGKILL mid checkpoint write", faults=1, checks=4)


# ------------------------------------------------------------------- full disk
def test_disk_full_while_saving_keeps_the_previous_checkpoint(images, reference, tmp_path,
                                                              monkeypatch, tally):
    out = tmp_path / "run"
    cfg = config(images, out)
    real_save = torch.save
    calls = [0]

    def full_disk(obj, f, *a, **kw):
        calls[0] += 1
        if calls[0] < 4:
            return real_save(obj, f, *a, **kw)
        buf = io.BytesIO()
        real_save(obj, buf, *a, **kw)
        Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # half, then full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(C.torch, "save", full_disk)
    with one_thread(), pytest.raises(OSError) as ei:
        train(cfg)
    assert ei.value.errno == errno.ENOSPC
    assert "checkpoint.pth" in str(ei.value) and "previous" in str(ei.value), str(ei.value)
    monkeypatch.setattr(C.torch, "save", real_save)
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["iteration"] == 3  # the third save, complete
    assert not list(out.glob(".*.tmp"))
    with one_thread():
        train(cfg)  # space freed: resume
    assert same_state(load_checkpoint(out / "checkpoint.pth"), reference["ckpt"])
    tally.add("training: disk full", faults=1, checks=5)


def test_disk_full_in_other_writers(tiny_model, tmp_path, monkeypatch, tally):
    """Index save, feature files and linear heads: a full disk mid-write leaves the
    previous file complete and no temporary file."""
    import faiss

    from dinofeat.extract import load_features, save_features
    from dinofeat.search import KNNIndex
    ix = KNNIndex(dim=4)
    ix.add(np.eye(4, dtype=np.float32))
    path = ix.save(tmp_path / "a.idx")
    ix.add(np.ones((1, 4), np.float32))
    real = faiss.write_index

    def full(index, fname):
        Path(fname).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(faiss, "write_index", full)
    with pytest.raises(OSError):
        ix.save(path)
    monkeypatch.setattr(faiss, "write_index", real)
    assert len(KNNIndex.load(path)) == 4
    assert not [p for p in path.iterdir() if p.name.endswith(".tmp")]
    f = save_features(tmp_path / "f.safetensors", torch.ones(2, 3), ["a", "b"])
    import safetensors.torch as st
    real_sf = st.save_file
    monkeypatch.setattr(st, "save_file", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError):
        save_features(f, torch.zeros(5, 3), list("abcde"))
    monkeypatch.setattr(st, "save_file", real_sf)
    assert load_features(f).features.shape == (2, 3)
    assert not list(tmp_path.glob(".*.tmp"))
    tally.add("writers: disk full", faults=2, checks=4)


# ------------------------------------------------------------- non-finite loss
def test_non_finite_loss_through_the_cli(images, tmp_path, capsys, tally):
    """A learning rate of 1e36 makes the loss NaN at the second step: one line naming the
    iteration and the kept checkpoint, exit code 1, the checkpoint finite and loadable."""
    out = tmp_path / "run"
    with one_thread():
        rc = main(["train", "--arch", "vit_mini16", "--data", str(images), "--out",
                   str(out), "--epochs", "2", "--batch-size", "2", "--num-workers",
                   "0", "--global-crop-size", "32", "--local-crop-size", "16",
                   "--local-crops-number", "1", "--out-dim", "32", "--hidden-dim", "32",
                   "--bottleneck-dim", "16", "--warmup-epochs", "0",
                   "--warmup-teacher-temp-epochs", "0", "--precision", "fp32", "--lr", "1e36",
                   "--save-every-iters", "1", "--clip-grad", "0"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dinofeat: error")]
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "loss is nan" in lines[0] and "checkpoint.pth" in lines[0]
    ck = load_checkpoint(out / "checkpoint.pth")
    assert ck["iteration"] >= 1
    for part in ("student", "teacher"):
        assert all(torch.isfinite(v).all() for v in ck[part].values() if v.is_floating_point())
    tally.add("training: non-finite loss", faults=1, checks=4)
