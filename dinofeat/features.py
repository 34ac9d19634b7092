"""How feature vectors are made from a backbone: :class:`FeatureSpec`.

A :class:`FeatureSpec` names every choice that changes the vectors ``embed`` returns,
apart from the weights themselves:

* ``pool``: ``"cls"`` (the final-normed [CLS] token; k-NN and retrieval), ``"mean"``
  (the average output patch token), ``"gem"`` (generalised mean, p = 4, over the output
  patch tokens: ``(mean(max(x, 1e-6) ** 4)) ** (1 / 4)`` per channel) or ``"cls+gem"``
  ([CLS] followed by GeM; copy detection);
* ``n_last_blocks`` and ``avgpool``: the linear-evaluation representation, the [CLS]
  tokens of the last ``n`` blocks (each through the final LayerNorm) concatenated, with
  the average patch token of the last block when ``avgpool``. ``layout`` says where that
  average goes: ``"interleaved"`` (the release's ``[cls_0, avg_0, cls_1, avg_1, ...]``,
  what its ViT-B linear heads expect; only for ``n_last_blocks=1``, and its default
  there) or ``"concat"`` (``[cls_{L-n+1}, ..., cls_L, avg_L]``; the default for ``n > 1``);
* ``multiscale``: the representation averaged over the input resized (bilinear) by 1,
  1/sqrt(2) and 1/2;
* ``normalize``: L2-normalise each vector (after the multi-scale average);
* ``preprocessing`` and ``size``: ``None`` (the model's own), ``"dino"``/``"whole"`` or a
  :class:`~dinofeat.zoo.Preprocessing`, and the crop size (``"dino"``) or long side
  (``"whole"``) that overrides it.

The numeric precision (fp32/bf16/fp16) is deliberately not part of a spec: it changes
the vectors only by rounding, and features made at one precision may be searched with
queries made at another.

:meth:`FeatureSpec.identity` gives the JSON record stored with an index, a feature file
or the evaluation cache (the model's name and weights hash, the preprocessing actually
applied, every field above and the vector length); :func:`check_identities` compares two
such records and names what differs. Records written before the spec existed (keys
``pooling``/``normalized``, no block settings) are read with their defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .zoo import Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    from .protocol import FeatureModel

__all__ = ["FeatureSpec", "IncompatibleFeaturesError", "POOLS", "LAYOUTS", "GEM_P",
           "MULTISCALE_FACTORS", "gem", "crop_to_patches", "multiscale_features",
           "pooled_features", "resolve_preprocessing", "sized_preprocessing",
           "check_identities", "identity_differences"]

POOLS = ("cls", "mean", "gem", "cls+gem")
LAYOUTS = ("interleaved", "concat")
MULTISCALE_FACTORS = (1.0, 1.0 / math.sqrt(2.0), 0.5)
GEM_P = 4.0

# Keys of a stored identity that change the vectors, with the value an older record
# that lacks the key stands for (older indexes stored neither blocks nor layout).
_VECTOR_KEYS = {"weights_hash": None, "preprocessing": None, "pool": "cls",
                "normalize": True, "multiscale": False, "n_last_blocks": 1,
                "avgpool": False, "layout": None, "whitening": None}
_LEGACY_KEYS = {"pooling": "pool", "normalized": "normalize"}


class IncompatibleFeaturesError(ValueError):
    """Features made by another model or with other settings than those they are
    compared with (an index, a feature file, a linear head)."""


# ------------------------------------------------------------------ primitives
def gem(tokens: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling of patch tokens ``[B, N, D]`` -> ``[B, D]`` (in fp32):
    ``(mean_n max(x, eps) ** p) ** (1 / p)``."""
    return tokens.float().clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def crop_to_patches(x: torch.Tensor, patch_size: int | None) -> torch.Tensor:
    """Crop ``[B, C, H, W]`` to the top-left ``(H // p * p, W // p * p)``: exactly the
    pixels a stride-``p`` patch convolution uses, which is what the original DINO ViT does
    with a remainder (timm's patch embedding refuses one)."""
    if not patch_size:
        return x
    h, w = x.shape[-2] // patch_size * patch_size, x.shape[-1] // patch_size * patch_size
    if h == 0 or w == 0:
        raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than one {patch_size}-pixel "
                         "patch")
    return x[..., :h, :w]


def multiscale_features(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        scales: Sequence[float] = MULTISCALE_FACTORS) -> torch.Tensor:
    """Average of ``fn`` over bilinear rescalings of ``x`` by ``scales``."""
    if not scales:
        raise ValueError("multiscale_features needs at least one scale")
    feats = [fn(x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear",
                                               align_corners=False)).float() for s in scales]
    return torch.stack(feats).mean(dim=0)


def resolve_preprocessing(model: Any, preprocessing: None | str | Preprocessing
                          ) -> Preprocessing:
    """The model's own preprocessing, with ``mode`` replaced by a string, or a given one."""
    if preprocessing is None:
        return model.preprocessing
    if isinstance(preprocessing, str):
        if preprocessing not in ("dino", "whole"):
            raise ValueError(f"preprocessing must be 'dino', 'whole' or a Preprocessing, got "
                             f"{preprocessing!r}")
        return model.preprocessing.replace(mode=preprocessing)
    if isinstance(preprocessing, Preprocessing):
        return preprocessing
    raise TypeError(f"preprocessing must be None, 'dino', 'whole' or a Preprocessing, got "
                    f"{type(preprocessing).__name__}")


def sized_preprocessing(pre: Preprocessing, size: int | None) -> Preprocessing:
    """``pre`` with a ``size`` override applied: in ``"dino"`` mode the crop becomes
    ``size`` and the resize scales with it (``round(size * resize / crop)``, the paper's
    256/224 ratio kept); in ``"whole"`` mode ``size`` is the long side."""
    if size is None:
        return pre
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if pre.mode == "dino":
        return pre.replace(crop_size=size,
                           resize_size=round(size * pre.resize_size / pre.crop_size))
    return pre.replace(crop_size=size)


def _preprocessing_from(value: Any) -> None | str | Preprocessing:
    if value is None or isinstance(value, (str, Preprocessing)):
        return value
    if isinstance(value, Mapping):
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in value.items()}
        return Preprocessing(**fields)
    raise TypeError(f"preprocessing must be None, 'dino', 'whole', a Preprocessing or its "
                    f"dict, got {type(value).__name__}")


# ------------------------------------------------------------------ the spec
@dataclass(frozen=True)
class FeatureSpec:
    """Every setting that changes the vectors made from a model (see the module
    docstring). Immutable and hashable; ``spec.replace(normalize=False)`` makes a
    variant. Invalid combinations raise ``ValueError`` when the spec is made; what
    depends on the model (a ResNet has no patch tokens, a ViT has so many blocks) is
    checked by :meth:`check_model`."""

    pool: str = "cls"
    normalize: bool = True
    multiscale: bool = False
    n_last_blocks: int = 1
    avgpool: bool = False
    layout: str | None = None
    preprocessing: None | str | Preprocessing = None
    size: int | None = None

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        n = self.n_last_blocks
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n_last_blocks must be a positive integer, got {n!r}")
        if (n > 1 or self.avgpool) and self.pool != "cls":
            raise ValueError("n_last_blocks/avgpool build the linear-evaluation [CLS] "
                             f"representation; they cannot be combined with pool={self.pool!r}")
        for name in ("normalize", "multiscale", "avgpool"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        layout = self.layout
        if not self.avgpool:
            layout = None  # without the average token there is nothing to lay out
        elif layout is None:
            layout = "interleaved" if n == 1 else "concat"
        elif layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        elif layout == "interleaved" and n != 1:
            raise ValueError("the interleaved (release) avgpool layout exists only for "
                             f"n_last_blocks=1, got {n}; use layout='concat'")
        object.__setattr__(self, "layout", layout)
        object.__setattr__(self, "preprocessing", _preprocessing_from(self.preprocessing))
        if isinstance(self.preprocessing, str) and self.preprocessing not in ("dino", "whole"):
            raise ValueError(f"preprocessing must be 'dino', 'whole' or a Preprocessing, got "
                             f"{self.preprocessing!r}")
        if self.size is not None and (not isinstance(self.size, int) or
                                      isinstance(self.size, bool) or self.size < 1):
            raise ValueError(f"size must be a positive integer, got {self.size!r}")

    # ------------------------------------------------------------ construction
    @classmethod
    def from_options(cls, spec: "FeatureSpec | None" = None, **options: Any) -> "FeatureSpec":
        """``spec`` (default: the defaults) with ``options`` (field names) replaced; an
        unknown option is a ``TypeError`` naming it."""
        unknown = sorted(set(options) - set(FIELDS))
        if unknown:
            raise TypeError(f"unknown feature option(s): {', '.join(unknown)} (valid: "
                            f"{', '.join(FIELDS)})")
        base = spec if spec is not None else cls()
        if not isinstance(base, FeatureSpec):
            raise TypeError(f"spec must be a FeatureSpec, got {type(base).__name__}")
        return base.replace(**options) if options else base

    @staticmethod
    def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(spec fields, everything else)`` of a keyword dict (e.g. ``embed``'s)."""
        spec = {k: v for k, v in options.items() if k in FIELDS}
        return spec, {k: v for k, v in options.items() if k not in FIELDS}

    def replace(self, **changes: Any) -> "FeatureSpec":
        """A copy with ``changes``. Changing ``avgpool`` or ``n_last_blocks`` re-derives
        the default layout unless ``layout`` is given too."""
        if ("avgpool" in changes or "n_last_blocks" in changes) and "layout" not in changes:
            changes["layout"] = None
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ facts
    def check_model(self, model: "FeatureModel") -> None:
        """Raise when ``model`` cannot make these features (``TypeError`` for a missing
        capability, ``ValueError`` for a number out of range), naming the option."""
        name = getattr(model, "name", "this model")
        if not model.is_vit:
            if self.n_last_blocks > 1 or self.avgpool:
                raise TypeError(f"n_last_blocks/avgpool need a ViT; {name} is not one")
            if self.pool != "cls" and not model.has_tokens:
                raise TypeError(f"pool={self.pool!r} needs patch tokens; {name} is a ResNet "
                                "(its feature is the global average pool: use pool='cls')")
        depth = getattr(model, "depth", None)
        if depth is not None and self.n_last_blocks > depth:
            raise ValueError(f"n_last_blocks={self.n_last_blocks} but {name} has {depth} "
                             "blocks")

    def dim(self, model: "FeatureModel") -> int:
        """Length of the vectors these settings give with ``model``."""
        d = int(model.embed_dim)
        if self.n_last_blocks > 1 or self.avgpool:
            return d * (self.n_last_blocks + int(self.avgpool))
        return 2 * d if self.pool == "cls+gem" else d

    def effective_preprocessing(self, model: "FeatureModel") -> Preprocessing:
        """The preprocessing actually applied with ``model`` (its own, or the override,
        with ``size``)."""
        return sized_preprocessing(resolve_preprocessing(model, self.preprocessing), self.size)

    # ------------------------------------------------------------ computing
    def pooled_features(self, model: "FeatureModel", x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` -> the single-scale representation
        ``[B, D']``, before the L2 normalisation."""
        x = crop_to_patches(x, model.patch_size)
        if self.n_last_blocks > 1 or self.avgpool:
            blocks = model.intermediate_tokens(x, self.n_last_blocks, norm=True)
            cls = torch.cat([t[:, 0] for t in blocks], dim=-1)
            if not self.avgpool:
                return cls
            avg = blocks[-1][:, 1:].mean(dim=1)
            if self.layout == "interleaved":  # what stacking on a new last axis gives
                return torch.stack((cls, avg), dim=-1).flatten(1)
            return torch.cat((cls, avg), dim=-1)
        if self.pool == "cls":
            return model(x)
        tokens = model.forward_tokens(x)
        patches = tokens[:, 1:]
        if self.pool == "mean":
            return patches.mean(dim=1)
        g = gem(patches)
        return g if self.pool == "gem" else torch.cat([tokens[:, 0].float(), g], dim=-1)

    def features(self, model: "FeatureModel", x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``[B, 3, H, W]`` -> the final vectors ``[B, D']`` (float32):
        pooled, averaged over scales and L2-normalised as the spec says."""
        def single(t: torch.Tensor) -> torch.Tensor:
            return self.pooled_features(model, t).float()

        f = multiscale_features(single, x) if self.multiscale else single(x)
        return F.normalize(f, dim=-1) if self.normalize else f

    def function(self, model: "FeatureModel") -> Callable[[torch.Tensor], torch.Tensor]:
        """:meth:`features` bound to ``model`` (checked first): what ``embed`` runs on
        every normalised batch."""
        self.check_model(model)
        return lambda x: self.features(model, x)

    # ------------------------------------------------------------ records
    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (a :class:`~dinofeat.zoo.Preprocessing` as its dict)."""
        out = {f: getattr(self, f) for f in FIELDS}
        if isinstance(self.preprocessing, Preprocessing):
            out["preprocessing"] = json.loads(json.dumps(self.preprocessing.to_dict()))
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Any] | None) -> "FeatureSpec":
        """The spec of a record written by :meth:`to_dict` or :meth:`identity`, or by an
        older dinofeat: an index's model identity (``pooling``, ``normalized``), a feature
        file's ``embed`` section or an evaluation cache's options. Keys that are not
        fields (weights hash, precision, dim...) are ignored; missing ones take their
        defaults."""
        record = dict(record or {})
        for old, new in _LEGACY_KEYS.items():
            if old in record and new not in record:
                record[new] = record[old]
        kw = {f: record[f] for f in FIELDS if record.get(f) is not None}
        return cls(**kw)

    def identity(self, model: "FeatureModel") -> dict[str, Any]:
        """The JSON record of the vectors this spec makes with ``model``: the model's
        ``describe()`` (name, weights hash, dims), the preprocessing actually applied
        (``size`` folded in), every field and the vector length ``dim``. Stored with
        indexes, feature files and the evaluation cache; compare two with
        :func:`check_identities`."""
        info = dict(model.describe())
        info.update({f: getattr(self, f) for f in FIELDS if f not in ("preprocessing", "size")})
        info["preprocessing"] = self.effective_preprocessing(model).to_dict()
        info["dim"] = self.dim(model)
        return json.loads(json.dumps(info))  # plain JSON types (tuples -> lists)

    def check_compatible(self, other: "FeatureSpec", what: str = "features") -> None:
        """Raise :class:`IncompatibleFeaturesError` naming every field in which ``other``
        makes different vectors than this spec."""
        if not isinstance(other, FeatureSpec):
            raise TypeError(f"other must be a FeatureSpec, got {type(other).__name__}")
        diffs = [f"{f} ({getattr(self, f)!r} vs {getattr(other, f)!r})" for f in FIELDS
                 if _canonical(getattr(self, f)) != _canonical(getattr(other, f))]
        if diffs:
            raise IncompatibleFeaturesError(f"{what} are made with other settings: "
                                            f"{'; '.join(diffs)} differ")


FIELDS = tuple(f.name for f in dataclasses.fields(FeatureSpec))


def _canonical(value: Any) -> str:
    if isinstance(value, Preprocessing):
        value = value.to_dict()
    return json.dumps(value, sort_keys=True)


# ------------------------------------------------------------------ records compared
def _normalised_record(info: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(info)
    for old, new in _LEGACY_KEYS.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    if out.get("avgpool") and out.get("layout") is None:
        out["layout"] = "interleaved" if out.get("n_last_blocks", 1) == 1 else "concat"
    return out


def identity_differences(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None
                         ) -> list[str]:
    """The keys in which two stored identities (:meth:`FeatureSpec.identity`, or an older
    index's model record) make different vectors. Nothing differs when either side is
    unknown; weights and preprocessing are compared only when both sides record them,
    and the model names only when a side records no weights hash."""
    if not a or not b:
        return []
    a, b = _normalised_record(a), _normalised_record(b)
    diffs = []
    for key, default in _VECTOR_KEYS.items():
        x, y = a.get(key, default), b.get(key, default)
        if key in ("weights_hash", "preprocessing") and (x is None or y is None):
            continue
        if json.dumps(x, sort_keys=True) != json.dumps(y, sort_keys=True):
            diffs.append(key)
    if (not a.get("weights_hash") or not b.get("weights_hash")) and \
            a.get("name") and b.get("name") and a["name"] != b["name"]:
        diffs.append("name")
    return diffs


def describe_identity(info: Mapping[str, Any]) -> str:
    """A short human description of a stored identity (model, weights, pooling...)."""
    info = _normalised_record(info)
    parts = [str(info.get("name", "unnamed model"))]
    if info.get("weights_hash"):
        parts.append(f"weights {info['weights_hash']}")
    parts.append(f"pool {info.get('pool', 'cls')}")
    if info.get("n_last_blocks", 1) != 1:
        parts.append(f"n_last_blocks {info['n_last_blocks']}")
    if info.get("avgpool"):
        parts.append(f"avgpool ({info.get('layout')})")
    if info.get("multiscale"):
        parts.append("multiscale")
    if info.get("normalize", True) is False:
        parts.append("not normalized")
    return ", ".join(parts)


def check_identities(expected: Mapping[str, Any] | None, got: Mapping[str, Any] | None,
                     what: str = "features", where: str = "this index") -> None:
    """Raise :class:`IncompatibleFeaturesError` when ``got`` (the identity of new
    features) differs from ``expected`` (what ``where`` holds), naming the keys."""
    diffs = identity_differences(expected, got)
    if diffs and expected and got:
        raise IncompatibleFeaturesError(
            f"{what} come from a different feature space than {where} ({', '.join(diffs)} "
            f"differ): the {what} are from [{describe_identity(got)}], {where} holds "
            f"[{describe_identity(expected)}]; embed them with the same model and settings")


def pooled_features(model: "FeatureModel", x: torch.Tensor, spec: FeatureSpec | None = None,
                    **options: Any) -> torch.Tensor:
    """``FeatureSpec.from_options(spec, **options).pooled_features(model, x)``: normalised
    images ``[B, 3, H, W]`` -> the representation ``[B, D']`` (not L2-normalised)."""
    return FeatureSpec.from_options(spec, **options).pooled_features(model, x)
