"""Pretrained folders and hub repos: the transformers DINO layout, dinofeat's own
save_pretrained / push_to_hub, timm interop, hub names through huggingface_hub against a
local hub (tests/_hubserver.py), and failing fast without network."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _hubserver import HubServer
from test_faithfulness import (
    ARCHS,
    TOL,
    _image,
    _max_diff,
    _to_hf_vit,
    dino_like_vit_weights,
    reference_forward,
)

import dinofeat
from dinofeat import weights

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers
def _dino_hf_config(arch: str, eps: float = 1e-12):
    """The config of the converted facebook/dino-* repos: ViTConfig defaults (LayerNorm
    eps 1e-12 among them) with the DINO sizes."""
    dim, depth, heads, patch = ARCHS[arch]
    return transformers.ViTConfig(hidden_size=dim, num_hidden_layers=depth,
                                  num_attention_heads=heads, intermediate_size=4 * dim,
                                  image_size=224, patch_size=patch, qkv_bias=True,
                                  hidden_act="gelu", layer_norm_eps=eps)


def _hf_folder(tmp_path: Path, arch: str, eps: float = 1e-12, seed: int = 0,
               cls=None) -> tuple[dict, Path, "transformers.ViTModel"]:
    """``ViTModel.save_pretrained`` of DINO-like weights (as the converted repos were made)."""
    dim, depth, heads, patch = ARCHS[arch]
    sd = dino_like_vit_weights(dim, depth, heads, patch, grid=224 // patch, seed=seed)
    cls = cls or transformers.ViTModel
    kw = {"add_pooling_layer": False} if cls is transformers.ViTModel else {}
    net = cls(_dino_hf_config(arch, eps), **kw).eval()
    hf_sd = _to_hf_vit(sd)
    if cls is not transformers.ViTModel:
        hf_sd = {f"vit.{k}": v for k, v in hf_sd.items()}
        hf_sd.update({k: v for k, v in net.state_dict().items() if k.startswith("classifier")})
    net.load_state_dict(hf_sd, strict=True)
    folder = tmp_path / f"hf_{arch}_{cls.__name__}"
    net.save_pretrained(folder)
    return sd, folder, net


def _cls(model, x):
    with torch.no_grad():
        return model(x)


# -------------------------------------------------- transformers DINO layout
@pytest.mark.parametrize("arch,height,width", [("vit_s16", 224, 224), ("vit_s16", 480, 640),
                                               pytest.param("vit_s8", 224, 224,
                                                            marks=pytest.mark.slow)])
def test_transformers_folder_matches_original(tmp_path, arch, height, width):
    sd, folder, _ = _hf_folder(tmp_path, arch)
    keys = json.loads((folder / "config.json").read_text())
    assert keys["layer_norm_eps"] == 1e-12  # as in the converted facebook/dino-* configs
    model = dinofeat.load(folder, device="cpu")
    dim, depth, heads, patch = ARCHS[arch]
    assert (model.embed_dim, model.patch_size, model.num_heads) == (dim, patch, heads)
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)  # DINO's value, not the config's
    x = _image(1, height, width)
    with torch.no_grad():
        cls, attn = model(x), model.last_self_attention(x)
    ref_cls, ref_attn = reference_forward(sd, x, heads)
    assert _max_diff(cls, ref_cls) <= TOL and _max_diff(attn, ref_attn) <= TOL
    # the same numbers as the release file read by dinofeat (and timm names underneath)
    release = tmp_path / "release.pth"
    torch.save(sd, release)
    assert _max_diff(cls, _cls(dinofeat.load(release, device="cpu"), x)) <= TOL


def test_transformers_eps_choice(tmp_path):
    """Default eps 1e-6 reproduces the original; layer_norm_eps="config" (1e-12) reproduces
    transformers' own ViTModel; the two differ, by far less than the tolerance."""
    sd, folder, net = _hf_folder(tmp_path, "vit_s16")
    dino = dinofeat.load(folder, device="cpu")
    cfg = dinofeat.load(folder, device="cpu", layer_norm_eps="config")
    assert {m.eps for m in cfg.backbone.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}
    x = _image(2, 224, 224)
    with torch.no_grad():
        hf_cls = net(pixel_values=x).last_hidden_state[:, 0]
    assert _max_diff(_cls(cfg, x), hf_cls) <= TOL
    assert _max_diff(_cls(dino, x), reference_forward(sd, x, 6)[0]) <= TOL
    # in float64 (no fp32 rounding to hide it) the eps effect is visible yet tiny
    d64 = _max_diff(_cls(dino.double(), x.double()), _cls(cfg.double(), x.double()))
    assert 1e-9 < d64 < 1e-5, d64
    one = dinofeat.load(folder, device="cpu", layer_norm_eps=1e-5)
    assert {m.eps for m in one.backbone.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}


def test_transformers_bin_classifier_and_bare_file(tmp_path):
    """pytorch_model.bin (weights-only read), ViTForImageClassification ("vit." prefix,
    classifier dropped), and a bare model.safetensors without config all load."""
    sd, folder, _ = _hf_folder(tmp_path, "vit_tiny16", cls=transformers.ViTForImageClassification)
    x = _image(1, 224, 224)
    ref = reference_forward(sd, x, 3)[0]
    assert _max_diff(_cls(dinofeat.load(folder, device="cpu"), x), ref) <= TOL
    binf = tmp_path / "bin"
    binf.mkdir()
    (binf / "config.json").write_bytes((folder / "config.json").read_bytes())
    from safetensors.torch import load_file
    torch.save(load_file(folder / "model.safetensors"), binf / "pytorch_model.bin")
    assert _max_diff(_cls(dinofeat.load(binf, device="cpu"), x), ref) <= TOL
    bare = dinofeat.load(folder / "model.safetensors", device="cpu")  # heads from the width
    assert _max_diff(_cls(bare, x), ref) <= TOL


def test_transformers_config_that_is_not_dino_is_refused(tmp_path):
    _, folder, _ = _hf_folder(tmp_path, "vit_tiny16")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["hidden_act"] = "relu"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(weights.CheckpointError, match="hidden_act='relu'"):
        dinofeat.load(folder, device="cpu")


# ------------------------------------------------------- save_pretrained
def _small_model(tmp_path, arch="vit_tiny16", seed=3):
    dim, depth, heads, patch = ARCHS[arch]
    sd = dino_like_vit_weights(dim, depth, heads, patch, grid=224 // patch, seed=seed)
    torch.save(sd, tmp_path / "w.pth")
    return sd, dinofeat.load(tmp_path / "w.pth", device="cpu",
                             preprocessing=dinofeat.zoo.Preprocessing(mean=(0.5,) * 3,
                                                                      std=(0.25,) * 3))


def test_save_pretrained_round_trip_is_exact(tmp_path):
    sd, model = _small_model(tmp_path)
    out = model.save_pretrained(tmp_path / "pub")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors"]
    back = dinofeat.load(out, device="cpu")
    a, b = model.backbone.state_dict(), back.backbone.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.preprocessing == model.preprocessing and back.weights_hash == model.weights_hash
    x = _image(1, 320, 480)
    assert torch.equal(_cls(back, x), _cls(model, x))
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n") and "## Preprocessing" in card
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dinofeat"]["pos_embed_interp"] == "dino" and cfg["num_classes"] == 0


@pytest.mark.parametrize("which", ["random", "vit_t_fmnist"])
def test_saved_weights_load_in_timm_with_same_cls(tmp_path, which):
    timm = pytest.importorskip("timm")
    if which == "random":
        _, model = _small_model(tmp_path, "vit_tiny8")
    else:
        model = dinofeat.load("vit_t_fmnist", device="cpu")
    out = model.save_pretrained(tmp_path / "pub")
    cfg = json.loads((out / "config.json").read_text())
    net = timm.create_model(cfg["architecture"], pretrained=True, num_classes=0,
                            pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                            **cfg["model_args"]).eval()
    size = cfg["model_args"]["img_size"]
    x = _image(2, size[0], size[1])
    with torch.no_grad():
        assert _max_diff(net(x), _cls(model, x)) <= TOL


def test_save_pretrained_from_training_run_has_recipe_and_knn(tmp_path):
    sd, model = _small_model(tmp_path)
    ckpt = {"teacher": {f"backbone.{k}": v for k, v in sd.items()},
            "student": {f"backbone.{k}": v for k, v in sd.items()},
            "config": {"arch": "vit_tiny", "patch_size": 16, "epochs": 30, "lr": 5e-4,
                       "batch_size_per_gpu": 64, "teacher_temp": 0.04,
                       "local_crops_number": 8, "global_crop_size": 224},
            "epoch": 30, "iteration": 2820, "data": {"num_images": 6000, "world_size": 1},
            "history": [{"loss": 9.1}, {"loss": 7.25}],
            "knn": {"knn_top1": 61.5, "knn_top5": 88.0, "knn_k": 20, "knn_train": 5000,
                    "knn_val": 1000},
            "dinofeat": {"name": "myrun", "arch": "vit_tiny16", "pos_embed_interp": "dino",
                         "preprocessing": model.preprocessing.to_dict()}}
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "checkpoint.pth")
    (run / "config.json").write_text(json.dumps(ckpt["config"]))  # a training config
    m = dinofeat.load(run, device="cpu")
    out = m.save_pretrained(tmp_path / "pub", license="cc-by-nc-4.0")
    cfg = json.loads((out / "config.json").read_text())
    t = cfg["dinofeat"]["training"]
    assert t["num_images"] == 6000 and t["iterations"] == 2820 and t["recipe"]["epochs"] == 30
    card = (out / "README.md").read_text()
    assert "license: cc-by-nc-4.0" in card and "6,000 unlabelled images" in card
    assert "k-NN top-1 61.50%" in card and "| teacher_temp | 0.04 |" in card
    assert dinofeat.load(out, device="cpu").name == "myrun"


# ----------------------------------------------------------- hub protocol
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local hub at $HF_ENDPOINT, an empty cache, network allowed (no HF_HUB_OFFLINE)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "DINOFEAT_WEIGHTS_DIR"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: CI runs with it set
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_TOKEN", "hf_localtest")
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        weights._probed.clear()
        yield server
    weights._probed.clear()


def test_hub_name_downloads_through_huggingface_hub(tmp_path, hub):
    sd, folder, _ = _hf_folder(tmp_path, "vit_tiny16")
    hub.add_folder("facebook/dino-tiny", folder)
    x = _image(1, 224, 224)
    m = dinofeat.load("hf-hub:facebook/dino-tiny", device="cpu")
    assert m.name == "facebook/dino-tiny"
    assert _max_diff(_cls(m, x), reference_forward(sd, x, 3)[0]) <= TOL
    gets = [p for verb, p in hub.requests if verb == "GET" and "/resolve/" in p]
    assert any(p.endswith("/resolve/main/model.safetensors") for p in gets)
    snap = Path(m.source).parent
    assert snap.parent.name == "snapshots" and (Path(os.environ["HF_HUB_CACHE"]) /
                                               "models--facebook--dino-tiny") in snap.parents
    assert "Bearer hf_localtest" in hub.tokens_seen  # the token travels
    # the second load is served from the cache: HEADs only, same blob (etag)
    n_get = len(gets)
    m2 = dinofeat.load("facebook/dino-tiny", device="cpu")  # plain org/name
    assert len([p for v, p in hub.requests if v == "GET" and "/resolve/" in p]) == n_get
    assert Path(m2.source).resolve() == Path(m.source).resolve()


def test_hub_revisions_and_offline_cache(tmp_path, hub, monkeypatch):
    sd1, f1 = _small_model(tmp_path, "vit_tiny16", seed=1)[0], tmp_path / "v1"
    dinofeat.load(tmp_path / "w.pth", device="cpu").save_pretrained(f1)
    c1 = hub.add_folder("me/model", f1)
    sd2 = _small_model(tmp_path, "vit_tiny16", seed=2)[0]
    dinofeat.load(tmp_path / "w.pth", device="cpu").save_pretrained(tmp_path / "v2")
    c2 = hub.add_folder("me/model", tmp_path / "v2")
    x = _image(1, 224, 224)
    new = dinofeat.load("hf-hub:me/model", device="cpu")
    old = dinofeat.load("hf-hub:me/model", device="cpu", revision=c1)
    old_at = dinofeat.load(f"hf-hub:me/model@{c1}", device="cpu")
    assert c2 in new.source and c1 in old.source and old_at.source == old.source
    assert _max_diff(_cls(new, x), reference_forward(sd2, x, 3)[0]) <= TOL
    assert _max_diff(_cls(old, x), reference_forward(sd1, x, 3)[0]) <= TOL
    # HF_HUB_OFFLINE: the cache alone, no request
    n = len(hub.requests)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dinofeat.load("hf-hub:me/model", device="cpu").source == new.source
    assert len(hub.requests) == n
    with pytest.raises(weights.WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        dinofeat.load("hf-hub:me/other", device="cpu")
    # a plain org/name that is neither a local path nor a repo says both
    with pytest.raises(FileNotFoundError, match="no such weights file or folder: runs/absent; "
                       "as a Hugging Face hub repo"):
        dinofeat.load("runs/absent", device="cpu")
    with pytest.raises(FileNotFoundError, match="no such weights file or folder: runs/x.pth$"):
        dinofeat.load("runs/x.pth", device="cpu")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(weights.WeightsNotFoundError, match="RevisionNotFound|revision"):
        dinofeat.load("hf-hub:me/model@nope", device="cpu")
    with pytest.raises(weights.WeightsNotFoundError, match="RepoNotFound|Repository"):
        dinofeat.load("hf-hub:me/missing", device="cpu")


def test_push_to_hub_then_load(tmp_path, hub):
    sd, model = _small_model(tmp_path)
    url = model.push_to_hub("me/pushed", private=True)
    repo = hub.repos["me/pushed"]
    assert repo.private and url.endswith(repo.refs["main"])
    assert {"README.md", "config.json", "model.safetensors"} <= set(repo.commits[repo.refs["main"]])
    assert any("/preupload/main" in p for _, p in hub.requests)
    assert hub.model_cards and "hf-hub:me/pushed" in hub.model_cards[-1]
    back = dinofeat.load("hf-hub:me/pushed", device="cpu")
    a, b = model.backbone.state_dict(), back.backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and back.preprocessing == model.preprocessing
    # a second push to an existing repo is a new commit on main
    first = repo.refs["main"]
    model.push_to_hub("me/pushed", commit_message="again")
    assert repo.refs["main"] != first


def test_timm_reads_a_pushed_repo_by_hub_name(tmp_path, hub, monkeypatch):
    """timm.create_model("hf-hub:...") builds the network and its preprocessing from the
    config.json dinofeat wrote (huggingface_hub read HF_ENDPOINT at import: patch it)."""
    timm = pytest.importorskip("timm")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    model = dinofeat.load("vit_t_fmnist", device="cpu")
    model.push_to_hub("me/fmnist")
    net = timm.create_model("hf-hub:me/fmnist", pretrained=True,
                            cache_dir=os.environ["HF_HUB_CACHE"]).eval()
    assert tuple(net.pretrained_cfg["mean"]) == model.preprocessing.mean
    assert tuple(net.pretrained_cfg["input_size"]) == (3, 28, 28)
    x = _image(2, 28, 28)
    with torch.no_grad():
        assert _max_diff(net(x), _cls(model, x)) <= TOL


def test_push_verb(tmp_path, hub):
    _small_model(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "dinofeat", "push", str(tmp_path / "w.pth"),
                        "--repo", "org/cli-model", "--out", str(tmp_path / "folder")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pushed" in r.stdout and (tmp_path / "folder" / "README.md").is_file()
    assert "org/cli-model" in hub.repos


def test_zoo_hub_copy_checked_against_pinned_sha(tmp_path, hub, monkeypatch):
    import dataclasses

    from dinofeat import zoo
    sd, model = _small_model(tmp_path)
    model.save_pretrained(tmp_path / "pub")
    commit = hub.add_folder("timm/tiny.dino", tmp_path / "pub")
    good = weights.sha256_file(tmp_path / "pub" / "model.safetensors")
    base = dict(backbone_url=None, full_checkpoint_url=None, linear_head_url=None,
                local_file=None, hf_hub_id="timm/tiny.dino")
    spec = dataclasses.replace(zoo.get_spec("vit_s16"), name="tiny_pin", patch_size=16,
                               embed_dim=192, num_heads=3, hf_revision=commit,
                               hf_sha256=good, **base)
    monkeypatch.setitem(zoo.MODELS, "tiny_pin", spec)
    assert weights.fetch_weights(spec).name == "model.safetensors"
    bad = dataclasses.replace(spec, hf_sha256="0" * 64)
    with pytest.raises(weights.CheckpointError, match="SHA-256 does not match"):
        weights.fetch_weights(bad)


# ------------------------------------------------------------- no network
def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused at once
    return port


@pytest.mark.parametrize("how", ["cli-hub-name", "cli-zoo", "python-zoo"])
def test_no_network_fails_fast_in_one_line(tmp_path, how):
    port = _closed_port()
    env = {k: v for k, v in os.environ.items() if k not in (
        "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DINOFEAT_WEIGHTS_DIR", "HF_HOME")}
    env.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=f"http://127.0.0.1:{port}",
               HF_HUB_CACHE=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    img = tmp_path / "img.png"
    from PIL import Image
    Image.new("RGB", (32, 32), (120, 30, 200)).save(img)
    # the zoo entry's release URL points at the closed port too, so no test reaches the net
    zoo_patch = ("import dataclasses; from dinofeat import zoo; "
                 "zoo.register_model(dataclasses.replace(zoo.get_spec('vit_s16'), "
                 f"backbone_url='http://127.0.0.1:{port}/dino/x_pretrain.pth')); ")
    # timed inside the child, after the imports (which take long on a loaded machine
    # and are not what the probe is about); stdout carries the time, stderr the error
    pre = ("import sys, time, dinofeat, dinofeat.cli, dinofeat.pretrained, "
           "huggingface_hub.file_download; from dinofeat.cli import main; ")
    timed = ("t0 = time.monotonic()\ntry:\n    rc = {call}\nfinally:\n"
             "    print(f'{{time.monotonic() - t0:.2f}}')\nsys.exit(rc)")
    out = str(tmp_path / "f.npy")
    if how == "cli-hub-name":
        code = pre + "\n" + timed.format(call=f"main(['embed', {str(img)!r}, '--model', "
                                                f"'hf-hub:org/absent', '--out', {out!r}])")
    elif how == "cli-zoo":
        code = pre + zoo_patch + "\n" + timed.format(
            call=f"main(['embed', {str(img)!r}, '--model', 'vit_s16', '--out', {out!r}])")
    else:
        code = pre + zoo_patch + "\n" + timed.format(call="dinofeat.load('vit_s16')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    took = float(r.stdout.strip().splitlines()[-1])
    assert r.returncode != 0
    assert took < 10, (took, r.stderr)
    if how.startswith("cli"):
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("dinofeat: error:"), r.stderr
        assert "--model PATH" in lines[0] and "--weights PATH" in lines[0]
        assert "dinofeat.load(" not in lines[0]
    else:
        assert "dinofeat.load('/path" in r.stderr and "--weights" not in r.stderr
    assert "cannot be reached" in r.stderr or "not reachable" in r.stderr
