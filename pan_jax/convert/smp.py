"""segmentation_models_pytorch `PAN` ↔ `models.create("pan_smp", ...)`, both ways."""

from __future__ import annotations

import json
import os
import re
import urllib.error
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from pan_jax import models
from pan_jax.convert import download
from pan_jax.convert.core import (
    ConversionError,
    Rules,
    Source,
    check_against,
    flax_to_torch,
    read_state_dict,
    source_name,
    torch_to_flax,
    weights_file,
)
from pan_jax.convert.imagenet import resnet_rules

# SMP's native ResNet encoders are torchvision ResNets under `encoder.`.
SMP_RULES: Rules = (
    *resnet_rules("torchvision", avg_down=False, torch_prefix="encoder.", flax_prefix="backbone/"),
    ("decoder.fpa.branch1.1.{M}", "decoder/fpa/branch1/{M}"),
    ("decoder.fpa.mid.0.{M}", "decoder/fpa/mid/{M}"),
    ("decoder.fpa.down1.1.{M}", "decoder/fpa/down1/{M}"),
    ("decoder.fpa.down2.1.{M}", "decoder/fpa/down2/{M}"),
    ("decoder.fpa.down3.1.{M}", "decoder/fpa/down3_1/{M}"),
    ("decoder.fpa.down3.2.{M}", "decoder/fpa/down3_2/{M}"),
    ("decoder.fpa.{C}.{M}", "decoder/fpa/{C}/{M}"),
    ("decoder.{G}.conv1.1.{M}", "decoder/{G}/attention/{M}"),
    ("decoder.{G}.conv2.{M}", "decoder/{G}/low/{M}"),
    ("segmentation_head.0", "head"),
)


def smp_backbone(state_dict: Mapping[str, Any]) -> str:
    """The encoder of an SMP state dict ("resnet18" … "resnet152"), from its block counts."""
    blocks = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.layer3\.(\d+)\.", k))
    }
    bottleneck = any(k.startswith("encoder.layer1.0.conv3.") for k in state_dict)
    depths = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101, (36, True): 152}
    depth = depths.get((len(blocks), bottleneck))
    if not blocks:
        encoder = sorted(k for k in state_dict if k.startswith("encoder."))[:4]
        raise ConversionError(
            f"this SMP checkpoint's encoder is not a ResNet (no encoder.layer3; its keys begin "
            f"{encoder}): pan_smp takes SMP's resnet18/34/50/101/152 encoders"
        )
    if depth is None:
        raise ConversionError(
            f"cannot tell the ResNet depth of this SMP checkpoint: layer3 has {len(blocks)} blocks "
            f"({'bottleneck' if bottleneck else 'basic'}); expected resnet18/34/50/101/152"
        )
    return f"resnet{depth}"


def smp_spec(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The pan_jax model spec of an SMP PAN state dict (see `checkpointing.model_from_spec`)."""
    for key in ("segmentation_head.0.weight", "decoder.fpa.mid.0.conv.weight"):
        if key not in state_dict:
            found = sorted(state_dict)[:6]
            hint = (
                " (this looks like an ImageNet backbone: use kind 'torchvision' or 'timm')"
                if "layer1.0.conv1.weight" in state_dict
                else ""
            )
            raise ConversionError(
                f"not an SMP PAN state dict: key {key!r} is missing; keys begin {found}{hint}"
            )
    # Encoders and options pan_smp does not have, named before their keys fail to match.
    if any(k.startswith("encoder.model.") for k in state_dict):
        raise ConversionError(
            "an SMP PAN with a timm-universal ('tu-') encoder: pan_smp takes SMP's own "
            "resnet18…resnet152 encoders"
        )
    if not any(k.startswith("decoder.gau3.") for k in state_dict):  # SMP keeps layer4 anyway
        raise ConversionError("an SMP PAN with encoder_depth < 5 (no gau3): pan_smp needs 5")
    in_channels = np.shape(state_dict.get("encoder.conv1.weight", np.zeros((1, 3))))[1]
    if in_channels != 3:
        raise ConversionError(f"an SMP PAN with in_channels={in_channels}: pan_smp takes RGB (3)")
    conv2 = np.shape(state_dict.get("encoder.layer1.0.conv2.weight", np.zeros((1, 1))))
    if conv2[0] != conv2[1] and "encoder.layer1.0.conv3.weight" in state_dict:
        raise ConversionError(
            "an SMP PAN with grouped 3×3 convolutions (ResNeXt): pan_smp takes ResNet encoders"
        )
    return {
        "name": "pan_smp",
        "backbone": smp_backbone(state_dict),
        "num_classes": int(np.shape(state_dict["segmentation_head.0.weight"])[0]),
        "overrides": {
            "decoder_channels": int(np.shape(state_dict["decoder.fpa.mid.0.conv.weight"])[0])
        },
    }


def saved_config_options(weights: str | os.PathLike, backbone: str) -> dict[str, Any]:
    """pan_smp options from the `config.json` beside an SMP `save_pretrained` weights file
    or in its folder (local, or in the same folder of a Hub repository for `hf-hub:` weights).

    A state dict cannot tell output stride 16 from 32 (the same shapes) nor the decoder's
    interpolation, so such a model would convert silently wrong; SMP's config.json records
    them. Returns {} without one (a plain state dict), `{"output_stride": 32}` for such a
    model, and refuses options pan_smp does not have, naming them.
    """
    if download.is_remote(weights):
        path = _remote_config(weights)
    else:
        path = weights_file(epath.Path(weights)).parent / "config.json"
    if path is None or not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or "_model_class" not in config:
        return {}  # not written by SMP's save_pretrained
    if config["_model_class"] != "PAN":
        raise ConversionError(f"{path}: an SMP {config['_model_class']}, not a PAN")
    problems = []
    if config.get("encoder_name", backbone) != backbone:
        problems.append(f"encoder_name={config['encoder_name']!r} (pan_jax reads it as {backbone})")
    for key, supported in (("encoder_depth", 5), ("in_channels", 3), ("upsampling", 4)):
        if config.get(key, supported) != supported:
            problems.append(f"{key}={config[key]!r} (pan_smp: {supported})")
    interpolation = config.get("decoder_interpolation") or config.get("upscale_mode") or "bilinear"
    if interpolation != "bilinear":
        problems.append(f"decoder_interpolation={interpolation!r} (pan_smp: 'bilinear')")
    stride = config.get("encoder_output_stride", 16)
    if stride not in (16, 32):
        problems.append(f"encoder_output_stride={stride!r} (pan_smp: 16 or 32)")
    if problems:
        raise ConversionError(f"{path}: SMP options pan_smp does not have: {'; '.join(problems)}")
    return {"output_stride": 32} if stride == 32 else {}


def _remote_config(weights: str) -> epath.Path | None:
    """The config.json in the Hub folder of `hf-hub:` weights (None where there is none)."""
    if not weights.startswith(download.HF_PREFIX):
        logging.warning(
            "%s: a URL's neighbouring config.json is not looked for, so an SMP PAN of encoder "
            "output stride 32 converts as 16. Download both files and convert the local one.",
            weights,
        )
        return None
    parts = weights.removeprefix(download.HF_PREFIX).strip("/").split("/")
    folder = parts if len(parts) == 2 else parts[:-1]  # OWNER/REPO: its model.safetensors
    try:
        return epath.Path(download.fetch(download.HF_PREFIX + "/".join([*folder, "config.json"])))
    except download.DownloadError as error:
        cause = error.__cause__
        if not (isinstance(cause, urllib.error.HTTPError) and cause.code == 404):
            # Offline, cached weights still convert; what config.json would have said is unsaid.
            logging.warning(
                "%s: its repository's config.json could not be fetched (%s), so an SMP PAN of "
                "encoder output stride 32 converts as 16: add --override output_stride=32 then",
                weights,
                cause or error,
            )
        return None  # 404: a plain state dict uploaded, not a save_pretrained folder


def from_smp(source: Source, model: models.SegmentationModel | None = None) -> dict:
    """segmentation_models_pytorch `PAN` state dict (or its file) → `{'params', 'batch_stats'}`.

    The backbone depth, class count and decoder width are read from the checkpoint; pass
    `model` to check against another configuration of `models.create("pan_smp", ...)`.
    Accepts torch tensors or numpy arrays, or a .pth/.safetensors file (see `read_state_dict`).
    """
    state_dict = read_state_dict(source)
    # SMP's optional image-level classifier (aux_params) plays no part in the segmentation.
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("classification_head.")}
    spec = smp_spec(state_dict)
    variables, unexpected = torch_to_flax(state_dict, SMP_RULES)
    if model is None:
        model = models.create(
            "pan_smp",
            num_classes=spec["num_classes"],
            backbone=spec["backbone"],
            **spec["overrides"],
        )
    size = model.min_input_size
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    name = source_name(source)
    check_against(
        variables, template, unexpected, "SMP state dict" if name == "state dict" else name
    )
    return jax.tree.map(jnp.asarray, variables)


def to_smp(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Variables of `models.create("pan_smp", ...)` → an SMP `PAN` state dict of torch tensors.

    `smp.PAN(encoder_name=..., encoder_weights=None, classes=..., decoder_channels=...)`
    `.load_state_dict(to_smp(variables), strict=True)` accepts it.
    """
    import torch  # only this direction needs torch

    state_dict = flax_to_torch(variables, SMP_RULES)
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict.items()}
