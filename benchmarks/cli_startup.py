"""Start-up time of the command line against ``python -c "import torch"``.

Runs ``dinofeat --help``, ``dinofeat models``, ``python -c "import dinofeat"`` and
``python -c "import torch"`` as fresh processes in interleaved rounds (the machine is shared,
so each round measures all four under the same load) after one warm-up round that fills the
file cache, and prints the median wall time of each, its ratio to ``import torch``, the CPU
model and the load average.

    python benchmarks/cli_startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
    "dinofeat --help": [sys.executable, "-m", "dinofeat", "--help"],
    "dinofeat models": [sys.executable, "-m", "dinofeat", "models"],
    "import dinofeat": [sys.executable, "-c", "import dinofeat"],
    "import torch": [sys.executable, "-c", "import torch"],
}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def once(cmd: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    for cmd in COMMANDS.values():  # warm-up: file cache, __pycache__
        once(cmd)
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    loads = []
    for _ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for name, cmd in COMMANDS.items():
            times[name].append(once(cmd))
    ref = statistics.median(times["import torch"])
    print(f"{cpu_name()}, {os.cpu_count()} logical CPUs, {args.rounds} interleaved rounds, "
          f"1-min load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"{'command':<18} {'median s':>9} {'min s':>7} {'/ import torch':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<18} {med:>9.2f} {min(ts):>7.2f} {med / ref:>15.2f}")


if __name__ == "__main__":
    main()
