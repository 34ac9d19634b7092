"""benchmarks/gpu_check.py --dry-run: every part of the prepared GPU check runs on the CPU
with tiny sizes (CI has no GPU), so the script cannot rot between GPU runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"),
                           "--dry-run", "--out", str(out), "--work-dir", str(tmp_path / "w")],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["machine"]["device"] == "cpu" and res["machine"]["gpu"] is None
    parts = res["parts"]
    assert list(parts) == ["train", "loader", "resume", "nccl_accum", "compile", "embed",
                           "attention", "fashion_mnist"]
    failed = {k: v.get("error", "")[-600:] for k, v in parts.items() if v["status"] != "ok"}
    assert not failed, failed
    rows = parts["train"]["rows"]
    assert set(rows) == {"release_fp16", "dinofeat_fp16", "dinofeat_bf16"}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert 0 <= parts["loader"]["data_wait_frac"] <= 1
    assert parts["resume"]["resumed_vs_uninterrupted"]["bit_identical"]  # exact on CPU
    assert parts["nccl_accum"]["all_reduce_ok"]
    assert parts["nccl_accum"]["accumulation_matches"]
    assert parts["compile"]["steps"] == 5
    assert parts["embed"]["cosine_goal_0.9999_met"]
    assert parts["embed"]["backbone_vs_timm"]["fp32"]["cosine_min_to_timm"] > 0.9999
    assert parts["attention"]["finite"]
    assert 0 <= parts["fashion_mnist"]["knn"]["top1"] <= 100
    assert "dinofeat GPU check" in proc.stdout
