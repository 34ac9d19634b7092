"""What the verbs share: the one-line-error parser, ``UserError`` and the model options."""

from __future__ import annotations

import argparse
import sys

__all__ = ["UserError", "Parser", "load_model_arg", "features_device", "add_model_args",
           "resolve_model_args", "model_args_fixup", "Deprecated", "add_deprecated",
           "LibraryDefault", "resolve_default",
           "embed_run_options", "rank"]


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``dinofeat embed: error: ... (see ... --help)``)
    instead of the usage block; sub-command parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def load_model_arg(args: argparse.Namespace):
    """The model named by ``--model`` (a zoo name or a weights file / run folder)."""
    from .. import load
    return load(args.model, device=getattr(args, "device", None), arch=args.arch_hint)


def features_device(args: argparse.Namespace) -> None:
    """Under torchrun (or srun/mpirun) on GPUs, each process takes its own GPU: the
    local rank's, else ``RANK % number of GPUs`` (:mod:`dinofeat.runtime`)."""
    from .. import runtime
    if args.device is None and runtime.launcher_ranks()[1] > 1:
        args.device = str(runtime.default_device())


def add_model_args(p, default_model: str, *, running: bool = True) -> None:
    """``--model NAME_OR_PATH`` (+ ``--device``, ``--precision`` when ``running``), with the
    old ``--arch NAME`` / ``--weights PATH`` as hidden deprecated aliases."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help=f"zoo model name (see 'dinofeat models'; default {default_model}), "
                        "or a weights file (.pth, .safetensors) or training run folder")
    add_deprecated(g, "--arch", new="--model", dest="arch_alias")
    add_deprecated(g, "--weights", new="--model", dest="weights_alias")
    if running:
        g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA "
                       "when available)")
        g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                       help="autocast precision (default fp32)")
    p.set_defaults(default_model=default_model)


def resolve_model_args(args: argparse.Namespace, default: str | None = None) -> None:
    """Fold the deprecated ``--arch`` / ``--weights`` into ``args.model`` (``--arch`` next
    to a weights file stays what it was: the file's architecture) and set
    ``args.arch_hint``."""
    arch, weights = getattr(args, "arch_alias", None), getattr(args, "weights_alias", None)
    args.arch_hint = None
    if weights:
        if args.model:
            raise UserError("give the model once: --model (--weights is its old spelling)")
        args.model, args.arch_hint = weights, arch
    elif arch:
        if args.model:  # --model FILE --arch NAME: the architecture of the file
            args.arch_hint = arch
        else:
            args.model = arch
    if not args.model:
        args.model = default if default is not None else getattr(args, "default_model", None)


def model_args_fixup(func):
    def run(args):
        resolve_model_args(args)
        return func(args)
    return run


class Deprecated(argparse.Action):
    """A hidden old spelling of an option: stores into the new option's ``dest`` and prints
    one deprecation line (once per option per process)."""

    _warned: set[str] = set()

    def __init__(self, option_strings, dest, new: str, **kw):
        kw["help"] = argparse.SUPPRESS
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string not in Deprecated._warned:
            Deprecated._warned.add(option_string)
            print(f"dinofeat: warning: {option_string} is deprecated and will be removed in "
                  f"the next release; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated(parser, *old: str, new: str, dest: str, **kw) -> None:
    """Register ``old`` spellings of ``new`` as hidden deprecated aliases (same ``dest``)."""
    kw.setdefault("default", argparse.SUPPRESS if dest not in ("arch_alias", "weights_alias")
                  else None)
    parser.add_argument(*old, action=Deprecated, new=new, dest=dest, **kw)


class LibraryDefault:
    """A default that lives in a library module, read only when needed: shown by
    ``--help`` through ``%(default)s`` without importing that module at start-up."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def value(self):
        import importlib
        return getattr(importlib.import_module(self.module, __package__), self.name)

    def __str__(self) -> str:
        return str(self.value())


def resolve_default(value):
    """``value``, or the library value a :class:`LibraryDefault` stands for."""
    return value.value() if isinstance(value, LibraryDefault) else value


def embed_run_options(args: argparse.Namespace) -> dict:
    opts = {"batch_size": args.batch_size, "num_workers": args.num_workers,
            "progress": args.progress, "precision": args.precision,
            "decode": getattr(args, "decode", "reduced")}
    if getattr(args, "device", None):
        opts["device"] = args.device
    return opts


def embed_options(args: argparse.Namespace) -> dict:
    """:func:`embed_run_options` plus the feature options ``--size`` and
    ``--preprocessing`` when given (the verbs that embed a folder with a chosen spec)."""
    opts = embed_run_options(args)
    if getattr(args, "size", None):
        opts["size"] = args.size
    if getattr(args, "preprocessing", None):
        opts["preprocessing"] = args.preprocessing
    return opts


def add_decode_arg(g) -> None:
    """``--decode reduced|full`` (embedding from image files)."""
    g.add_argument("--decode", choices=("reduced", "full"), default="reduced",
                   help="reduced (default): JPEGs at least twice the model's input size are "
                        "decoded at 1/2, 1/4 or 1/8 scale, then resized as usual (several "
                        "times faster on photos); full: decode every pixel first")


def rank() -> int:
    import os
    return int(os.environ.get("RANK", "0") or 0)


