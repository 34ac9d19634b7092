"""``dinofeat export``: ONNX / TorchScript export."""

from __future__ import annotations

import argparse

from .common import UserError, add_model_args, load_model_arg, model_args_fixup


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..export import export_model
    out = Path(args.out)
    suffix = {"onnx": ".onnx", "torchscript": ".pt"}[args.format]
    if out.suffix.lower() != suffix and not (args.format == "torchscript" and
                                             out.suffix.lower() in (".ts", ".torchscript")):
        raise UserError(f"--out for --format {args.format} must end in {suffix}, got {out}")
    args.device = "cpu"
    model = load_model_arg(args)
    if not model.is_vit:
        raise UserError(f"export supports ViTs; {model.name} is not one")
    small = [s for s in args.check_size or [] if s < model.patch_size]
    if small:
        raise UserError(f"--check-size {small[0]} is smaller than one {model.patch_size}-pixel "
                        "patch")
    report = export_model(model, out, args.format, attention=args.attention,
                          check_sizes=args.check_size or None)
    print(f"exported {model.name} ({args.format}, outputs: {', '.join(report.outputs)}; "
          "dynamic batch and image size) to " + str(out))
    shapes = ", ".join("x".join(map(str, s)) for s in report.checked_shapes)
    print(f"parity with PyTorch (inputs {shapes}): max abs difference " +
          ", ".join(f"{k} {v:.2e}" for k, v in report.max_abs_diff.items()))
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export a ViT to ONNX or TorchScript (dynamic batch and size)",
        description="Write a ViT as ONNX or TorchScript: input a normalised batch "
                    "[B, 3, H, W] (any batch and size), outputs the [CLS] feature, the "
                    "patch tokens and, with --attention, the last block's [CLS] attention. "
                    "The file is checked against PyTorch at export and the largest "
                    "difference printed. dinofeat.load('model.onnx') runs an ONNX export "
                    "with ONNX Runtime.")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx",
                   help="onnx (default; needs dinofeat[onnx]) or torchscript")
    p.add_argument("--out", required=True, help="output file (.onnx, or .pt for torchscript)")
    p.add_argument("--attention", action="store_true",
                   help="also output the last block's [CLS] attention [B, heads, 1+N]")
    p.add_argument("--check-size", type=int, action="append", default=None, metavar="PX",
                   help="image size for the parity check (repeatable; default: the "
                        "model's crop size and a larger non-square one)")
    add_model_args(p, "vit_s16", running=False)
    p.set_defaults(func=model_args_fixup(_cmd_export))
