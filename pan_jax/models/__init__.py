"""PAN, its ablations and the paper's baselines as flax.linen modules.

    model = models.create("pan", num_classes=21, backbone="resnet101")
    variables = model.init(rng, images, train=False)        # images: (N, H, W, 3) float32
    logits = model.apply(variables, images, train=False)     # (N, H, W, num_classes) float32

Model names:
  pan       the paper's best PAN: deep64 stem (PSPNet's 64-64-128), output stride 16 with the
            torchvision dilation rule, FPA C357 + average pooling + global branch, GAU 3×3 + GP
            with a BN+ReLU gate, no conv biases before BN.
  pan_smp   segmentation_models_pytorch's PAN exactly (7×7 stem, every layer4 block dilated,
            max pooling, a 1-channel pyramid, sigmoid gates, biased convs, 32 channels).
  fcn       baseline: dilated ResNet, 1×1 classifier, direct upsampling (Tables 1–3, 72.60).
  fpa       FPA only, direct upsampling (Table 1).
  gau       GAU decoder only, with a 1×1 projection of layer4 as its top (Table 3).
  psp       PSPNet's pyramid pooling module on our backbone (Table 2).
  aspp      DeepLabV3's ASPP head on our backbone (Table 2).

Keyword overrides reach every switch; `create` lists the valid ones when given an unknown one.
Decoder widths: the paper gives none. `pan` uses 128 for the decoder and the pyramid (a
per-channel pyramid attention, as in the paper's Figure 3); SMP uses 32 and 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pan_jax.models.heads import ASPPDecoder, PyramidPoolingDecoder
from pan_jax.models.pan import FPA, GAU, PANDecoder
from pan_jax.models.resnet import DILATION_RULES, STEM_WIDTHS, ResNet
from pan_jax.models.segmenter import SegmentationModel

__all__ = [
    "BACKBONE_NAMES",
    "FPA",
    "GAU",
    "MODEL_NAMES",
    "OVERRIDE_TYPES",
    "ASPPDecoder",
    "PANDecoder",
    "PyramidPoolingDecoder",
    "ResNet",
    "SegmentationModel",
    "create",
    "parameter_count",
    "switched_off",
    "valid_overrides",
]

_PAPER_BACKBONE = dict(
    stem="deep64", dilation_rule="torchvision", output_stride=16, avg_down=False, align_corners=True
)
_PAPER_PAN = dict(
    decoder_channels=128,
    pyramid_features=128,
    fpa_kernels=(7, 5, 3),
    fpa_pooling="avg",
    fpa_global_branch=True,
    fpa_attention="pyramid",
    gau_low_kernel=3,
    gau_global_attention=True,
    gau_gate="relu",
    conv_bias=False,
    head_kernel=3,
    use_fpa=True,
    use_gau=True,
)
_SMP_PAN = dict(
    stem="torchvision",
    dilation_rule="smp",
    output_stride=16,
    avg_down=False,
    align_corners=True,
    use_fpa=True,
    use_gau=True,
    decoder_channels=32,
    pyramid_features=1,
    fpa_kernels=(7, 5, 3),
    fpa_pooling="max",
    fpa_global_branch=True,
    fpa_attention="pyramid",
    gau_low_kernel=3,
    gau_global_attention=True,
    gau_gate="sigmoid",
    conv_bias=True,
    head_kernel=3,
)

_PRESETS: dict[str, dict[str, Any]] = {
    "pan": {"decoder": "pan", **_PAPER_BACKBONE, **_PAPER_PAN},
    "pan_smp": {"decoder": "pan", **_SMP_PAN},
    "fcn": {"decoder": "none", **_PAPER_BACKBONE, "head_kernel": 1},
    "fpa": {"decoder": "pan", **_PAPER_BACKBONE, **_PAPER_PAN, "use_gau": False, "head_kernel": 1},
    "gau": {"decoder": "pan", **_PAPER_BACKBONE, **_PAPER_PAN, "use_fpa": False},
    "psp": {
        "decoder": "psp",
        **_PAPER_BACKBONE,
        "decoder_channels": 512,
        "head_kernel": 1,
        "bins": (1, 2, 3, 6),
        "dropout_rate": 0.1,
    },
    "aspp": {
        "decoder": "aspp",
        **_PAPER_BACKBONE,
        "decoder_channels": 256,
        "head_kernel": 1,
        "rates": (6, 12, 18),
        "dropout_rate": 0.5,
    },
}
MODEL_NAMES = tuple(_PRESETS)

_BACKBONE_FIELDS = ("stem", "output_stride", "dilation_rule", "avg_down")
_PAN_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(PANDecoder)
    if f.name not in ("features", "dtype", "parent", "name")
)
_MODEL_FIELDS = ("head_kernel", "align_corners", "dtype")
_DEPTHS = {f"resnet{d}": d for d in (18, 34, 50, 101, 152)}
BACKBONE_NAMES = tuple(_DEPTHS)


def _valid_overrides(decoder: str) -> set[str]:
    valid = set(_BACKBONE_FIELDS) | set(_MODEL_FIELDS)
    if decoder == "pan":  # PAN's decoder has no dropout
        valid |= {"decoder_channels", *_PAN_FIELDS}
    if decoder == "psp":
        valid |= {"decoder_channels", "dropout_rate", "bins"}
    if decoder == "aspp":
        valid |= {"decoder_channels", "dropout_rate", "rates"}
    return valid  # fcn: a classifier on the backbone, no decoder


# The options of each module a PAN decoder can switch off.
_MODULE_OPTIONS = {
    "use_fpa": {
        "fpa_kernels",
        "fpa_pooling",
        "fpa_global_branch",
        "fpa_attention",
        "pyramid_features",
    },
    "use_gau": {"gau_low_kernel", "gau_global_attention", "gau_gate"},
}


def _modules_off(name: str, overrides: dict[str, Any] | None) -> dict[str, set[str]]:
    """The switches of model `name`'s PAN modules that its preset and `overrides` turn off,
    with those modules' options."""
    preset = _PRESETS[name]
    switches = {**preset, **(overrides or {})}
    return {
        switch: options
        for switch, options in _MODULE_OPTIONS.items()
        if preset["decoder"] == "pan" and not switches.get(switch, True)
    }


def valid_overrides(name: str, overrides: dict[str, Any] | None = None) -> set[str]:
    """The keyword overrides `create(name, **overrides)` accepts: FPA's options only where the
    model has FPA (`use_fpa`, as the preset and `overrides` set it), GAU's where it has GAU."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    valid = _valid_overrides(_PRESETS[name]["decoder"])
    for options in _modules_off(name, overrides).values():
        valid -= options
    return valid


def switched_off(name: str, overrides: dict[str, Any], options: set[str]) -> str:
    """Why model `name` does not take `options`, where a module switched off is the reason:
    " (use_fpa=False)" for FPA's options on a model without FPA; "" otherwise."""
    off = [f"{s}=False" for s, module in _modules_off(name, overrides).items() if options & module]
    return f" ({', '.join(off)})" if off else ""


# Every override of some model but dtype (configs have config.model.dtype), with its type:
# configs/default.py declares them all, so any can be set on the command line.
OVERRIDE_TYPES: dict[str, type] = {
    "stem": str,
    "output_stride": int,
    "dilation_rule": str,
    "avg_down": bool,
    "head_kernel": int,
    "align_corners": bool,
    "decoder_channels": int,
    "dropout_rate": float,
    "pyramid_features": int,
    "fpa_kernels": tuple,
    "fpa_pooling": str,
    "fpa_global_branch": bool,
    "fpa_attention": str,
    "gau_low_kernel": int,
    "gau_global_attention": bool,
    "gau_gate": str,
    "conv_bias": bool,
    "use_fpa": bool,
    "use_gau": bool,
    "bins": tuple,
    "rates": tuple,
}


def _check_values(settings: dict[str, Any]) -> None:
    """Refuses values that would fail deep in the model with a message naming no option."""

    def refuse(key: str, expected: str) -> None:
        raise ValueError(f"option {key}={settings[key]!r}: expected {expected}")

    def odd_kernel(value: Any) -> bool:
        return isinstance(value, int) and value >= 1 and value % 2 == 1

    choices = {
        "stem": tuple(STEM_WIDTHS),
        "dilation_rule": DILATION_RULES,
        "output_stride": (8, 16, 32),
        "fpa_pooling": ("avg", "max"),
        "fpa_attention": ("pyramid", "se"),
        "gau_gate": ("relu", "sigmoid"),
    }
    for key, allowed in choices.items():
        if key in settings and settings[key] not in allowed:
            refuse(key, f"one of {', '.join(map(repr, allowed))}")
    for key in ("head_kernel", "gau_low_kernel"):  # padded by k // 2 on each side, as torch
        if key in settings and not odd_kernel(settings[key]):
            refuse(key, "an odd kernel size, at least 1")
    kernels = tuple(settings.get("fpa_kernels", ()))
    if "fpa_kernels" in settings and (len(kernels) != 3 or not all(map(odd_kernel, kernels))):
        refuse("fpa_kernels", "3 odd kernel sizes for the pyramid's 1/2, 1/4, 1/8 levels")
    if "decoder_channels" in settings and not (
        isinstance(settings["decoder_channels"], int) and settings["decoder_channels"] >= 1
    ):
        refuse("decoder_channels", "a positive integer")
    if "pyramid_features" in settings and settings["pyramid_features"] not in (
        1,
        settings["decoder_channels"],
    ):
        refuse("pyramid_features", f"1 or decoder_channels ({settings['decoder_channels']})")
    if "dropout_rate" in settings and not 0.0 <= settings["dropout_rate"] < 1.0:
        refuse("dropout_rate", "a rate in [0, 1)")
    for key in ("bins", "rates"):
        values = tuple(settings.get(key, ()))
        if key in settings and not (values and all(isinstance(v, int) and v >= 1 for v in values)):
            refuse(key, "a non-empty tuple of positive integers")


def create(
    name: str, *, num_classes: int, backbone: str = "resnet101", **overrides: Any
) -> SegmentationModel:
    """Builds a model by name; `overrides` set any backbone, decoder or head switch.

    Example: `create("pan", num_classes=21, fpa_pooling="max", fpa_kernels=(3, 3, 3),
    output_stride=8, dtype=jnp.bfloat16)`.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    if backbone not in _DEPTHS:
        raise ValueError(f"unknown backbone {backbone!r}; known backbones: {', '.join(_DEPTHS)}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    decoder_kind = _PRESETS[name]["decoder"]
    valid = valid_overrides(name, overrides)
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for model {name!r}"
            f"{switched_off(name, overrides, unknown)}; valid options: {sorted(valid)}"
        )
    settings = _settings(name, overrides)
    _check_values(settings)
    dtype = jnp.dtype(settings.get("dtype", jnp.float32))
    align_corners = settings["align_corners"]

    resnet = ResNet(
        depth=_DEPTHS[backbone],
        stem=settings["stem"],
        output_stride=settings["output_stride"],
        dilation_rule=settings["dilation_rule"],
        avg_down=settings["avg_down"],
        dtype=dtype,
    )
    decoder: Any
    if decoder_kind == "pan":
        decoder = PANDecoder(
            features=settings["decoder_channels"],
            dtype=dtype,
            **{k: settings[k] for k in _PAN_FIELDS if k in settings and k != "align_corners"},
            align_corners=align_corners,
        )
    elif decoder_kind == "psp":
        decoder = PyramidPoolingDecoder(
            features=settings["decoder_channels"],
            bins=tuple(settings["bins"]),
            dropout_rate=settings["dropout_rate"],
            align_corners=align_corners,
            dtype=dtype,
        )
    elif decoder_kind == "aspp":
        decoder = ASPPDecoder(
            features=settings["decoder_channels"],
            rates=tuple(settings["rates"]),
            output_stride=settings["output_stride"],
            dropout_rate=settings["dropout_rate"],
            dtype=dtype,
        )
    else:
        decoder = None
    return SegmentationModel(
        backbone=resnet,
        decoder=decoder,
        num_classes=num_classes,
        head_kernel=settings["head_kernel"],
        align_corners=align_corners,
        dtype=dtype,
    )


def _settings(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Model `name`'s preset with `overrides`. Where the preset's pyramid is as wide as its
    decoder (the paper's per-channel attention), a new decoder width widens the pyramid too."""
    settings = {**_PRESETS[name], **overrides}
    del settings["decoder"]
    preset = _PRESETS[name]
    tied = "pyramid_features" in preset and preset["pyramid_features"] == preset["decoder_channels"]
    if tied and "decoder_channels" in overrides and "pyramid_features" not in overrides:
        settings["pyramid_features"] = settings["decoder_channels"]
    return settings


_NO_DEFAULT = object()


def explicit_overrides(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The overrides that change model `name` from what it is without them (lists read as
    tuples): equal specs describe equal models, whether a default is spelled out or not. A
    known option that model does not take changes nothing; an unknown one is kept."""
    if name not in _PRESETS:
        return dict(overrides)
    explicit = {}
    valid = valid_overrides(name, overrides)
    for key, value in overrides.items():
        if key in OVERRIDE_TYPES and key not in valid:
            continue
        others = {k: v for k, v in overrides.items() if k != key}
        default = _settings(name, others).get(key, _NO_DEFAULT)
        if (tuple(value) if isinstance(value, list) else value) != default:
            explicit[key] = value
    return explicit


def parameter_count(params: Any) -> int:
    """Number of trainable parameters (batch statistics excluded)."""
    return int(sum(np.prod(np.shape(p)) for p in jax.tree.leaves(params)))


def random_variables(model: SegmentationModel, seed: int = 0) -> dict:
    """He-initialised kernels, zero biases and identity BatchNorm, as host numpy arrays.

    Filled without compiling `model.init`, which for ResNet-101 takes as long as compiling a
    train step: for benchmarks and tests, whose results do not depend on the initialiser.
    """
    size = model.min_input_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    rng = np.random.default_rng(seed)

    def fill(path: tuple, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        name = path[-1].key
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return (rng.normal(size=leaf.shape) * std).astype(leaf.dtype)
        if name in ("var", "scale"):
            return np.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, leaf.dtype)
        raise ValueError(f"random_variables: no fill for {jax.tree_util.keystr(path)}")

    return jax.tree_util.tree_map_with_path(fill, shapes)
