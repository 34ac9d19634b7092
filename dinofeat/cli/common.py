"""What the verbs share: the one-line-error parser, ``UserError`` and the model options."""

from __future__ import annotations

import argparse

__all__ = ["UserError", "Parser", "load_model_arg", "features_device", "add_model_args",
           "model_args_fixup", "embed_run_options", "rank"]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``dinofeat embed: error: ... (see ... --help)``)
    instead of the usage block; sub-command parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def load_model_arg(args: argparse.Namespace):
    """The model named by ``--weights PATH`` (``--arch`` as a hint) or ``--arch NAME``."""
    from .. import load
    if args.weights:
        return load(args.weights, device=args.device, arch=args.arch_given)
    return load(args.arch, device=args.device)


def features_device(args: argparse.Namespace) -> None:
    """Under torchrun (or srun/mpirun) on GPUs, each process takes its own GPU: the
    local rank's, else ``RANK % number of GPUs`` (:mod:`dinofeat.runtime`)."""
    from .. import runtime
    if args.device is None and runtime.launcher_ranks()[1] > 1:
        args.device = str(runtime.default_device())



def add_model_args(p, default_arch: str) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--arch", default=None, help=f"zoo model name (default {default_arch}); "
                   "with --weights, the architecture of the file (inferred when omitted)")
    g.add_argument("--weights", default=None, metavar="PATH",
                   help="weights file or training run folder instead of a zoo model")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA "
                   "when available)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision (default fp32)")
    p.set_defaults(default_arch=default_arch)


def model_args_fixup(func):
    def run(args):
        args.arch_given = args.arch
        if args.arch is None and not args.weights:
            args.arch = args.default_arch
        return func(args)
    return run



def embed_run_options(args: argparse.Namespace) -> dict:
    opts = {"batch_size": args.batch_size, "num_workers": args.num_workers,
            "progress": None if args.progress else False, "precision": args.precision}
    if getattr(args, "device", None):
        opts["device"] = args.device
    return opts



def rank() -> int:
    import os
    return int(os.environ.get("RANK", "0") or 0)


