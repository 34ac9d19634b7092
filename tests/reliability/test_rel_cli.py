"""User mistakes on the command line, for every sub-command: wrong arguments, missing
paths, conflicting options. Each must end with ONE line on stderr
(``dinofeat...: error: ...``) and a non-zero exit code, never a traceback; ``--debug``
shows the traceback instead.

The table below is run in-process (``dinofeat.cli.main``), with the network off and empty
weight caches, so that a zoo name without weights is also a clean error. One subprocess
test checks the real executable.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from _zoo import picture
from dinofeat.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_weights):
    """Files the cases refer to: images, a text file named .jpg, a saved index, ..."""
    d = tmp_path_factory.mktemp("cli")
    imgs = d / "imgs"
    (imgs / "a").mkdir(parents=True)
    (imgs / "b").mkdir()
    for i in range(4):
        Image.fromarray(picture(40, 40, seed=60 + i)).save(imgs / "ab"[i % 2] / f"{i}.png")
    (d / "notes.jpg").write_text("not an image")
    (d / "file.txt").write_text("hello")
    (d / "not-an-index").mkdir()
    (d / "not-an-index" / "x.txt").write_text("x")
    from dinofeat.search import KNNIndex
    import numpy as np
    ix = KNNIndex(dim=4)
    ix.add(np.eye(4, dtype=np.float32))
    ix.save(d / "vec.idx")
    return {"d": str(d), "imgs": str(imgs), "img": str(imgs / "a" / "0.png"),
            "w": str(tiny_weights), "notes": str(d / "notes.jpg"), "txt": str(d / "file.txt"),
            "missing": str(d / "missing"), "notidx": str(d / "not-an-index"),
            "vecidx": str(d / "vec.idx")}


# (argv template, a piece of the expected message); {x} are keys of `paths`
CASES = [
    ([], None),  # no command: help, exit 2
    (["frobnicate"], "invalid choice"),
    (["models", "--bogus"], "unrecognized arguments"),
    # embed
    (["embed", "{imgs}"], "--out"),
    (["embed", "{missing}", "--out", "{o}/f.npy", "--model", "{w}"], "missing"),
    (["embed", "{imgs}", "--out", "{o}/f.txt", "--model", "{w}"], ".safetensors or .npy"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "{w}", "--shard-size", "0"],
     "--shard-size"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "{w}", "--pool", "max"],
     "invalid choice"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "{w}", "--batch-size", "abc"],
     "invalid int value"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "{w}", "--batch-size", "0"],
     "batch_size"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "{w}", "--pool", "gem",
      "--n-last-blocks", "4"], "cannot be combined"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "{w}", "--avgpool",
      "--pool", "gem"], "avgpool"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "{w}", "--size", "-5"], "size"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "{missing}.pth"], "missing.pth"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "{txt}"], "file.txt"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "vit_giant"], "vit_giant"),
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "vit_s16"], "vit_s16"),  # no weights
    (["embed", "{imgs}", "--out", "{o}/f.npy", "--model", "{w}", "--precision", "fp8"],
     "invalid choice"),
    # attn
    (["attn", "{missing}.jpg", "--out", "{o}/a", "--model", "{w}"], "missing.jpg"),
    (["attn", "{notes}", "--out", "{o}/a", "--model", "{w}"], "notes.jpg"),
    (["attn", "{img}", "--out", "{o}/a", "--model", "{w}", "--threshold", "1.5"],
     "threshold"),
    (["attn", "{img}", "--out", "{o}/a", "--model", "{w}", "--short-side", "0"],
     "short-side"),
    (["attn", "{notidx}", "--out", "{o}/a", "--model", "{w}"], "no image files"),
    (["attn", "{img}", "--out", "{txt}", "--model", "{w}"], "file.txt"),
    # index
    (["index"], "ACTION"),
    (["index", "build", "{missing}", "--out", "{o}/i.idx", "--model", "{w}"], "missing"),
    (["index", "build", "{imgs}", "--out", "{o}/i.idx", "--model", "{w}",
      "--checkpoint-every", "0"], "--checkpoint-every"),
    (["index", "build", "{imgs}", "--out", "{o}/i.idx", "--model", "{w}", "--factory",
      "Bogus99"], "Bogus99"),
    (["index", "build", "{imgs}", "--out", "{txt}", "--model", "{w}"], "file.txt"),
    (["index", "build", "{imgs}", "--out", "{notidx}", "--model", "{w}"], "not-an-index"),
    (["index", "add", "{missing}.idx", "{imgs}"], "missing.idx"),
    (["index", "add", "{vecidx}", "{imgs}"], "vec.idx"),  # no model recorded
    (["index", "info", "{missing}.idx"], "missing.idx"),
    (["index", "info", "{notidx}"], "not-an-index"),
    (["index", "info", "{txt}"], "file.txt"),
    # search
    (["search", "{missing}.idx", "{img}"], "missing.idx"),
    (["search", "{vecidx}", "{missing}.jpg"], "missing.jpg"),
    (["search", "{vecidx}", "{img}", "-k", "0"], "-k"),
    (["search", "{vecidx}", "{img}"], "vec.idx"),  # an index without a model
    (["search", "{vecidx}"], "required"),
    # dedup
    (["dedup", "{missing}", "--model", "{w}"], "missing"),
    (["dedup", "{imgs}", "--model", "{w}", "--threshold", "2"], "--threshold"),
    (["dedup", "{imgs}", "--model", "{w}", "--out", "{o}/g.txt"], ".json or .csv"),
    (["dedup", "{imgs}", "--model", "{w}", "--whitening", "{missing}.safetensors"],
     "missing.safetensors"),
    (["dedup", "{imgs}", "--model", "{w}", "-k", "0"], "k"),
    # train
    (["train", "--out", "{o}/r"], "--data"),
    (["train", "--data", "{missing}", "--out", "{o}/r"], "missing"),
    (["train", "--data", "{txt}", "--out", "{o}/r"], "file.txt"),
    (["train", "--data", "{imgs}", "--out", "{o}/r", "--epochs", "-1"], "epochs"),
    (["train", "--data", "{imgs}", "--out", "{o}/r", "--epochs", "2", "--warmup-epochs", "5"],
     "warm-up"),
    (["train", "--data", "{imgs}", "--out", "{o}/r", "--arch", "vit_giant"], "vit_giant"),
    (["train", "--data", "{imgs}", "--out", "{o}/r", "--preset", "bogus"], "invalid choice"),
    (["train", "--data", "{imgs}", "--out", "{o}/r", "--resume-from", "{missing}.pth",
      "--batch-size", "2"], "missing.pth"),
    (["train", "--data", "{imgs}", "--out", "{o}/r", "--batch-size", "0"], "batch"),
    (["train", "--data", "{imgs}", "--out", "{o}/r", "--teacher-temp", "abc"], "invalid"),
    (["train", "--data", "{imgs}", "--out", "{txt}"], "file.txt"),
    # eval
    (["eval"], "TASK"),
    (["eval", "knn", "--val", "{imgs}"], "--train"),
    (["eval", "knn", "--train", "{missing}", "--val", "{imgs}", "--model", "{w}"], "missing"),
    (["eval", "knn", "--train", "{imgs}", "--val", "{imgs}", "--model", "{w}", "-k", "0"],
     "k"),
    (["eval", "knn", "--train", "{imgs}", "--val", "{imgs}", "--model", "{w}", "--temperature",
      "0"], "temperature"),
    (["eval", "linear", "--model", "{w}"], "--train"),
    (["eval", "linear", "--model", "{w}", "--evaluate", "{missing}.pth", "--val", "{imgs}"],
     "missing.pth"),
    (["eval", "linear", "--model", "{w}", "--train", "{imgs}", "--val", "{imgs}",
      "--epochs", "0", "--out", "{o}/lin"], "epochs"),
    (["eval", "retrieval", "--dataset", "rome", "--data-root", "{d}"], "invalid choice"),
    (["eval", "retrieval", "--dataset", "roxford5k", "--data-root", "{missing}",
      "--model", "{w}"], "missing"),
    (["eval", "copydetect", "--data-root", "{missing}", "--model", "{w}"], "missing"),
    (["eval", "copydetect", "--data-root", "{imgs}", "--model", "{w}", "--whitening",
      "{missing}.json"], "missing"),
    (["eval", "davis", "--data-root", "{missing}", "--out", "{o}/dv", "--model", "{w}"],
     "missing"),
    # demo, export
    (["demo", "--steps", "0", "--out", "{o}/demo"], "steps"),
    (["demo", "--data", "{missing}", "--out", "{o}/demo"], "missing"),
    (["export", "--out", "{o}/m.txt", "--model", "{w}"], ".onnx"),
    (["export", "--format", "tflite", "--out", "{o}/m.onnx", "--model", "{w}"],
     "invalid choice"),
    (["export", "--out", "{o}/m.onnx", "--model", "{missing}.pth"], "missing.pth"),
    (["export", "--out", "{o}/m.onnx", "--model", "{w}", "--check-size", "0"], "size"),
]


# A progress line, as written to a pipe ("embed:  50%|#####     | 2/4 [...]").
PROGRESS = re.compile(r"^[^:]+: +\d+%\|")


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code if isinstance(e.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for name in ("HF_HOME", "DINOFEAT_WEIGHTS_DIR", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DINOFEAT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("argv,expect", CASES, ids=[" ".join(c[0][:3]) or "(none)" for c in CASES])
def test_user_mistake_is_one_line_and_nonzero(argv, expect, paths, offline, tmp_path, tally):
    argv = [a.format(**{**paths, "o": str(tmp_path)}) for a in argv]
    rc, out, err = _run(argv)
    assert rc != 0, (argv, out[-500:], err[-500:])
    assert "Traceback" not in err and "Traceback" not in out
    if expect is None:  # bare `dinofeat`: the help
        assert rc == 2 and "usage" in out
        return
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(
        "dinofeat.") and not PROGRESS.match(ln)]  # log and progress lines are not the error
    errors = [ln for ln in lines if ln.startswith("dinofeat") and ": error: " in ln]
    assert len(errors) == 1 and lines[0] == errors[0], (argv, err)
    # the one error line; only the missing-weights error adds its list of places searched
    assert len(lines) == 1 or lines[0].endswith("Searched:"), (argv, err)
    assert expect in lines[0], (expect, lines[0])
    assert rc == 2 or "run with --debug" in lines[0], (rc, lines[0])
    tally.add("CLI: user mistakes", inputs=1, checks=3)


def test_debug_shows_the_traceback(paths, offline, tally):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "embed", paths["missing"], "--out", paths["d"] + "/f.npy",
              "--model", paths["w"]])
    tally.add("CLI: user mistakes", inputs=1, checks=1)


@pytest.mark.slow
def test_real_process_exit_code_and_stderr(paths, tally):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "dinofeat", "index", "info", paths["notidx"]],
                       capture_output=True, env=env, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 2 and err.count("\n") == 1 and "not-an-index" in err, err
    assert err.startswith("dinofeat: error: ")
    tally.add("CLI: user mistakes", inputs=1, checks=2)
