r"""Input-pipeline throughput: images/s per worker process, and what bounds it.

    python -m pan_jax.data.bench_input [--num_images=48] [--repeats=5] [--workers=1,2]

Generates its own files in a temp dir (no dataset needed): VOC-sized JPEGs (500x375, photo-like
texture, ~100 KB) with single-channel label PNGs, and Cityscapes-sized PNGs (2048x1024) with
labelIds PNGs. Then it times, per image and in one process with one cv2 thread:
  decode  - JPEG/PNG -> uint8 arrays (what SegmentationSource does after reading the record),
  augment - scale/crop/flip to a uint8 crop (pipeline.train_transform; normalization runs on
            the accelerator, in the train step),
and the whole grain training pipeline (pipeline.train_pipeline: shuffle, random_map, batch 16)
with 0, 1, 2 ... worker processes. Reading the ArrayRecord file and parsing the tf.Example
(well under 0.1 ms per record) is left out: the records are held in memory.
Reported numbers are medians over --repeats runs.
"""

import functools
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence

import cv2
import ml_collections
import numpy as np
from absl import app, flags

from pan_jax.data import cityscapes, pipeline

_NUM_IMAGES = flags.DEFINE_integer("num_images", 48, "VOC-sized images (Cityscapes: a quarter).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "Worker-process counts for the grain runs.")
_BATCH = flags.DEFINE_integer("batch", 16, "Per-host batch size of the grain runs.")


def _photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Multi-scale noise + edges: compresses like a photo (VOC JPEGs average ~100 KB)."""
    image = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in ((4, 90.0), (16, 40.0), (64, 20.0), (256, 10.0)):
        field = rng.normal(0.0, amplitude, (max(2, cells * height // width), cells, 3))
        image += cv2.resize(
            field.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC
        )
    image += rng.normal(0.0, 6.0, image.shape)
    return np.clip(image + 128.0, 0, 255).astype(np.uint8)


def _label_like(
    rng: np.random.Generator, height: int, width: int, num_ids: int, band: bool
) -> np.ndarray:
    label = np.zeros((height, width), np.uint8)
    for _ in range(6):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        axes = (
            int(rng.integers(width // 16, width // 3)),
            int(rng.integers(height // 16, height // 3)),
        )
        cv2.ellipse(
            label,
            (int(cx), int(cy)),
            axes,
            float(rng.uniform(0, 180)),
            0,
            360,
            int(rng.integers(1, num_ids)),
            -1,
        )
    if band:  # VOC's 255 boundary band
        edges = cv2.dilate(label, np.ones((5, 5), np.uint8)) != cv2.erode(
            label, np.ones((5, 5), np.uint8)
        )
        label[edges] = 255
    return label


def _write_files(directory: str, kind: str, count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        if kind == "voc":
            height, width = (375, 500) if i % 4 else (500, 375)  # some portrait images, as in VOC
            image_path = os.path.join(directory, f"voc_{i}.jpg")
            image = _photo_like(rng, height, width)
            cv2.imwrite(image_path, image, [cv2.IMWRITE_JPEG_QUALITY, 92])
            label = _label_like(rng, height, width, 21, band=True)
        else:
            height, width = 1024, 2048
            image_path = os.path.join(directory, f"cityscapes_{i}.png")
            cv2.imwrite(image_path, _photo_like(rng, height, width))
            label = _label_like(rng, height, width, 34, band=False)
        label_path = os.path.join(directory, f"{kind}_{i}_label.png")
        cv2.imwrite(label_path, label)
        paths.append((image_path, label_path))
    return paths


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class BytesSource(Sequence):
    """Encoded records held in memory; decodes like pipeline.SegmentationSource."""

    def __init__(self, records: list[tuple[bytes, bytes]], label_lut: np.ndarray | None):
        self._records, self._lut = records, label_lut

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        image, label = self._records[index]
        return pipeline.decode_record(image, label, f"record_{index}", self._lut)


def _timed(fn, repeats: int) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of fn(). CPU time is what one core spends; wall time
    also counts waiting for a core, which on a shared machine can be much longer."""
    cpu, wall = [], []
    for _ in range(repeats):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - start_cpu)
        wall.append(time.perf_counter() - start_wall)
    return statistics.median(cpu), statistics.median(wall)


def _stages(
    source: BytesSource, config: ml_collections.ConfigDict, repeats: int
) -> dict[str, tuple]:
    """Median (CPU, wall) seconds per image of each stage, in this process, one cv2 thread."""
    n = len(source)
    transform = functools.partial(
        pipeline.train_transform,
        crop_size=config.crop_size,
        min_scale=config.min_scale,
        max_scale=config.max_scale,
        flip=True,
        num_classes=config.num_classes,
    )
    raw = source._records
    decoded = [source[i] for i in range(n)]
    rngs = [np.random.default_rng(i) for i in range(n)]
    stages = {
        "decode image": lambda: [pipeline._decode_image(r[0]) for r in raw],
        "decode label": lambda: [pipeline._decode_label(r[1]) for r in raw],
        "scale/crop/flip": lambda: [transform(d, g) for d, g in zip(decoded, rngs, strict=True)],
    }
    if source._lut is not None:  # Cityscapes: label ids → train ids, as decode_record does
        labels = [pipeline._decode_label(r[1]) for r in raw]
        stages["label ids → classes"] = lambda: [source._lut[label] for label in labels]
    return {name: tuple(t / n for t in _timed(fn, repeats)) for name, fn in stages.items()}


def _pipeline_rate(
    source: BytesSource,
    config: ml_collections.ConfigDict,
    num_workers: int,
    batch: int,
    num_batches: int,
    repeats: int,
) -> float:
    """Median images/s of the grain training pipeline with `num_workers` processes."""
    config = config.copy_and_resolve_references()
    config.num_workers = num_workers
    config.prefetch = 4
    rates = []
    for r in range(repeats):
        ds = pipeline.train_pipeline(
            source, config, per_process_batch_size=batch, seed=r, process_index=0, process_count=1
        )
        it = iter(ds)
        for _ in range(max(2, num_workers * 2)):  # start-up: spawn, imports, first batches
            next(it)
        start = time.perf_counter()
        for _ in range(num_batches):
            next(it)
        rates.append(num_batches * batch / (time.perf_counter() - start))
        if hasattr(it, "close"):
            it.close()
    return statistics.median(rates)


def _config(name: str, crop_size: int, num_classes: int) -> ml_collections.ConfigDict:
    config = pipeline.default_data_config(name)
    config.crop_size, config.num_classes = crop_size, num_classes
    return config


def run(num_images: int, repeats: int, workers: list[int], batch: int) -> str:
    cv2.setNumThreads(1)  # Per-core numbers: one cv2 thread, like a grain worker.
    lines = [
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, OpenCV {cv2.__version__}, "
        f"{time.strftime('%Y-%m-%d')}",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cases = [
            (
                "VOC-sized JPEG ~500x375 -> 512x512 crop",
                "voc",
                num_images,
                _config("voc_aug", 512, 21),
                None,
            ),
            (
                "Cityscapes-sized PNG 2048x1024 -> 768x768 crop",
                "cityscapes",
                max(4, num_images // 4),
                _config("cityscapes", 768, 19),
                cityscapes.cityscapes_train_id_lut(),
            ),
        ]
        for title, kind, count, config, lut in cases:
            paths = _write_files(tmp, kind, count)
            records = [(_read(i), _read(label)) for i, label in paths]
            source = BytesSource(records, lut)
            mean_kb = np.mean([len(r[0]) for r in records]) / 1e3
            stages = _stages(source, config, repeats)
            cpu = sum(v[0] for k, v in stages.items() if not k.startswith("  "))
            wall = sum(v[1] for k, v in stages.items() if not k.startswith("  "))
            lines += [f"### {title}", "", f"{count} images, mean file size {mean_kb:.0f} KB", ""]
            lines += [
                "| stage (1 process, 1 cv2 thread) | CPU ms/image | wall ms/image | CPU share |",
                "|---|---|---|---|",
            ]
            for stage, (c, w) in stages.items():
                lines.append(f"| {stage} | {c * 1e3:.2f} | {w * 1e3:.2f} | {c / cpu:.0%} |")
            lines += [
                f"| **sum** | {cpu * 1e3:.2f} | {wall * 1e3:.2f} | |",
                "",
                f"**{1 / cpu:.0f} img/s per core** (CPU time); {1 / wall:.0f} img/s wall-clock "
                f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)",
                "",
            ]
            lines += [
                f"| grain train pipeline, batch {batch} (wall) | img/s | img/s per worker |",
                "|---|---|---|",
            ]

            for n in [0, *workers]:
                # Enough batches that the timed part spans several rounds of every worker.
                num_batches = max(8, 3 * n) if kind == "voc" else max(3, n)
                rate = _pipeline_rate(source, config, n, batch, num_batches, max(1, repeats // 2))
                label = "in-process (4 reader threads)" if n == 0 else f"{n} worker process(es)"
                per = f"{rate / n:.0f}" if n else "-"
                lines.append(f"| {label} | {rate:.0f} | {per} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    del argv
    print(run(_NUM_IMAGES.value, _REPEATS.value, [int(w) for w in _WORKERS.value], _BATCH.value))


if __name__ == "__main__":  # The guard grain's spawned workers need.
    app.run(main)
