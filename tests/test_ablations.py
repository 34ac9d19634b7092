"""The paper's ablation switches: reachable from the CLI with the paper's finding, documented,
mathematically what they say; the ablation benchmark's grid, verdicts and outputs."""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dinofeat.training.config import TrainConfig
from dinofeat.training.head import DINOHead
from dinofeat.training.loss import DINOLoss
from dinofeat.training.monitor import CollapseMonitor, teacher_stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ablations as ab  # noqa: E402

#: switch -> a fragment of the paper's finding its --help must carry
FINDINGS = {
    "--collapse": "72.2%",              # Sinkhorn-Knopp vs centering
    "--sharpen": "uniform",             # centering alone: uniform collapse
    "--teacher-temp": "0.08",           # 0.08 constant collapses
    "--center-momentum": "0.999",       # collapses
    "--teacher": "0.1%",                # previous iteration: 0.1% k-NN
    "--momentum-teacher": "0.9995",     # small batches want a higher momentum
    "--loss": "52.6%",                  # MSE
    "--predictor": "71.8%",
    "--use-bn-in-head": "BatchNorm-free",
    "--head-layers": "collapse",
    "--l2-bottleneck": "collapse",
    "--out-dim": "65536",
    "--local-crops-number": "67.9%",    # no multi-crop
    "--global-crops-scale": "(0.14, 1)",
    "--local-crops-scale": "local crops",
    "--sinkhorn-iters": "Sinkhorn",
}


@pytest.fixture(scope="module")
def train_help() -> str:
    """What `dinofeat train --help` prints (the real CLI parser, in this process)."""
    import contextlib
    import io

    from dinofeat.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    return out.getvalue()


def _help_of(help_text: str, option: str) -> str:
    """The help entry of ``option``, its lines joined."""
    for entry in re.split(r"\n(?=  -)", help_text):
        first = entry.strip().split("\n")[0]
        if re.match(rf"{re.escape(option)}(\s|,|$)", first):
            return " ".join(entry.split())
    raise AssertionError(f"{option} is not in `dinofeat train --help`")


@pytest.mark.parametrize("option", sorted(FINDINGS))
def test_every_ablation_switch_is_in_train_help_with_the_paper_finding(train_help, option):
    assert FINDINGS[option] in _help_of(train_help, option)


def test_switch_values_are_the_documented_choices(train_help):
    assert "{center,batch_softmax,sinkhorn,none}" in _help_of(train_help, "--collapse")
    assert "{momentum,prev_epoch,prev_iter}" in _help_of(train_help, "--teacher")
    assert "{ce,mse}" in _help_of(train_help, "--loss")
    for flag in ("--no-sharpen", "--no-l2-bottleneck", "--predictor", "--use-bn-in-head"):
        assert flag in train_help


def test_training_doc_has_the_ablation_table():
    text = (ROOT / "docs" / "training.md").read_text()
    assert "## Ablation switches" in text
    section = text.split("## Ablation switches", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `--")]
    documented = " ".join(r.split("|")[1] for r in rows)
    for option in ("--collapse", "--sharpen", "--teacher-temp", "--center-momentum",
                   "--teacher", "--loss", "--predictor", "--use-bn-in-head", "--head-layers",
                   "--l2-bottleneck", "--out-dim", "--local-crops-number"):
        assert f"`{option}`" in documented, option
    for row in rows:  # three columns: switch, values, finding (non-empty)
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 3 and all(cells), row


# ------------------------------------------------------------------ switch mathematics
def test_head_without_l2_bottleneck_feeds_the_raw_mlp_output():
    torch.manual_seed(0)
    x = torch.randn(6, 12) * 5
    on = DINOHead(12, 20, nlayers=3, hidden_dim=16, bottleneck_dim=8)
    off = DINOHead(12, 20, nlayers=3, hidden_dim=16, bottleneck_dim=8, l2_bottleneck=False)
    off.load_state_dict(on.state_dict())
    z = on.mlp(x)
    torch.testing.assert_close(off.bottleneck(x), z)
    torch.testing.assert_close(on.bottleneck(x), z / z.norm(dim=1, keepdim=True))
    v = on.last_layer.weight_v.detach()
    w = v / v.norm(dim=1, keepdim=True)            # norm_last_layer: unit rows
    torch.testing.assert_close(off(x), z @ w.T)
    # with the bottleneck every logit is a cosine; without it the scale follows the input
    assert on(x).abs().max() <= 1 + 1e-5
    assert off(x * 1000).abs().max() > 1


def test_no_sharpen_teacher_is_the_student_temperature_softmax_of_centred_outputs():
    torch.manual_seed(1)
    k, b = 16, 4
    loss = DINOLoss(k, 2, 0.04, 0.04, 0, 10, student_temp=0.1, sharpen=False)
    c = torch.randn(1, k) * 0.3
    loss.center.copy_(c)
    t = torch.randn(2 * b, k)
    torch.testing.assert_close(loss.teacher_distribution(t, 0), torch.softmax((t - c) / 0.1, -1))
    sharp = DINOLoss(k, 2, 0.04, 0.04, 0, 10, student_temp=0.1)
    sharp.center.copy_(c)
    ent = lambda p: float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())  # noqa: E731
    assert ent(sharp.teacher_distribution(t, 0)) < ent(loss.teacher_distribution(t, 0))


def test_sharpening_alone_drives_the_batch_to_one_prototype_and_centering_alone_to_uniform():
    """The two collapse modes of the paper (section 5.3), on the loss's own teacher
    distribution: a teacher whose outputs share a dominant dimension gives every image the
    same one-hot target without centering; centring removes it, and without sharpening the
    remaining small differences give a nearly uniform target."""
    torch.manual_seed(2)
    k, b = 64, 32
    t = torch.randn(2 * b, k) * 0.01
    t[:, 5] += 1.0                                  # a dimension that dominates every image
    none = DINOLoss(k, 2, 0.04, 0.04, 0, 10, collapse="none")
    p = none.teacher_distribution(t, 0)
    assert float(p[:, 5].min()) > 0.99                  # one prototype for everyone
    center = DINOLoss(k, 2, 0.04, 0.04, 0, 10, sharpen=False)
    center.center.copy_(t.mean(0, keepdim=True))
    q = center.teacher_distribution(t, 0)
    ent = float(-(q * q.log()).sum(-1).mean())
    assert ent > 0.99 * math.log(k)                     # uniform
    mon = CollapseMonitor(k)
    mon.update(teacher_stats(t, None, 0.04))
    assert "single-prototype" in mon.end_epoch()["collapse_reason"]
    mon.update(teacher_stats(t, center.center, 0.1))
    assert "uniform" in mon.end_epoch()["collapse_reason"]


def test_monitor_flags_an_image_independent_teacher_that_swings_between_extremes():
    """The no-momentum collapse seen in benchmarks/ablations.py: every image gets the same
    teacher distribution, one-hot at some steps and nearly uniform at others, so the
    epoch's mean entropies sit at neither extreme and the outputs still vary (relative std
    far above 1e-3); only the KL criterion catches it. A teacher whose distributions depend
    on the image is not flagged."""
    torch.manual_seed(3)
    k, b, temp = 1024, 32, 0.04
    log_k = math.log(k)
    spike = torch.zeros(b, k)
    spike[:, 7] = 1.0
    one_hot_step = teacher_stats(spike + 0.005 * torch.randn(b, k), None, temp)
    uniform_step = teacher_stats(0.001 * torch.randn(b, k), None, temp)
    mon = CollapseMonitor(k)
    for s in (one_hot_step, uniform_step, one_hot_step, uniform_step):
        mon.update(s)
    judged = mon.end_epoch()
    assert 0.2 * log_k < judged["teacher_entropy"] < 0.8 * log_k
    assert 0.2 * log_k < judged["teacher_batch_entropy"] < 0.8 * log_k
    assert judged["teacher_std"] > 0.1
    assert judged["teacher_kl"] < 0.01 * log_k
    assert judged["collapsed"] and "image-independent" in judged["collapse_reason"]
    # the same monitor without the KL criterion misses it
    assert CollapseMonitor(k, min_kl_fraction=0.0).check(judged) is None
    # distributions that depend on the image: kept
    working = teacher_stats(0.05 * torch.randn(b, k), None, temp)
    assert working["teacher_kl"] > 0.05 * log_k
    mon.update(working)
    assert mon.end_epoch()["collapsed"] is False


def test_monitor_flags_a_teacher_that_uses_two_prototypes():
    """Centre momentum 0.999 in benchmarks/ablations.py: each image one-hot, the batch split
    between two prototypes. Mean entropy ~0 and batch-mean entropy log 2 (10% of log K):
    neither extreme, and the mutual information (log 2) is above the KL threshold; the
    batch-mean rule (at most 15% of log K) flags it. Forty prototypes in use are kept."""
    k, b, temp = 1024, 64, 0.04
    log_k = math.log(k)

    def one_hot_on(n_protos):
        t = torch.zeros(b, k)
        t[torch.arange(b), torch.arange(b) % n_protos] = 1.0
        return teacher_stats(t, None, temp)

    two = one_hot_on(2)
    assert two["teacher_entropy"] < 0.01 * log_k
    assert two["teacher_batch_entropy"] == pytest.approx(math.log(2), rel=1e-3)
    assert two["teacher_kl"] > CollapseMonitor(k).min_kl_fraction * log_k
    mon = CollapseMonitor(k)
    mon.update(two)
    judged = mon.end_epoch()
    assert judged["collapsed"] and "2.0 of 1024 prototypes" in judged["collapse_reason"]
    mon.update(one_hot_on(40))
    assert mon.end_epoch()["collapsed"] is False


def test_monitor_flags_a_near_uniform_teacher_that_says_little_about_the_image():
    """No momentum teacher, last chunk of the ablation grid: entropy 94% of log K (below the
    99% uniform rule) and KL 3.5% of log K. A teacher that is nearly uniform but whose
    distributions still differ between images by 12% of log K (the DINO run) is kept."""
    k = 1024
    log_k = math.log(k)
    mon = CollapseMonitor(k)
    drifting = {"teacher_entropy": 0.94 * log_k, "teacher_batch_entropy": 0.975 * log_k,
                "teacher_kl": 0.035 * log_k, "teacher_std": 0.56, "center_norm": 1.0}
    assert "image-independent" in mon.check(drifting)
    learning = {"teacher_entropy": 0.84 * log_k, "teacher_batch_entropy": 0.96 * log_k,
                "teacher_kl": 0.12 * log_k, "teacher_std": 0.84, "center_norm": 1.0}
    assert mon.check(learning) is None


# ------------------------------------------------------------------ the benchmark grid
def _cfg(a: ab.Ablation, tmp_path) -> TrainConfig:
    return ab.run_config(a, steps=20, chunks=4, data=tmp_path, output_dir=tmp_path / "o",
                         mean=0.3, std=0.35)


def test_grid_runs_change_only_their_switch(tmp_path):
    base = _cfg(ab.GRID_BY_NAME["dino"], tmp_path).to_dict()
    assert base["arch"] == "vit_mini7" and base["patch_size"] == 7 and base["hidden_dim"] == 512
    assert base["max_iters_per_epoch"] == 5 and base["epochs"] == 4
    # DINO's own collapse avoidance in the reference run
    assert (base["teacher"], base["collapse"], base["sharpen"], base["loss"]) == \
        ("momentum", "center", True, "ce")
    names = [a.name for a in ab.GRID]
    assert len(set(names)) == len(names)
    for a in ab.GRID:
        assert a.expect in ("works", "collapses")
        d = _cfg(a, tmp_path).to_dict()
        changed = {k for k in d if d[k] != base[k]}
        want = {k for k, v in a.options.items()
                if (list(v) if isinstance(v, tuple) else v) != base[k]}
        assert changed == want, a.name
    core = [a.name for a in ab.GRID if not a.extended]
    assert {"no_momentum", "teacher_temp_0.08", "center_momentum_0.999", "centering_only",
            "sharpening_only", "no_multicrop", "dino"} <= set(core)


def test_config_key_ignores_paths_and_sees_options(tmp_path):
    a = ab.GRID_BY_NAME["dino"]
    k1 = ab.config_key(_cfg(a, tmp_path))
    k2 = ab.config_key(ab.run_config(a, steps=20, chunks=4, data=tmp_path / "x",
                                     output_dir=tmp_path / "y", mean=0.3, std=0.35))
    k3 = ab.config_key(_cfg(ab.GRID_BY_NAME["sharpening_only"], tmp_path))
    assert k1 == k2 != k3


def _fake_result(name: str, top1: float, flagged: bool, n_steps: int = 4) -> dict:
    a = ab.GRID_BY_NAME[name]
    it = list(range(0, 5 * n_steps, 5))
    return {"name": name, "switch": a.switch, "options": a.options, "expect": a.expect,
            "paper": a.paper, "knn": {"top1": top1, "top5": min(100.0, top1 + 20)},
            "train_seconds": 60.0,
            "monitor": {"collapsed": flagged, "reason": "uniform collapse: x" if flagged
                        else None, "first_flagged_chunk": 1 if flagged else None,
                        "flagged_chunks": [1] if flagged else []},
            "chunks_summary": [{"epoch": 0, "entropy_frac": 0.8, "batch_entropy_frac": 0.9,
                                "teacher_kl": 0.4, "collapsed": False},
                               {"epoch": 1, "entropy_frac": 1.0 if flagged else 0.8,
                                "batch_entropy_frac": 0.9,
                                "teacher_kl": 0.001 if flagged else 0.4,
                                "collapsed": flagged}],
            "curves": {"iteration": it, "loss": [1.0] * n_steps,
                       "entropy_frac": list(np.linspace(0.8, 1.0 if flagged else 0.7, n_steps)),
                       "batch_entropy_frac": [0.9] * n_steps, "teacher_std": [0.1] * n_steps,
                       "teacher_kl": [0.001 if flagged else 0.4] * n_steps},
            "config": {"batch_size_per_gpu": 64, "out_dim": 1024}}


def _fake_grid(**override) -> dict:
    spec = {"dino": (75.0, False), "no_momentum": (12.0, True),
            "teacher_temp_0.08": (25.0, True), "center_momentum_0.999": (30.0, True),
            "centering_only": (15.0, True), "sharpening_only": (20.0, True),
            "no_multicrop": (70.0, False)}
    spec.update(override)
    return {n: _fake_result(n, *v) for n, v in spec.items()}


BASE = {"random_weights": 60.0, "random_weights_top5": 90.0, "raw_pixels": 80.0,
        "chance": 10.0}


def _claims(runs) -> dict[str, bool]:
    return {c["claim"]: c["agrees"] for c in ab.check_claims(runs, BASE)}


def test_verdicts_and_claims():
    assert ab.knn_floor(BASE) == 35.0
    claims = _claims(_fake_grid())
    assert len(claims) == 9 and all(claims.values()), claims
    v = ab.verdict(_fake_grid()["no_momentum"], _fake_grid()["dino"], BASE)
    assert v == {"observed": "collapsed", "agrees": True, "knn_collapsed": True,
                 "below_untrained": True, "knn_minus_dino": -63.0}
    # expected to collapse, k-NN near chance, not flagged: disagrees, and the monitor
    # claim fails
    runs = _fake_grid(**{"center_momentum_0.999": (30.0, False)})
    v = ab.verdict(runs["center_momentum_0.999"], runs["dino"], BASE)
    assert v["observed"] == "works" and not v["agrees"] and v["knn_collapsed"]
    claims = _claims(runs)
    assert not claims["centre momentum 0.999 collapses"]
    assert not claims["the collapse monitor flags every run whose k-NN fell to near chance, "
                      "and no run the paper expects to work"]
    # flagged collapse whose k-NN stays high (a short run): the monitor-based claim holds,
    # the k-NN claims do not
    claims = _claims(_fake_grid(no_momentum=(80.0, True)))
    assert claims["no momentum teacher (teacher = student of the previous iteration) "
                  "collapses"]
    assert not claims["the runs the paper expects to collapse have a lower k-NN than DINO"]
    assert not claims["the runs the paper expects to collapse fall to near-chance k-NN "
                      "(below halfway from the untrained network to chance)"]
    # a working run flagged by the monitor disagrees with the paper
    runs = _fake_grid(dino=(75.0, True))
    assert not ab.verdict(runs["dino"], None, BASE)["agrees"]
    assert not _claims(runs)["DINO (momentum teacher, centering + sharpening) does not "
                             "collapse"]
    # multi-crop not better: the claim fails; missing runs drop their claims
    claims = _claims(_fake_grid(no_multicrop=(80.0, False)))
    assert not claims["multi-crop improves k-NN (same number of steps)"]
    only = {"dino": _fake_grid()["dino"]}
    assert [c["claim"][:4] for c in ab.check_claims(only, BASE)] == ["DINO", "the "]


def test_rejudge_applies_todays_monitor_to_the_recorded_chunk_means():
    """A cached run judged under older thresholds is judged again from its recorded chunk
    means, chunk by chunk, exactly as CollapseMonitor.check judges them; the verdict the
    run logged is kept beside it when they differ."""
    log_k = math.log(1024)
    chunk = lambda e, ent, bent, kl: {"epoch": e, "loss": 6.0, "entropy_frac": ent,  # noqa: E731
                                      "batch_entropy_frac": bent, "teacher_kl": kl * log_k,
                                      "teacher_std": 0.5, "collapsed": False, "reason": None}
    logged = {"collapsed": False, "reason": None, "first_flagged_chunk": None,
              "flagged_chunks": []}
    res = {"name": "no_momentum", "config": {"out_dim": 1024}, "monitor": dict(logged),
           "chunks_summary": [chunk(0, 0.42, 0.50, 0.085), chunk(1, 0.88, 0.93, 0.052),
                              chunk(2, 0.94, 0.976, 0.035)]}
    out = ab.rejudge(res)
    assert out["monitor"]["collapsed"] and "image-independent" in out["monitor"]["reason"]
    assert out["monitor"]["flagged_chunks"] == [2] and out["monitor_logged"] == logged
    assert [c["collapsed"] for c in out["chunks_summary"]] == [False, False, True]
    assert res["monitor"] == logged  # the input is left as it was
    again = ab.rejudge(out)  # idempotent, and the first logged verdict is kept
    assert again["monitor"] == out["monitor"] and again["monitor_logged"] == logged
    # two prototypes in use: the batch-mean rule
    two = ab.rejudge(dict(res, chunks_summary=[chunk(0, 0.02, 0.10, 0.076)]))
    assert "2.0 of 1024 prototypes" in two["monitor"]["reason"]
    # nothing to judge from (no spread recorded): left alone
    bare = dict(res, chunks_summary=[{k: v for k, v in chunk(0, 0.9, 0.9, 0.01).items()
                                      if k != "teacher_std"}])
    assert ab.rejudge(bare) is bare


def test_docs_section_is_replaced_in_place_and_plot_is_small(tmp_path):
    runs = _fake_grid()
    base = dict(BASE, chance=10.5)
    res_all = {"date": "2026-01-01 00:00",
               "settings": {"steps": 20, "chunks": 4, "batch": 64, "train_images": 1000,
                            "test": 200, "seed": 0, "jobs": 2, "threads_per_run": 1,
                            "epochs_of_data": 1.28},
               "baselines": base, "runs": runs,
               "verdicts": {n: ab.verdict(r, runs["dino"], base) for n, r in runs.items()},
               "claims": ab.check_claims(runs, base),
               "machine": {"cores": 2, "cpu": "Test CPU @ 1GHz", "gpu": None},
               "load_start": [1.0, 2.0, 3.0], "load_end": [1.0, 2.5, 3.0],
               "total_seconds": 600.0}
    text = ab.markdown(res_all)
    assert text.startswith(ab.BEGIN) and text.endswith(ab.END)
    assert "| no_momentum |" in text and "**12.0**" in text and "reproduced" in text
    doc = tmp_path / "benchmarks.md"
    other = "<!-- other:begin -->\n## Other\nkeep me\n<!-- other:end -->"
    doc.write_text(f"# Benchmarks\n\n{other}\n\n{ab.BEGIN}\nold\n{ab.END}\n\ntail\n")
    ab.write_docs_section(text, doc)
    new = doc.read_text()
    assert other in new and new.endswith("tail\n") and "\nold\n" not in new
    assert new.count(ab.BEGIN) == 1 and "| dino |" in new
    fresh = tmp_path / "fresh.md"
    ab.write_docs_section(text, fresh)
    assert fresh.read_text().startswith("# Benchmarks\n\n" + ab.BEGIN)
    png = ab.plot(res_all, tmp_path / "img.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 300_000
    json.dumps(res_all)  # the results file is plain JSON


def test_one_grid_run_end_to_end(tmp_path):
    """Two steps of the sharpening-only run on 32 synthetic photos (batches of 8, no
    loader workers): training, monitor verdicts per chunk, reloading the teacher, k-NN,
    the saved result."""
    from dinofeat.datasets import export_image_folder
    rng = np.random.default_rng(0)
    x = (rng.random((32, 28, 28)) * 255).astype(np.uint8)
    y = np.arange(32) % 10
    data = export_image_folder(x, None, tmp_path / "png")
    split = ab.Split(np.arange(32), np.arange(8), x, y, x[:8], y[:8], 0.5, 0.3, data)
    small = {"batch_size_per_gpu": 8, "num_workers": 0}
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ab.run_one(ab.GRID_BY_NAME["sharpening_only"], split, tmp_path, steps=2,
                         chunks=2, overrides=small)
    assert res["steps"] == 2 and res["chunks"] == 2 and len(res["chunks_summary"]) == 2
    assert res["config"]["collapse"] == "none"
    assert 0 <= res["knn"]["top1"] <= 100 and res["knn"]["bank"] == 32
    assert res["monitor"]["collapsed"] == res["chunks_summary"][-1]["collapsed"]
    assert len(res["curves"]["iteration"]) == len(res["curves"]["entropy_frac"]) >= 2
    saved = json.loads((tmp_path / "sharpening_only" / "result.json").read_text())
    assert saved["config_key"] == res["config_key"]
    cfg = ab.run_config(ab.GRID_BY_NAME["sharpening_only"], steps=2, chunks=2, data=data,
                        output_dir=tmp_path / "elsewhere", mean=0.5, std=0.3,
                        overrides=small)
    assert ab.cached_result(tmp_path, ab.GRID_BY_NAME["sharpening_only"], cfg) is not None
