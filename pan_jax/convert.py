"""PyTorch checkpoints ↔ Flax variables.

    variables = convert.from_smp(smp_model.state_dict())  # for models.create("pan_smp")
    state_dict = convert.to_smp(variables)  # smp.PAN(...).load_state_dict(strict=True)

Torch modules map to Flax modules by name rules (below); tensors by kind: a conv weight OIHW
becomes a kernel HWIO, BatchNorm `weight/bias` become `scale/bias` in `params` and
`running_mean/running_var` become `mean/var` in `batch_stats` (`num_batches_tracked` is dropped).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from pan_jax import models

# (torch module pattern, flax module pattern); {X} placeholders stand for one name component.
SMP_RULES = (
    ("encoder.conv1", "backbone/stem_conv0"),
    ("encoder.bn1", "backbone/stem_bn0"),
    ("encoder.layer{L}.{B}.downsample.0", "backbone/layer{L}_{B}/downsample/downsample_conv"),
    ("encoder.layer{L}.{B}.downsample.1", "backbone/layer{L}_{B}/downsample/downsample_bn"),
    ("encoder.layer{L}.{B}.{M}", "backbone/layer{L}_{B}/{M}"),
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

_BN_TO_FLAX = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_CONV_TO_FLAX = {"weight": ("params", "kernel"), "bias": ("params", "bias")}


class ConversionError(ValueError):
    """A checkpoint does not fit the model: names the keys and shapes that do not."""


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{[A-Z]\})", pattern)
    regex = "".join(
        f"(?P<{p[1]}>[A-Za-z0-9]+)" if re.fullmatch(r"\{[A-Z]\}", p) else re.escape(p)
        for p in parts
    )
    return re.compile(regex + "$")


def _translate(name: str, rules, source: int) -> str | None:
    for rule in rules:
        match = _pattern_regex(rule[source]).match(name)
        if match:
            return rule[1 - source].format(**match.groupdict())
    return None


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like → numpy (float tensors stay float32)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def torch_to_flax(state_dict: Mapping[str, Any], rules) -> tuple[dict, list[str]]:
    """Converts a state dict by module `rules`; returns variables and the keys no rule took."""
    modules: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = value
    flat: dict[tuple[str, ...], np.ndarray] = {}
    unexpected = []
    for module, leaves in modules.items():
        target = _translate(module, rules, 0)
        if target is None:
            unexpected.extend(f"{module}.{leaf}" for leaf in leaves)
            continue
        path = tuple(target.split("/"))
        is_bn = "running_mean" in leaves
        table = _BN_TO_FLAX if is_bn else _CONV_TO_FLAX
        for leaf, value in leaves.items():
            if leaf == "num_batches_tracked":
                continue
            if leaf not in table:
                unexpected.append(f"{module}.{leaf}")
                continue
            array = to_numpy(value)
            if not is_bn and leaf == "weight":
                if array.ndim == 4:
                    array = array.transpose(2, 3, 1, 0)  # OIHW → HWIO
                elif array.ndim == 2:
                    array = array.T  # Linear (out, in) → Dense (in, out)
            collection, name = table[leaf]
            flat[(collection, *path, name)] = array
    return traverse_util.unflatten_dict(flat), unexpected


def check_against(variables: dict, template: dict, unexpected: list[str], source: str) -> None:
    """Raises ConversionError naming missing, unexpected and mis-shaped entries."""
    got = traverse_util.flatten_dict(variables, sep="/")
    want = traverse_util.flatten_dict(template, sep="/")
    missing = sorted(set(want) - set(got))
    unexpected = sorted(unexpected + sorted(set(got) - set(want)))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(np.shape(got[k]))}, model {tuple(want[k].shape)}"
        for k in set(got) & set(want)
        if tuple(np.shape(got[k])) != tuple(want[k].shape)
    )
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit the model:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                shown = ", ".join(items[:12]) + (
                    f" … ({len(items)} in all)" if len(items) > 12 else ""
                )
                lines.append(f"  {title}: {shown}")
        raise ConversionError("\n".join(lines))


def _smp_backbone(state_dict: Mapping[str, Any]) -> str:
    blocks = {
        int(m.group(1)) for k in state_dict if (m := re.match(r"encoder\.layer3\.(\d+)\.", k))
    }
    bottleneck = any(k.startswith("encoder.layer1.0.conv3.") for k in state_dict)
    depths = {(2, False): 18, (6, False): 34, (6, True): 50, (23, True): 101, (36, True): 152}
    depth = depths.get((len(blocks), bottleneck))
    if depth is None:
        raise ConversionError(
            f"cannot tell the ResNet depth of this SMP checkpoint: layer3 has {len(blocks)} blocks "
            f"({'bottleneck' if bottleneck else 'basic'}); expected resnet18/34/50/101/152"
        )
    return f"resnet{depth}"


def from_smp(state_dict: Mapping[str, Any], model: models.SegmentationModel | None = None) -> dict:
    """segmentation_models_pytorch `PAN` state dict → `{'params', 'batch_stats'}`.

    The backbone depth, class count and decoder width are read from the checkpoint; pass
    `model` to check against another configuration of `models.create("pan_smp", ...)`.
    Accepts torch tensors or numpy arrays.
    """
    for key in ("segmentation_head.0.weight", "decoder.fpa.mid.0.conv.weight"):
        if key not in state_dict:
            raise ConversionError(f"not an SMP PAN state dict: key {key!r} is missing")
    variables, unexpected = torch_to_flax(state_dict, SMP_RULES)
    if model is None:
        model = models.create(
            "pan_smp",
            num_classes=int(np.shape(state_dict["segmentation_head.0.weight"])[0]),
            backbone=_smp_backbone(state_dict),
            decoder_channels=int(np.shape(state_dict["decoder.fpa.mid.0.conv.weight"])[0]),
        )
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False)
    )
    check_against(variables, template, unexpected, "SMP state dict")
    return jax.tree.map(jnp.asarray, variables)


def flax_to_torch(variables: Mapping[str, Any], rules) -> dict[str, np.ndarray]:
    """Inverse of `torch_to_flax`: numpy arrays under torch key names (BN counters as 0)."""
    params = traverse_util.flatten_dict(dict(variables["params"]))
    stats = traverse_util.flatten_dict(dict(variables.get("batch_stats", {})))
    out: dict[str, np.ndarray] = {}
    for path, value in params.items():
        module = _translate("/".join(path[:-1]), rules, 1)
        if module is None:
            raise ConversionError(f"no torch name for Flax parameter {'/'.join(path)}")
        array = np.asarray(value)
        is_bn = (*path[:-1], "mean") in stats
        if is_bn:
            out[f"{module}.{'weight' if path[-1] == 'scale' else 'bias'}"] = array
            out[f"{module}.running_mean"] = np.asarray(stats[(*path[:-1], "mean")])
            out[f"{module}.running_var"] = np.asarray(stats[(*path[:-1], "var")])
            out[f"{module}.num_batches_tracked"] = np.zeros((), np.int64)
        elif path[-1] == "kernel":
            out[f"{module}.weight"] = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
        else:
            out[f"{module}.bias"] = array
    return out


def to_smp(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Variables of `models.create("pan_smp", ...)` → an SMP `PAN` state dict of torch tensors."""
    import torch  # only this direction needs torch

    state_dict = flax_to_torch(variables, SMP_RULES)
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict.items()}
