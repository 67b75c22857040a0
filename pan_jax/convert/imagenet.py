"""ImageNet ResNets from torchvision and timm → variables of `models.ResNet`.

    variables, arch = convert.from_imagenet("resnet101s.safetensors")  # .pth, a state dict
    backbone = models.ResNet(**arch, output_stride=16)  # arch: depth, stem, avg_down
    features = backbone.apply(variables, images, train=False)

torchvision and timm name ResNet tensors alike (timm's `resnet50` loads torchvision's file), so
one converter serves both. The variant is read from the keys and shapes:

| checkpoint                 | stem keys (widths)                  | shortcut        | arch     |
|----------------------------|-------------------------------------|-----------------|----------|
| torchvision / timm resnetN | conv1 (64×3×7×7), bn1               | downsample.0/.1 | torchvision |
| timm resnetNc              | conv1.0/.1/.3/.4/.6, bn1 (32-32-64) | downsample.0/.1 | deep32   |
| timm resnetNd              | as c                                | downsample.1/.2 | deep32, d |
| timm resnetNs              | as c (64-64-128)                    | downsample.0/.1 | deep64   |

(N = 18…152 where the library has it; d = avg_down: timm's "d" shortcut average-pools before
its conv.) Variants whose extra pieces have no parameters (timm's anti-aliased `resnetaa*`,
`resnetblur*`) cannot be told from a plain ResNet by their keys; they are not supported, and
refused where their name shows (the file, folder or hub repository), not in a bare state dict.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pan_jax.convert.core import (
    ConversionError,
    Rules,
    Source,
    check_against,
    read_state_dict,
    source_name,
    torch_to_flax,
)
from pan_jax.models.resnet import STAGE_SIZES, STEM_WIDTHS, ResNet

Arch = dict[str, Any]  # {"depth": int, "stem": str, "avg_down": bool}: `ResNet` keyword arguments

# The ImageNet classifier, which a segmentation backbone does not use.
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")
_DEPTHS = {(sizes, depth >= 50): depth for depth, sizes in STAGE_SIZES.items()}
# timm's anti-aliased ResNets: a plain ResNet's keys and shapes, another network (blur pools).
_ANTI_ALIASED = re.compile(r"(?<![a-z])resnet(?:aa|blur)\d+[a-z]?", re.IGNORECASE)
_SUFFIXES = {
    "": dict(stem="torchvision", avg_down=False),
    "c": dict(stem="deep32", avg_down=False),
    "d": dict(stem="deep32", avg_down=True),
    "s": dict(stem="deep64", avg_down=False),
}


def resnet_rules(stem: str, avg_down: bool, torch_prefix: str = "", flax_prefix: str = "") -> Rules:
    """Name rules of a torchvision/timm ResNet: torch module → `ResNet` module path."""
    if stem == "torchvision":
        stem_rules = (("conv1", "stem_conv0"), ("bn1", "stem_bn0"))
    else:  # timm's deep stem: Sequential(conv, bn, relu, conv, bn, relu, conv), then bn1
        stem_rules = (
            ("conv1.0", "stem_conv0"),
            ("conv1.1", "stem_bn0"),
            ("conv1.3", "stem_conv1"),
            ("conv1.4", "stem_bn1"),
            ("conv1.6", "stem_conv2"),
            ("bn1", "stem_bn2"),
        )
    # timm's "d" shortcut is Sequential(AvgPool2d or Identity, conv, bn).
    conv, bn = (1, 2) if avg_down else (0, 1)
    block_rules = (
        (f"layer{{L}}.{{B}}.downsample.{conv}", "layer{L}_{B}/downsample/downsample_conv"),
        (f"layer{{L}}.{{B}}.downsample.{bn}", "layer{L}_{B}/downsample/downsample_bn"),
        ("layer{L}.{B}.{M}", "layer{L}_{B}/{M}"),
    )
    return tuple((torch_prefix + t, flax_prefix + f) for t, f in (*stem_rules, *block_rules))


def describe(arch: Arch) -> str:
    """E.g. "resnet101 (stem deep32, average-pool shortcuts)"."""
    shortcut = ", average-pool shortcuts" if arch.get("avg_down") else ""
    return f"resnet{arch['depth']} (stem {arch['stem']}{shortcut})"


def resnet_variant(name: str) -> Arch:
    """A torchvision/timm model name ("resnet101", "resnet50d", "resnet101s.gluon_in1k") → arch."""
    match = re.fullmatch(r"(?:tv_)?resnet(\d+)([cds]?)(?:\..*)?", name.strip().lower())
    if not match or int(match.group(1)) not in STAGE_SIZES:
        raise ValueError(
            f"unknown ResNet variant {name!r}; expected resnet{{18,34,50,101,152}} optionally "
            "followed by timm's c (32-32-64 stem), d (as c, average-pool shortcut) or s "
            "(64-64-128 stem), e.g. resnet101s"
        )
    return {"depth": int(match.group(1)), **_SUFFIXES[match.group(2)]}


def detect_resnet(state_dict: Mapping[str, Any], source: str = "state dict") -> Arch:
    """Reads depth, stem and shortcut type of a torchvision/timm ResNet state dict."""
    if "conv1.weight" in state_dict:
        shape = tuple(np.shape(state_dict["conv1.weight"]))
        if shape != (64, 3, 7, 7):
            raise ConversionError(
                f"{source}: conv1.weight has shape {shape}; a torchvision ResNet stem is "
                "(64, 3, 7, 7)"
            )
        stem = "torchvision"
    elif "conv1.0.weight" in state_dict:
        keys = ("conv1.0.weight", "conv1.3.weight", "conv1.6.weight")
        missing = [k for k in keys if k not in state_dict]
        if missing:
            raise ConversionError(f"{source}: deep stem incomplete, missing {missing}")
        widths = tuple(int(np.shape(state_dict[k])[0]) for k in keys)
        stem = next((s for s, w in STEM_WIDTHS.items() if w == widths and s != "torchvision"), "")
        if not stem:
            raise ConversionError(
                f"{source}: deep stem of widths {widths} ({', '.join(keys)}) is not supported; "
                "expected 32-32-64 (timm resnet*c/d) or 64-64-128 (timm resnet*s)"
            )
    else:
        hint = ""
        if any(k.startswith("encoder.") for k in state_dict):
            hint = " (keys start with 'encoder.': an SMP model? use kind 'smp')"
        elif any(k.startswith(("stem.", "backbone.")) for k in state_dict):
            hint = " (mmseg/mmcv checkpoints are not supported)"
        raise ConversionError(
            f"{source} is not a torchvision/timm ResNet: neither conv1.weight (7×7 stem) nor "
            f"conv1.0.weight (timm deep stem) is there; keys begin {sorted(state_dict)[:6]}{hint}"
        )
    blocks = tuple(
        len({m.group(1) for k in state_dict if (m := re.match(rf"layer{i}\.(\d+)\.", k))})
        for i in (1, 2, 3, 4)
    )
    bottleneck = "layer1.0.conv3.weight" in state_dict
    depth = _DEPTHS.get((blocks, bottleneck))
    if depth is None:
        raise ConversionError(
            f"{source}: a ResNet with {'-'.join(map(str, blocks))} "
            f"{'bottleneck' if bottleneck else 'basic'} blocks in layer1..4 is not supported; "
            "expected resnet18 (2-2-2-2 basic), 34 (3-4-6-3 basic), 50 (3-4-6-3), "
            "101 (3-4-23-3) or 152 (3-8-36-3)"
        )
    avg_down = any(re.match(r"layer\d\.0\.downsample\.2\.", k) for k in state_dict)
    return {"depth": depth, "stem": stem, "avg_down": avg_down}


def resnet_template(arch: Arch) -> dict:
    """Shapes of `ResNet(**arch)`'s variables (no computation)."""
    model = ResNet(**arch, output_stride=32)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )


def convert_resnet(
    state_dict: Mapping[str, Any], source: str, variant: str | None = None
) -> tuple[dict, Arch, list[str]]:
    """As `from_imagenet` on a read state dict; also returns the checkpoint keys left unused."""
    # The names of the file, its folder or hub repository; not the folders above, which are
    # the user's.
    named = "/".join(source.replace("\\", "/").split("/")[-2:])
    if anti_aliased := _ANTI_ALIASED.search(named):
        raise ConversionError(
            f"{source}: timm's {anti_aliased.group(0)} is an anti-aliased ResNet: its blur "
            "pooling has no weights, so its keys and shapes are a plain ResNet's, but pan_jax's "
            "ResNet has no such layers and would compute another network; use a plain "
            "torchvision/timm ResNet (e.g. resnet101, resnet101d, resnet101s)"
        )
    arch = detect_resnet(state_dict, source)
    if variant is not None:
        wanted = resnet_variant(variant)
        if wanted != arch:
            raise ConversionError(
                f"{source} holds a {describe(arch)}, not the requested {variant} "
                f"({describe(wanted)})"
            )
    variables, unexpected = torch_to_flax(state_dict, resnet_rules(arch["stem"], arch["avg_down"]))
    unused = sorted(k for k in unexpected if k in CLASSIFIER_KEYS)
    unexpected = [k for k in unexpected if k not in CLASSIFIER_KEYS]
    check_against(
        variables,
        resnet_template(arch),
        unexpected,
        source,
        header=f"{source} does not fit a {describe(arch)}:",
    )
    return variables, arch, unused


def from_imagenet(source: Source, variant: str | None = None) -> tuple[dict, Arch]:
    """torchvision/timm ImageNet ResNet → (`{'params', 'batch_stats'}` of `ResNet`, arch).

    Args:
      source: a .safetensors (read without torch) or .pth/.pt/.bin file, local or gs://, or a
        state dict of torch tensors or numpy arrays.
      variant: e.g. "resnet101", "resnet101d", "resnet50s"; when given, the checkpoint must be
        that variant. By default the variant is read from the checkpoint.

    Returns:
      The backbone's variables (float32 jax arrays) and `arch`, the `ResNet` keyword arguments
      `{"depth", "stem", "avg_down"}` the weights were trained for. The classifier (`fc.*`) is
      dropped. Output stride and dilation rule are free: timm and torchvision dilate with the
      "torchvision" rule.

    Raises:
      ConversionError: naming the file and the keys and shapes that do not fit.
    """
    variables, arch, _ = convert_resnet(read_state_dict(source), source_name(source), variant)
    return jax.tree.map(jnp.asarray, variables), arch
