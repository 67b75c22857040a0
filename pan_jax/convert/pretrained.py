"""Pretrained weights into a model's variables: the backbone at least, more where it fits.

    variables = model.init(rng, images, train=False)
    variables, report = convert.load_pretrained(
        variables, "resnet101s.safetensors", "timm", model=model
    )
    logging.info("%s", report)   # what was loaded, what was left as initialised, what was unused

Kinds: "torchvision" and "timm" (ImageNet ResNets: the backbone), "smp" (an SMP PAN state dict)
and "pan_jax" (a directory written by `checkpointing.save_variables`, e.g. by
`python -m pan_jax.convert`). For the last two every top-level part of the model (backbone,
decoder, head) whose names and shapes all match is loaded; a head for another number of classes
or a decoder of other widths stays as initialised. The backbone must always fit.

Files of the first three kinds may also be "hf-hub:OWNER/REPO" or URLs (downloaded once, see
`download`), and "imagenet" picks the ImageNet weights that fit the model's backbone
(`download.IMAGENET_WEIGHTS`, timm checkpoints on the Hugging Face Hub) as SMP's
`encoder_weights="imagenet"` does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from flax import linen as nn
from flax import traverse_util

from pan_jax.convert import download
from pan_jax.convert.core import ConversionError, check_against, read_state_dict
from pan_jax.convert.imagenet import Arch, convert_resnet, describe
from pan_jax.convert.smp import from_smp, smp_spec

PRETRAINED_KINDS = ("torchvision", "timm", "smp", "pan_jax")


@dataclasses.dataclass(frozen=True)
class PretrainedReport:
    """What `load_pretrained` did. Names are "collection/part/.../leaf", e.g.
    "params/backbone/layer1_0/conv1/kernel"; `unused` holds checkpoint entries not loaded."""

    source: str
    kind: str
    arch: Arch | None
    loaded: tuple[str, ...]
    not_loaded: tuple[str, ...]
    unused: tuple[str, ...]
    notes: tuple[str, ...]
    loaded_values: int

    @property
    def untrained_parts(self) -> list[str]:
        """The top-level parts ("decoder", "head") left wholly or partly as initialised."""
        return _parts(self.not_loaded)

    def __str__(self) -> str:
        what = f" ({describe(self.arch)})" if self.arch else ""
        lines = [
            f"loaded {len(self.loaded)} arrays ({self.loaded_values:,} values) into "
            f"{', '.join(_parts(self.loaded))} from {self.kind} checkpoint {self.source}{what}"
        ]
        if self.not_loaded:
            lines.append(
                f"left as initialised: {len(self.not_loaded)} arrays in "
                f"{', '.join(self.untrained_parts)}"
            )
        if self.unused:
            shown = ", ".join(self.unused[:8]) + (" …" if len(self.unused) > 8 else "")
            lines.append(f"unused from the checkpoint: {len(self.unused)} arrays: {shown}")
        lines.extend(self.notes)
        return "; ".join(lines)


def _parts(names: tuple[str, ...]) -> list[str]:
    """The top-level parts ("backbone", "decoder", "head") the names fall in."""
    return sorted({n.split("/")[1] for n in names})


def _backbone_arch(backbone: Any) -> Arch:
    return {"depth": backbone.depth, "stem": backbone.stem, "avg_down": backbone.avg_down}


def _variables_arch(variables: Mapping[str, Any]) -> str:
    """Depth and stem a backbone variable tree has, for error messages (avg_down is invisible)."""
    flat = traverse_util.flatten_dict(dict(variables.get("params", {})), sep="/")
    flat = {k.removeprefix("backbone/"): v for k, v in flat.items()}
    blocks = [
        len({k.split("/")[0] for k in flat if k.startswith(f"layer{i}_")}) for i in (1, 2, 3, 4)
    ]
    stem_widths = [
        int(flat[f"stem_conv{i}/kernel"].shape[-1])
        for i in range(3)
        if f"stem_conv{i}/kernel" in flat
    ]
    return f"a ResNet with {'-'.join(map(str, blocks))} blocks and stem widths {stem_widths}"


def option_differences(saved: Any, model: Any, prefix: str = "") -> list[str]:
    """Where two models' options differ, e.g. "decoder.gate: checkpoint 'sigmoid', model 'relu'"
    (their modules' fields, recursively; not the class count or the compute dtype)."""
    differences = []
    for field in dataclasses.fields(model):
        if field.name in ("parent", "name", "dtype", "num_classes"):
            continue
        was, now = getattr(saved, field.name, None), getattr(model, field.name)
        if isinstance(was, nn.Module) and type(was) is type(now):
            differences += option_differences(was, now, f"{prefix}{field.name}.")
        elif isinstance(was, nn.Module) or isinstance(now, nn.Module):
            kinds = type(was).__name__, type(now).__name__
            differences.append(f"{prefix}{field.name}: checkpoint {kinds[0]}, model {kinds[1]}")
        elif was != now:
            differences.append(f"{prefix}{field.name}: checkpoint {was!r}, model {now!r}")
    return differences


def _read(path: str | os.PathLike, kind: str) -> tuple[dict, Arch | None, list[str], Any]:
    """(variables of the checkpoint in the model's layout, its backbone arch, unused keys, the
    model it was saved from where it says)."""
    name = os.fspath(path)
    if kind in ("torchvision", "timm"):
        backbone, arch, unused = convert_resnet(read_state_dict(path), name)
        return {c: {"backbone": tree} for c, tree in backbone.items()}, arch, unused, None
    if kind == "smp":
        state_dict = read_state_dict(path)
        depth = int(smp_spec(state_dict)["backbone"].removeprefix("resnet"))
        arch = {"depth": depth, "stem": "torchvision", "avg_down": False}
        return from_smp(state_dict), arch, [], None
    from pan_jax import checkpointing  # orbax is only needed for this kind

    variables, spec, _ = checkpointing.load_any(path)  # a model dir or a run's latest checkpoint
    saved = checkpointing.model_from_spec(spec)
    return variables, _backbone_arch(saved.backbone), [], saved


def _cast_like(value: Any, like: Any) -> Any:
    """`value` with `like`'s dtype, on `like`'s devices when it is a placed jax array."""
    array = np.asarray(value, dtype=like.dtype)
    if isinstance(like, jax.Array):
        return jax.device_put(array, like.sharding)
    return array


def load_pretrained(
    variables: Mapping[str, Any],
    path: str | os.PathLike,
    kind: str,
    *,
    model: Any = None,
) -> tuple[dict, PretrainedReport]:
    """Returns `variables` with the pretrained parts of `path` put in, and a report.

    Pure: `variables` is not modified; the parts not loaded are returned as they are (already
    initialised arrays, or `jax.ShapeDtypeStruct`s from `jax.eval_shape`, which the caller then
    initialises). Loaded arrays take the dtype (and, for jax arrays, the sharding) of the
    arrays they replace.

    Args:
      variables: `{'params', 'batch_stats'}` of a `models.SegmentationModel` (params under
        'backbone', 'decoder', 'head').
      path: a .safetensors/.pth/.pt/.bin file for kinds torchvision, timm and smp (or a remote
        source: "hf-hub:OWNER/REPO[/FILE]", a URL), "imagenet" (with `model`: the ImageNet
        weights of its backbone variant, kind timm or torchvision); for kind pan_jax a
        directory written by `checkpointing.save_variables` or a training workdir
        (its latest checkpoint: fine-tuning). Local or gs://.
      kind: one of PRETRAINED_KINDS.
      model: the model `variables` belong to. Optional, but pass it: it lets the backbone's
        stem, depth and shortcut type be checked against the checkpoint's (timm's "d"
        average-pool shortcut has no parameters of its own, so only this check catches a
        resnet101d checkpoint loaded into a model without `avg_down=True`).

    Raises:
      ConversionError: the checkpoint's backbone does not fit (naming the file, the keys and
        shapes), or it was trained for another backbone variant than `model`'s.
      ValueError: unknown kind, or "imagenet" without a model or for a variant without weights.
      download.DownloadError: a remote file could not be fetched.
    """
    path = resolve_source(path, kind, model)
    loaded, arch, unused, saved = _read(path, kind)
    notes = []
    if saved is not None and model is not None and (differs := option_differences(saved, model)):
        # Fine-tuning across options is legitimate; weights of the same shapes load silently.
        notes.append(f"loaded into a model of other options ({'; '.join(differs)})")
    return merge_pretrained(
        variables,
        loaded,
        source=os.fspath(path),
        kind=kind,
        arch=arch,
        unused=unused,
        model=model,
        notes=notes,
    )


def resolve_source(path: str | os.PathLike, kind: str, model: Any = None) -> str | os.PathLike:
    """`path`, with "imagenet" replaced by the source of the model's backbone variant."""
    if kind not in PRETRAINED_KINDS:
        raise ValueError(f"unknown pretrained kind {kind!r}; expected one of {PRETRAINED_KINDS}")
    if os.fspath(path) != download.IMAGENET:  # `~` as a shell would (none in a config value)
        return os.path.expanduser(path) if isinstance(path, str) else path
    if model is None or kind not in ("torchvision", "timm"):
        raise ValueError(
            f"pretrained {download.IMAGENET!r} picks the ImageNet weights that fit the model's "
            f"backbone: it needs model= and kind timm or torchvision, got kind {kind!r}"
        )
    return download.imagenet_source(_backbone_arch(model.backbone))


def fetch_pretrained(path: str | os.PathLike, kind: str, model: Any = None) -> None:
    """Downloads a remote or "imagenet" source into the cache now, if it is not there yet, or
    checks that a local one exists. Training calls it before it writes anything, so that a bad
    name fails in seconds."""
    source = resolve_source(path, kind, model)
    if download.is_remote(source):
        download.fetch(source)
    elif not epath.Path(source).exists():
        raise FileNotFoundError(f"pretrained weights {os.fspath(source)} not found ({kind})")


def merge_pretrained(
    variables: Mapping[str, Any],
    loaded: Mapping[str, Any],
    *,
    source: str,
    kind: str,
    arch: Arch | None,
    unused: list[str],
    model: Any = None,
    notes: Sequence[str] = (),
) -> tuple[dict, PretrainedReport]:
    """`load_pretrained` on a checkpoint already converted to the model's layout (`loaded`);
    `notes` open the report's."""
    name = source  # the checkpoint's file name, for messages
    if model is not None and arch is not None and arch != _backbone_arch(model.backbone):
        raise ConversionError(
            f"{name} holds a {describe(arch)} backbone, but the model's is a "
            f"{describe(_backbone_arch(model.backbone))}: create the model with "
            f"backbone='resnet{arch['depth']}', stem={arch['stem']!r}, "
            f"avg_down={arch['avg_down']}"
        )

    collections = [c for c in ("params", "batch_stats") if c in variables]
    target = {c: dict(variables[c]) for c in collections}
    given = {c: dict(loaded.get(c, {})) for c in collections}

    def part(tree: dict, key: str) -> dict:
        """`{collection: {key: subtree}}`, so that names read "params/backbone/..."."""
        return {c: {key: tree[c][key]} for c in collections if key in tree[c]}

    backbone_target, backbone_source = part(target, "backbone"), part(given, "backbone")
    check_against(
        backbone_source,
        backbone_target,
        [],
        name,
        header=(
            f"the backbone in {kind} checkpoint {name} ({_variables_arch(backbone_source)}) "
            f"does not fit the model's ({_variables_arch(backbone_target)}):"
        ),
    )

    out = {c: dict(target[c]) for c in collections}
    notes = list(notes)
    loaded_names: list[str] = []
    unused_names = list(unused)
    loaded_values = 0
    keys = {k for c in collections for k in target[c]} | {k for c in given for k in given[c]}
    for key in sorted(keys):
        want, got = part(target, key), part(given, key)
        if not got:
            continue
        if not want:
            unused_names.extend(_names(got))
            continue
        try:  # only the backbone is required to fit; other parts load when they do
            # A note in a log line, not an error to act on: the first few names say enough.
            header = f"{key} not loaded, it does not fit:"
            check_against(got, want, [], name, header=header, limit=3)
        except ConversionError as error:
            notes.append(" ".join(str(error).split()))
            unused_names.extend(_names(got))
            continue
        for c in want:
            out[c][key] = jax.tree.map(_cast_like, got[c][key], want[c][key])
        loaded_names.extend(_names(got))
        loaded_values += sum(int(np.size(v)) for v in jax.tree.leaves(got))

    loaded_set = set(loaded_names)
    not_loaded = [n for n in _names(target) if n not in loaded_set]
    report = PretrainedReport(
        source=name,
        kind=kind,
        arch=arch,
        loaded=tuple(sorted(loaded_names)),
        not_loaded=tuple(sorted(not_loaded)),
        unused=tuple(sorted(unused_names)),
        notes=tuple(notes),
        loaded_values=loaded_values,
    )
    if model is None and arch is not None and arch["avg_down"]:
        logging.warning(
            "%s uses timm's average-pool shortcuts: the model needs avg_down=True "
            "(pass model= to load_pretrained to have this checked)",
            name,
        )
    logging.info("pretrained weights: %s", report)
    return {**variables, **out}, report


def _names(tree: Mapping[str, Any]) -> list[str]:
    """Flat "collection/part/.../leaf" names of a variables tree."""
    return [
        "/".join((collection, *path))
        for collection, sub in tree.items()
        for path in traverse_util.flatten_dict(dict(sub))
    ]
