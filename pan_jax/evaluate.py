"""Evaluation with the standard protocol: dataset-level mIoU at the original resolution.

Every image is scored at the resolution of its label: the logits of each view are resized
(bilinear, with the model's `align_corners`, as mmseg does) to the label size *before* the argmax,
and labels are never resized. Views:

- `mode="whole"`: the whole (rescaled) image in one forward pass.
- `mode="slide"`: mmseg's sliding window for large images (Cityscapes at 1024×2048): windows of
  `crop_size` every `stride` pixels, grid = ceil((H − crop) / stride) + 1 per axis, the last
  window clamped to the image edge; window logits are summed and divided by a per-pixel count.
- `scales` × `flip`: each scale s resizes the image to round(s·H) × round(s·W) (bilinear, as
  mmcv's `imrescale`); with `flip` each scale is also run on the mirrored image and its logits
  mirrored back. The views are merged by **averaging softmax probabilities** (mmseg's
  `SegTTAModel.merge_preds` does the same; the PAN paper does not say; a one-class model's
  sigmoid). A single view is argmaxed on its logits directly. The paper's multi-scale set is
  `MS_SCALES`.

Bounded compilation: XLA compiles one program per input shape, and evaluation images come in
many sizes (VOC) at six scales. Each model input is therefore zero-padded at the bottom/right to
`padded_size` (every side rounded up to a multiple of `pad_multiple`, default 128, and at least
`model.min_input_size`, so images smaller than the model's minimum are padded up, never
rejected), and the logits are cropped back to the image. Zero is the mean pixel after ImageNet
normalization, so the padding is a flat gray border; convolutions near the border and the global
pooling branches (FPA, GAU) do see it, which shifts predictions slightly compared with an
unpadded forward pass (DeepLab's evaluation pads every VOC image to 513×513 in the same way).
`pad_multiple=1` pads only images below the minimum size (exact, but one compilation per image
size). Sliding windows of exactly `crop_size` are never padded (every window has that size when
the image is larger than the crop). Label-sized arrays use the same buckets, so the number of
programs is bounded by the number of buckets, not of images.

Several devices: each process evaluates its own shard of the dataset on all its local devices
and keeps a host int64 confusion matrix; the matrices and image counts of all processes are
summed at the end. Images are run in batches of one per local device, sharded over them, so one
program per shape serves every device (not one per shape and device) and no device waits for
another: in whole mode images whose views all fall in the same buckets (each keeps its own
resize to its own label), in slide mode images of the same size (the same windows; Cityscapes:
all). A batch that cannot be filled (at the end, a size of its own, or held back too long) is
completed with copies whose labels are all ignored, so every image counts exactly once.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath
from jax import lax

from pan_jax import checkpointing, metrics, sharding
from pan_jax.config_errors import ConfigError

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # The paper's and mmseg's `img_ratios`.
PAD_MULTIPLE = 128
MODES = ("whole", "slide")
REPORT_JSON = "eval_report.json"
REPORT_MD = "eval_report.md"
# Device results waiting to be added to the host matrix: enough to keep the devices busy while
# the host prepares the next batch, few enough to bound device memory.
_MAX_PENDING = 4
# Images held back for a full batch, in batches: a dataset of many sizes (slide mode on VOC)
# must not pile up in host memory; past this the oldest batch runs incomplete.
_MAX_WAITING = 8
BATCH_AXIS = "batch"


# ----------------------------------------------------------------------------------------------
# Shapes and resampling.


def padded_size(size: int, pad_multiple: int, min_size: int) -> int:
    """`size` rounded up to a multiple of `pad_multiple`, and at least `min_size`."""
    return max(int(min_size), -(-int(size) // int(pad_multiple)) * int(pad_multiple))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """mmcv's `rescale_size`: int(x·s + 0.5) per side, at least 1."""
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _interpolation_indices(
    in_size: int, out_size: int, align_corners: bool, flip: bool, padded_out: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, frac) such that out[o] = in[lo]·(1−frac) + in[hi]·frac, torch's bilinear rule.

    The same source positions as `models.layers.interpolation_matrix`; written as a gather
    because two taps per output are far cheaper than a dense (out, in) matmul at 2048 px.
    `flip` reads the input mirrored (the logits of a flipped view, mirrored back). Entries past
    `out_size`, up to `padded_out`, read row 0 with weight 0: they land on padded label pixels.
    """
    dst = np.arange(out_size, dtype=np.float64)
    if align_corners:
        src = dst * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:
        src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    if flip:
        lo, hi = in_size - 1 - lo, in_size - 1 - hi
    pad = padded_out - out_size
    lo = np.pad(lo, (0, pad)).astype(np.int32)
    hi = np.pad(hi, (0, pad)).astype(np.int32)
    frac = np.pad(frac, (0, pad)).astype(np.float32)
    return lo, hi, frac


def _resample_one(
    logits: jax.Array, rows: tuple[jax.Array, ...], cols: tuple[jax.Array, ...]
) -> jax.Array:
    """Separable bilinear resampling of (H, W, C) logits by index/weight triples."""
    lo, hi, frac = rows
    x = logits[lo] * (1.0 - frac)[:, None, None] + logits[hi] * frac[:, None, None]
    lo, hi, frac = cols
    return x[:, lo] * (1.0 - frac)[None, :, None] + x[:, hi] * frac[None, :, None]


# (B, H, W, C) logits, each image with its own (B, P) index/weight triples.
_resample = jax.jit(jax.vmap(_resample_one))


def _resize_batch(
    logits: jax.Array,
    valid_sizes: Sequence[tuple[int, int]],
    out_sizes: Sequence[tuple[int, int]],
    *,
    align_corners: bool,
    flip: bool,
    padded_out: tuple[int, int],
) -> jax.Array:
    """`resize_logits` of each image of a (B, H, W, C) batch, with its own valid and out size."""

    def indices(axis: int, flipped: bool) -> tuple[np.ndarray, ...]:
        triples = [
            _interpolation_indices(v[axis], o[axis], align_corners, flipped, padded_out[axis])
            for v, o in zip(valid_sizes, out_sizes, strict=True)
        ]
        return tuple(np.stack(column) for column in zip(*triples, strict=True))

    return _resample(logits, indices(0, False), indices(1, flip))


def resize_logits(
    logits: jax.Array,
    valid_size: tuple[int, int],
    out_size: tuple[int, int],
    *,
    align_corners: bool,
    flip: bool = False,
    padded_out: tuple[int, int] | None = None,
) -> jax.Array:
    """Resizes the top-left `valid_size` of (H, W, C) `logits` to `out_size` (mirrored if `flip`).

    The result has shape `padded_out` (default `out_size`) × C; rows/columns beyond `out_size`
    hold filler values. Equals `models.layers.resize_bilinear` on the valid region.
    """
    return _resize_batch(
        logits[None],
        [valid_size],
        [out_size],
        align_corners=align_corners,
        flip=flip,
        padded_out=padded_out or out_size,
    )[0]


# ----------------------------------------------------------------------------------------------
# Device programs. The model is a static argument: flax modules hash by value, so every image
# of every call shares one compilation per input shape.


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: Any, variables: Any, images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False)


@jax.jit
def _add_window(
    total: jax.Array,
    count: jax.Array,
    logits: jax.Array,
    offset: jax.Array,
    window_size: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Adds the (B) logits of one padded window of each image into the running (B) sums at
    `offset` = (y, x); the window's valid size is `window_size`.

    Kept apart from the forward pass, so the model compiles once per window shape (shared with
    whole-image inference) and only this cheap program depends on the size of the sum.
    """
    rows = lax.broadcasted_iota(jnp.int32, logits.shape[1:3], 0) < window_size[0]
    cols = lax.broadcasted_iota(jnp.int32, logits.shape[1:3], 1) < window_size[1]
    mask = rows & cols
    y, x = offset[0], offset[1]
    region = lax.dynamic_slice(total, (0, y, x, 0), logits.shape)
    total = lax.dynamic_update_slice(
        total, region + jnp.where(mask[None, ..., None], logits, 0.0), (0, y, x, 0)
    )
    region = lax.dynamic_slice(count, (0, y, x), logits.shape[:3])
    count = lax.dynamic_update_slice(count, region + mask.astype(count.dtype), (0, y, x))
    return total, count


@functools.partial(jax.jit, static_argnames=("shape", "sharding"))
def _zero_sums(
    shape: tuple[int, ...], sharding: jax.sharding.Sharding | None
) -> tuple[jax.Array, jax.Array]:
    """Zero window sums (B, H, W, C) and counts (B, H, W), split over the batch like the
    logits that will be added (no device then holds another's image)."""
    total, count = jnp.zeros(shape, jnp.float32), jnp.zeros(shape[:3], jnp.float32)
    if sharding is not None:
        total, count = lax.with_sharding_constraint((total, count), sharding)
    return total, count


@jax.jit
def _average_windows(total: jax.Array, count: jax.Array) -> jax.Array:
    return total / jnp.maximum(count, 1.0)[..., None]


def _probabilities(logits: jax.Array) -> jax.Array:
    """Softmax over the classes; a one-class (binary, SMP's `classes=1`) model's sigmoid."""
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)


@jax.jit
def _add_probabilities(total: jax.Array | None, logits: jax.Array) -> jax.Array:
    view = _probabilities(logits)
    return view if total is None else total + view


@functools.partial(jax.jit, static_argnames="averaged")
def _classes(scores: jax.Array, averaged: bool) -> jax.Array:
    """Class indices of `predict_scores`'s output. A one-class model's mask is 1 where its
    sigmoid passes 0.5 (a logit above 0, or an averaged probability above 0.5), as SMP's
    binary models are read; argmax would always give 0."""
    if scores.shape[-1] == 1:
        return (scores[..., 0] > (0.5 if averaged else 0.0)).astype(jnp.int32)
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def mask_classes(num_classes: int) -> int:
    """How many values a model's masks take: its classes, and 2 for a one-class (binary)
    model, whose masks hold 0 and 1 (the rows of its confusion matrix, its names, colors)."""
    return max(num_classes, 2)


@functools.partial(jax.jit, static_argnames=("num_classes", "averaged"))
def _score(scores: jax.Array, labels: jax.Array, num_classes: int, averaged: bool) -> jax.Array:
    """(B, C, C) confusion matrices, one per image: summed on the host, so the devices never
    wait for one another."""

    def one(scores: jax.Array, labels: jax.Array) -> jax.Array:
        predictions = _classes(scores, averaged)
        return metrics.confusion_matrix(labels, predictions, mask_classes(num_classes))

    return jax.vmap(one)(scores, labels)


# ----------------------------------------------------------------------------------------------
# One image.


def _pad_to(array: np.ndarray, height: int, width: int, value: float | int) -> np.ndarray:
    pad = [(0, height - array.shape[0]), (0, width - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, constant_values=value)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int | np.integer) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return int(pair[0]), int(pair[1])


def check_options(
    *,
    mode: str,
    scales: Sequence[float],
    crop_size: int | Sequence[int] | None,
    stride: int | Sequence[int] | None,
    pad_multiple: int,
    where: str = "",
) -> dict[str, Any]:
    """Validated inference options; `where` prefixes field names in errors (e.g. 'config.eval.')."""
    if mode not in MODES:
        raise ValueError(f"{where}mode={mode!r}: expected one of {MODES}")
    scales = tuple(float(s) for s in scales)
    if not scales or any(not s > 0 for s in scales):
        raise ValueError(f"{where}scales={scales!r}: expected one or more positive scale factors")
    if int(pad_multiple) < 1:
        raise ValueError(f"{where}pad_multiple={pad_multiple!r}: expected an integer >= 1")
    crop = stride_hw = None
    if mode == "slide":
        if crop_size is None:
            raise ValueError(f"{where}crop_size is required with mode='slide' (e.g. 769)")
        crop = _pair(crop_size, f"{where}crop_size")
        # mmseg's Cityscapes setting is crop 769, stride 513: two thirds of the crop.
        stride_hw = (
            tuple(c - c // 3 for c in crop) if stride is None else _pair(stride, f"{where}stride")
        )
        if stride_hw[0] > crop[0] or stride_hw[1] > crop[1]:
            raise ValueError(
                f"{where}stride={stride_hw} is larger than {where}crop_size={crop}: "
                "pixels between windows would never be predicted"
            )
    return {
        "mode": mode,
        "scales": scales,
        "crop_size": crop,
        "stride": stride_hw,
        "pad_multiple": int(pad_multiple),
    }


def _slide_logits(
    model: Any,
    variables: Any,
    images: np.ndarray,
    crop: tuple[int, int],
    stride: tuple[int, int],
    pad_multiple: int,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """Window-averaged logits (B, H', W', C) of (B, H, W, 3) `images` (one size, so the same
    windows); valid in the top-left image-sized region."""
    height, width = images.shape[1:3]
    win_h, win_w = min(crop[0], height), min(crop[1], width)
    min_size = model.min_input_size

    def window_side(side: int, crop_side: int) -> int:
        # A full crop is never padded (all windows of a large image); a short side is bucketed.
        if side == crop_side:
            return max(side, min_size)
        return min(max(crop_side, min_size), padded_size(side, pad_multiple, min_size))

    pad_h, pad_w = window_side(win_h, crop[0]), window_side(win_w, crop[1])
    # The sum must hold a padded window at the last offset (image size − window size).
    total_h = padded_size(height - win_h + pad_h, pad_multiple, min_size)
    total_w = padded_size(width - win_w + pad_w, pad_multiple, min_size)
    total, count = _zero_sums(
        (len(images), total_h, total_w, model.num_classes), sharding=batch_sharding
    )
    rows = max(height - win_h + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - win_w + stride[1] - 1, 0) // stride[1] + 1
    size = np.array([win_h, win_w], np.int32)
    for i in range(rows):
        for j in range(cols):
            y = max(min(i * stride[0] + win_h, height) - win_h, 0)
            x = max(min(j * stride[1] + win_w, width) - win_w, 0)
            windows = np.zeros((len(images), pad_h, pad_w, 3), np.float32)
            windows[:, :win_h, :win_w] = images[:, y : y + win_h, x : x + win_w]
            logits = _forward(model, variables, _put(windows, batch_sharding))
            offset = np.array([y, x], np.int32)
            total, count = _add_window(total, count, logits, offset, size)
    return _average_windows(total, count)


def _views(scales: Sequence[float], flip: bool) -> list[tuple[float, bool]]:
    """(scale, flipped) of every view `predict_scores` merges."""
    return [(s, f) for s in scales for f in ((False, True) if flip else (False,))]


def _put(batch: np.ndarray, batch_sharding: jax.sharding.Sharding | None) -> Any:
    """A host batch split over the devices (None: left to the jitted call to place)."""
    return batch if batch_sharding is None else jax.device_put(batch, batch_sharding)


def _view(image: np.ndarray, scale: float, flipped: bool) -> np.ndarray:
    height, width = image.shape[:2]
    h, w = scaled_size(height, width, scale)
    view = (
        image
        if (h, w) == (height, width)
        else cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)
    )
    return view[:, ::-1] if flipped else view


def _padded(size: Sequence[int], pad_multiple: int, min_size: int) -> tuple[int, int]:
    """`padded_size` of (height, width)."""
    return tuple(padded_size(side, pad_multiple, min_size) for side in size[:2])


def _view_shapes(
    image_size: tuple[int, int], scales: Sequence[float], pad_multiple: int, min_size: int
) -> tuple[tuple[int, int], ...]:
    """The padded model input of each scale of whole-image inference."""
    return tuple(
        _padded(scaled_size(*image_size, scale), pad_multiple, min_size) for scale in scales
    )


def _merged_scores(
    model: Any,
    variables: Any,
    images: Sequence[np.ndarray],
    out_sizes: Sequence[tuple[int, int]],
    padded_out: tuple[int, int],
    options: Mapping[str, Any],
    flip: bool,
    batch_sharding: jax.sharding.Sharding | None,
) -> jax.Array:
    """(B, H', W', C) scores of images that share every padded view shape (whole mode) or
    their size (slide mode), split over the devices of `batch_sharding`."""
    views = _views(options["scales"], flip)
    min_size, multiple = model.min_input_size, options["pad_multiple"]
    total = None
    for scale, flipped in views:
        inputs = [_view(image, scale, flipped) for image in images]
        valid_sizes = [view.shape[:2] for view in inputs]
        if options["mode"] == "whole":
            shape = _padded(valid_sizes[0], multiple, min_size)  # the same for the whole batch
            batch = np.stack([_pad_to(view, *shape, 0.0) for view in inputs])
            logits = _forward(model, variables, _put(batch, batch_sharding))
        else:
            logits = _slide_logits(
                model,
                variables,
                np.stack(inputs),
                options["crop_size"],
                options["stride"],
                multiple,
                batch_sharding,
            )
        logits = _resize_batch(
            logits,
            valid_sizes,
            out_sizes,
            align_corners=model.align_corners,
            flip=flipped,
            padded_out=padded_out,
        )
        if len(views) == 1:
            return logits
        total = _add_probabilities(total, logits)
    return total / len(views)


def predict_scores(
    model: Any,
    variables: Any,
    image: np.ndarray,
    out_size: tuple[int, int] | None = None,
    *,
    mode: str = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    pad_multiple: int = PAD_MULTIPLE,
) -> jax.Array:
    """Merged class scores of one normalized image, on the device, at `out_size` (padded).

    `image` is float32 (H, W, 3), ImageNet-normalized. Returns (H', W', C) with H' =
    `padded_size(out_size[0])`, valid in the top-left `out_size` (default: the image size):
    logits for a single view, the mean softmax probability over views otherwise (sigmoid for
    a one-class model).
    """
    options = check_options(
        mode=mode, scales=scales, crop_size=crop_size, stride=stride, pad_multiple=pad_multiple
    )
    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a normalized (H, W, 3) image, got shape {image.shape}")
    out_size = tuple(out_size or image.shape[:2])
    padded_out = _padded(out_size, options["pad_multiple"], model.min_input_size)
    return _merged_scores(
        model, variables, [image], [out_size], padded_out, options, flip, batch_sharding=None
    )[0]


def predict_image(model: Any, variables: Any, image: np.ndarray, **options: Any) -> np.ndarray:
    """Class indices (H, W) int32 of one normalized float32 (H, W, 3) image.

    `options` are those of `predict_scores` (mode, scales, flip, crop_size, stride, pad_multiple).
    """
    height, width = np.shape(image)[:2]
    scores = predict_scores(model, variables, image, **options)
    views = _views(options.get("scales", (1.0,)), options.get("flip", False))
    return np.asarray(_classes(scores, averaged=len(views) > 1))[:height, :width]


# ----------------------------------------------------------------------------------------------
# A dataset.


def _replicated(variables: Any, mesh: jax.sharding.Mesh) -> Any:
    """`variables` replicated over `mesh` (this process's devices), also from global arrays of
    a multi-host run.

    The training state is a global array spread over every process's devices; each process
    evaluates on its own, so it needs the whole value locally: any local shard of a replicated
    array is the whole value, and a partitioned one is gathered (a collective: every process
    walks the same tree in the same order).
    """

    def whole(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return x.addressable_data(0)
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(x, tiled=True)
        return x

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.device_put(jax.tree.map(whole, variables), replicated)


def _checked(element: Mapping[str, Any], index: int) -> tuple[np.ndarray, np.ndarray]:
    image, label = np.asarray(element["image"]), np.asarray(element["label"])
    name = element.get("file_name", f"element {index}")
    if image.ndim != 3 or image.shape[-1] != 3 or not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"{name}: expected a normalized float (H, W, 3) image "
            f"(pan_jax.data.normalize), got {image.dtype} {image.shape}"
        )
    if label.ndim != 2:
        raise ValueError(f"{name}: expected an (H, W) label, got shape {label.shape}")
    return image, label


def evaluate_dataset(
    model: Any,
    variables: Any,
    dataset: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    mode: str = "whole",
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    crop_size: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    pad_multiple: int = PAD_MULTIPLE,
    num_images_hint: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Dataset-level metrics of `model` over every element of `dataset` (this process's shard).

    Elements are {'image': float32 (H, W, 3) normalized, 'label': int (H', W') with 255 = ignore,
    ...}; the label size may differ from the image size (logits are resized to it). Returns
    `metrics.compute_metrics` of the confusion matrix summed over all processes, plus
    `confusion_matrix` (int64; 2 × 2 for a one-class model, whose masks hold 0 and 1),
    `num_images` (all processes) and the inference options. This is
    a collective with several processes: every process must call it. `num_images_hint` (this
    process's image count) only feeds the progress log's ETA. `devices`: those of this process
    to run on (default: all of them).
    """
    if num_classes != model.num_classes:
        raise ValueError(
            f"num_classes={num_classes}, but the model predicts {model.num_classes} classes"
        )
    options = check_options(
        mode=mode, scales=scales, crop_size=crop_size, stride=stride, pad_multiple=pad_multiple
    )
    devices = jax.local_devices() if devices is None else list(devices)
    if not devices or any(d.process_index != jax.process_index() for d in devices):
        raise ValueError(f"devices={devices}: expected one or more of this process's devices")
    mesh = jax.sharding.Mesh(np.array(devices), (BATCH_AXIS,))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXIS))
    variables = _replicated(variables, mesh)
    batch_size = batch_sharding.num_devices
    min_size, multiple = model.min_input_size, options["pad_multiple"]
    confusion = np.zeros((mask_classes(num_classes),) * 2, np.int64)
    averaged = len(_views(options["scales"], flip)) > 1
    pending: collections.deque[jax.Array] = collections.deque()
    # Images waiting for a full batch, by what a batch must share (see `batch_key`).
    waiting: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = collections.defaultdict(list)
    num_images = 0
    start = last_log = time.perf_counter()

    def run(group: list[tuple[np.ndarray, np.ndarray]], padded_out: tuple[int, int]) -> None:
        nonlocal confusion, num_images, last_log
        images = [image for image, _ in group]
        labels = [_pad_to(label.astype(np.int32), *padded_out, metrics.IGNORE_LABEL)
                  for _, label in group]  # fmt: skip
        out_sizes = [label.shape for _, label in group]
        fillers = batch_size - len(group)  # copies of an image that count for nothing
        images += [images[0]] * fillers
        out_sizes += [out_sizes[0]] * fillers
        labels += [np.full(padded_out, metrics.IGNORE_LABEL, np.int32)] * fillers
        labels = _put(np.stack(labels), batch_sharding)
        scores = _merged_scores(
            model, variables, images, out_sizes, padded_out, options, flip, batch_sharding
        )
        pending.append(_score(scores, labels, num_classes, averaged))
        while len(pending) > _MAX_PENDING:
            confusion = add(confusion, pending.popleft())
        num_images += len(group)
        now = time.perf_counter()
        if now - last_log > 30:
            log_progress(now)
            last_log = now

    def log_progress(now: float, done: bool = False) -> None:
        rate = num_images / max(now - start, 1e-9)
        eta = ""  # none without a hint, or once done
        if num_images_hint and not done:
            eta = f", ETA {max(num_images_hint - num_images, 0) / rate:.0f} s"
        logging.info(
            "eval%s: %d%s images, %.2f img/s%s",
            " done" if done else "",
            num_images,
            f"/{num_images_hint}" if num_images_hint else "",
            rate,
            eta,
        )

    def add(confusion: np.ndarray, per_image: jax.Array) -> np.ndarray:
        return metrics.accumulate(confusion, np.asarray(per_image).sum(0, dtype=np.int64))

    def batch_key(image: np.ndarray, padded_out: tuple[int, int]) -> tuple:
        # Whole mode: the model's padded inputs (each image is resized to its own label);
        # slide mode: the size itself, which places the windows.
        if options["mode"] == "whole":
            return _view_shapes(image.shape[:2], options["scales"], multiple, min_size), padded_out
        return image.shape[:2], padded_out

    for index, element in enumerate(dataset):
        image, label = _checked(element, index)
        padded_out = _padded(label.shape, multiple, min_size)
        key = batch_key(image, padded_out)
        waiting[key].append((image, label))
        if len(waiting[key]) == batch_size:
            run(waiting.pop(key), padded_out)
        elif sum(map(len, waiting.values())) > _MAX_WAITING * batch_size:
            oldest = next(iter(waiting))
            run(waiting.pop(oldest), oldest[1])
    for (_, padded_out), group in waiting.items():
        run(group, padded_out)
    while pending:
        confusion = add(confusion, pending.popleft())
    if num_images:
        log_progress(time.perf_counter(), done=True)
    confusion = metrics.allreduce(confusion)
    total_images = int(metrics.allreduce(np.array([[num_images]], np.int64))[0, 0])
    result = metrics.compute_metrics(confusion)
    result.update(
        confusion_matrix=confusion,
        num_images=total_images,
        mode=options["mode"],
        scales=list(options["scales"]),
        flip=bool(flip),
        crop_size=options["crop_size"],
        stride=options["stride"],
        pad_multiple=multiple,
    )
    return result


# ----------------------------------------------------------------------------------------------
# Class names and reports.


def class_names_for(dataset_name: str | None, num_classes: int) -> tuple[str, ...]:
    """Names of the classes: the dataset's own when known, VOC for 21 and Cityscapes for 19
    classes otherwise, else `class_0`, `class_1`, ..."""
    from pan_jax import data  # tfds and friends: imported only when names are needed.

    names: tuple[str, ...] | None = None
    if dataset_name:
        try:
            names = tuple(data.class_names(dataset_name))
        except ValueError:
            names = None
    if names is None or len(names) != num_classes:
        names = {21: data.voc_aug.CLASS_NAMES, 19: data.cityscapes.CLASS_NAMES}.get(num_classes)
    return tuple(names) if names else tuple(f"class_{i}" for i in range(mask_classes(num_classes)))


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def report_to_json(report: Mapping[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """A JSON-able copy of an `evaluate_dataset` result; NaN (class absent) becomes null."""
    num_classes = len(report["iou"])
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a report of {num_classes} classes")
    arrays = ("iou", "accuracy", "confusion_matrix", "miou", "pixel_accuracy", "mean_accuracy")
    out = {key: value for key, value in report.items() if key not in arrays}
    out = json.loads(
        json.dumps(out, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
    )
    out.update(
        miou=_json_float(report["miou"]),
        pixel_accuracy=_json_float(report["pixel_accuracy"]),
        mean_accuracy=_json_float(report["mean_accuracy"]),
        per_class=[
            {"class": i, "name": name, "iou": _json_float(iou), "accuracy": _json_float(acc)}
            for i, (name, iou, acc) in enumerate(
                zip(class_names, report["iou"], report["accuracy"], strict=True)
            )
        ],
        confusion_matrix=np.asarray(report["confusion_matrix"]).tolist(),
    )
    return out


def _percent(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def report_markdown(report_json: Mapping[str, Any]) -> str:
    """The per-class IoU table of a `report_to_json` dict, in markdown."""
    get = report_json.get
    views = f"mode {get('mode')}, scales {get('scales')}, flip {get('flip')}"
    lines = [
        "# Evaluation report",
        "",
        f"- checkpoint: {report_json.get('checkpoint', '?')} (step {report_json.get('step', '?')})",
        f"- dataset: {report_json.get('dataset', '?')}, split {report_json.get('split', '?')}, "
        f"{report_json.get('num_images')} images",
        f"- inference: {views}",
        "",
        f"**mIoU {_percent(get('miou'))}** · pixel accuracy {_percent(get('pixel_accuracy'))} · "
        f"mean accuracy {_percent(get('mean_accuracy'))}",
        "",
    ]
    if get("paper_miou") is not None:
        lines += [f"The paper reports mIoU {_percent(get('paper_miou'))} for this setting.", ""]
    lines += [
        "| class | name | IoU (%) | accuracy (%) |",
        "|---:|---|---:|---:|",
    ]
    for row in report_json["per_class"]:
        iou, accuracy = _percent(row["iou"]), _percent(row["accuracy"])
        lines.append(f"| {row['class']} | {row['name']} | {iou} | {accuracy} |")
    lines += [
        "",
        "— : the class is absent from the ground truth (and, for IoU, from the predictions).",
    ]
    return "\n".join(lines) + "\n"


def write_report(
    workdir: str | os.PathLike, report: Mapping[str, Any], class_names: Sequence[str]
) -> tuple[epath.Path, epath.Path]:
    """Writes `eval_report.json` and `eval_report.md` (per-class IoU table) into `workdir`."""
    directory = epath.Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    report_json = report_to_json(report, class_names)
    json_path, md_path = directory / REPORT_JSON, directory / REPORT_MD
    json_path.write_text(json.dumps(report_json, indent=2) + "\n")
    md_path.write_text(report_markdown(report_json))
    return json_path, md_path


# ----------------------------------------------------------------------------------------------
# The entry point behind `python -m pan_jax.main --mode=eval`.


def _get(config: Any, name: str, default: Any) -> Any:
    if config is None:
        return default
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def eval_options(eval_config: Any) -> dict[str, Any]:
    """Validated inference options from a `config.eval` section (ConfigDict, dict or None).

    Fields: mode ('whole' | 'slide', default 'whole'), scales (default (1.0,)), flip (False),
    crop_size and stride (slide mode; stride defaults to crop − crop // 3), pad_multiple (128).
    """
    try:
        options = check_options(
            mode=_get(eval_config, "mode", "whole"),
            scales=_get(eval_config, "scales", (1.0,)),
            crop_size=_get(eval_config, "crop_size", None),
            stride=_get(eval_config, "stride", None),
            pad_multiple=_get(eval_config, "pad_multiple", PAD_MULTIPLE),
            where="config.eval.",
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    options["flip"] = bool(_get(eval_config, "flip", False))
    return options


def load_model(
    directory: str | os.PathLike, step: int | None = None
) -> tuple[Any, Any, dict, int | None]:
    """(model, variables, spec, step) from a model directory (`model.json`, as written by
    `checkpointing.save_variables`) or a training workdir (its latest or `step` checkpoint)."""
    variables, spec, step = checkpointing.load_any(directory, step)
    if spec.get("untrained"):  # set by pan_jax.convert: e.g. an ImageNet backbone's decoder
        parts = spec["untrained"]
        logging.warning(
            "%s: its %s %s never trained (pan_jax.convert left them as initialised), so its "
            "predictions are noise; train from it first (config.model.pretrained=%s, "
            "config.model.pretrained_kind=pan_jax)",
            directory,
            " and ".join(parts),
            "was" if len(parts) == 1 else "were",
            directory,
        )
    return checkpointing.model_from_spec(spec), variables, spec, step


def evaluate(config: Any, workdir: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """Evaluates the latest (or `step`) checkpoint of `workdir` on `config.data.eval_split`.

    Uses `config.eval` (see `eval_options`), prints the mIoU, writes `eval_report.json` and
    `eval_report.md` into the workdir (process 0) and returns the JSON report.
    """
    from pan_jax import data  # tfds/grain: only the dataset side needs them.

    options = eval_options(config.get("eval") if hasattr(config, "get") else None)
    model, variables, spec, step = load_model(workdir, step)
    if step is not None and _get(config, "model", None) is not None:
        # A training workdir's config describes its model (and, for an ablation row, the
        # paper's figure in the report): another model's config is refused, as training
        # refuses it. Options the config leaves unset are not compared, so the run's
        # command-line switches need not be repeated. A model directory (step None) brings
        # its own model to any config.
        from pan_jax import train

        expected = train.model_spec(config)
        saved = dict(
            spec,
            overrides={k: v for k, v in spec["overrides"].items() if k in expected["overrides"]},
        )
        checkpointing.check_spec(saved, expected, f"checkpoint {step} in {workdir}")
    num_classes = int(config.data.num_classes)
    if spec["num_classes"] != num_classes:
        raise checkpointing.CheckpointMismatchError(
            f"the checkpoint in {workdir} predicts {spec['num_classes']} classes, "
            f"but config.data.num_classes={num_classes} ({config.data.name})"
        )
    try:
        trained_on = (checkpointing.read_run_config(workdir).get("data") or {}).get("name")
    except ValueError as error:  # a damaged record: the model and its checkpoint may be fine
        logging.warning("%s; not compared with config.data", error)
        trained_on = None
    if trained_on and trained_on != config.data.name:
        logging.warning(
            "evaluating on data.name=%s (built first where it is not prepared), but the run in %s "
            "trained on %s (its config.json): give that run's config, or --config.data.name=%s, "
            "to score it on its own data",
            config.data.name,
            workdir,
            trained_on,
            trained_on,
        )
    # As training does: built where it is missing (or a one-line error saying what is missing).
    sharding.process_zero_first(functools.partial(data.prepare, config.data), "dataset prepared")
    split = config.data.eval_split
    expected = data.num_examples(config.data, split)
    share = len(range(jax.process_index(), expected, jax.process_count()))
    logging.info(
        "Evaluating %s (step %s) on %s/%s: %d images, %s",
        spec["name"],
        step,
        config.data.name,
        split,
        expected,
        options,
    )
    report = evaluate_dataset(
        model,
        variables,
        data.eval_dataset(config.data),
        num_classes=num_classes,
        num_images_hint=share,
        **options,
    )
    if report["num_images"] != expected:
        logging.warning(
            "Scored %d of the %d images of %s/%s (data.skip_corrupt left out corrupt records)",
            report["num_images"],
            expected,
            config.data.name,
            split,
        )
    report.update(
        checkpoint=os.fspath(workdir),
        step=step,
        model=spec,
        dataset=config.data.name,
        split=split,
        num_images_expected=expected,
    )
    names = class_names_for(config.data.name, num_classes)
    message = (
        f"mIoU {100 * report['miou']:.2f} % | pixel acc {100 * report['pixel_accuracy']:.2f} % | "
        f"mean acc {100 * report['mean_accuracy']:.2f} % | {report['num_images']} images, "
        f"{config.data.name}/{split}, step {step}"
    )
    paper = _get(config, "paper_miou_percent", None)  # set by configs/voc_ablation.py
    if paper is not None:
        report["paper_miou"] = float(paper) / 100
        message += f" | the paper: mIoU {float(paper):.2f} %"
    logging.info(message)
    if jax.process_index() == 0:
        print(message, flush=True)
        json_path, md_path = write_report(workdir, report, names)
        logging.info("Wrote %s and %s", json_path, md_path)
    return report_to_json(report, names)
