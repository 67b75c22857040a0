"""Command line: a PyTorch checkpoint → a pan_jax model directory (variables/ + model.json).

    python -m pan_jax.convert --from=timm --input=resnet101s.safetensors --output=DIR \
        [--model=pan] [--num_classes=21] [--variant=resnet101s] [--override KEY=VALUE ...]
    python -m pan_jax.convert --from=smp --input=smp_pan.pth --output=DIR
    python -m pan_jax.convert --from=timm --input=hf-hub:timm/resnet101s.gluon_in1k --output=DIR

An ImageNet backbone (--from=torchvision or timm) goes into a full model (--model, default
`pan`) whose decoder and head are freshly initialised (--seed). The backbone's depth, stem and
shortcut type come from the checkpoint and are recorded in the spec (`backbone`, `stem`,
`avg_down`), so a torchvision file pairs with `stem="torchvision"` without being asked.
An SMP PAN checkpoint becomes `pan_smp` with the checkpoint's classes and decoder width
(or, with --model, only its backbone goes into that model). A state dict does not show SMP's
`encoder_output_stride` (32 converts as 16) or `decoder_interpolation`: the `config.json` that
SMP's `save_pretrained` writes beside `model.safetensors` is read when present; for a bare
state dict of an output-stride-32 model pass `--override output_stride=32`.

The directory is read by `checkpointing.load_variables` (notebooks, evaluation) and by
training as its initialisation (`--config.model.pretrained=DIR
--config.model.pretrained_kind=pan_jax`).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from flax import traverse_util

from pan_jax import checkpointing, models
from pan_jax.convert.core import ConversionError, read_state_dict
from pan_jax.convert.download import DownloadError
from pan_jax.convert.imagenet import convert_resnet, describe
from pan_jax.convert.pretrained import merge_pretrained
from pan_jax.convert.smp import from_smp, saved_config_options, smp_spec


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--override takes KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word: a string such as stem=torchvision


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pan_jax.convert",
        description="Convert a PyTorch checkpoint into a pan_jax model directory.",
    )
    parser.add_argument(
        "--from", dest="source", required=True, choices=("torchvision", "timm", "smp")
    )
    parser.add_argument(  # `~` expanded: the shell leaves it in --input=~/x
        "--input",
        type=os.path.expanduser,
        required=True,
        help=".safetensors, .pth, .pt or .bin file, hf-hub:OWNER/REPO or a URL (downloaded once)",
    )
    parser.add_argument(
        "--output",
        type=os.path.expanduser,
        required=True,
        help="directory to write (local or gs://)",
    )
    parser.add_argument(
        "--model", help=f"one of {', '.join(models.MODEL_NAMES)}; default pan (pan_smp for smp)"
    )
    parser.add_argument("--num_classes", type=int, help="default 21 (the checkpoint's for smp)")
    parser.add_argument("--backbone", help="resnet18…resnet152; must match the checkpoint")
    parser.add_argument("--variant", help="e.g. resnet101d: require this torchvision/timm variant")
    parser.add_argument(
        "--override",
        type=_parse_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a models.create option, e.g. output_stride=8 or fpa_pooling=max (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=0, help="initialisation of what is not loaded")
    return parser


def _spec(args: argparse.Namespace, arch: dict, smp: dict | None) -> dict[str, Any]:
    """The model spec: the requested model, with the checkpoint's backbone variant."""
    overrides = dict(args.override)
    if smp is not None and args.model in (None, "pan_smp"):
        spec = dict(smp, overrides={**smp["overrides"], **overrides})
    else:
        spec = {"name": args.model or "pan", "num_classes": 21, "overrides": overrides}
        for key in ("stem", "avg_down"):
            if key in overrides and overrides[key] != arch[key]:
                raise ConversionError(
                    f"--override {key}={overrides[key]!r} contradicts {args.input}, which holds "
                    f"a {describe(arch)}"
                )
            overrides[key] = arch[key]
    # Refused here, since a stored spec's options that the model does not take are skipped.
    valid = models.valid_overrides(spec["name"], dict(args.override))
    inapplicable = sorted(set(dict(args.override)) - valid)
    if inapplicable:
        raise ConversionError(
            f"--override {', '.join(inapplicable)}: model {spec['name']!r} does not take it; "
            f"its options: {', '.join(sorted(valid))}"
        )
    spec["backbone"] = f"resnet{arch['depth']}"
    if args.backbone and args.backbone != spec["backbone"]:
        raise ConversionError(
            f"--backbone={args.backbone} but {args.input} holds a {describe(arch)}"
        )
    if args.num_classes is not None:
        spec["num_classes"] = args.num_classes
    return spec


def initialise_missing(
    model: models.SegmentationModel, variables: dict, seed: int, size: int
) -> dict:
    """Fills the `jax.ShapeDtypeStruct` leaves of `variables` with the model's initialisers.

    Flax initialises the variables an `apply` with mutable collections finds missing, so only
    the decoder and head are drawn (with one forward pass) and the loaded arrays are kept. Flax
    derives each variable's key from its module path, so they are the arrays
    `model.init(jax.random.key(seed), ...)` would give.
    """
    flat = traverse_util.flatten_dict(variables)
    present = {k: v for k, v in flat.items() if not isinstance(v, jax.ShapeDtypeStruct)}
    if len(present) == len(flat):
        return variables

    @jax.jit
    def fill(partial: dict) -> dict:
        _, filled = model.apply(
            partial,
            jnp.zeros((1, size, size, 3)),
            train=False,
            rngs={"params": jax.random.key(seed)},
            mutable=True,
        )
        return filled

    return dict(fill(traverse_util.unflatten_dict(present)))


def _check_output(output: str) -> None:
    """Refuses an --output that is a file, or a training workdir: its model.json would be
    replaced, and the weights written beside its checkpoints never read (a workdir loads
    those)."""
    path = epath.Path(output)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output={output} is a file: expected a directory")
    if (path / "checkpoints").exists():
        raise ValueError(
            f"--output={output} is a training workdir (it holds checkpoints/): write the model "
            "into another directory"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the conversion; returns the exit status (errors are printed, not raised)."""
    args = build_parser().parse_args(argv)
    try:
        _check_output(args.output)  # before the conversion, which may download
        state_dict = read_state_dict(args.input)
        smp = None
        if args.source == "smp":
            smp = smp_spec(state_dict)
            # SMP's save_pretrained config.json holds what the weights cannot show.
            smp["overrides"].update(saved_config_options(args.input, smp["backbone"]))
            variables = from_smp(state_dict)
            unused: list[str] = []
            arch = {"depth": int(smp["backbone"][6:]), "stem": "torchvision", "avg_down": False}
        else:
            backbone, arch, unused = convert_resnet(state_dict, os.fspath(args.input), args.variant)
            variables = {c: {"backbone": tree} for c, tree in backbone.items()}
        spec = _spec(args, arch, smp)
        model = checkpointing.model_from_spec(spec)
        size = model.min_input_size
        template = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
        )
        merged, report = merge_pretrained(
            template,
            variables,
            source=os.fspath(args.input),
            kind=args.source,
            arch=arch,
            unused=unused,
            model=model,
        )
        merged = initialise_missing(model, merged, args.seed, size)
        if report.untrained_parts:  # inference from it warns (inference.load_model)
            spec["untrained"] = report.untrained_parts
    except (ConversionError, ValueError, FileNotFoundError, DownloadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    checkpointing.save_variables(args.output, merged, spec)
    print(report)
    print(f"wrote {args.output}: model {spec}")
    return 0
