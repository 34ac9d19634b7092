"""Shared pytest fixtures. Keep each one small and say whose tests use it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest


# ---------------------------------------------------------------- weights (loading tests)
@pytest.fixture
def offline_weight_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """Every weights lookup confined to empty folders under ``tmp_path``, network off.

    Sets ``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE`` and ``TORCH_HOME``; removes ``HF_HOME``,
    ``DINOFEAT_WEIGHTS_DIR`` and the legacy cache variables. Returns ``hf_cache`` (the
    Hugging Face hub cache), ``torch_checkpoints`` (``$TORCH_HOME/hub/checkpoints``, where
    release ``.pth`` files are looked for) and ``weights_dir`` (a folder for
    ``DINOFEAT_WEIGHTS_DIR``, not set until a test sets it)."""
    for name in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "DINOFEAT_WEIGHTS_DIR", "TORCH_HUB",
                 "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    caches = SimpleNamespace(hf_cache=tmp_path / "hf-cache",
                             torch_home=tmp_path / "torch-home",
                             weights_dir=tmp_path / "weights-dir")
    caches.torch_checkpoints = caches.torch_home / "hub" / "checkpoints"
    for folder in (caches.hf_cache, caches.torch_checkpoints, caches.weights_dir):
        folder.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(caches.hf_cache))
    monkeypatch.setenv("TORCH_HOME", str(caches.torch_home))
    return caches


@pytest.fixture
def hf_snapshot_writer() -> Callable[..., Path]:
    """A function ``write(cache, repo_id, files, commit=None, refs=("main",))`` that lays
    out a model repo in a Hugging Face hub cache folder exactly as huggingface_hub does::

        models--<org>--<name>/blobs/<sha256 of the file>
        models--<org>--<name>/refs/<ref>                      (the commit hash, no newline)
        models--<org>--<name>/snapshots/<commit>/<file> -> ../../blobs/<sha256>

    ``files`` maps file names to bytes or to a path whose bytes are copied. Returns the
    snapshot folder; its name is the commit (40 hex digits, derived from the contents
    when not given)."""

    def write(cache: Path, repo_id: str, files: dict[str, bytes | Path],
              commit: str | None = None, refs: tuple[str, ...] = ("main",)) -> Path:
        repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
        data = {name: (Path(v).read_bytes() if isinstance(v, (str, os.PathLike)) else v)
                for name, v in files.items()}
        if commit is None:
            h = hashlib.sha1()
            for name in sorted(data):
                h.update(name.encode() + hashlib.sha256(data[name]).digest())
            commit = h.hexdigest()
        snapshot = repo / "snapshots" / commit
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot.mkdir(parents=True, exist_ok=True)
        for name, content in data.items():
            blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
            blob.write_bytes(content)
            link = snapshot / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        for ref in refs:
            (repo / "refs" / ref).write_text(commit)
        return snapshot

    return write



# ------------------------------------------------- dispatch probes (dinofeat.accel, all tests)
@pytest.fixture(autouse=True)
def _no_dispatch_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No timed probes in tests (fixed kernel rules, nothing written to the user's cache):
    a test that exercises probing sets ``DINOFEAT_PROBE=1`` and ``DINOFEAT_CACHE_DIR``
    itself."""
    monkeypatch.setenv("DINOFEAT_PROBE", "0")
