"""Maintainer step: ship a backbone written by ``recipes/pretrain.py`` inside the package.

    python tools/bundle_backbone.py runs/pretrain_vit_small NAME

Copies ``backbone.{safetensors,json,md}`` from the pretrain folder to
``ncfinetune/assets/NAME.*`` (each file atomically). Recipes never do this themselves: a
training run must not change what ``create_backbone(NAME)`` loads for every other user of the
installed package. Refuses to replace an existing bundled backbone unless ``--replace``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import timm

from ncfinetune.backbones.hub import ASSETS, bundled_names, create_backbone
from ncfinetune.errors import NcFinetuneError
from ncfinetune.files import atomic_write


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a recipes/pretrain.py output folder")
    ap.add_argument("name", help="bundled name, e.g. vit_small_fmnist04 ([a-z0-9_]+)")
    ap.add_argument("--replace", action="store_true", help="replace a bundled backbone")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9_]+", args.name):
        ap.error(f"name {args.name!r} must match [a-z0-9_]+ (it becomes a file name)")
    if timm.is_model(args.name) or timm.list_models(args.name):
        ap.error(
            f"name {args.name!r} is a timm architecture: create_backbone({args.name!r}) would "
            "then load this backbone instead of timm's model. Pick a name timm does not have "
            "(e.g. add the source data: resnet18_fmnist04)."
        )
    clash = [n for n in bundled_names() if n.lower() == args.name.lower() and n != args.name]
    if clash:
        ap.error(f"name {args.name!r} differs only in case from bundled {clash[0]!r}")
    missing = [
        f for f in ("safetensors", "json", "md") if not (args.folder / f"backbone.{f}").is_file()
    ]
    if missing:
        ap.error(
            f"{args.folder} lacks backbone.{{{','.join(missing)}}}: is it a finished pretrain run?"
        )
    try:  # the whole folder, as create_backbone will load it: card, weights, architecture
        create_backbone(str(args.folder), 2)
    except NcFinetuneError as err:
        ap.error(f"{args.folder} does not load as a backbone: {err}")
    if (ASSETS / f"{args.name}.json").exists() and not args.replace:
        ap.error(f"{args.name} is already bundled ({ASSETS}); pass --replace to overwrite it")
    for ext in ("safetensors", "md", "json"):  # the card last: it makes the backbone visible
        src = args.folder / f"backbone.{ext}"
        atomic_write(ASSETS / f"{args.name}.{ext}", lambda tmp, src=src: shutil.copyfile(src, tmp))
    print(f"bundled {args.folder} as {args.name} in {ASSETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
