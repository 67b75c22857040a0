"""Inference on whole images: padding buckets, sliding windows, multi-scale + flip.

The views of one image (or of a batch of images that share their view shapes), merged into class
scores at the size of its label:

- `mode="whole"`: the whole (rescaled) image in one forward pass.
- `mode="slide"`: mmseg's sliding window for large images (Cityscapes at 1024×2048): windows of
  `crop_size` every `stride` pixels, grid = ceil((H − crop) / stride) + 1 per axis, the last
  window clamped to the image edge; window logits are summed and divided by a per-pixel count.
- `scales` × `flip`: each scale s resizes the image to round(s·H) × round(s·W) (bilinear, as
  mmcv's `imrescale`); with `flip` each scale is also run on the mirrored image and its logits
  mirrored back. The logits of each view are resized (bilinear, with the model's
  `align_corners`, as mmseg does) to the output size *before* they are merged, by **averaging
  softmax probabilities** (mmseg's `SegTTAModel.merge_preds` does the same; the PAN paper does
  not say; a one-class model's sigmoid). A single view keeps its logits. The paper's
  multi-scale set is `MS_SCALES`. A uint8 image is rescaled as uint8 and normalized on the
  device, as mmseg does: unpadded (`pad_multiple=1`) this equals mmseg's own test-time
  augmentation, whole or sliding, run on the same network (tests/test_inference.py).

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
the image is larger than the crop). Output-sized arrays use the same buckets, so the number of
programs is bounded by the number of buckets, not of images.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from pan_jax import checkpointing, normalization

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # The paper's and mmseg's `img_ratios`.
PAD_MULTIPLE = 128
MODES = ("whole", "slide")


# ----------------------------------------------------------------------------------------------
# Shapes and resampling.


def padded_size(size: int, pad_multiple: int, min_size: int) -> int:
    """`size` rounded up to a multiple of `pad_multiple`, and at least `min_size`."""
    return max(int(min_size), -(-int(size) // int(pad_multiple)) * int(pad_multiple))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The view mmseg's test-time `Resize(scale_factor=s, keep_ratio=True)` makes, at least 1.

    mmcv rounds twice: the target (int(h·s + 0.5), int(w·s + 0.5)) becomes a bound for
    `rescale_size`, whose factor min(long'/long, short'/short) is applied and rounded again
    (150×191 at 0.75 gives 112×143, not 113×143).
    """
    bound = (int(height * scale + 0.5), int(width * scale + 0.5))
    factor = min(max(bound) / max(height, width), min(bound) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


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
def _forward(model: Any, variables: Any, images: jax.Array, valid_sizes: jax.Array) -> jax.Array:
    """Logits of a (B, H, W, 3) batch padded at the bottom/right. uint8 RGB is normalized here,
    0 (the mean pixel) outside each image's (height, width) in `valid_sizes` (B, 2), as the
    train step does; float images come normalized, padded with 0 (`valid_sizes` unused)."""
    if images.dtype == jnp.uint8:
        images = normalization.normalize_crops(images, valid_sizes)
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
def class_indices(scores: jax.Array, averaged: bool) -> jax.Array:
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


# ----------------------------------------------------------------------------------------------
# Options, views and their merge.


def pad_to(array: np.ndarray, height: int, width: int, value: float | int) -> np.ndarray:
    """`array` padded with `value` at the bottom and right to `height` × `width`."""
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
    try:
        scales = tuple(float(s) for s in scales)
    except (TypeError, ValueError):  # e.g. --config.eval.scales=1.0,abc: one string
        raise ValueError(
            f"{where}scales={scales!r}: expected a tuple of positive scale factors, e.g. "
            "'(0.75,1.0,1.25)'"
        ) from None
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
    window_sizes = to_devices(np.tile(size, (len(images), 1)), batch_sharding)  # every window's
    for i in range(rows):
        for j in range(cols):
            y = max(min(i * stride[0] + win_h, height) - win_h, 0)
            x = max(min(j * stride[1] + win_w, width) - win_w, 0)
            windows = np.zeros((len(images), pad_h, pad_w, 3), images.dtype)
            windows[:, :win_h, :win_w] = images[:, y : y + win_h, x : x + win_w]
            logits = _forward(model, variables, to_devices(windows, batch_sharding), window_sizes)
            offset = np.array([y, x], np.int32)
            total, count = _add_window(total, count, logits, offset, size)
    return _average_windows(total, count)


def checked_image(image: Any, name: str = "image") -> np.ndarray:
    """An image as inference takes it: uint8 RGB (H, W, 3) as decoded, normalized on the
    device after any rescaling (mmseg resizes the uint8 image too); or float (H, W, 3),
    already normalized (`normalization.normalize`), as float32."""
    image = np.asarray(image)
    if (
        image.ndim != 3
        or image.shape[-1] != 3
        or not (image.dtype == np.uint8 or np.issubdtype(image.dtype, np.floating))
    ):
        raise ValueError(
            f"{name}: expected a uint8 RGB (H, W, 3) image, or a float one normalized by "
            f"pan_jax.normalization.normalize; got {image.dtype} {image.shape}"
        )
    return image if image.dtype == np.uint8 else image.astype(np.float32, copy=False)


def views_of(scales: Sequence[float], flip: bool) -> list[tuple[float, bool]]:
    """(scale, flipped) of every view `predict_scores` merges."""
    return [(s, f) for s in scales for f in ((False, True) if flip else (False,))]


def to_devices(batch: np.ndarray, batch_sharding: jax.sharding.Sharding | None) -> Any:
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


def padded_shape(size: Sequence[int], pad_multiple: int, min_size: int) -> tuple[int, int]:
    """`padded_size` of (height, width)."""
    return tuple(padded_size(side, pad_multiple, min_size) for side in size[:2])


def view_shapes(
    image_size: tuple[int, int], scales: Sequence[float], pad_multiple: int, min_size: int
) -> tuple[tuple[int, int], ...]:
    """The padded model input of each scale of whole-image inference."""
    return tuple(
        padded_shape(scaled_size(*image_size, scale), pad_multiple, min_size) for scale in scales
    )


def merged_scores(
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
    views = views_of(options["scales"], flip)
    min_size, multiple = model.min_input_size, options["pad_multiple"]
    total = None
    for scale, flipped in views:
        inputs = [_view(image, scale, flipped) for image in images]
        valid_sizes = [view.shape[:2] for view in inputs]
        if options["mode"] == "whole":
            shape = padded_shape(valid_sizes[0], multiple, min_size)  # the same for the whole batch
            batch = np.stack([pad_to(view, *shape, 0) for view in inputs])
            sizes = np.array(valid_sizes, np.int32)
            logits = _forward(
                model,
                variables,
                to_devices(batch, batch_sharding),
                to_devices(sizes, batch_sharding),
            )
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
    """Merged class scores of one image, on the device, at `out_size` (padded).

    `image`: see `checked_image`. Returns (H', W', C) with H' = `padded_size(out_size[0])`,
    valid in the top-left `out_size` (default: the image size): logits for a single view, the
    mean softmax probability over views otherwise (sigmoid for a one-class model).
    """
    options = check_options(
        mode=mode, scales=scales, crop_size=crop_size, stride=stride, pad_multiple=pad_multiple
    )
    image = checked_image(image)
    out_size = tuple(out_size or image.shape[:2])
    padded_out = padded_shape(out_size, options["pad_multiple"], model.min_input_size)
    return merged_scores(
        model, variables, [image], [out_size], padded_out, options, flip, batch_sharding=None
    )[0]


def predict_image(model: Any, variables: Any, image: np.ndarray, **options: Any) -> np.ndarray:
    """Class indices (H, W) int32 of one image (see `checked_image`), at `out_size` if given.

    `options` are those of `predict_scores` (out_size, mode, scales, flip, crop_size, stride,
    pad_multiple).
    """
    height, width = options.get("out_size") or np.shape(image)[:2]
    scores = predict_scores(model, variables, image, **options)
    views = views_of(options.get("scales", (1.0,)), options.get("flip", False))
    return np.asarray(class_indices(scores, averaged=len(views) > 1))[:height, :width]


# ----------------------------------------------------------------------------------------------
# A saved model.


def load_model(
    directory: str | os.PathLike, step: int | None = None, *, dtype: Any = jnp.float32
) -> tuple[Any, Any, dict, int | None]:
    """(model, variables, spec, step) from a model directory (`model.json`, as written by
    `checkpointing.save_variables`) or a training workdir (its latest or `step` checkpoint).

    The model computes in `dtype` (bfloat16: faster on GPUs and TPUs), whatever dtype it was
    trained in; its parameters stay float32."""
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
    return checkpointing.model_from_spec(spec, dtype=jnp.dtype(dtype)), variables, spec, step
