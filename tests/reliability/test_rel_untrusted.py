"""Untrusted files: every loader in dinofeat refuses a pickle that would run code, and
says clearly what is wrong with truncated, empty or mismatched files.

Each *target* below is one place where dinofeat reads a file a user (or a download) can
hand it: ``dinofeat.load`` (a file, a run folder, a zoo name resolved through
``$DINOFEAT_WEIGHTS_DIR``), ``weights.read_checkpoint``, training resume and
``--resume-from``, linear heads (``.pth`` and ``.safetensors``, ``attach_classifier``,
the linear probe's own resume checkpoint), whitening files (and ``dedup --whitening``),
every file of a saved index, the retrieval ground truth, feature files and their
sidecar, ONNX exports, training configs, the evaluation feature cache and the shard
manifest of an interrupted extraction.

Each target builds a valid file first and checks that the loader accepts it (so a loader
that refused everything would fail here), then puts each hostile payload in its place:
the payload's ``__reduce__`` calls ``exec`` to create a marker file. The tests check that
the loader raised a clear error naming the file (or, for the two caches, quietly
recomputed) and that the marker does not exist; each payload is also shown to be live,
i.e. an unrestricted unpickling does run it.

``test_no_unsafe_load_in_the_package`` keeps new loaders honest: no ``torch.load``
without ``weights_only=True``, no ``pickle`` outside the restricted unpickler, no
``np.load(allow_pickle=True)``, no ``torch.jit.load`` of user files.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import dinofeat
from _zoo import picture
from dinofeat.cli import main
from dinofeat.eval.linear import attach_classifier

PACKAGE = Path(dinofeat.__file__).resolve().parent


# ------------------------------------------------------------------------ payloads
class Payload:
    """Unpickling this object runs ``exec``, which creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _plausible(marker: Path) -> dict:
    """A checkpoint-looking dict with the payload where release checkpoints keep
    ``args``."""
    return {"student": {"w": torch.zeros(2)}, "teacher": {"w": torch.zeros(2)},
            "optimizer": {}, "epoch": 1, "iteration": 1, "config": {},
            "state_dict": {"linear.weight": torch.zeros(2, 2)}, "args": Payload(marker)}


def payload_bytes(kind: str, marker: Path) -> bytes:
    buf = io.BytesIO()
    if kind == "torch.save":
        torch.save(_plausible(marker), buf)
    elif kind == "torch.save legacy":
        torch.save(_plausible(marker), buf, _use_new_zipfile_serialization=False)
    elif kind == "raw pickle":
        pickle.dump({"epoch": 3, "gnd": [], "args": Payload(marker)}, buf, protocol=2)
    elif kind == "npy object array":
        np.save(buf, np.array([Payload(marker), 1], dtype=object), allow_pickle=True)
    else:  # pragma: no cover
        raise ValueError(kind)
    return buf.getvalue()


PAYLOADS = ("torch.save", "torch.save legacy", "raw pickle", "npy object array")


class _Stubbed(pickle.Unpickler):
    """Unrestricted unpickling with torch storages stubbed out (tensors become None)."""

    def persistent_load(self, pid):
        return None

    def find_class(self, module, name):
        if name.startswith("_rebuild_"):
            return lambda *a, **k: None
        return super().find_class(module, name)


def run_unrestricted(kind: str, data: bytes) -> None:
    """What a careless loader would do with ``data``."""
    if kind == "torch.save":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            _Stubbed(io.BytesIO(z.read(name))).load()
    elif kind == "torch.save legacy":
        f = io.BytesIO(data)
        for _ in range(4):  # magic, protocol, sys info, then the object
            _Stubbed(f).load()
    elif kind == "raw pickle":
        pickle.loads(data)
    else:
        np.load(io.BytesIO(data), allow_pickle=True)


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_are_live(kind, tmp_path, tally):
    marker = tmp_path / "ran"
    run_unrestricted(kind, payload_bytes(kind, marker))
    assert marker.exists()
    tally.add("untrusted: payload liveness", inputs=1, checks=1)


# ------------------------------------------------------------------------- targets
@dataclass
class Target:
    """``make(ctx) -> path`` writes a valid file under ``ctx.tmp`` and returns the path the
    payload will replace; ``load(ctx, path)`` reads it as dinofeat would; ``fallback``: a
    bad file is silently recomputed (caches) instead of raising. ``cache``: the files
    ``make`` writes are made once per module and copied for each test."""

    name: str
    make: Callable
    load: Callable
    fallback: bool = False
    needs: str | None = None
    cache: bool = True


class Ctx:
    def __init__(self, tmp: Path, model, weights: Path, images: Path, run: Path, monkeypatch):
        self.tmp, self.model, self.weights, self.images, self.run = tmp, model, weights, images, run
        self.monkeypatch = monkeypatch


def _tiny_backbone_pth(c: Ctx) -> Path:
    p = c.tmp / "backbone.pth"
    torch.save(c.model.backbone.state_dict(), p)
    return p


def _load_file(c: Ctx, p: Path):
    return dinofeat.load(p, device="cpu")


def _run_copy(c: Ctx) -> Path:
    import shutil
    d = c.tmp / "run"
    shutil.copytree(c.run, d)
    return d / "checkpoint.pth"


def _load_run(c: Ctx, p: Path):
    return dinofeat.load(p.parent, device="cpu")


def _zoo_name(c: Ctx) -> Path:
    d = c.tmp / "weights-dir"
    d.mkdir()
    c.monkeypatch.setenv("DINOFEAT_WEIGHTS_DIR", str(d))
    c.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return d / "vit_s16.pth"  # no valid 21M-parameter file is made here


def _load_zoo(c: Ctx, p: Path):
    return dinofeat.load("vit_s16", device="cpu")


def _read_ckpt(c: Ctx, p: Path):
    from dinofeat.weights import read_checkpoint
    return read_checkpoint(p)


def _train_cfg(c: Ctx, out: Path, **kw):
    from dinofeat.training.config import TrainConfig
    base = dict(arch="vit_mini16", out_dim=32, hidden_dim=32, bottleneck_dim=16,
                global_crop_size=32, local_crop_size=16, local_crops_number=1,
                batch_size_per_gpu=2, epochs=1, warmup_epochs=0, warmup_teacher_temp_epochs=0,
                num_workers=0, log_every=100, precision="fp32", saveckp_freq=0,
                data=str(c.images), output_dir=str(out))
    base.update(kw)
    return TrainConfig(**base)


def _resume(c: Ctx, p: Path):
    from dinofeat.training.loop import train
    return train(_train_cfg(c, p.parent))  # finished run: resumes, nothing left to do


def _resume_from(c: Ctx, p: Path):
    from dinofeat.training.loop import train
    return train(_train_cfg(c, c.tmp / "fresh", resume_from=str(p)))


def _cli_resume_from(c: Ctx, p: Path):
    err = io.StringIO()
    import contextlib
    with contextlib.redirect_stderr(err):
        rc = main(["train", "--arch", "vit_mini16", "--data", str(c.images), "--out",
                   str(c.tmp / "cli-run"), "--resume-from", str(p), "--epochs", "1",
                   "--batch-size", "2", "--num-workers", "0",
                   "--global-crop-size", "32", "--local-crop-size", "16",
                   "--local-crops-number", "1", "--out-dim", "32", "--hidden-dim", "32",
                   "--bottleneck-dim", "16", "--warmup-epochs", "0",
                   "--warmup-teacher-temp-epochs", "0", "--precision", "fp32"])
    text = err.getvalue()
    if rc != 0:
        lines = [line for line in text.splitlines() if line.startswith("dinofeat: error")]
        assert len(lines) == 1 and "Traceback" not in text, text
        raise RuntimeError(lines[0])
    return rc


def _head_pth(c: Ctx) -> Path:
    p = c.tmp / "head_linearweights.pth"
    torch.save({"state_dict": {"module.linear.weight": torch.randn(3, 192),
                               "module.linear.bias": torch.zeros(3)}}, p)
    return p


def _head_safetensors(c: Ctx) -> Path:
    from dinofeat.eval.linear import LinearClassifier, LinearProbe
    probe = LinearProbe(LinearClassifier(192, 3), ["a", "b", "c"])
    p = c.tmp / "head.safetensors"
    probe.save(p)
    return p


def _load_head(c: Ctx, p: Path):
    from dinofeat.eval.linear import load_linear_head
    return load_linear_head(p, embed_dim=192)


def _attach(c: Ctx, p: Path):
    import copy
    return attach_classifier(copy.deepcopy(c.model), p)


def _probe_data(c: Ctx):
    from dinofeat.eval.folders import image_folder
    return image_folder(c.images)


def _probe_ckpt(c: Ctx) -> Path:
    from dinofeat.eval.linear import LinearProbeConfig, train_linear_probe
    out = c.tmp / "probe"
    train_linear_probe(c.model, _probe_data(c), config=LinearProbeConfig(
        epochs=1, batch_size=4, n_last_blocks=1, num_workers=0), output_dir=out,
        progress=False)
    return out / "checkpoint.pth"


def _probe_resume(c: Ctx, p: Path):
    from dinofeat.eval.linear import LinearProbeConfig, train_linear_probe
    return train_linear_probe(c.model, _probe_data(c), config=LinearProbeConfig(
        epochs=1, batch_size=4, n_last_blocks=1, num_workers=0), output_dir=p.parent,
        progress=False)


def _whitening(suffix: str):
    def make(c: Ctx) -> Path:
        from dinofeat.eval.copydetect import learn_whitening
        w = learn_whitening(torch.randn(60, 384, generator=torch.Generator().manual_seed(0)))
        p = c.tmp / f"white{suffix}"
        w.save(p)
        return p
    return make


def _load_whitening(c: Ctx, p: Path):
    from dinofeat.eval.copydetect import Whitening
    return Whitening.load(p)


def _dedup_whitening(c: Ctx, p: Path):
    from dinofeat.search.dedup import dedup_folder
    return dedup_folder(c.images, c.model, whitening=p, num_workers=0, progress=False)


def _index_file(which: str):
    def make(c: Ctx) -> Path:
        from dinofeat.search import KNNIndex
        ix = KNNIndex(dim=8)
        ix.add(np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32))
        d = ix.save(c.tmp / "x.idx")
        header = json.loads((d / "index.json").read_text())
        return d / {"header": "index.json", "items": header["items_file"],
                    "faiss": header["faiss_file"]}[which]
    return make


def _load_index(c: Ctx, p: Path):
    from dinofeat.search import KNNIndex
    return KNNIndex.load(p.parent)


def _gnd(c: Ctx) -> Path:
    p = c.tmp / "gnd_roxford5k.pkl"
    p.write_bytes(pickle.dumps({"imlist": ["a", "b"], "qimlist": ["q"],
                                "gnd": [{"bbx": [0, 0, 1, 1], "easy": [0], "hard": [1],
                                         "junk": []}]}, protocol=2))
    return p


def _read_gnd(c: Ctx, p: Path):
    from dinofeat.eval.retrieval import read_gnd
    return read_gnd(p, write_json=False)


def _features(suffix: str, sidecar: bool = False):
    def make(c: Ctx) -> Path:
        from dinofeat.extract import save_features, sidecar_path
        p = c.tmp / f"f{suffix}"
        save_features(p, torch.randn(3, 4), ["a", "b", "c"])
        return sidecar_path(p) if sidecar else p
    return make


def _load_features(c: Ctx, p: Path):
    from dinofeat.extract import load_features
    return load_features(p if p.suffix != ".json" else p.with_suffix(""))


def _onnx(c: Ctx) -> Path:
    from dinofeat.export import export_onnx
    p = c.tmp / "tiny.onnx"
    export_onnx(c.model, p, check_sizes=())
    return p


def _load_onnx(c: Ctx, p: Path):
    return dinofeat.load(p, device="cpu")


def _config_json(c: Ctx) -> Path:
    p = c.tmp / "config.json"
    p.write_text(json.dumps(_train_cfg(c, c.tmp / "r").to_dict()))
    return p


def _load_config(c: Ctx, p: Path):
    from dinofeat.training.config import TrainConfig
    return TrainConfig.from_json_file(p)


def _feature_cache(c: Ctx) -> Path:
    _cached(c, None)
    (file,) = (c.tmp / "cache").glob("*.safetensors")
    return file


def _cached(c: Ctx, p: Path | None):
    from dinofeat.eval.features import cached_embed
    data = _probe_data(c)
    feats, *_ = cached_embed(c.model, data.paths, data.labels, c.images,
                             cache_dir=c.tmp / "cache", num_workers=0, progress=False)
    assert feats.shape == (len(data.paths), 192)
    return feats


def _shard_manifest(c: Ctx) -> Path:
    from dinofeat.extract import embed_to_file
    embed_to_file(c.model, c.images, c.tmp / "e.npy", shard_size=2,
                  shard_dir=c.tmp / "shards", keep_shards=True, num_workers=0, progress=False)
    return c.tmp / "shards" / "manifest.json"


def _extract_again(c: Ctx, p: Path):
    from dinofeat.extract import embed_to_file
    return embed_to_file(c.model, c.images, c.tmp / "e2.npy", shard_size=2,
                         shard_dir=p.parent, keep_shards=True, num_workers=0, progress=False)


def _shard_file(c: Ctx) -> Path:
    _shard_manifest(c)
    return sorted((c.tmp / "shards").glob("*.safetensors"))[0]


TARGETS = [
    Target("dinofeat.load(file.pth)", _tiny_backbone_pth, _load_file),
    Target("dinofeat.load(run folder)", _run_copy, _load_run),
    Target("dinofeat.load(zoo name, $DINOFEAT_WEIGHTS_DIR)", _zoo_name, _load_zoo,
           cache=False),
    Target("weights.read_checkpoint", _tiny_backbone_pth, _read_ckpt),
    Target("training resume (output/checkpoint.pth)", _run_copy, _resume),
    Target("training resume_from", _run_copy, _resume_from),
    Target("CLI train --resume-from", _run_copy, _cli_resume_from),
    Target("linear head .pth", _head_pth, _load_head),
    Target("linear head .safetensors", _head_safetensors, _load_head),
    Target("eval.linear.attach_classifier", _head_pth, _attach),
    Target("linear probe resume checkpoint", _probe_ckpt, _probe_resume),
    Target("whitening .safetensors", _whitening(".safetensors"), _load_whitening),
    Target("whitening .json", _whitening(".json"), _load_whitening),
    Target("dedup whitening=", _whitening(".safetensors"), _dedup_whitening),
    Target("index header", _index_file("header"), _load_index),
    Target("index items", _index_file("items"), _load_index),
    Target("index faiss file", _index_file("faiss"), _load_index),
    Target("retrieval ground truth .pkl", _gnd, _read_gnd),
    Target("feature file .npy", _features(".npy"), _load_features),
    Target("feature file .npy sidecar", _features(".npy", sidecar=True), _load_features),
    Target("feature file .safetensors", _features(".safetensors"), _load_features),
    Target("ONNX export", _onnx, _load_onnx, needs="onnxruntime"),
    Target("training config JSON", _config_json, _load_config),
    Target("eval feature cache", _feature_cache, _cached, fallback=True),
    Target("extraction shard manifest", _shard_manifest, _extract_again),
    Target("extraction shard", _shard_file, _extract_again, fallback=True),
]
_IDS = [t.name for t in TARGETS]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """4 small photos in 2 class folders (for training, probes, dedup, caches)."""
    d = tmp_path_factory.mktemp("untrusted") / "imgs"
    for i in range(4):
        (d / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture(36, 40, seed=20 + i)).save(d / f"c{i % 2}" / f"{i}.png")
    return d


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory) -> Path:
    """A finished 1-epoch training run (vit_tiny16, 32 px)."""
    from dinofeat.training.loop import train
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("untrusted-run") / "run"
    c = Ctx(out.parent, None, None, images, out, None)
    train(_train_cfg(c, out))
    return out


@pytest.fixture
def ctx(tmp_path, tiny_model, tiny_weights, images, finished_run, monkeypatch) -> Ctx:
    return Ctx(tmp_path / "t", tiny_model, tiny_weights, images, finished_run, monkeypatch)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """target name -> (folder holding what ``make`` wrote, the path relative to it)."""
    return {"root": tmp_path_factory.mktemp("pristine")}


def _make(target: Target, ctx: Ctx, pristine: dict) -> Path:
    """The target's valid file, made once per module and copied into ``ctx.tmp``."""
    import shutil
    if target.needs:
        pytest.importorskip(target.needs)
        pytest.importorskip("onnx")
    if not target.cache:
        ctx.tmp.mkdir(parents=True)
        return target.make(ctx)
    if target.name not in pristine:
        folder = pristine["root"] / str(len(pristine))
        made = Ctx(folder, ctx.model, ctx.weights, ctx.images, ctx.run, ctx.monkeypatch)
        folder.mkdir()
        pristine[target.name] = (folder, target.make(made).relative_to(folder))
    folder, rel = pristine[target.name]
    shutil.copytree(folder, ctx.tmp, symlinks=True)
    return ctx.tmp / rel


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("target", TARGETS, ids=_IDS)
def test_valid_file_is_accepted(target, ctx, pristine, tally):
    """Positive control: the loader reads the valid file (the zoo-name target has none)."""
    p = _make(target, ctx, pristine)
    if target.name.startswith("dinofeat.load(zoo name"):
        pytest.skip("no valid 21M-parameter vit_s16 file is made here")
    assert target.load(ctx, p) is not None or target.name.startswith("CLI")
    tally.add("untrusted: valid files", inputs=1, checks=1)


@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("target", TARGETS, ids=_IDS)
def test_code_in_a_file_never_runs(target, kind, ctx, pristine, tally):
    p = _make(target, ctx, pristine)
    marker = ctx.tmp / "payload-ran"
    p.write_bytes(payload_bytes(kind, marker))
    if target.fallback:
        target.load(ctx, p)  # a damaged cache is recomputed
    else:
        with pytest.raises(Exception) as ei:
            target.load(ctx, p)
        assert p.name in str(ei.value), (type(ei.value), str(ei.value))
        assert not isinstance(ei.value, (AttributeError, NameError, AssertionError)), \
            repr(ei.value)
    assert not marker.exists(), f"{target.name} ran the payload of a {kind} file"
    tally.add("untrusted: hostile pickles", inputs=1, checks=2)


@pytest.mark.parametrize("cut", ["half", "empty"])
@pytest.mark.parametrize("target", TARGETS, ids=_IDS)
def test_truncated_and_empty_files_are_named(target, cut, ctx, pristine, tally):
    p = _make(target, ctx, pristine)
    if not p.exists():
        pytest.skip("no valid file to truncate")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] if cut == "half" else b"")
    if target.fallback:
        target.load(ctx, p)
    else:
        with pytest.raises(Exception) as ei:
            target.load(ctx, p)
        msg = str(ei.value)
        assert p.name in msg, (type(ei.value), msg)
        assert not isinstance(ei.value, (AttributeError, NameError, AssertionError,
                                         UnboundLocalError)), repr(ei.value)
    tally.add("untrusted: truncated/empty files", inputs=1, checks=1)


# ------------------------------------------------------- mismatched but well-formed
def test_state_dict_of_another_architecture(tiny_model, tmp_path, tally):
    p = tmp_path / "tiny.pth"
    torch.save(tiny_model.backbone.state_dict(), p)
    with pytest.raises(Exception, match=r"tiny\.pth") as ei:
        dinofeat.load(p, arch="vit_small16", device="cpu")
    msg = str(ei.value)
    assert "384" in msg or "192" in msg or "shape" in msg, msg
    tally.add("untrusted: mismatched files", inputs=1, checks=2)


def test_safetensors_wrong_dtype_or_shape_for_each_reader(tiny_model, tmp_path, tally):
    from safetensors.torch import save_file

    from dinofeat.eval.copydetect import Whitening, learn_whitening
    from dinofeat.eval.linear import load_linear_head
    from dinofeat.extract import load_features, save_features
    # linear head: a weight that is not 2-D, then one of the wrong width for the model
    bad = tmp_path / "head.safetensors"
    save_file({"linear.weight": torch.zeros(3), "linear.bias": torch.zeros(3)}, str(bad))
    with pytest.raises(ValueError, match="head.safetensors.*linear layer"):
        load_linear_head(bad, embed_dim=192)
    wide = tmp_path / "wide.safetensors"
    save_file({"linear.weight": torch.zeros(3, 100), "linear.bias": torch.zeros(3)}, str(wide))
    with pytest.raises(ValueError, match="wide.safetensors"):
        attach_classifier(tiny_model, wide, n_last_blocks=1, avgpool=False)
    # whitening: projection of the wrong shape
    w = learn_whitening(torch.randn(40, 6, generator=torch.Generator().manual_seed(1)))
    good = w.save(tmp_path / "w.safetensors")
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**t, "projection": t["projection"][:, :4].contiguous()},
              str(tmp_path / "w2.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="w2.safetensors.*inconsistent shapes"):
        Whitening.load(tmp_path / "w2.safetensors")
    # feature file: integer features are converted, a 1-D tensor is refused
    f = save_features(tmp_path / "f.safetensors", torch.randn(3, 4), ["a", "b", "c"])
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    save_file({"features": torch.ones(3, 4, dtype=torch.int32)}, str(f), metadata=meta)
    assert load_features(f).features.dtype == torch.float32
    save_file({"features": torch.ones(3)}, str(f), metadata=meta)
    with pytest.raises(ValueError, match="f.safetensors"):
        load_features(f)
    tally.add("untrusted: mismatched files", inputs=5, checks=6)


# ------------------------------------------------------------- the package itself
def test_no_unsafe_load_in_the_package(tally):
    """The shared hook's rule, checked on every module of the package: nothing reads a
    pickle except the restricted unpickler of the retrieval ground truth."""
    bad = []
    for py in sorted(PACKAGE.rglob("*.py")):
        rel = py.relative_to(PACKAGE.parent).as_posix()
        for n, line in enumerate(py.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"torch\.load\(", code) and "weights_only=True" not in code:
                bad.append(f"{rel}:{n}: torch.load without weights_only=True")
            if re.search(r"^\s*(import pickle|from pickle import)", code) and \
                    rel != "dinofeat/eval/retrieval.py":
                bad.append(f"{rel}:{n}: pickle imported")
            if re.search(r"allow_pickle\s*=\s*True", code):
                bad.append(f"{rel}:{n}: np.load(allow_pickle=True)")
            if re.search(r"\b(pickle|cPickle|dill|joblib|shelve|marshal)\.loads?\(", code) \
                    and rel != "dinofeat/eval/retrieval.py":
                bad.append(f"{rel}:{n}: unpickling")
            if re.search(r"yaml\.load\(|(?<![.\w])(?<!def )(eval|exec)\(", code):
                bad.append(f"{rel}:{n}: code execution on data")
    assert not bad, "\n".join(bad)
    # torch.jit.load only re-reads a file export just wrote (its parity check)
    jit = [f"{p.relative_to(PACKAGE.parent)}" for p in PACKAGE.rglob("*.py")
           if "torch.jit.load(" in p.read_text()]
    assert jit == ["dinofeat/export.py"], jit
    tally.add("untrusted: package scan", inputs=len(list(PACKAGE.rglob("*.py"))), checks=5)
