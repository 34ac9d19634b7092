"""``dinofeat push``: publish a model (a training run, a weights file, a zoo name) as a
Hugging Face hub repo, or write the folder that would be uploaded."""

from __future__ import annotations

import argparse


def _cmd_push(args: argparse.Namespace) -> int:
    from .. import load
    if not args.repo and not args.out:
        raise ValueError("nothing to do: give --repo ORG/NAME (upload) and/or --out DIR "
                         "(write the folder)")
    model = load(args.model, device="cpu", arch=args.arch, checkpoint_key=args.checkpoint_key)
    if args.out:
        from ..pretrained import save_pretrained
        folder = save_pretrained(model, args.out, repo_id=args.repo, license=args.license)
        print(f"wrote {folder}/ (model.safetensors, config.json, README.md) for {model.name}")
    if args.repo:
        url = model.push_to_hub(args.repo, private=args.private or None, token=args.token,
                                revision=args.revision, commit_message=args.message,
                                license=args.license)
        print(f"pushed {model.name} to {args.repo}: {url}")
        print(f"load it with dinofeat.load('hf-hub:{args.repo}') or --model hf-hub:{args.repo}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "push", help="publish a model as a Hugging Face hub repo (weights, config, card)",
        description="Save a model as model.safetensors + config.json + a README.md model card "
                    "(training recipe, data size and k-NN accuracy when it comes from a "
                    "dinofeat run) and upload the folder to a Hugging Face hub repo, which is "
                    "created when missing. The token comes from --token, $HF_TOKEN or "
                    "'hf auth login'; $HF_ENDPOINT selects another hub. The weights use timm's "
                    "names: timm.create_model('hf-hub:ORG/NAME', pretrained=True) reads them.")
    p.add_argument("model", metavar="RUN_OR_WEIGHTS",
                   help="training run folder, weights file, pretrained folder, zoo name or "
                        "hf-hub:ORG/NAME")
    p.add_argument("--repo", metavar="ORG/NAME", help="hub repo to upload to")
    p.add_argument("--out", metavar="DIR", help="also (or only, without --repo) write the "
                   "folder here")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, metavar="BRANCH",
                   help="branch to commit to (default main)")
    p.add_argument("--token", default=None, help="hub token (default: $HF_TOKEN or the "
                   "saved login)")
    p.add_argument("--license", default="apache-2.0", help="license field of the model card "
                   "(default apache-2.0, the DINO release's)")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--arch", default=None, help="architecture of the file (inferred when "
                   "omitted)")
    p.add_argument("--checkpoint-key", default="teacher", choices=("teacher", "student"),
                   help="network of a training checkpoint to publish (default teacher)")
    p.set_defaults(func=_cmd_push)
