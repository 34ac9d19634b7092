"""The faiss GPU copy of a KNNIndex: on this process's GPU only (not every visible GPU),
and a failing GPU search falls back to the CPU index. faiss-gpu is faked on the CPU."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

import dinofeat.search.index as index_module
from dinofeat import KNNIndex


class _BrokenGpuIndex:
    """Stands for a GPU copy whose search fails (out of GPU memory...)."""

    def __init__(self, cpu_index):
        self.ntotal = cpu_index.ntotal

    def search(self, q, k):
        raise RuntimeError("Error in void faiss::gpu::allocMemorySpace: cudaMalloc failed")


def test_gpu_copy_on_this_process_gpu_and_cpu_fallback(monkeypatch):
    placed = []
    monkeypatch.setattr(index_module, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "res", raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu",
                        lambda res, dev, idx: placed.append(dev) or _BrokenGpuIndex(idx),
                        raising=False)

    def every_gpu(*a, **k):
        raise AssertionError("the index must not be copied onto every visible GPU")
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", every_gpu, raising=False)
    # under torchrun with LOCAL_RANK 3 of 4 GPUs: faiss uses GPU 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 16)).astype(np.float32)
    idx = KNNIndex(16, device="cuda")
    idx.add(feats)
    scores, ids = idx.search(feats[:5], k=3)
    assert placed == [3]
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]  # the CPU index answered
    # later searches go straight to the CPU
    idx.search(feats[:2], k=3)
    assert placed == [3]
    cpu = KNNIndex(16, device="cpu")
    cpu.add(feats)
    np.testing.assert_array_equal(cpu.search(feats[:5], k=3)[1], ids)
    with pytest.raises(ValueError, match="k must be"):
        idx.search(feats[:1], k=0)
