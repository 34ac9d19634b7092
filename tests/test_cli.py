"""The command line as a whole: one option vocabulary across verbs (old spellings hidden and
deprecated), --debug before or after the verb, errors pointing to the verb's help, progress
in a pipe, unreadable files named once, escaped terminal control characters, output file
modes, attn's size cap and folders, training start-up choices and recipe checks, start-up
imports, and the committed docs/cli.md.

Subprocess tests run the real ``python -m dinofeat``; the rest call ``dinofeat.cli.main``.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinofeat.cli import build_parser, main
from dinofeat.cli.common import Deprecated, resolve_model_args

REPO = Path(__file__).resolve().parents[1]
ESC_NAME = "tiny\x1b]0;pwned\x07\x1b[31mred"


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A random ViT-Tiny/16 (2 blocks, 32-px preprocessing) whose name holds ESC
    sequences, as a safetensors file."""
    import torch

    from dinofeat.backbones import DinoVisionTransformer
    from dinofeat.model import DinoModel, save_safetensors
    from dinofeat.zoo import Preprocessing
    torch.manual_seed(0)
    vit = DinoVisionTransformer(patch_size=16, embed_dim=192, depth=2, num_heads=3,
                                img_size=32)
    model = DinoModel(vit, name=ESC_NAME,
                      preprocessing=Preprocessing(resize_size=37, crop_size=32)).eval()
    return save_safetensors(model, tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Five small images (one in a sub-folder) and one broken file."""
    d = tmp_path_factory.mktemp("photos")
    (d / "sub").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        arr = (rng.random((40 + i, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(d / ("sub" if i == 4 else ".") / f"im{i}.png")
    (d / "broken.jpg").write_text("not an image")
    return d


def run_cli(*args: str, env: dict | None = None, timeout: int = 300):
    """``python -m dinofeat ARGS`` with stdout and stderr as pipes."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("DINOFEAT_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "dinofeat", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout,
                          preexec_fn=lambda: os.umask(0o022))


def in_process(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- vocabulary
def leaf_parsers(parser=None, prefix="dinofeat"):
    parser = parser or build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaf_parsers(sub, f"{prefix} {name}")


#: The option every verb uses for a concept (by the Python parameter it fills).
CANON = {"model": "--model", "out": "--out", "output_dir": "--out", "k": "-k",
         "temperature": "--temperature", "batch_size": "--batch-size",
         "batch_size_per_gpu": "--batch-size", "num_workers": "--num-workers",
         "precision": "--precision", "device": "--device", "size": "--size",
         "short_side": "--short-side", "progress": "--no-progress"}
OLD = {"--arch", "--weights", "--output", "--output-dir", "--output_dir", "--k", "--topk",
       "--T", "--imsize", "--batch-size-per-gpu", "--batch_size_per_gpu"}


def test_every_verb_uses_one_vocabulary():
    verbs = dict(leaf_parsers())
    assert {"dinofeat embed", "dinofeat attn", "dinofeat index build", "dinofeat search",
            "dinofeat dedup", "dinofeat train", "dinofeat eval knn",
            "dinofeat export"} <= set(verbs)
    meaning: dict[str, set[str]] = {}
    for verb, parser in verbs.items():
        visible = [a for a in parser._actions if a.help != argparse.SUPPRESS]
        hidden = [a for a in parser._actions if a.help == argparse.SUPPRESS]
        for a in visible:
            for s in a.option_strings:
                meaning.setdefault(s, set()).add(a.dest)
            # --arch is an architecture name: what train builds, or what push reads a
            # weights file as; never a trained model
            shown_old = set(a.option_strings) & OLD - (
                {"--arch"} if verb.endswith(("train", "push")) else set())
            assert not shown_old, f"{verb} shows the old spelling {shown_old}"
            if a.dest in CANON and a.option_strings:
                assert CANON[a.dest] in a.option_strings, (verb, a.option_strings)
        for a in hidden:  # every hidden option is a deprecated alias of a visible one
            assert isinstance(a, Deprecated), (verb, a.option_strings)
            assert any(v.dest == a.dest for v in visible) or a.dest.endswith("_alias"), (
                verb, a.option_strings)
        if any(a.dest == "device" for a in visible) and not verb.endswith("train"):
            assert any("--model" in a.option_strings for a in visible), verb
        if verb.endswith("train"):
            assert {"--arch", "--data", "--out", "--batch-size"} <= {
                s for a in visible for s in a.option_strings}
    # one option string, one parameter, across every verb
    allowed = {"--out": {"out", "output_dir"}, "--batch-size": {"batch_size",
                                                                "batch_size_per_gpu"}}
    for option, dests in meaning.items():
        assert len(dests) == 1 or dests <= allowed.get(option, set()), (option, dests)


OLD_NEW = [
    (["embed", "d", "--out", "f.npy", "--arch", "vit_s8"],
     ["embed", "d", "--out", "f.npy", "--model", "vit_s8"], ["model"]),
    (["embed", "d", "--out", "f.npy", "--weights", "w.pth"],
     ["embed", "d", "--out", "f.npy", "--model", "w.pth"], ["model"]),
    (["search", "i", "q.jpg", "--weights", "w.pth", "--k", "3"],
     ["search", "i", "q.jpg", "--model", "w.pth", "-k", "3"], ["model", "k"]),
    (["dedup", "d", "--k", "3"], ["dedup", "d", "-k", "3"], ["k"]),
    (["attn", "x.jpg", "--out", "o", "--size", "300"],
     ["attn", "x.jpg", "--out", "o", "--short-side", "300"], ["short_side"]),
    (["eval", "knn", "--train", "a", "--val", "b", "--T", "0.1", "--k", "5", "7"],
     ["eval", "knn", "--train", "a", "--val", "b", "--temperature", "0.1", "-k", "5", "7"],
     ["temperature", "k"]),
    (["eval", "copydetect", "--data-root", "c", "--imsize", "300", "--topk", "7"],
     ["eval", "copydetect", "--data-root", "c", "--size", "300", "-k", "7"], ["size", "k"]),
    (["train", "--output", "r", "--batch-size-per-gpu", "8"],
     ["train", "--out", "r", "--batch-size", "8"], ["output_dir", "batch_size_per_gpu"]),
]


@pytest.mark.parametrize("old,new,dests", OLD_NEW, ids=[" ".join(c[0][:4]) for c in OLD_NEW])
def test_old_spellings_still_work_with_one_warning(old, new, dests, capsys):
    Deprecated._warned.clear()
    parser = build_parser()
    a_new = parser.parse_args(new)
    assert capsys.readouterr().err == ""
    a_old = parser.parse_args(old)
    err = capsys.readouterr().err
    n_old = sum(1 for t in old if t in OLD or t == "--size" and old[0] == "attn")
    lines = err.strip().splitlines()
    assert len(lines) == n_old and all("deprecated" in ln for ln in lines), err
    for ns in (a_new, a_old):
        if "model" in dests:
            resolve_model_args(ns, default="")
    for d in dests:
        assert getattr(a_old, d) == getattr(a_new, d), d


# ----------------------------------------------------------- errors, --debug
def test_train_arch_typo_is_an_error_listing_the_architectures(photos, tmp_path):
    r = run_cli("train", "--arch", "vit_s17", "--data", str(photos), "--out",
                str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    line, = [ln for ln in r.stderr.splitlines() if ": error: " in ln]
    assert "vit_s17" in line and "vit_s16" in line and "resnet50" in line
    assert "--patch-size" in line and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_debug_after_the_verb_shows_the_traceback(weights, tmp_path):
    missing = str(tmp_path / "missing")
    plain = run_cli("embed", missing, "--out", str(tmp_path / "f.npy"), "--model",
                    str(weights))
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = run_cli("embed", missing, "--out", str(tmp_path / "f.npy"), "--model",
                    str(weights), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "FileNotFoundError" in debug.stderr


def test_debug_before_the_verb(weights, tmp_path, capsys):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "embed", str(tmp_path / "missing"), "--out", str(tmp_path / "f.npy"),
              "--model", str(weights)])


def test_errors_point_to_the_verbs_own_help(photos, tmp_path, capsys):
    rc, _, err = in_process(["embed", str(photos), "--out", str(tmp_path / "f.npy"),
                             "--bogus"], capsys)
    assert rc == 2 and "unrecognized arguments: --bogus" in err
    assert "'dinofeat embed --help'" in err and err.count("\n") == 1
    rc, _, err = in_process(["embed", str(photos), "--out", str(tmp_path / "f.txt")], capsys)
    assert rc == 2 and "'dinofeat embed --help'" in err and err.count("\n") == 1


# -------------------------------------------------------- progress, outputs
def test_embed_in_a_pipe_prints_progress_lines_names_bad_files_once(weights, photos,
                                                                     tmp_path):
    out = tmp_path / "f.safetensors"
    r = run_cli("embed", str(photos), "--model", str(weights), "--out", str(out),
                "--num-workers", "0", env={"DINOFEAT_PROGRESS_INTERVAL": "0"})
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    bar = [ln for ln in r.stderr.splitlines() if ln.startswith("embed:")]
    assert bar and "6/6" in bar[-1], r.stderr  # files, the broken one included
    assert (r.stdout + r.stderr).count("broken.jpg") == 1, (r.stdout, r.stderr)
    assert "rank 0" not in r.stderr
    assert "skipped 1 unreadable file" in r.stdout and "file(s)" not in r.stdout
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    # read back with the documented reader: paths absolute? no: as given, in order
    from dinofeat.extract import load_features
    f = load_features(out)
    assert f.features.shape == (5, 192) and len(f.paths) == 5


def test_attn_folder_in_a_pipe_one_subfolder_per_image(weights, photos, tmp_path):
    r = run_cli("attn", str(photos), "--model", str(weights), "--out", str(tmp_path / "a"),
                env={"DINOFEAT_PROGRESS_INTERVAL": "0"})
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "attn:" in r.stderr and "6/6" in r.stderr
    for name in ("im0", "im1", "im2", "im3", "sub/im4"):
        assert (tmp_path / "a" / name / "masks.png").is_file(), name
    assert "broken.jpg" in r.stdout and "attention maps of 5 images" in r.stdout
    assert "\x1b" not in r.stdout and "\\x1b" in r.stdout


def test_attn_caps_large_images_and_takes_more_on_request(weights, tmp_path, capsys):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((600, 700, 3), np.uint8)).save(big)
    rc, out, _ = in_process(["attn", str(big), "--model", str(weights), "--out",
                             str(tmp_path / "a")], capsys)
    assert rc == 0
    with Image.open(tmp_path / "a" / "image.png") as im:
        assert min(im.size) == 480  # 700x600 brought down to short side 480 (560x480)
    rc, _, _ = in_process(["attn", str(big), "--model", str(weights), "--out",
                           str(tmp_path / "b"), "--short-side", "full"], capsys)
    with Image.open(tmp_path / "b" / "image.png") as im:
        assert rc == 0 and im.size == (688, 592)  # whole image, cut to 16-px patches
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(small)
    rc, _, _ = in_process(["attn", str(small), "--model", str(weights), "--out",
                           str(tmp_path / "c")], capsys)
    with Image.open(tmp_path / "c" / "image.png") as im:
        assert rc == 0 and im.size == (80, 64)  # never upscaled


def test_control_characters_are_escaped_everywhere(weights, photos, tmp_path, capsys):
    idx = str(tmp_path / "p.idx")
    outs = []
    for argv in (["index", "build", str(photos), "--model", str(weights), "--out", idx,
                  "--no-progress", "--num-workers", "0"],
                 ["index", "info", idx],
                 ["search", idx, str(photos / "im0.png"), "-k", "2", "--model", str(weights)],
                 ["dedup", str(photos), "--model", str(weights), "--threshold", "0.5",
                  "--no-progress", "--num-workers", "0"]):
        rc, out, err = in_process(argv, capsys)
        assert rc == 0, (argv, err)
        assert "\x1b" not in out + err and "\x07" not in out + err, argv
        outs.append(out)
    assert "\\x1b]0;pwned\\x07" in outs[1]  # index info shows the name, escaped
    assert "dedup" not in outs[3].split("\n", 1)[1][:0]  # (summary printed once, below)
    assert sum("duplicate group" in ln for ln in outs[3].splitlines()) == 1


# -------------------------------------------------------------------- train
def test_train_machine_choices(tmp_path):
    from dinofeat.cli.train import cpu_has_bf16, machine_choices
    from dinofeat.training.config import TrainConfig
    d = tmp_path / "five"
    d.mkdir()
    for i in range(5):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / f"{i}.png")
    cfg = TrainConfig(data=str(d), device="cpu")
    changes, why = machine_choices(cfg, given=set())
    assert changes["batch_size_per_gpu"] == 4  # the largest power of two in 5
    assert changes["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    assert 0 <= changes["num_workers"] < max(1, len(os.sched_getaffinity(0)))
    assert len(why) == 3
    given, _ = machine_choices(cfg, given={"batch_size_per_gpu", "precision", "num_workers"})
    assert given == {}


def test_failing_train_start_leaves_no_run_folder(photos, tmp_path, capsys):
    run = tmp_path / "run"
    rc, _, err = in_process(["train", "--data", str(photos), "--out", str(run),
                             "--batch-size", "64", "--arch", "vit_tiny",
                             "--warmup-epochs", "0", "--epochs", "1"], capsys)
    assert rc == 2 and "fewer than one batch" in err, err
    assert not run.exists()


def test_resume_with_another_recipe_is_refused(photos, tmp_path, capsys):
    from dinofeat.training.config import TrainConfig
    run = tmp_path / "run"
    run.mkdir()
    saved = TrainConfig(data=str(photos), output_dir=str(run), local_crops_number=8)
    (run / "config.json").write_text(json.dumps(saved.to_dict()))
    (run / "checkpoint.pth").write_bytes(b"")
    rc, _, err = in_process(["train", "--data", str(photos), "--out", str(run),
                             "--local-crops-number", "6"], capsys)
    assert rc == 2 and "--local-crops-number 8 in the run, 6 now" in err, err
    assert (run / "checkpoint.pth").exists()


# ------------------------------------------------------------------ startup
def test_help_and_models_do_not_import_torch():
    code = ("import sys, contextlib, io\n"
            "import dinofeat\n"
            "from dinofeat.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['models'])\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'faiss') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


# --------------------------------------------------------------------- docs
def test_docs_cli_md_is_generated_from_help():
    from dinofeat.cli.reference import render
    committed = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == render(), ("docs/cli.md is stale: run "
                                   "python -m dinofeat.cli.reference")


def test_training_options_name_the_runtime_precisions():
    from dinofeat.runtime import PRECISIONS
    from dinofeat.training.config import PRECISIONS as OPTION_PRECISIONS
    assert OPTION_PRECISIONS == PRECISIONS
