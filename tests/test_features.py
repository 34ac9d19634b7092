"""FeatureSpec: one description of how vectors are made, its identity records and checks."""

from __future__ import annotations

import json

import pytest
import torch

import dinofeat
from _features import make_image, tiny_vit  # noqa: F401  (fixtures)
from dinofeat.features import (FeatureSpec, IncompatibleFeaturesError, check_identities,
                               identity_differences)
from dinofeat.zoo import Preprocessing


@pytest.fixture
def pics(make_image):
    return [make_image(40 + 7 * i, 48 + 3 * i, seed=i) for i in range(4)]


def test_exported_from_the_package():
    assert dinofeat.FeatureSpec is FeatureSpec


@pytest.mark.parametrize("change", [
    {"normalize": False}, {"n_last_blocks": 2}, {"avgpool": True}, {"pool": "gem"},
    {"multiscale": True}, {"n_last_blocks": 2, "avgpool": True, "layout": "concat"},
    {"size": 48}, {"preprocessing": "whole"},
])
def test_identity_differs_on_every_field_that_changes_vectors(tiny_vit, change):
    base = FeatureSpec()
    other = base.replace(**change)
    a, b = base.identity(tiny_vit), other.identity(tiny_vit)
    diffs = identity_differences(a, b)
    assert diffs, change
    with pytest.raises(IncompatibleFeaturesError, match="differ"):
        check_identities(a, b)
    with pytest.raises(IncompatibleFeaturesError) as e:
        base.check_compatible(other)
    for field in change:
        assert field in str(e.value)


def test_layout_is_part_of_the_identity(tiny_vit):
    inter = FeatureSpec(avgpool=True)
    concat = FeatureSpec(avgpool=True, layout="concat")
    assert inter.layout == "interleaved" and concat.layout == "concat"
    assert identity_differences(inter.identity(tiny_vit), concat.identity(tiny_vit)) == ["layout"]
    # default layout: interleaved for one block, concat for more
    assert FeatureSpec(avgpool=True, n_last_blocks=3).layout == "concat"
    assert FeatureSpec(layout="concat").layout is None  # no average token, nothing to lay out
    with pytest.raises(ValueError, match="interleaved"):
        FeatureSpec(avgpool=True, n_last_blocks=2, layout="interleaved")


def test_equal_specs_are_compatible_and_precision_is_not_identity(tiny_vit, pics):
    a = FeatureSpec(pool="gem", multiscale=True)
    b = FeatureSpec(pool="gem", multiscale=True)
    assert a == b and hash(a) == hash(b)
    a.check_compatible(b)
    assert identity_differences(a.identity(tiny_vit), b.identity(tiny_vit)) == []
    # precision is a way of running, not part of the spec
    with pytest.raises(TypeError, match="precision"):
        FeatureSpec(precision="bf16")  # type: ignore[call-arg]
    assert a.identity(tiny_vit) == json.loads(json.dumps(a.identity(tiny_vit)))


def test_identity_records_model_preprocessing_and_dim(tiny_vit):
    ident = FeatureSpec(size=48).identity(tiny_vit)
    assert ident["weights_hash"] == tiny_vit.weights_hash
    assert ident["name"] == "tiny-test"
    # the size rule: the crop becomes 48 and the resize keeps the 37/32 ratio
    assert ident["preprocessing"]["crop_size"] == 48
    assert ident["preprocessing"]["resize_size"] == round(48 * 37 / 32)
    assert ident["dim"] == 192
    assert FeatureSpec(n_last_blocks=4).identity(tiny_vit)["dim"] == 4 * 192
    assert FeatureSpec(n_last_blocks=2, avgpool=True).dim(tiny_vit) == 3 * 192
    assert FeatureSpec(pool="cls+gem").dim(tiny_vit) == 2 * 192


def test_round_trip_and_older_records(tiny_vit):
    spec = FeatureSpec(pool="cls", normalize=False, n_last_blocks=2, avgpool=True,
                       preprocessing=Preprocessing(crop_size=48, resize_size=55), size=40)
    assert FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert FeatureSpec.from_dict(spec.identity(tiny_vit)).replace(
        preprocessing=None, size=None) == spec.replace(preprocessing=None, size=None)
    # an index written before the spec: keys "pooling"/"normalized", no block settings
    old_index = {"name": "tiny-test", "weights_hash": tiny_vit.weights_hash,
                 "pooling": "gem", "normalized": False,
                 "preprocessing": tiny_vit.preprocessing.to_dict()}
    assert FeatureSpec.from_dict(old_index) == FeatureSpec(
        pool="gem", normalize=False, preprocessing=tiny_vit.preprocessing)
    assert identity_differences(
        old_index, FeatureSpec(pool="gem", normalize=False).identity(tiny_vit)) == []
    assert identity_differences(old_index, FeatureSpec(pool="gem").identity(tiny_vit)) == [
        "normalize"]
    # a feature file's "embed" section (pool, normalize, size, precision, dim)
    old_file = {"pool": "cls", "normalize": True, "multiscale": False, "n_last_blocks": 4,
                "avgpool": False, "size": None, "preprocessing": None, "precision": "bf16",
                "dim": 768}
    assert FeatureSpec.from_dict(old_file) == FeatureSpec(n_last_blocks=4)


def test_embed_spec_equals_the_same_keywords(tiny_vit, pics):
    kw = dict(pool="cls+gem", normalize=False, multiscale=True, size=48)
    spec = FeatureSpec(**kw)
    torch.testing.assert_close(tiny_vit.embed(pics, spec=spec), tiny_vit.embed(pics, **kw))
    lin = FeatureSpec(n_last_blocks=2, avgpool=True)
    torch.testing.assert_close(tiny_vit.embed(pics, lin),
                               tiny_vit.embed(pics, n_last_blocks=2, avgpool=True))
    # keywords override the spec's fields
    torch.testing.assert_close(tiny_vit.embed(pics, spec, normalize=True),
                               tiny_vit.embed(pics, **{**kw, "normalize": True}))
    stream = tiny_vit.iter_embed(pics, spec, batch_size=2)
    assert stream.spec == spec
    assert sum(f.shape[0] for _, f in stream) == len(pics)


def test_check_model_names_the_option(tiny_vit):
    with pytest.raises(ValueError, match="n_last_blocks=5"):
        FeatureSpec(n_last_blocks=5).check_model(tiny_vit)
    with pytest.raises(ValueError, match="cannot be combined"):
        FeatureSpec(pool="mean", avgpool=True)


def test_index_refuses_queries_with_other_normalisation_or_blocks(tiny_vit, pics, tmp_path):
    from dinofeat import KNNIndex
    for i, p in enumerate(pics):
        p.save(tmp_path / f"im{i}.png")
    index = KNNIndex()
    index.add_images(tmp_path, tiny_vit, progress=False)
    index.search_images(pics[:1], tiny_vit, k=2)  # same settings: fine
    for other, named in (({"normalize": False}, "normalized"), ({"n_last_blocks": 2}, "n_last_blocks"),
                         ({"avgpool": True}, "avgpool")):
        with pytest.raises(IncompatibleFeaturesError, match=named):
            index.search_images(pics[:1], tiny_vit, k=2, **other)
    # vectors recorded with another spec's identity are refused when added
    spec = FeatureSpec(n_last_blocks=2)
    with pytest.raises(IncompatibleFeaturesError, match="n_last_blocks"):
        index.add(tiny_vit.embed(pics, spec), model_info=spec.identity(tiny_vit))
    gem = FeatureSpec(pool="gem")
    with pytest.raises(IncompatibleFeaturesError, match="pooling"):
        index.add(tiny_vit.embed(pics, gem), model_info=gem.identity(tiny_vit))
    same = FeatureSpec()
    index.add(tiny_vit.embed(pics, same), model_info=same.identity(tiny_vit))
