"""``dinofeat doctor``: what dinofeat chose on this machine, and the timings behind it."""

from __future__ import annotations

import argparse


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .. import accel
    if args.reprobe:
        accel.clear_probes()
    report = accel.platform_report(probe_now=not args.no_probe)
    if args.json:
        import json
        print(json.dumps(report, indent=1))
        return 0
    check = report["onednn_fp32"]
    print(f"CPU: {report['cpu']}, {report['threads']} threads, torch {report['torch']}, "
          f"CUDA: {'yes' if report['cuda'] else 'no'}")
    print(f"oneDNN for fp32 matmuls: {'used' if report['onednn_fp32_used'] else 'not used'} "
          f"({check['reason']}; error {check['linear_error']:.1e} vs default "
          f"{check['default_error']:.1e})")
    if not report["probing"]:
        print("probing is off (DINOFEAT_PROBE=0): fixed rules are used")
        return 0
    print(f"probes (cached in {report['probe_cache']}):")
    for name, res in report["probes"].items():
        timings = res.get("seconds") or res.get("gflops_by_batch") or {}
        if isinstance(timings, dict):
            shown = ", ".join(f"{k} {v * 1e3:.1f} ms" if "seconds" in res else f"{k}: {v}"
                              for k, v in timings.items())
        else:
            shown = f"{timings * 1e3:.1f} ms"
        print(f"  {name:28s} -> {res['choice']!s:14s} ({shown}; load {res.get('load_average')})")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "doctor", help="show the kernels dinofeat chose on this machine and why",
        description="Run (once per machine and software version; cached under "
                    "~/.cache/dinofeat) the short timed probes behind dinofeat's dispatch "
                    "choices - attention kernel per precision and sequence length, the "
                    "oneDNN fp32 route (with its numerical self-check), faiss or torch for "
                    "exact search, the GEMM rate, the embedding batch - and print what was "
                    "chosen with the timings. DINOFEAT_PROBE=0 turns probing off.")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--reprobe", action="store_true",
                   help="forget the cached probes of this machine and measure again")
    p.add_argument("--no-probe", action="store_true",
                   help="show the cached choices only, run nothing")
    p.set_defaults(func=_cmd_doctor)
