"""Dataset-level metrics against torchmetrics (≥ 1.0) and mmsegmentation's own IoUMetric."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torchmetrics
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex
from torchmetrics.functional.classification import multiclass_confusion_matrix

from pan_jax import metrics
from tests.helpers import allow_mmseg_import

NUM_CLASSES = 7
ABSENT = 3  # in neither ground truth nor predictions: NaN IoU, left out of the mean
PREDICTED_ONLY = 5  # predicted but never in the ground truth: IoU 0, counted
SIZES = ((13, 17), (40, 9), (31, 31), (5, 64), (1, 1), (22, 23))


def random_images(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(label, prediction) pairs of different sizes with 255 holes and skewed class frequencies."""
    rng = np.random.default_rng(seed)
    gt_classes = np.array([c for c in range(NUM_CLASSES) if c not in (ABSENT, PREDICTED_ONLY)])
    pred_classes = np.array([c for c in range(NUM_CLASSES) if c != ABSENT])
    frequencies = np.linspace(1, 3, len(gt_classes))
    images = []
    for h, w in SIZES:
        label = rng.choice(gt_classes, size=(h, w), p=frequencies / frequencies.sum())
        # Predictions agree with the label ~60% of the time, so IoUs are far from 0 and 1.
        pred = np.where(rng.random((h, w)) < 0.6, label, rng.choice(pred_classes, size=(h, w)))
        label = np.where(rng.random((h, w)) < 0.15, 255, label)
        images.append((label.astype(np.int32), pred.astype(np.int32)))
    return images


def mmseg_metrics(images, num_classes, ignore_index=255):
    """mmseg's own `IoUMetric`: `intersect_and_union` of each image, summed, as its
    `compute_metrics` does, then `total_area_to_metrics` (and its nan-means)."""
    allow_mmseg_import()
    from mmseg.evaluation.metrics import IoUMetric

    areas = [
        IoUMetric.intersect_and_union(
            torch.from_numpy(pred).long(), torch.from_numpy(label).long(), num_classes, ignore_index
        )
        for label, pred in images
    ]
    # float64 before its divisions: its areas are float32 (exact integers here), its ratios
    # would round to float32.
    totals = [sum(area).double() for area in zip(*areas, strict=True)]
    result = IoUMetric.total_area_to_metrics(*totals, metrics=["mIoU"])
    return {**result, "mIoU": np.nanmean(result["IoU"]), "mAcc": np.nanmean(result["Acc"])}


def ours(images, num_classes=NUM_CLASSES):
    total = None
    for label, pred in images:
        total = metrics.accumulate(total, metrics.confusion_matrix(label, pred, num_classes))
    return total, metrics.compute_metrics(total)


def test_miou_equals_mmsegmentations_iou_metric_and_torchmetrics():
    # Since torchmetrics 1.0 a class absent from predictions and target has weight 0 (PR #1821).
    assert tuple(int(v) for v in torchmetrics.__version__.split(".")[:2]) >= (1, 0)
    images = random_images()
    confusion, result = ours(images)
    reference = mmseg_metrics(images, NUM_CLASSES)

    # The test data has what it must: an absent class, a predicted-only class, holes.
    assert np.isnan(result["iou"][ABSENT]) and result["iou"][PREDICTED_ONLY] == 0.0
    assert confusion.sum() == sum(int((label != 255).sum()) for label, _ in images)

    np.testing.assert_allclose(result["iou"], reference["IoU"], rtol=0, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(result["accuracy"], reference["Acc"], atol=1e-12, equal_nan=True)
    assert result["miou"] == pytest.approx(reference["mIoU"], abs=1e-12)
    assert result["pixel_accuracy"] == pytest.approx(reference["aAcc"], abs=1e-12)
    assert result["mean_accuracy"] == pytest.approx(reference["mAcc"], abs=1e-12)

    jaccard = MulticlassJaccardIndex(num_classes=NUM_CLASSES, ignore_index=255, average="macro")
    accuracy = MulticlassAccuracy(num_classes=NUM_CLASSES, ignore_index=255, average="micro")
    for label, pred in images:
        jaccard.update(torch.from_numpy(pred)[None].long(), torch.from_numpy(label)[None].long())
        accuracy.update(torch.from_numpy(pred)[None].long(), torch.from_numpy(label)[None].long())
    assert result["miou"] == pytest.approx(float(jaccard.compute()), abs=1e-6)
    assert result["pixel_accuracy"] == pytest.approx(float(accuracy.compute()), abs=1e-6)

    # Dataset-level, not an average of per-image mIoUs (which would differ on this data).
    per_image = np.nanmean([ours([pair])[1]["miou"] for pair in images])
    assert abs(per_image - result["miou"]) > 1e-3


def test_confusion_matrix_by_hand():
    label = np.array([[0, 1, 255], [2, 2, 1], [9, 0, 1]])  # 255 ignored, 9 out of range
    pred = np.array([[0, 2, 1], [2, 0, 1], [1, 7, 1]])  # 7 out of range: that pixel is skipped
    expected = np.array([[1, 0, 0], [0, 2, 1], [1, 0, 1]])
    np.testing.assert_array_equal(np.asarray(metrics.confusion_matrix(label, pred, 3)), expected)
    result = metrics.compute_metrics(expected)
    np.testing.assert_allclose(result["iou"], [1 / 2, 2 / 3, 1 / 3])
    assert result["pixel_accuracy"] == pytest.approx(4 / 6)
    assert result["mean_accuracy"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    empty = metrics.compute_metrics(np.zeros((3, 3), np.int64))
    assert np.isnan(empty["miou"]) and np.isnan(empty["pixel_accuracy"])
    # A negative label or prediction is outside [0, C) too: bincount clipped its index into a
    # real bin ((0, 0) for label -1 and prediction 2, (0, 2) for label 1 and prediction -1).
    np.testing.assert_array_equal(
        np.asarray(metrics.confusion_matrix(np.array([[-1, 1]]), np.array([[2, 1]]), 3)),
        [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
    )
    np.testing.assert_array_equal(
        np.asarray(metrics.confusion_matrix(np.array([[1, 2]]), np.array([[-1, 2]]), 3)),
        [[0, 0, 0], [0, 0, 0], [0, 0, 1]],
    )


def test_another_ignore_label_is_skipped_as_torchmetrics_does():
    # Only 255 was tested: an ignore_label of 0 counted like any class would go unseen.
    rng = np.random.default_rng(4)
    label = rng.integers(0, 4, (9, 11))
    pred = rng.integers(0, 4, (9, 11))
    ours = np.asarray(metrics.confusion_matrix(label, pred, 4, ignore_label=0))
    reference = multiclass_confusion_matrix(
        torch.from_numpy(pred), torch.from_numpy(label), 4, ignore_index=0
    )
    np.testing.assert_array_equal(ours, reference.numpy())
    assert ours[0].sum() == 0 and ours.sum() == (label != 0).sum()


def test_accumulation_is_int64_beyond_int32():
    # A Cityscapes train pass has ≈6.2e9 pixels: counts far beyond int32 must add exactly.
    near_limit = np.full((2, 2), 2**31 - 1, np.int32)
    total = None
    for _ in range(3):
        total = metrics.accumulate(total, near_limit)
    device_counts = metrics.confusion_matrix(np.zeros((4, 4)), np.zeros((4, 4)), 2)
    total = metrics.accumulate(total, device_counts)  # an int32 jax array from the device
    assert total.dtype == np.int64
    assert total[0, 0] == 3 * (2**31 - 1) + 16 and total[1, 1] == 3 * (2**31 - 1)
    big = np.array([[6_000_000_001, 7], [3, 2**40]], np.int64)
    result = metrics.compute_metrics(big)
    assert result["iou"][0] == pytest.approx(6_000_000_001 / 6_000_000_011, rel=1e-15)
    assert metrics.allreduce(big) is not None
    np.testing.assert_array_equal(metrics.allreduce(big), big)  # one process: unchanged


WORKER = textwrap.dedent(
    """
    import sys
    import jax
    import numpy as np
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from pan_jax import metrics
    pid = jax.process_index()
    # 2**30 + 7: a low digit with its top bit set (a 30-bit mask would drop it).
    local = np.array([[3 * 2**31 + pid, 2**31 + 2**30 + 7], [2**40 * (pid + 1), 0]], np.int64)
    print("SUM", metrics.allreduce(local).tolist(), flush=True)
    """
)


def test_allreduce_sums_int64_across_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    expected = [[2 * 3 * 2**31 + 1, 2 * (2**31 + 2**30 + 7)], [3 * 2**40, 0]]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert f"SUM {expected}" in out, (out, err[-2000:])
