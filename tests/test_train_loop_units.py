"""Units of the training loop: data order and seeds, image lists, the collapse monitor,
RNG capture, checkpoint files."""

from __future__ import annotations

import random
import stat

import numpy as np
import pytest
import torch

from dinofeat.training.checkpoint import (capture_rng_state, load_checkpoint, restore_rng_state,
                                       save_checkpoint)
from dinofeat.training.data import (ResumableDistributedSampler, TrainImages,
                                 resolve_image_list, sample_seed)
from dinofeat.training.monitor import CollapseMonitor, teacher_stats

from test_train_loop import make_images


def test_sampler_start_skips_a_prefix_and_replicas_partition_the_epoch():
    data = list(range(23))
    full = ResumableDistributedSampler(data, num_replicas=1, rank=0, seed=7)
    full.set_epoch(3)
    order = list(full)
    assert sorted(i for i, _ in order) == data
    assert all(s == sample_seed(7, 3, i) for i, s in order)
    full.set_start(8)
    assert list(full) == order[8:] and len(full) == 15
    full.set_epoch(4)
    full.set_start(0)
    assert [i for i, _ in full] != [i for i, _ in order]  # a new permutation each epoch
    # two processes: disjoint halves of the same permutation (drop_last: 22 of 23)
    parts = []
    for rank in range(2):
        s = ResumableDistributedSampler(data, num_replicas=2, rank=rank, seed=7)
        s.set_epoch(3)
        parts.append([i for i, _ in s])
    assert len(parts[0]) == len(parts[1]) == 11 and not set(parts[0]) & set(parts[1])
    assert [i for pair in zip(*parts) for i in pair] == [i for i, _ in order][:22]
    with pytest.raises(ValueError):
        full.set_start(100)


def test_sample_crops_depend_only_on_the_seed_and_leave_global_rngs_alone(tmp_path):
    make_images(tmp_path, 4)

    def aug(img):
        return [torch.rand(2), torch.tensor([random.random(), float(np.random.rand())])]

    ds = TrainImages(tmp_path, aug)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    a, fa = ds[(2, 1234)]
    b, _ = ds[(2, 1234)]
    c, _ = ds[(2, 999)]
    assert fa == [] and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])


def test_image_sources_and_their_errors(tmp_path):
    paths = make_images(tmp_path / "tree", 4)
    assert resolve_image_list(tmp_path / "tree") == sorted(paths)
    lst = tmp_path / "l.txt"
    lst.write_text(f"# c\n\ntree/class0/img000.png\n{paths[1]}\n")
    assert resolve_image_list(lst) == [tmp_path / "tree/class0/img000.png", paths[1]]
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_image_list(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        resolve_image_list(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no paths"):
        resolve_image_list(tmp_path / "blank.txt")
    with pytest.raises(ValueError, match="not a .txt list"):
        resolve_image_list(paths[0])


def test_bad_images_are_replaced_by_the_next_readable_one(tmp_path):
    good = make_images(tmp_path / "d", 3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    ds = TrainImages([good[0], bad, good[2]], lambda img: [torch.tensor(img.size)])
    crops, failures = ds[(1, 5)]
    assert len(failures) == 1 and str(bad) in failures[0]
    assert crops[0].tolist() == list(ds[(2, 5)][0][0].tolist())
    all_bad = TrainImages([bad, bad], lambda img: [img])
    with pytest.raises(RuntimeError, match="could not be read"):
        all_bad[0]


def test_teacher_stats_formulas_and_collapse_verdicts():
    k = 64
    uniform = teacher_stats(torch.zeros(8, k), torch.zeros(1, k), 0.04)
    assert uniform["teacher_entropy"] == pytest.approx(np.log(k), rel=1e-6)
    assert uniform["teacher_kl"] == pytest.approx(0.0, abs=1e-5)
    torch.manual_seed(0)
    t = torch.randn(16, k)
    st = teacher_stats(t, torch.zeros(1, k), 0.1)
    p = torch.softmax(t / 0.1, -1)
    ent = -(p * p.log()).sum(-1).mean()
    m = p.mean(0)
    assert st["teacher_entropy"] == pytest.approx(float(ent), rel=1e-5)
    assert st["teacher_batch_entropy"] == pytest.approx(float(-(m * m.log()).sum()), rel=1e-5)
    assert st["teacher_std"] == pytest.approx(float(t.std(0, unbiased=False).mean() /
                                                     t.pow(2).mean().sqrt()), rel=1e-5)

    def verdict(stats_list):
        mon = CollapseMonitor(k)
        for s in stats_list:
            mon.update(s)
        return mon.end_epoch()

    assert verdict([st])["collapsed"] is False
    assert "uniform" in verdict([uniform])["collapse_reason"]
    one_hot = torch.full((8, k), -10.0)
    one_hot[:, 3] = 10.0  # every image picks prototype 3
    j = verdict([teacher_stats(one_hot + 0.01 * torch.randn(8, k), None, 0.04)])
    assert "single-prototype" in j["collapse_reason"]
    same = teacher_stats(torch.randn(1, k).repeat(8, 1) * 0.5, torch.zeros(1, k), 1.0)
    assert "constant" in verdict([same])["collapse_reason"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = capture_rng_state()
    expect = (torch.rand(3), random.random(), np.random.rand())
    path = save_checkpoint({"rng": [state], "student": {}, "teacher": {}, "optimizer": {},
                            "epoch": 0, "iteration": 0, "config": {}}, tmp_path / "c.pth")
    ck = load_checkpoint(path)  # weights_only=True
    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    restore_rng_state(ck["rng"][0])
    assert torch.equal(torch.rand(3), expect[0])
    assert random.random() == expect[1] and np.random.rand() == expect[2]
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode & stat.S_IRGRP or mode & stat.S_IRUSR  # readable, umask respected
    with pytest.raises(Exception, match="not a dinofeat training checkpoint"):
        torch.save({"model": {}}, tmp_path / "other.pth")
        load_checkpoint(tmp_path / "other.pth")


def test_tensorboard_option_needs_the_package(tmp_path):
    from dinofeat.training.loop import _TensorBoard
    try:
        import torch.utils.tensorboard  # noqa: F401
        have = True
    except ImportError:
        have = False
    if have:
        tb = _TensorBoard(tmp_path / "tb")
        tb.write({"loss": 1.0, "epoch": 0}, 0, "train")
        tb.close()
        assert any((tmp_path / "tb").iterdir())
    else:
        with pytest.raises(ValueError, match="pip install"):
            _TensorBoard(tmp_path / "tb")


def test_cuda_rng_state_goes_to_the_current_device(monkeypatch):
    """Each process's CUDA generator is saved and restored on its own GPU, not GPU 0."""
    from dinofeat.training.checkpoint import capture_rng_state, restore_rng_state
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda s, device="cuda": restored.append((s.tolist(), device)))
    state = capture_rng_state()
    assert [s.tolist() for s in state["cuda"]] == [[7]]
    restore_rng_state(state)
    assert restored == [([7], 1)]
    # a checkpoint of an earlier version holds every GPU's state: the current one is used
    restored.clear()
    restore_rng_state({**state, "cuda": [torch.tensor([0]), torch.tensor([1]), torch.tensor([2])]})
    assert restored == [([1], 1)]
