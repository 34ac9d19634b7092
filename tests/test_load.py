"""``dinofeat.load``: every weights source and file format, and every error it promises.

All weights are random and all files are written by the tests, in the layouts the
original DINO release, timm's Hugging Face copies, huggingface_hub's cache and torch's
hub cache use. No test touches the network (``offline_weight_caches`` in conftest.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import dinofeat
from dinofeat import weights as W, zoo
from dinofeat.backbones import build_backbone
from dinofeat.weights import CheckpointError, WeightsNotFoundError
from dinofeat.model import save_safetensors

VIT_S16 = zoo.get_spec("vit_s16")


# ------------------------------------------------------------------------ helpers
@functools.lru_cache(maxsize=None)
def _shapes(arch: str, img_size: int = 224) -> dict[str, tuple[torch.Size, torch.dtype]]:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        net = build_backbone(arch, img_size=img_size)
    return {k: (v.shape, v.dtype) for k, v in net.state_dict().items()}


@functools.lru_cache(maxsize=None)
def _random_state(arch: str, seed: int, img_size: int = 224) -> dict[str, torch.Tensor]:
    """Random weights of the backbone ``arch`` with the names and shapes it loads (cached:
    callers must not modify the dict or its tensors)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (shape, dtype) in _shapes(arch, img_size).items():
        if not dtype.is_floating_point:
            out[k] = torch.zeros(shape, dtype=dtype)
        elif k.endswith("running_var") or (k.endswith("weight") and len(shape) == 1):
            out[k] = torch.rand(shape, generator=g).mul_(0.1).add_(1.0)  # norms, BN scales
        else:
            out[k] = torch.randn(shape, generator=g).mul_(0.05)
    return out


def _assert_weights(model: dinofeat.DinoModel, expected: dict[str, torch.Tensor]) -> None:
    got = model.backbone.state_dict()
    assert set(got) == set(expected)
    bad = [k for k in expected if not torch.equal(got[k].cpu(), expected[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


def _head(dim: int, seed: int) -> dict[str, torch.Tensor]:
    """A small DINO projection head in the release's names (weight-normed last layer)."""
    g = torch.Generator().manual_seed(seed)
    return {"mlp.0.weight": torch.randn(64, dim, generator=g), "mlp.0.bias": torch.zeros(64),
            "mlp.2.weight": torch.randn(32, 64, generator=g), "mlp.2.bias": torch.zeros(32),
            "last_layer.weight_g": torch.ones(100, 1),
            "last_layer.weight_v": torch.randn(100, 32, generator=g)}


def _release_full_checkpoint(teacher: dict, student: dict, dim: int) -> dict:
    """An original DINO ``checkpoint.pth``: DDP ``module.`` prefix on the student,
    ``backbone.``/``head.`` on both, optimizer state, loss center, and ``args`` as an
    ``argparse.Namespace``."""
    args = argparse.Namespace(arch="vit_tiny", patch_size=16, out_dim=100, norm_last_layer=True,
                              momentum_teacher=0.996, use_bn_in_head=False,
                              global_crops_scale=(0.4, 1.0), local_crops_number=8,
                              data_path="/path/to/imagenet/train", output_dir=".", seed=0)
    return {
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                    **{f"module.head.{k}": v for k, v in _head(dim, 1).items()}},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()},
                    **{f"head.{k}": v for k, v in _head(dim, 2).items()}},
        "optimizer": {"state": {0: {"step": torch.tensor(10.0)}},
                      "param_groups": [{"lr": 1e-4, "weight_decay": 0.04, "params": [0]}]},
        "epoch": 100, "args": args, "dino_loss": {"center": torch.zeros(1, 100)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
    }


def _to_release_xcit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm XCiT names -> the original XCiT/DINO release names (``pos_embeder``, fused
    class-attention ``qkv``)."""
    out = {}
    for k, v in sd.items():
        if ".attn.q." in k and k.startswith("cls_attn_blocks."):
            base, kind = k.split(".attn.q.")
            out[f"{base}.attn.qkv.{kind}"] = torch.cat(
                [sd[f"{base}.attn.{n}.{kind}"] for n in "qkv"], dim=0)
        elif k.startswith("cls_attn_blocks.") and (".attn.k." in k or ".attn.v." in k):
            continue
        else:
            out[k.replace("pos_embed.", "pos_embeder.", 1)] = v
    return out


@pytest.fixture(scope="module")
def vit_s16_state() -> dict[str, torch.Tensor]:
    return _random_state("vit_s16", 0)


@pytest.fixture
def tiny_hub_spec(monkeypatch) -> zoo.ModelSpec:
    """A ViT-T/16 zoo entry with a hub copy, so that the hub mechanics are tested on
    small files (the real entries are exercised with vit_s16 elsewhere)."""
    spec = zoo.ModelSpec("vit_t16_hubtest", "vit", "vit_tiny_patch16_224", 16, 192, 12, 3, 6,
                         None, None, hf_hub_id="timm/vit_tiny_patch16_224.dino")
    monkeypatch.setitem(zoo.MODELS, spec.name, spec)
    return spec


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_state) -> Path:
    path = tmp_path_factory.mktemp("tinyhub") / "model.safetensors"
    save_file(tiny_state, str(path))
    return path


@pytest.fixture(scope="module")
def vit_s16_file(tmp_path_factory, vit_s16_state) -> Path:
    """vit_s16 weights as timm's hub copy stores them: model.safetensors, timm names."""
    path = tmp_path_factory.mktemp("hubcopy") / "model.safetensors"
    save_file(vit_s16_state, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return _random_state("vit_tiny16", 1)


# ------------------------------------------------------------ local files, formats
def test_release_backbone_pth_infers_architecture(tmp_path):
    sd = _random_state("vit_tiny8", 3, img_size=64)  # a 8x8 trained grid, not 224's
    path = tmp_path / "dino_vittiny8_pretrain.pth"
    torch.save(sd, path)
    model = dinofeat.load(path, device="cpu")
    bb = model.backbone
    assert (model.embed_dim, model.patch_size, bb.num_heads, bb.depth) == (192, 8, 3, 12)
    assert bb.trained_grid == (8, 8) and not model.training
    _assert_weights(model, sd)
    x = torch.randn(2, 3, 64, 96)
    ref = build_backbone("vit_tiny8", img_size=64)
    ref.load_state_dict(sd)
    with torch.no_grad():  # same weights, same function (kernels may differ: dinofeat.accel)
        torch.testing.assert_close(model(x), ref.eval()(x), atol=1e-5, rtol=0)
        cls = model(x)
        attn = model.last_self_attention(x)
    assert cls.shape == (2, 192)
    n = (64 // 8) * (96 // 8)
    assert attn.shape == (2, 3, 1 + n, 1 + n)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 1 + n))


def test_release_full_checkpoint_teacher_and_student(tmp_path, tiny_state):
    student = _random_state("vit_tiny16", 2)
    path = tmp_path / "checkpoint.pth"
    torch.save(_release_full_checkpoint(tiny_state, student, 192), path)
    _assert_weights(dinofeat.load(path, device="cpu"), tiny_state)  # teacher by default
    _assert_weights(dinofeat.load(path, device="cpu", checkpoint_key="student"), student)
    # the same file through the folder form, and with an explicit architecture
    _assert_weights(dinofeat.load(tmp_path, device="cpu"), tiny_state)
    _assert_weights(dinofeat.load(path, device="cpu", arch="vit_tiny16"), tiny_state)
    with pytest.raises(CheckpointError, match="no entry 'ema'.*student, teacher"):
        dinofeat.load(path, device="cpu", checkpoint_key="ema")


def test_release_full_checkpoint_of_a_resnet_through_ddp_teacher(tmp_path):
    """ResNet teachers were DDP-wrapped in the release (BatchNorm): ``module.backbone.``."""
    sd = _random_state("resnet50", 0)
    ckpt = {"teacher": {f"module.backbone.{k}": v for k, v in sd.items()}
            | {f"module.head.{k}": v for k, v in _head(2048, 3).items()},
            "student": {}, "epoch": 1}
    path = tmp_path / "resnet_checkpoint.pth"
    torch.save(ckpt, path)
    model = dinofeat.load(path, device="cpu")
    _assert_weights(model, sd)
    assert model.embed_dim == 2048 and model.patch_size is None
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2048)


def test_dinofeat_training_checkpoint_restores_name_and_preprocessing(tmp_path, tiny_state):
    student = _random_state("vit_tiny16", 2)
    prep = zoo.Preprocessing(resize_size=73, crop_size=64, grayscale=True)
    run = tmp_path / "runs" / "exp1"
    run.mkdir(parents=True)
    torch.save({
        "student": {f"backbone.{k}": v for k, v in student.items()}
        | {f"head.{k}": v for k, v in _head(192, 4).items()},
        "teacher": {f"backbone.{k}": v for k, v in tiny_state.items()}
        | {f"head.{k}": v for k, v in _head(192, 5).items()},
        "optimizer": {"state": {}, "param_groups": []}, "epoch": 3, "iteration": 30,
        "config": {"arch": "vit_tiny16", "lr": 0.0005, "crops": [2, 6]},
        "dinofeat": {"name": "exp1", "arch": "vit_tiny16", "preprocessing": prep.to_dict(),
                     "pos_embed_interp": "dino"},
    }, run / "checkpoint.pth")
    model = dinofeat.load(run, device="cpu")
    _assert_weights(model, tiny_state)
    assert model.name == "exp1" and model.preprocessing == prep
    _assert_weights(dinofeat.load(run / "checkpoint.pth", device="cpu",
                                  checkpoint_key="student"), student)


def test_safetensors_round_trip_and_plain_safetensors(tmp_path, tiny_state):
    plain = tmp_path / "plain.safetensors"
    save_file(tiny_state, str(plain))
    model = dinofeat.load(plain, device="cpu")
    _assert_weights(model, tiny_state)
    assert model.preprocessing == zoo.Preprocessing()
    model.preprocessing = zoo.Preprocessing(mode="whole", crop_size=96)
    model.name = "mine"
    out = save_safetensors(model, tmp_path / "mine.safetensors")
    again = dinofeat.load(out, device="cpu")
    _assert_weights(again, tiny_state)
    assert again.weights_hash == model.weights_hash
    assert (again.name, again.preprocessing) == ("mine", model.preprocessing)
    # half precision files are read into the model's float32
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in tiny_state.items()},
              str(half))
    loaded = dinofeat.load(half, device="cpu").backbone.state_dict()
    assert loaded["pos_embed"].dtype == torch.float32
    torch.testing.assert_close(loaded["pos_embed"], tiny_state["pos_embed"].half().float())


def test_missing_batchnorm_counters_are_tolerated(tmp_path):
    sd = _random_state("resnet50", 0)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "dino_resnet50_pretrain.pth"
    torch.save(sd, path)
    model = dinofeat.load(path, device="cpu")
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


# ------------------------------------------------------ zoo names: hub, caches, env
def test_zoo_name_from_hf_cache_via_env(offline_weight_caches, hf_snapshot_writer,
                                        vit_s16_file, vit_s16_state):
    snap = hf_snapshot_writer(offline_weight_caches.hf_cache, VIT_S16.hf_hub_id,
                              {"model.safetensors": vit_s16_file,
                               "config.json": b'{"architecture": "vit_small_patch16_224"}'})
    repo = offline_weight_caches.hf_cache / "models--timm--vit_small_patch16_224.dino"
    assert (repo / "refs" / "main").read_text() == snap.name and len(snap.name) == 40
    assert (snap / "model.safetensors").is_symlink()
    model = dinofeat.load("vit_s16", device="cpu")
    _assert_weights(model, vit_s16_state)
    assert Path(model.source) == snap / "model.safetensors"
    assert model.name == "vit_s16" and model.spec is VIT_S16
    assert model.preprocessing == VIT_S16.preprocessing


def test_zoo_name_from_hf_home(offline_weight_caches, monkeypatch, hf_snapshot_writer,
                               tiny_hub_spec, tiny_file, tiny_state, tmp_path):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snap = hf_snapshot_writer(tmp_path / "hf-home" / "hub", tiny_hub_spec.hf_hub_id,
                              {"model.safetensors": tiny_file})
    assert W.hf_cache_dir() == tmp_path / "hf-home" / "hub"
    model = dinofeat.load(tiny_hub_spec.name, device="cpu")
    assert Path(model.source) == snap / "model.safetensors"
    _assert_weights(model, tiny_state)


def test_zoo_name_from_cache_dir_argument(offline_weight_caches, hf_snapshot_writer,
                                          tiny_hub_spec, tiny_file, tiny_state, tmp_path):
    other = tmp_path / "elsewhere"
    hf_snapshot_writer(other, tiny_hub_spec.hf_hub_id, {"model.safetensors": tiny_file})
    with pytest.raises(WeightsNotFoundError):  # not in $HF_HUB_CACHE
        dinofeat.load(tiny_hub_spec.name, device="cpu")
    _assert_weights(dinofeat.load(tiny_hub_spec.name, device="cpu", cache_dir=other), tiny_state)


def test_revision_picks_that_snapshot(offline_weight_caches, hf_snapshot_writer, tmp_path,
                                      tiny_hub_spec, tiny_file, tiny_state):
    newer = {k: v + 1.0 if v.is_floating_point() else v for k, v in tiny_state.items()}
    newer_file = tmp_path / "newer.safetensors"
    save_file(newer, str(newer_file))
    cache = offline_weight_caches.hf_cache
    repo_id, name = tiny_hub_spec.hf_hub_id, tiny_hub_spec.name
    old_commit = "a" * 40
    hf_snapshot_writer(cache, repo_id, {"model.safetensors": tiny_file}, commit=old_commit,
                       refs=())
    new = hf_snapshot_writer(cache, repo_id, {"model.safetensors": newer_file},
                             refs=("main", "v2"))
    assert tiny_hub_spec.hf_revision == "main"
    _assert_weights(dinofeat.load(name, device="cpu"), newer)
    _assert_weights(dinofeat.load(name, device="cpu", revision=old_commit), tiny_state)
    _assert_weights(dinofeat.load(name, device="cpu", revision="v2"), newer)
    assert Path(dinofeat.load(name, device="cpu", revision=new.name).source).parent == new
    with pytest.raises(WeightsNotFoundError, match=f"revision {'b' * 40}"):
        dinofeat.load(name, device="cpu", revision="b" * 40)


def test_zoo_default_revision_is_passed_through(offline_weight_caches, hf_snapshot_writer,
                                                monkeypatch, vit_s16_file, vit_s16_state):
    """A zoo entry pinned to a commit gets that snapshot even when ``main`` moved on."""
    pinned = "c" * 40
    hf_snapshot_writer(offline_weight_caches.hf_cache, VIT_S16.hf_hub_id,
                       {"model.safetensors": vit_s16_file}, commit=pinned, refs=())
    monkeypatch.setitem(zoo.MODELS, "vit_s16", dataclasses.replace(VIT_S16, hf_revision=pinned))
    model = dinofeat.load("vit_s16", device="cpu")
    assert Path(model.source).parent.name == pinned
    _assert_weights(model, vit_s16_state)


def test_release_pth_in_torch_hub_cache_when_hub_has_none(offline_weight_caches):
    """resnet50 and the XCiTs have no hub copy: the release file in $TORCH_HOME is used."""
    sd = _random_state("resnet50", 0)
    torch.save(sd, offline_weight_caches.torch_checkpoints / "dino_resnet50_pretrain.pth")
    model = dinofeat.load("resnet50", device="cpu")
    _assert_weights(model, sd)
    assert Path(model.source).parent == offline_weight_caches.torch_checkpoints


def test_xcit_release_file_in_torch_hub_cache(offline_weight_caches):
    timm_sd = _random_state("xcit_s12_16", 0)
    release = _to_release_xcit(timm_sd)
    assert "pos_embeder.token_projection.weight" in release
    assert "cls_attn_blocks.0.attn.qkv.weight" in release
    spec = zoo.get_spec("xcit_s12_16")
    torch.save(release, offline_weight_caches.torch_checkpoints /
               spec.backbone_url.rsplit("/", 1)[-1])
    model = dinofeat.load("xcit_s12_16", device="cpu")
    _assert_weights(model, timm_sd)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 48)).shape == (1, 384)


def test_vit_falls_back_to_release_pth_when_hf_cache_lacks_it(offline_weight_caches,
                                                             vit_s16_state):
    target = offline_weight_caches.torch_checkpoints / "dino_deitsmall16_pretrain.pth"
    torch.save(vit_s16_state, target)
    model = dinofeat.load("vit_s16", device="cpu")
    assert Path(model.source) == target
    _assert_weights(model, vit_s16_state)


def test_weights_dir_comes_first(offline_weight_caches, monkeypatch, hf_snapshot_writer,
                                 vit_s16_file, vit_s16_state):
    wd = offline_weight_caches.weights_dir
    monkeypatch.setenv("DINOFEAT_WEIGHTS_DIR", str(wd))
    # resnet50 under its zoo name, the XCiT under its release file name
    rn = _random_state("resnet50", 0)
    save_file(rn, str(wd / "resnet50.safetensors"))
    _assert_weights(dinofeat.load("resnet50", device="cpu"), rn)
    xc = _random_state("xcit_s12_16", 0)
    torch.save(_to_release_xcit(xc), wd / "dino_xcit_small_12_p16_pretrain.pth")
    _assert_weights(dinofeat.load("xcit_s12_16", device="cpu"), xc)
    # a ViT present in both the weights folder and the HF cache: the folder wins
    hf_snapshot_writer(offline_weight_caches.hf_cache, VIT_S16.hf_hub_id,
                       {"model.safetensors": vit_s16_file})
    other = {k: -v if v.is_floating_point() else v for k, v in vit_s16_state.items()}
    torch.save(other, wd / "vit_s16.pth")
    model = dinofeat.load("vit_s16", device="cpu")
    assert Path(model.source) == wd / "vit_s16.pth"
    _assert_weights(model, other)


def _file_url_spec(monkeypatch, src: Path, sha256: str | None) -> zoo.ModelSpec:
    """resnet50 pointed at a ``file://`` release URL: torch's real download code runs."""
    spec = dataclasses.replace(zoo.get_spec("resnet50"), backbone_url=src.as_uri(),
                               sha256=sha256)
    monkeypatch.setitem(zoo.MODELS, "resnet50", spec)
    return spec


def test_release_download_checks_sha256(offline_weight_caches, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    sd = _random_state("resnet50", 0)
    src = tmp_path / "server" / "dino_resnet50_pretrain.pth"
    src.parent.mkdir()
    torch.save(sd, src)
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    target = offline_weight_caches.torch_checkpoints / src.name

    _file_url_spec(monkeypatch, src, "0" * 64)
    with pytest.raises(CheckpointError, match="SHA-256"):
        dinofeat.load("resnet50", device="cpu")
    assert not target.exists() and not list(offline_weight_caches.torch_checkpoints.iterdir())

    _file_url_spec(monkeypatch, src, good)
    model = dinofeat.load("resnet50", device="cpu")
    assert Path(model.source) == target and target.is_file()
    _assert_weights(model, sd)

    # a cached file that no longer matches is refused, not silently used
    _file_url_spec(monkeypatch, src, "f" * 64)
    with pytest.raises(CheckpointError, match=f"{target}.*SHA-256.*delete it"):
        dinofeat.load("resnet50", device="cpu")


# ------------------------------------------------------------------------- errors
def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError) as info:
        dinofeat.load("vit_s17", device="cpu")
    msg = info.value.args[0]
    assert "vit_s17" in msg and all(name in msg for name in zoo.MODELS)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        dinofeat.load(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="without a checkpoint"):
        dinofeat.load(tmp_path)


def test_no_network_error_names_everything(offline_weight_caches):
    with pytest.raises(WeightsNotFoundError) as info:
        dinofeat.load("vit_s16", device="cpu")
    msg = str(info.value)
    for needle in ("'vit_s16'", VIT_S16.hf_hub_id, "revision main", VIT_S16.backbone_url,
                   str(offline_weight_caches.hf_cache),
                   str(offline_weight_caches.torch_checkpoints), "HF_HUB_OFFLINE",
                   "dinofeat.load(", "DINOFEAT_WEIGHTS_DIR", "dino_deitsmall16_pretrain.pth",
                   "hf download timm/vit_small_patch16_224.dino model.safetensors"):
        assert needle in msg, f"{needle!r} missing from:\n{msg}"
    assert isinstance(info.value, FileNotFoundError)  # the CLI reports it in one line


def test_failed_download_names_url_and_error(offline_weight_caches, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    spec = _file_url_spec(monkeypatch, tmp_path / "gone" / "dino_resnet50_pretrain.pth", None)
    with pytest.raises(WeightsNotFoundError) as info:
        dinofeat.load("resnet50", device="cpu")
    msg = str(info.value)
    assert spec.backbone_url in msg and "URLError" in msg and "'resnet50'" in msg
    assert str(offline_weight_caches.torch_checkpoints) in msg


class _Payload:
    """Unpickling this object runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("layout", ["torch.save", "raw pickle"])
def test_code_in_a_pickle_is_never_run(tmp_path, tiny_state, layout):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    if layout == "torch.save":
        torch.save({**tiny_state, "args": _Payload(marker)}, path)
    else:  # a plain pickle (tensors would be refused first, so none here)
        with open(path, "wb") as f:
            pickle.dump({"epoch": 3, "args": _Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError) as info:
        dinofeat.load(path, device="cpu")
    assert not marker.exists()
    msg = str(info.value)
    assert str(path) in msg and "refused" in msg and "exec" in msg
    # the payload is live: an unrestricted unpickling would have run it (for torch.save,
    # the archive's data.pkl with tensor storages stubbed out)
    if layout == "torch.save":
        import zipfile

        class _NoStorages(pickle.Unpickler):  # tensors become None, the rest unpickles
            def persistent_load(self, pid):
                return None

            def find_class(self, module, name):
                if name.startswith("_rebuild_"):
                    return lambda *args, **kwargs: None
                return super().find_class(module, name)

        with zipfile.ZipFile(path) as z:
            name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
            with z.open(name) as f:
                _NoStorages(f).load()
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


def test_truncated_files(tmp_path, tiny_state):
    zipped = tmp_path / "full.pth"
    torch.save(tiny_state, zipped)
    legacy = tmp_path / "legacy.pth"
    torch.save(tiny_state, legacy, _use_new_zipfile_serialization=False)
    st = tmp_path / "full.safetensors"
    save_file(tiny_state, str(st))
    for src in (zipped, legacy, st):
        data = src.read_bytes()
        for cut in (len(data) // 2, len(data) - 7):
            bad = tmp_path / f"cut_{cut}_{src.name}"
            bad.write_bytes(data[:cut])
            with pytest.raises(CheckpointError) as info:
                dinofeat.load(bad, device="cpu")
            msg = str(info.value)
            assert msg.startswith(str(bad)) and ("truncated" in msg or "corrupt" in msg), msg
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        dinofeat.load(empty)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match=str(junk)):
        dinofeat.load(junk)


def test_vit_b_weights_as_vit_s16_name_the_mismatch(tmp_path):
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_backbone("vit_b16").state_dict().items()}
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    path = tmp_path / "vitb16.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as info:
        dinofeat.load(path, arch="vit_s16", device="cpu")
    msg = str(info.value)
    assert msg.startswith(str(path)) and "dim 768" in msg and "dim 384" in msg
    assert "arch='vit_s16'" in msg
    # without a name the architecture is read off the tensors
    model = dinofeat.load(path, device="cpu")
    assert (model.embed_dim, model.patch_size, model.num_heads) == (768, 16, 12)


def test_vit_with_other_depth_as_zoo_name(tmp_path):
    sd = _random_state("vit_s16", 0)
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(f"blocks.{i}." for i in
                                                                   range(6, 12)))}
    path = tmp_path / "short.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="short.pth: .*6 blocks.*'vit_s16'.*12 blocks"):
        dinofeat.load(path, arch="vit_s16", device="cpu")


def test_safetensors_wrong_shape_and_integer_dtype(tmp_path, tiny_state):
    wrong = dict(tiny_state)
    wrong["blocks.3.mlp.fc1.weight"] = torch.zeros(768, 100)
    path = tmp_path / "wrong_shape.safetensors"
    save_file(wrong, str(path))
    with pytest.raises(CheckpointError) as info:
        dinofeat.load(path, device="cpu")
    msg = str(info.value)
    assert str(path) in msg and "shape mismatches (1)" in msg
    assert "blocks.3.mlp.fc1.weight: file (768, 100) vs model (768, 192)" in msg

    ints = dict(tiny_state)
    ints["blocks.0.attn.qkv.weight"] = torch.zeros(576, 192, dtype=torch.int32)
    path = tmp_path / "int.safetensors"
    save_file(ints, str(path))
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight has dtype torch.int32"):
        dinofeat.load(path, device="cpu")


def test_missing_and_unexpected_keys_are_named(tmp_path, tiny_state):
    sd = {k: v for k, v in tiny_state.items() if k not in ("norm.weight", "blocks.5.ls1.gamma")}
    sd["blocks.0.attn.extra_scale"] = torch.ones(3)
    del sd["blocks.7.norm2.bias"]
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        dinofeat.load(path, device="cpu")
    msg = str(info.value)
    assert "missing keys (2): blocks.7.norm2.bias, norm.weight" in msg
    assert "unexpected keys (1): blocks.0.attn.extra_scale" in msg


def test_student_requested_from_a_backbone_file(tmp_path, tiny_state):
    path = tmp_path / "backbone.pth"
    torch.save(tiny_state, path)
    with pytest.raises(CheckpointError, match="no 'student' entry"):
        dinofeat.load(path, device="cpu", checkpoint_key="student")


def test_resnet_has_no_attention(tmp_path):
    sd = _random_state("resnet50", 0)
    path = tmp_path / "rn.pth"
    torch.save(sd, path)
    model = dinofeat.load(path, device="cpu")
    with pytest.raises(TypeError, match="needs a ViT"):
        model.last_self_attention(torch.randn(1, 3, 32, 32))
