"""The model table agrees with the networks it names and with itself.

Every entry is built with ``build_backbone`` on the meta device (shapes only, no memory,
no arithmetic) and compared with the table: feature dim, patch size, heads, depth,
tokens at 224, parameter count. URLs, hub ids and names are checked for form and
uniqueness, and ``dinofeat models`` must print every name.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlparse

import pytest
import torch

from dinofeat import cli, zoo
from dinofeat.backbones import DinoVisionTransformer, build_backbone

NAMES = list(zoo.MODELS)
#: the original release's models (vit_t_fmnist, trained and shipped by dinofeat itself, has
#: its own tests in tests/test_fashion_mnist.py)
RELEASE = [n for n, s in zoo.MODELS.items() if s.local_file is None]


def _build_meta(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return build_backbone(name)


@pytest.mark.parametrize("name", RELEASE)
def test_entry_builds_and_matches_its_table_row(name):
    spec = zoo.get_spec(name)
    net = _build_meta(name)
    assert net.embed_dim == spec.embed_dim
    # The feature really has that many numbers: run the (shape-only) meta forward.
    out = net(torch.empty(2, 3, 224, 224, device="meta"))
    assert tuple(out.shape) == (2, spec.embed_dim)
    n_params = sum(p.numel() for p in net.parameters())
    assert abs(n_params / 1e6 - spec.params_m) <= 0.1 * spec.params_m, (
        f"{name}: {n_params / 1e6:.1f}M parameters, table says {spec.params_m}M")
    if spec.arch == "vit":
        assert isinstance(net, DinoVisionTransformer)
        assert (net.patch_size, net.num_heads, net.depth) == (
            spec.patch_size, spec.num_heads, spec.depth)
        assert len(net.blocks) == spec.depth
        assert net.blocks[0].attn.num_heads == spec.num_heads
        tokens = net.prepare_tokens(torch.empty(1, 3, 224, 224, device="meta")).shape[1]
        assert tokens == spec.tokens_at_224 == (224 // spec.patch_size) ** 2 + 1
        assert spec.pos_embed_interp == "dino"
    elif spec.arch == "xcit":
        assert net.patch_size == spec.patch_size
        assert len(net.net.blocks) == spec.depth
        assert net.net.blocks[0].attn.num_heads == spec.num_heads
        assert net.net.patch_embed.patch_size == spec.patch_size
    else:
        assert spec.arch == "resnet" and spec.patch_size is None and net.patch_size is None


def test_vit_rows_match_the_paper_table():
    """Token counts at 224 of the paper's table: 197 for /16, 785 for /8."""
    assert zoo.get_spec("vit_s16").tokens_at_224 == 197
    assert zoo.get_spec("vit_b8").tokens_at_224 == 785
    assert zoo.get_spec("resnet50").tokens_at_224 is None


def test_names_unique_and_keys_consistent():
    assert all(spec.name == key for key, spec in zoo.MODELS.items())
    lowered = [n.lower() for n in NAMES]
    assert len(set(lowered)) == len(lowered)
    hub_ids = [s.hf_hub_id for s in zoo.MODELS.values() if s.hf_hub_id]
    assert len(set(hub_ids)) == len(hub_ids)
    for attr in ("backbone_url", "full_checkpoint_url", "linear_head_url"):
        urls = [getattr(zoo.MODELS[n], attr) for n in RELEASE]
        assert len(set(urls)) == len(urls), attr
    assert zoo.list_models() == NAMES
    assert {"vit_s16", "vit_s8", "vit_b16", "vit_b8", "resnet50"} <= set(RELEASE)
    assert set(NAMES) - set(RELEASE) == {"vit_t_fmnist"}


@pytest.mark.parametrize("name", RELEASE)
def test_weight_sources_well_formed(name):
    spec = zoo.get_spec(name)
    for attr, suffix in (("backbone_url", "_pretrain.pth"),
                         ("full_checkpoint_url", "_pretrain_full_checkpoint.pth"),
                         ("linear_head_url", "_linearweights.pth")):
        url = getattr(spec, attr)
        assert url, f"{name}: no {attr}"
        parts = urlparse(url)
        assert parts.scheme == "https" and parts.netloc == "dl.fbaipublicfiles.com", url
        assert not parts.query and not parts.fragment and " " not in url
        folder, file = parts.path.rsplit("/", 1)
        assert folder.startswith("/dino/") and file.endswith(suffix), url
        # release layout: /dino/<stem>_pretrain/<stem><suffix>
        assert folder == f"/dino/{file[: -len(suffix)]}_pretrain", url
    if spec.hf_hub_id is not None:
        assert re.fullmatch(r"timm/[a-z0-9_]+\.dino", spec.hf_hub_id), spec.hf_hub_id
        assert spec.hf_hub_id == f"timm/{spec.timm_name}.dino"
        assert spec.hf_revision and "/" not in spec.hf_revision
    else:
        assert spec.arch in ("resnet", "xcit"), f"{name}: a ViT without a hub copy"
    assert spec.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", spec.sha256)


@pytest.mark.parametrize("name", RELEASE)
def test_published_numbers_plausible(name):
    spec = zoo.get_spec(name)
    assert 60.0 < spec.knn_top1 < spec.linear_top1 < 85.0
    p = spec.preprocessing
    assert (p.mode, p.resize_size, p.crop_size, p.interpolation) == ("dino", 256, 224, "bicubic")
    assert p.mean == zoo.IMAGENET_MEAN and p.std == zoo.IMAGENET_STD and not p.grayscale


def test_get_spec_unknown_lists_valid_names():
    with pytest.raises(KeyError) as info:
        zoo.get_spec("vit_s17")
    msg = str(info.value)
    assert "vit_s17" in msg and all(n in msg for n in NAMES)


def test_list_models_as_dicts():
    rows = zoo.list_models(as_dicts=True)
    assert [r["name"] for r in rows] == NAMES
    for r in rows:
        spec = zoo.get_spec(r["name"])
        assert (r["dim"], r["patch_size"], r["knn_top1"], r["linear_top1"]) == (
            spec.embed_dim, spec.patch_size, spec.knn_top1, spec.linear_top1)


def test_cli_models_prints_every_name(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    first_cells = [line.split()[0] for line in out.splitlines()[2:] if line.strip()]
    assert first_cells == NAMES
    for name in NAMES:
        spec = zoo.get_spec(name)
        row = next(line for line in out.splitlines() if line.split()[0] == name)
        linear = "-" if spec.linear_top1 is None else f"{spec.linear_top1:.1f}"
        assert str(spec.embed_dim) in row.split() and linear in row.split()
        assert f"{spec.knn_top1:.1f}" in row.split()


def test_cli_models_json(capsys):
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == NAMES


def test_cli_models_shows_local_copies(capsys, offline_weight_caches, monkeypatch,
                                       hf_snapshot_writer):
    """The 'here' column (and --json local_path): shipped, $DINOFEAT_WEIGHTS_DIR, HF cache."""
    from dinofeat import weights
    monkeypatch.setenv("DINOFEAT_WEIGHTS_DIR", str(offline_weight_caches.weights_dir))
    (offline_weight_caches.weights_dir / "vit_b8.safetensors").write_bytes(b"x")
    hf_snapshot_writer(offline_weight_caches.hf_cache, "timm/vit_small_patch8_224.dino",
                       {"model.safetensors": b"y"})
    here = weights.local_weights_all()
    assert {n for n, p in here.items() if p} == {"vit_t_fmnist", "vit_b8", "vit_s8"}
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "here"
    col = {ln.split()[0]: ln.split()[-1] for ln in lines[2:] if ln.strip()}
    assert col == {n: "yes" if here[n] else "no" for n in NAMES}
    assert cli.main(["models", "--json"]) == 0
    rows = {r["name"]: r["local_path"] for r in json.loads(capsys.readouterr().out)}
    assert rows["vit_b8"].endswith("vit_b8.safetensors") and rows["vit_s16"] is None


def test_cli_wording_does_not_leak_into_python():
    """main() words errors for the command line only while it runs."""
    from dinofeat import weights
    assert cli.main(["models", "--markdown"]) == 0
    assert "dinofeat.load(" in weights.how_to_pass_weights()
