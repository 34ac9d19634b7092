"""Fixtures of the reliability suite (tests/reliability/): a tiny model, its weights file,
the zoo of broken images, and the tally of what the suite tried.

The tally: every test reports how many bad inputs it tried, how many faults it injected
(kills, crashes, full disks, concurrent writers ...) and how much finished work was lost
afterwards (which must be zero). Set ``DINOFEAT_RELIABILITY_FIGURES=path.json`` to have the
totals written there at the end of the run; docs/reliability.md quotes such a file.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _zoo import deny_read, write_zoo  # noqa: E402


class Tally:
    """Counts per area: ``inputs`` (bad or hostile inputs tried), ``faults`` (faults
    injected), ``checks`` (outcomes checked), ``lost`` (finished work lost: must stay 0)."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.notes: dict[str, str] = {}

    def add(self, area: str, *, inputs: int = 0, faults: int = 0, checks: int = 0,
            lost: int = 0) -> None:
        c = self.counts[area]
        c["inputs"] += inputs
        c["faults"] += faults
        c["checks"] += checks
        c["lost"] += lost

    def note(self, key: str, text: str) -> None:
        self.notes[key] = text

    def as_dict(self) -> dict:
        areas = {a: dict(c) for a, c in sorted(self.counts.items())}
        total = defaultdict(int)
        for c in areas.values():
            for k, v in c.items():
                total[k] += v
        return {"areas": areas, "total": dict(total), "notes": self.notes}


_TALLY = Tally()


@pytest.fixture(scope="session")
def tally() -> Tally:
    return _TALLY


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("DINOFEAT_RELIABILITY_FIGURES")
    if target and _TALLY.counts:
        doc = _TALLY.as_dict()
        doc["exit_status"] = int(exitstatus)
        Path(target).write_text(json.dumps(doc, indent=1) + "\n")


@pytest.fixture(scope="session")
def tiny_model():
    """A random-weight ViT-Tiny/16, 4 blocks, 32-px "dino" preprocessing (resize 37, crop
    32), as a DinoModel on CPU. Shared: do not modify."""
    import torch

    from dinofeat.backbones import DinoVisionTransformer
    from dinofeat.model import DinoModel
    from dinofeat.zoo import Preprocessing
    torch.manual_seed(0)
    vit = DinoVisionTransformer(patch_size=16, embed_dim=192, depth=4, num_heads=3,
                                img_size=32)
    return DinoModel(vit, name="tiny-rel",
                     preprocessing=Preprocessing(resize_size=37, crop_size=32)).eval()


@pytest.fixture(scope="session")
def tiny_weights(tiny_model, tmp_path_factory) -> Path:
    from dinofeat.model import save_safetensors
    return save_safetensors(tiny_model, tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """The zoo of awkward/broken images (see _zoo.py) in a session folder: ``(root,
    files)``. Do not modify it."""
    root = tmp_path_factory.mktemp("zoo") / "photos"
    return root, write_zoo(root)


@pytest.fixture
def unreadable_by_permission(zoo_dir):
    """The zoo's chmod-000 file denied to this process (simulated as root)."""
    _, files = zoo_dir
    with deny_read([f.path for f in files if f.kind == "no read permission"]) as how:
        yield how
