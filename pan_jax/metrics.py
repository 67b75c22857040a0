"""Dataset-level segmentation metrics from one confusion matrix, as mmsegmentation computes them.

The protocol (mmseg `IoUMetric`, torchmetrics ≥ 1.0 `MulticlassJaccardIndex(average='macro')`):
pixels whose ground truth is the ignore label (255) are dropped, every remaining pixel adds one
count to `confusion[gt, pred]`, the counts are summed over the *whole split* (never averaged per
image), and only then are the ratios taken:

    I_c = confusion[c, c],  label_c = Σ_p confusion[c, p],  pred_c = Σ_g confusion[g, c]
    IoU_c = I_c / (label_c + pred_c − I_c),   mIoU = nanmean_c IoU_c
    aAcc  = Σ_c I_c / Σ_c label_c,            mAcc = nanmean_c I_c / label_c

A class with neither ground truth nor prediction has 0/0 = NaN IoU and is left out of the mean;
a class that is predicted but absent from the ground truth has IoU 0 and counts.

Counting runs on the device, per image or batch (`confusion_matrix`, jitted, int32: one batch has
far fewer than 2³¹ pixels); the running total lives on the host as numpy int64 (`accumulate`),
because a pass over Cityscapes train (≈6.2·10⁹ pixels) overflows int32 and float32 counts stop
being exact above 2²⁴. `allreduce` sums the host totals of all processes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_label"))
def confusion_matrix(
    labels: jax.Array, predictions: jax.Array, num_classes: int, ignore_label: int = IGNORE_LABEL
) -> jax.Array:
    """Counts of (ground truth, prediction) pairs: int32 (C, C), rows = ground truth.

    `labels` and `predictions` are integer arrays of one shape (any batch of images). Pixels
    whose label is `ignore_label` are skipped, and so is a pixel whose label or prediction lies
    outside [0, C) (a prediction from an argmax always lies inside). Padding a batch with
    `ignore_label` labels therefore makes the padding count for nothing.
    """
    labels = labels.astype(jnp.int32).reshape(-1)
    predictions = predictions.astype(jnp.int32).reshape(-1)
    valid = (
        (labels != ignore_label)
        & (labels >= 0)
        & (labels < num_classes)
        & (predictions >= 0)
        & (predictions < num_classes)
    )
    # Invalid pixels go to an extra bin that is cut off: a fixed `length` keeps shapes static.
    index = jnp.where(valid, labels * num_classes + predictions, num_classes * num_classes)
    counts = jnp.bincount(index, length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def accumulate(total: np.ndarray | None, counts: Any) -> np.ndarray:
    """`total + counts` as a new int64 numpy matrix; `total=None` starts a sum.

    `counts` may be a device array (int32 from `confusion_matrix`) or a host array; it is
    widened to int64 *before* the addition, so the sum never wraps.
    """
    counts = np.asarray(jax.device_get(counts)).astype(np.int64)
    if total is None:
        return counts
    if total.shape != counts.shape:
        raise ValueError(
            f"confusion matrices of different shapes: {total.shape} and {counts.shape}"
        )
    return total.astype(np.int64) + counts


# Below 2**62 an int64 count splits into two int32 digits of base 2**31 (both in [0, 2**31)).
_DIGIT_BITS = 31


def allreduce(total: np.ndarray) -> np.ndarray:
    """Sum of every process's int64 host matrix; every process gets the sum (collective).

    With one process this returns `total` unchanged. With several, `process_allgather` moves the
    counts: jax (without x64) would silently cut int64 to int32, so the counts travel as two
    int32 digits and are recombined and summed on the host in int64.
    """
    total = np.asarray(total).astype(np.int64)
    if jax.process_count() == 1:
        return total
    if total.size and (total.min() < 0 or total.max() >= 2 ** (2 * _DIGIT_BITS)):
        raise ValueError(
            f"confusion matrix counts must lie in [0, 2**62) to be summed across processes, "
            f"got [{total.min()}, {total.max()}]"
        )
    from jax.experimental import multihost_utils  # Only multi-process runs need it.

    digits = np.stack([total >> _DIGIT_BITS, total & ((1 << _DIGIT_BITS) - 1)]).astype(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(digits)).astype(np.int64)
    high, low = gathered[:, 0].sum(axis=0), gathered[:, 1].sum(axis=0)
    return (high << _DIGIT_BITS) + low


def compute_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """IoU per class, mIoU, pixel accuracy and mean class accuracy of a (C, C) confusion matrix.

    Returns numpy float64 arrays `iou` and `accuracy` (per class, NaN where undefined) and
    Python floats `miou`, `pixel_accuracy`, `mean_accuracy` (NaN when nothing was counted).
    """
    confusion = np.asarray(confusion, np.int64)
    if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"expected a square (C, C) confusion matrix, got shape {confusion.shape}")
    intersection = np.diag(confusion).astype(np.float64)
    label_area = confusion.sum(axis=1).astype(np.float64)
    pred_area = confusion.sum(axis=0).astype(np.float64)
    union = label_area + pred_area - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union  # 0/0 = NaN: class absent from ground truth and prediction
        accuracy = intersection / label_area  # NaN: class absent from ground truth
        pixel_accuracy = intersection.sum() / label_area.sum()

    def nanmean(x: np.ndarray) -> float:
        return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")

    return {
        "iou": iou,
        "accuracy": accuracy,
        "miou": nanmean(iou),
        "pixel_accuracy": float(pixel_accuracy),
        "mean_accuracy": nanmean(accuracy),
    }
