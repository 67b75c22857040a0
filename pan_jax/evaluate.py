"""Evaluation with the standard protocol: dataset-level mIoU at the original resolution.

Every image is scored at the resolution of its label: the logits of each view are resized to the
label size before the argmax (`pan_jax.inference`, which also says how views are merged and
inputs padded), and labels are never resized.

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

import jax
import numpy as np
from absl import logging
from etils import epath

from pan_jax import checkpointing, inference, metrics, sharding
from pan_jax.config_errors import ConfigError

REPORT_JSON = "eval_report.json"
REPORT_MD = "eval_report.md"


class ReportWriteError(OSError):
    """The reports of an evaluation whose figures were printed could not be written."""


# Device results waiting to be added to the host matrix: enough to keep the devices busy while
# the host prepares the next batch, few enough to bound device memory.
_MAX_PENDING = 4
# Images held back for a full batch, in batches: a dataset of many sizes (slide mode on VOC)
# must not pile up in host memory; past this the oldest batch runs incomplete.
_MAX_WAITING = 8
BATCH_AXIS = "batch"


# ----------------------------------------------------------------------------------------------
# A dataset.


@functools.partial(jax.jit, static_argnames=("num_classes", "averaged"))
def _score(scores: jax.Array, labels: jax.Array, num_classes: int, averaged: bool) -> jax.Array:
    """(B, C, C) confusion matrices, one per image: summed on the host, so the devices never
    wait for one another."""

    def one(scores: jax.Array, labels: jax.Array) -> jax.Array:
        predictions = inference.class_indices(scores, averaged)
        return metrics.confusion_matrix(labels, predictions, inference.mask_classes(num_classes))

    return jax.vmap(one)(scores, labels)


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
    name = element.get("file_name", f"element {index}")
    image, label = inference.checked_image(element["image"], name), np.asarray(element["label"])
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
    pad_multiple: int = inference.PAD_MULTIPLE,
    num_images_hint: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Dataset-level metrics of `model` over every element of `dataset` (this process's shard).

    Elements are {'image': uint8 (H, W, 3) RGB, or float normalized (`inference.checked_image`),
    'label': int (H', W') with 255 = ignore, ...}; the label size may differ from the image size
    (logits are resized to it). Returns `metrics.compute_metrics` of the confusion matrix summed
    over all processes, plus `confusion_matrix` (int64; 2 × 2 for a one-class model, whose masks
    hold 0 and 1), `num_images` (all processes) and the inference options. This is a collective
    with several processes: every process must call it. `num_images_hint` (this
    process's image count) only feeds the progress log's ETA. `devices`: those of this process
    to run on (default: all of them).
    """
    if num_classes != model.num_classes:
        raise ValueError(
            f"num_classes={num_classes}, but the model predicts {model.num_classes} classes"
        )
    options = inference.check_options(
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
    confusion = np.zeros((inference.mask_classes(num_classes),) * 2, np.int64)
    averaged = len(inference.views_of(options["scales"], flip)) > 1
    pending: collections.deque[jax.Array] = collections.deque()
    # Images waiting for a full batch, by what a batch must share (see `batch_key`).
    waiting: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = collections.defaultdict(list)
    num_images = 0
    start = last_log = time.perf_counter()

    def run(group: list[tuple[np.ndarray, np.ndarray]], padded_out: tuple[int, int]) -> None:
        nonlocal confusion, num_images, last_log
        images = [image for image, _ in group]
        labels = [inference.pad_to(label.astype(np.int32), *padded_out, metrics.IGNORE_LABEL)
                  for _, label in group]  # fmt: skip
        out_sizes = [label.shape for _, label in group]
        fillers = batch_size - len(group)  # copies of an image that count for nothing
        images += [images[0]] * fillers
        out_sizes += [out_sizes[0]] * fillers
        labels += [np.full(padded_out, metrics.IGNORE_LABEL, np.int32)] * fillers
        labels = inference.to_devices(np.stack(labels), batch_sharding)
        scores = inference.merged_scores(
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
        # slide mode: the size itself, which places the windows. And the kind of image: stacked
        # with float ones, uint8 images would be read as normalized.
        if options["mode"] == "whole":
            shapes = inference.view_shapes(image.shape[:2], options["scales"], multiple, min_size)
        else:
            shapes = image.shape[:2]
        return (shapes, image.dtype), padded_out

    for index, element in enumerate(dataset):
        image, label = _checked(element, index)
        padded_out = inference.padded_shape(label.shape, multiple, min_size)
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
    return (
        tuple(names)
        if names
        else tuple(f"class_{i}" for i in range(inference.mask_classes(num_classes)))
    )


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


def images_of_this_process(num_images: int) -> int:
    """How many of `num_images` this process scores: eval datasets deal images round robin."""
    return len(range(jax.process_index(), num_images, jax.process_count()))


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
        options = inference.check_options(
            mode=_get(eval_config, "mode", "whole"),
            scales=_get(eval_config, "scales", (1.0,)),
            crop_size=_get(eval_config, "crop_size", None),
            stride=_get(eval_config, "stride", None),
            pad_multiple=_get(eval_config, "pad_multiple", inference.PAD_MULTIPLE),
            where="config.eval.",
        )
    except ValueError as error:
        raise ConfigError(str(error)) from None
    options["flip"] = bool(_get(eval_config, "flip", False))
    return options


def evaluate(config: Any, workdir: str | os.PathLike, *, step: int | None = None) -> dict[str, Any]:
    """Evaluates the latest (or `step`) checkpoint of `workdir` on `config.data.eval_split`.

    Uses `config.eval` (see `eval_options`), prints the mIoU, writes `eval_report.json` and
    `eval_report.md` into the workdir (process 0) and returns the JSON report.
    """
    from pan_jax import data  # tfds/grain: only the dataset side needs them.

    options = eval_options(config.get("eval") if hasattr(config, "get") else None)
    model, variables, spec, step = inference.load_model(workdir, step)
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
    share = images_of_this_process(expected)
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
        try:  # a run read where this user cannot write (main lets --mode=eval read it)
            json_path, md_path = write_report(workdir, report, names)
        except OSError as error:
            raise ReportWriteError(
                f"cannot write {REPORT_JSON} and {REPORT_MD} into {workdir} "
                f"({error.strerror or error}); the figures are in the line above"
            ) from error
        logging.info("Wrote %s and %s", json_path, md_path)
    return report_to_json(report, names)
