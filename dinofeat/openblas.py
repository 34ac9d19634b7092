"""Which kernels faiss's bundled OpenBLAS uses.

The faiss-cpu wheels (1.15) bundle OpenBLAS 0.3.15, which does not recognise CPUs newer than
itself (Sapphire Rapids and later Xeons, among others) and falls back to its generic
``Prescott`` kernels (SSE3): every BLAS path of faiss (exact search, k-means, IVF
assignment) then runs several times slower than the CPU allows. On the 2-core Xeon with
AMX, faiss's exact search of 250 queries over 200k 384-d vectors took 1.6 s with Prescott
kernels and 0.33 s with ``OPENBLAS_CORETYPE=SkylakeX``. OpenBLAS reads the variable once,
when its library is loaded, so it must be set before faiss is first imported:
``import dinofeat`` calls :func:`pin_core` before any of its modules can load faiss (a
program that imported faiss before dinofeat keeps OpenBLAS's own choice).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["ENV", "core_for_flags", "pin_core"]

ENV = "OPENBLAS_CORETYPE"
_AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def core_for_flags(flags: set[str]) -> str | None:
    """The newest OpenBLAS 0.3.15 kernel family these CPU flags run: ``SkylakeX``
    (AVX-512), ``Haswell`` (AVX2 + FMA), else ``None`` (leave OpenBLAS's own choice)."""
    if _AVX512 <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:  # not Linux: OpenBLAS decides
        pass
    return set()


def pin_core() -> str | None:
    """Set ``OPENBLAS_CORETYPE`` from the CPU's flags before faiss is loaded, so that its
    OpenBLAS does not fall back to generic kernels on a CPU it does not know. Nothing is
    changed when the user set the variable, or faiss is already loaded (too late).
    Returns the value set, or ``None``."""
    if ENV in os.environ or "faiss" in sys.modules:
        return None
    core = core_for_flags(_cpu_flags())
    if core:
        os.environ[ENV] = core
    return core
