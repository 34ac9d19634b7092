"""Printing evaluation results as plain-text tables and writing them as JSON."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any, Sequence

from ..utils import atomic_write_json

__all__ = ["format_table", "write_results", "fmt", "results_table"]


def fmt(v: Any, digits: int = 2) -> str:
    """A table cell: floats with ``digits`` decimals, NaN/None as ``-``."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if v != v else f"{v:.{digits}f}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> str:
    """Left-aligned columns separated by two spaces, with a dashed rule under the header."""
    cells = [[str(h) for h in headers]] + [[fmt(v, digits) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(path: str | os.PathLike, results: dict) -> Path:
    """Write ``results`` as JSON (atomically), adding when and with what it was made."""
    import torch

    from ..version import __version__
    out = dict(results)
    out.setdefault("meta", {}).update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dinofeat": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    })
    path = Path(path)
    atomic_write_json(path, out)
    return path


def results_table(results: dict) -> str:
    """The table ``dinofeat eval <task>`` prints for a result dict of any evaluation."""
    task = results.get("task")
    if task == "knn":
        return format_table(["k", "top-1", "top-5"],
                            [[r["k"], r["top1"], r["top5"]] for r in results["results"]])
    if task == "linear":
        final = results.get("final") or {}
        rows = [["final", final.get("acc1"), final.get("acc5")]]
        if results.get("best_acc1") is not None:
            rows.append(["best epoch", results["best_acc1"], None])
        return format_table(["linear probe", "top-1", "top-5"], rows)
    if task == "retrieval":
        res = results["results"]
        keys = [k for k in next(iter(res.values()))]
        return format_table([results["dataset"]] + keys,
                            [[p] + [res[p][k] for k in keys] for p in res])
    if task == "copydetect":
        return format_table(["copydays block", "mAP", "queries"],
                            [[b, r["mAP"], r["n_queries"]] for b, r in results["results"].items()])
    if task == "davis":
        rows = [[v, r["J"], r["F"], (r["J"] + r["F"]) / 2] if r else [v, None, None, None]
                for v, r in results["videos"].items()]
        s = results.get("results")
        if s:
            rows.append(["mean over objects", s["J"], s["F"], s["J&F"]])
        return format_table(["video", "J", "F", "J&F"], rows, digits=1)
    raise ValueError(f"unknown evaluation task {task!r}")
