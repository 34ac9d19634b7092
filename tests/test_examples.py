"""Every example in examples/ runs, as a user runs it, on tiny inputs, offline.

Each script is started as a subprocess (``HF_HUB_OFFLINE=1``, one thread) on photos the
test draws itself (three colour classes of 64x64 PNGs, plus a planted JPEG copy) with a
small random-weights ViT saved as safetensors and passed as ``--model``; the assertions
are on what the script wrote and printed. The notebook's code cells run the same way, its
model and folder injected through the environment variables it reads. A new example
without a test here fails :func:`test_every_example_is_tested`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
NOTEBOOK = EXAMPLES / "attention_and_neighbours.ipynb"
TESTED = {"quickstart.py", "retrieval.py", "dedup.py", "attention.py", "knn_classify.py",
          "train_custom_folder.py", "attention_and_neighbours.ipynb"}
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}
PER_CLASS = 4
HEADS = 3  # vit_mini: 192-d, 4 blocks, 3 heads


def draw(rng: np.random.Generator, rgb: tuple[int, int, int], size: int = 64) -> Image.Image:
    """A noisy square of colour ``rgb`` with two inverted rectangles at random places."""
    a = np.clip(np.array(rgb) + rng.normal(0, 30, (size, size, 3)), 0, 255)
    for _ in range(2):
        h, w = rng.integers(10, 30, 2)
        y, x = rng.integers(0, size - 30, 2)
        a[y:y + h, x:x + w] = 255 - a[y:y + h, x:x + w]
    return Image.fromarray(a.astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """``photos/<colour>/<colour>_<i>.png`` (+ ``red/red_0_copy.jpg``, a re-encoded copy of
    ``red_0.png``), ``val/<colour>/`` with two more images per class, and ``tiny.safetensors``:
    a random-weights ViT (vit_mini16, 64-px preprocessing) written with save_safetensors."""
    import torch

    from dinofeat import DinoModel
    from dinofeat.backbones import build_backbone
    from dinofeat.model import save_safetensors
    from dinofeat.zoo import Preprocessing

    root = tmp_path_factory.mktemp("examples")
    rng = np.random.default_rng(0)
    for split, count in (("photos", PER_CLASS), ("val", 2)):
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                draw(rng, rgb).save(folder / f"{name}_{i}.png")
    original = Image.open(root / "photos" / "red" / "red_0.png")
    original.save(root / "photos" / "red" / "red_0_copy.jpg", quality=95)
    torch.manual_seed(0)
    model = DinoModel(build_backbone("vit_mini16", img_size=64), name="tiny-random",
                      preprocessing=Preprocessing(resize_size=64, crop_size=64))
    save_safetensors(model, root / "tiny.safetensors")
    return {"root": root, "photos": root / "photos", "val": root / "val",
            "model": root / "tiny.safetensors"}


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 180) -> str:
    """Run ``python <args>`` offline on one thread in ``cwd``; its stdout (fails on rc != 0)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


def example(name: str) -> str:
    return str(EXAMPLES / name)


def test_every_example_is_tested_and_documented():
    found = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".ipynb")}
    assert found == TESTED, "examples without a test (or tests without an example)"
    for name in sorted(found - {NOTEBOOK.name}):
        doc = (EXAMPLES / name).read_text()
        assert doc.startswith('"""'), f"{name} has no module docstring"
        assert f"python examples/{name}" in doc, f"{name}'s docstring does not say how to run it"
    docs_page = (REPO / "docs" / "examples.md").read_text()
    for name in found:
        assert f"examples/{name}" in docs_page, f"docs/examples.md does not list {name}"


def test_quickstart(data, tmp_path):
    out = run([example("quickstart.py"), str(data["photos"]), "--model", str(data["model"]),
               "--out", "attn"], tmp_path)
    assert f"{3 * PER_CLASS + 1} photos -> features (13, 192)" in out
    first = sorted(data["photos"].rglob("*.png"))[0]
    assert re.search(rf"1\.000  {re.escape(str(first))}", out), out
    assert {"image.png", "mean_overlay.png", "masks.png"} <= {p.name for p in
                                                             (tmp_path / "attn").iterdir()}


def test_retrieval_finds_the_query_and_its_copy(data, tmp_path):
    query = data["photos"] / "red" / "red_0.png"
    out = run([example("retrieval.py"), str(data["photos"]), str(query), "--model",
               str(data["model"]), "-k", "4", "--thumb", "32", "--out", "nb.png",
               "--index", "photos.idx"], tmp_path)
    assert f"{3 * PER_CLASS + 1} images indexed" in out
    ranked = re.findall(r"^\s+(\d+)  cosine ([\d.]+)  (.+)$", out, flags=re.M)
    assert len(ranked) == 4
    assert ranked[0][1:] == ("1.000", str(query))                    # itself first
    assert Path(ranked[1][2]).name == "red_0_copy.jpg"                # then its copy
    assert all(Path(p).parent.name == "red" for _, _, p in ranked)   # then its class
    with Image.open(tmp_path / "nb.png") as im:                       # 1 + 4 tiles of 36 px
        assert im.size == (5 * 36 + 4, 36)
    assert json.loads((tmp_path / "photos.idx" / "index.json").read_text())["count"] == 13


def test_dedup_finds_the_planted_copy(data, tmp_path):
    # With this model (cls+gem features) the copy scores 0.989, every other pair <= 0.968.
    out = run([example("dedup.py"), str(data["photos"]), "--model", str(data["model"]),
               "--threshold", "0.98", "--out", "groups.json", "--html", "report.html"],
              tmp_path)
    groups = json.loads((tmp_path / "groups.json").read_text())["groups"]
    assert [sorted(Path(m["path"]).name for m in g["members"]) for g in groups] == \
        [["red_0.png", "red_0_copy.jpg"]]
    assert "1 duplicate groups" in out and "red_0_copy.jpg" in out
    assert "<img src=\"data:image/jpeg;base64," in (tmp_path / "report.html").read_text()


def test_attention_pictures(data, tmp_path):
    images = [data["photos"] / "green" / "green_1.png", data["val"] / "blue" / "blue_0.png"]
    out = run([example("attention.py"), *map(str, images), "--model", str(data["model"]),
               "--size", "96", "--out", "attn"], tmp_path)
    assert out.count(f"{HEADS} heads at 96x96 px") == 2
    for img in images:
        folder = tmp_path / "attn" / img.stem
        names = {p.name for p in folder.iterdir()}
        assert {f"head{h:02d}_{kind}.png" for h in range(HEADS)
                for kind in ("heatmap", "overlay", "mask")} <= names
        with Image.open(folder / "head00_overlay.png") as im:
            assert im.size == (96, 96)
        with Image.open(folder / "all_heads.png") as im:   # image, mean, heads, masks
            assert im.size == ((2 + 2 * HEADS) * 97 - 1, 96)


def test_knn_classify(data, tmp_path):
    out = run([example("knn_classify.py"), str(data["photos"]), str(data["val"]),
               "--model", str(data["model"]), "-k", "5", "--out", "pred.csv"], tmp_path)
    top1 = float(re.search(r"top-1 ([\d.]+)%", out).group(1))
    with open(tmp_path / "pred.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(COLOURS)
    right = sum(r["class"] == r["predicted"] for r in rows)
    assert top1 == pytest.approx(100 * right / len(rows), abs=0.05)
    assert right == len(rows)  # colour classes: easy even for random weights


def test_train_custom_folder_then_load_the_run(data, tmp_path):
    out = run([example("train_custom_folder.py"), str(data["photos"]), "--out", "run",
               "--arch", "vit_mini8", "--image-size", "32", "--batch-size", "4",
               "--epochs", "2", "--set", "out_dim=128", "--set", "hidden_dim=64",
               "--set", "bottleneck_dim=32", "--set", "local_crops_number=2",
               "--set", "num_workers=0"], tmp_path)
    assert "done: 2 epochs, 6 steps" in out
    assert "embedded 13 images -> 192-d features" in out
    run_dir = tmp_path / "run"
    assert {"checkpoint.pth", "config.json", "log.jsonl"} <= {p.name for p in run_dir.iterdir()}
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["out_dim"], config["global_crop_size"]) == (128, 32)

    import dinofeat
    model = dinofeat.load(run_dir, device="cpu")
    assert (model.embed_dim, model.patch_size, model.num_heads) == (192, 8, HEADS)
    assert model.embed(data["val"]).shape == (2 * len(COLOURS), 192)


def test_notebook_code_cells_run(data, tmp_path):
    nb = json.loads(NOTEBOOK.read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells and all(not c["outputs"] and c["execution_count"] is None for c in cells), \
        "commit the notebook without outputs"
    query = data["photos"] / "blue" / "blue_2.png"
    checks = textwrap.dedent(f"""
        import json, matplotlib.pyplot as plt
        ns = {{}}
        for n, cell in enumerate(json.load(open({str(NOTEBOOK)!r}))["cells"]):
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), f"cell {{n}}", "exec"), ns)
        assert ns["maps"].num_heads == {HEADS} and ns["maps"].image.shape == (80, 80, 3)
        assert ns["found"][0] == (ns["found"][0][0], {str(query)!r}), ns["found"]
        assert abs(ns["found"][0][0] - 1) < 1e-4 and len(ns["found"]) == 5
        sizes = [tuple(plt.figure(f).get_size_inches()) for f in plt.get_fignums()]
        print("figures", len(plt.get_fignums()), sizes)
    """)
    out = run(["-c", checks], tmp_path, env={
        "DINOFEAT_EXAMPLE_MODEL": str(data["model"]),
        "DINOFEAT_EXAMPLE_IMAGES": str(data["photos"]),
        "DINOFEAT_EXAMPLE_QUERY": str(query), "DINOFEAT_EXAMPLE_SIZE": "80"})
    assert "\nfigures 2 " in out
