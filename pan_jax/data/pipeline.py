"""The grain input pipeline: tfds ArrayRecord sources -> augmented host batches.

    source (random access, decoded to numpy)
      -> seed(seed).shuffle().repeat()      global order, reshuffled every epoch, same on all hosts
      -> random_map(scale/crop/flip)        RNG from (seed, global position): reproducible
      -> [process_index::process_count]     disjoint host shards that cover every epoch
      -> batch(per_process_batch_size)      in the MapDataset, so batches do not depend on workers
      -> [start_batch:]                     a resumed run starts at its step
      -> to_iter_dataset(...) [-> mp_prefetch(num_workers)]

Augmenting before sharding seeds every record's augmentation by its *global* position, so two
hosts never share a random stream. Batch k is a fixed function of (seed, k, process layout): a
run resumed at step k (`start_batch=k`, one batch per step) sees exactly the batches it would
have seen, with any number of data workers, and with another number of processes the same
global batches. grain's own iterator state is not used: its format depends on the workers.

Scale, crop and flip follow cv2.resize's pixel-center convention. While the rescaled image is at
most ~4 crops (VOC-sized inputs) it is resized whole and cropped; above that (Cityscapes at 2x)
one cv2.warpAffine computes only the crop window, so the cost follows the crop, not the rescaled
frame. Both give the same pixels up to interpolation rounding; labels use nearest neighbour at
the same pixel centers, so image and mask stay aligned (tests check both paths).
"""

import dataclasses
import functools
import os
import signal
from collections.abc import Sequence
from typing import Any

import cv2
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging
from etils import epath
from tensorflow_datasets.core.data_sources import base as tfds_data_sources

from pan_jax.config_errors import ConfigError
from pan_jax.data import cityscapes, synthetic, voc_aug

IGNORE_LABEL = 255

# Below this (rescaled area / crop area) train_transform resizes the whole image, above it warps
# only the crop window; both give the same pixels up to interpolation rounding.
_RESIZE_AREA_RATIO = 4.0


class CorruptRecordError(ValueError):
    """A record that cannot be read or decoded; the message names its file."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to read one dataset's tfds records."""

    tfds_name: str
    image_key: str
    label_key: str
    file_name_key: str
    class_names: tuple[str, ...]
    label_lut: np.ndarray | None = None  # applied to decoded labels (Cityscapes ids -> trainIds)
    # Larger values before the table mean a wrong file (a trainIds PNG where ids belong).
    max_label_id: int | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def dataset_spec(name: str) -> DatasetSpec:
    """`name` is 'voc_aug', 'cityscapes' or 'pan_synthetic', optionally '/<tfds config>'."""
    base, _, config = name.partition("/")
    if base == "voc_aug":
        return DatasetSpec(name, "image", "mask", "file_name", voc_aug.CLASS_NAMES)
    if base == "pan_synthetic":
        return DatasetSpec(name, "image", "mask", "file_name", synthetic.CLASS_NAMES)
    if base == "cityscapes":
        config = config or "semantic_segmentation"
        if config not in cityscapes.TFDS_CONFIGS:
            raise ConfigError(
                f"data.name={name!r}: tfds config {config!r} has no semantic labels; "
                f"expected one of {cityscapes.TFDS_CONFIGS}"
            )
        return DatasetSpec(
            f"cityscapes/{config}",
            "image_left",
            "segmentation_label",
            "image_id",
            cityscapes.CLASS_NAMES,
            cityscapes.cityscapes_train_id_lut(),
            cityscapes.MAX_LABEL_ID,
        )
    raise ConfigError(
        f"data.name={name!r}: expected 'voc_aug', 'cityscapes' or 'pan_synthetic' "
        "(optionally followed by '/<tfds config>', e.g. 'pan_synthetic/tiny')"
    )


def class_names(name: str) -> tuple[str, ...]:
    """Class names of dataset `name`, index = label value."""
    return dataset_spec(name).class_names


def default_data_config(name: str) -> ml_collections.ConfigDict:
    """The data fields of a run config for dataset `name`, with the paper's augmentation."""
    base = name.partition("/")[0]
    per_dataset = {
        "voc_aug": ("train_aug", "val", 512),
        "cityscapes": ("train", "validation", 768),
        "pan_synthetic": ("train", "val", 128),
    }
    if base not in per_dataset:
        dataset_spec(name)  # Raises with the list of known names.
    train_split, eval_split, crop_size = per_dataset[base]
    config = ml_collections.ConfigDict(
        {
            "name": name,
            # Placeholders keep the fields typed as str, so --config.data.data_dir=... works.
            "data_dir": ml_collections.config_dict.placeholder(str),
            "manual_dir": ml_collections.config_dict.placeholder(str),
            "train_split": train_split,
            "eval_split": eval_split,
            "num_classes": dataset_spec(name).num_classes,
            "crop_size": crop_size,
            "min_scale": 0.5,
            "max_scale": 2.0,
            "flip": True,
            "num_workers": 0,  # grain worker processes; 0 = decode in the training process.
            "skip_corrupt": False,
            "prefetch": 2,  # batches buffered per worker (or by the reader threads).
        }
    )
    config.lock()  # a misspelt field in a config file is an error, not a new field
    return config


def _checked_spec(data_config: Any) -> DatasetSpec:
    """The dataset's spec, refusing a class count that is not the dataset's."""
    spec = dataset_spec(data_config.name)
    if data_config.num_classes != spec.num_classes:
        raise ConfigError(
            f"data.num_classes={data_config.num_classes}, but {data_config.name} has "
            f"{spec.num_classes} classes"
        )
    return spec


def _config_path(data_config: Any, field: str) -> str | None:
    """config.data.<field> with `~` expanded, as a shell would: tfds takes a `~` literally (the
    shell leaves it in --config.data.data_dir=~/tfds, a word, not an assignment)."""
    value = getattr(data_config, field, None)
    return os.path.expanduser(value) if value else value


def _builder(data_config: Any) -> tuple[DatasetSpec, tfds.core.DatasetBuilder]:
    spec = _checked_spec(data_config)
    data_dir = _config_path(data_config, "data_dir")
    if data_dir and epath.Path(data_dir).exists() and not epath.Path(data_dir).is_dir():
        raise ConfigError(f"data.data_dir={data_dir} is a file: expected a directory")
    return spec, tfds.builder(spec.tfds_name, data_dir=data_dir)


def prepare(data_config: Any) -> None:
    """Builds the tfds dataset as ArrayRecord if it is not built yet; a no-op otherwise.

    tfds writes into a temporary directory and renames it when done, so a failed build leaves
    an existing prepared dataset untouched and no half-built one behind. With a data_dir shared
    by several hosts, run it once (e.g. on process 0, then a barrier) before the others read.
    """
    spec, builder = _builder(data_config)
    if builder.is_prepared():
        _check_random_access(builder)
        return
    if epath.Path(builder.data_path).exists():  # tfds would reuse it, and nothing could read it
        raise ConfigError(
            f"{builder.data_path} exists but holds no prepared dataset (dataset_info.json): a "
            "copy cut short? Move it away (it is not deleted for you) and run again to rebuild."
        )
    manual_dir = _config_path(data_config, "manual_dir")
    if spec.tfds_name.startswith("cityscapes"):
        default_manual_dir = epath.Path(builder.data_dir_root) / "downloads" / "manual"
        cityscapes.check_manual_zips(
            manual_dir or default_manual_dir, spec.tfds_name.partition("/")[2]
        )
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(file_format="array_record", download_config=download_config)


def _check_random_access(builder: tfds.core.DatasetBuilder) -> None:
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" not in formats:
        raise ValueError(
            f"{builder.name}: the dataset in {builder.data_dir} is stored as {sorted(formats)}, "
            "but grain needs random access (array_record). Rebuild it into another data_dir "
            "(data.data_dir) or delete it and call prepare() again."
        )


def num_examples(data_config: Any, split: str) -> int:
    """Number of records in `split` of the configured dataset (prepared)."""
    return len(load_source(data_config, split))


def _decode_image(data: bytes) -> np.ndarray:
    # IGNORE_ORIENTATION: masks are drawn on the stored pixels, so an EXIF rotation would
    # misalign them (PIL and tf.image ignore EXIF too).
    image = cv2.imdecode(
        np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    )
    if image is None:
        raise ValueError("the image bytes are not a decodable JPEG/PNG")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _decode_label(data: bytes) -> np.ndarray:
    label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise ValueError("the label bytes are not a decodable PNG")
    if label.ndim == 3 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.ndim != 2 or label.dtype != np.uint8:
        # A palette PNG stored as-is would arrive here as colors: refuse rather than train on them.
        raise ValueError(
            f"expected a single-channel 8-bit label PNG, got shape {label.shape} {label.dtype}"
        )
    return label


def decode_record(
    image_bytes: bytes,
    label_bytes: bytes,
    file_name: str,
    label_lut: np.ndarray | None = None,
    max_label_id: int | None = None,
) -> dict[str, Any]:
    """Encoded image/label -> {'image': uint8 (H, W, 3), 'label': uint8 (H, W), 'file_name'}."""
    image = _decode_image(image_bytes)
    label = _decode_label(label_bytes)
    if image.shape[:2] != label.shape:
        raise ValueError(f"image is {image.shape[:2]} but label is {label.shape} (height, width)")
    if max_label_id is not None and label.size and int(label.max()) > max_label_id:
        raise ValueError(
            f"label holds the value {int(label.max())}: expected label ids 0..{max_label_id} "
            "(is it a trainIds or color PNG instead of *_labelIds.png?)"
        )
    if label_lut is not None:
        label = label_lut[label]
    return {"image": image, "label": label, "file_name": file_name}


class SegmentationSource(Sequence):
    """Random-access source of decoded records over a prepared tfds ArrayRecord split.

    on_corrupt: 'raise' (error naming the file), 'skip' (return None: the record disappears
    from the pipeline) or 'substitute' (return the next readable record, so training batches
    stay full). Skips are logged with a running count, kept in `self.num_skipped` (per process).
    """

    def __init__(
        self, spec: DatasetSpec, split: str, data_dir: str | None, on_corrupt: str = "raise"
    ):
        if on_corrupt not in ("raise", "skip", "substitute"):
            raise ValueError(f"on_corrupt={on_corrupt!r}: expected 'raise', 'skip' or 'substitute'")
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"{spec.tfds_name} is not prepared in {builder.data_dir}: call "
                "pan_jax.data.prepare(config.data) first (or `tfds build "
                "--file_format=array_record`)"
            )
        _check_random_access(builder)
        config = spec.tfds_name.partition("/")[2]
        # tfds' split expressions: "train", "train[:10%]", "train+validation[:5]".
        for split_name in (part.split("[")[0].strip() for part in split.split("+")):
            if split_name not in builder.info.splits:
                raise ConfigError(
                    f"{spec.tfds_name} has no split {split_name!r} (in {split!r}: "
                    f"data.train_split / data.eval_split); it has {sorted(builder.info.splits)}"
                )
            if split_name in cityscapes.COARSE_EVAL_SPLITS.get(config, ()):
                raise ConfigError(
                    f"{spec.tfds_name}/{split_name} has coarse labels (tfds puts gtCoarse into "
                    "every split of this config); use name='cityscapes' (semantic_segmentation) "
                    "to evaluate"
                )
        self.spec, self.split, self.on_corrupt = spec, split, on_corrupt
        self.num_skipped = 0
        skip = tfds.decode.SkipDecoding()  # Decoded here, with errors that name the file.
        self._source = builder.as_data_source(
            split, decoders={spec.image_key: skip, spec.label_key: skip}
        )
        instructions = tfds_data_sources.file_instructions(builder.info, split)
        self._files = [(fi.filename, fi.take) for fi in instructions]

    def __len__(self) -> int:
        return len(self._source)

    def _file_of(self, index: int) -> str:
        for filename, take in self._files:
            if index < take:
                return filename
            index -= take
        return "?"

    def _read(self, index: int) -> dict[str, Any]:
        where = (
            f"{self.spec.tfds_name} split {self.split!r} record {index} ({self._file_of(index)})"
        )
        try:
            record = self._source[index]
            file_name = record[self.spec.file_name_key]
            file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
        except Exception as e:  # Unreadable ArrayRecord chunk or unparsable example.
            raise CorruptRecordError(f"cannot read {where}: {e}") from e
        try:
            return decode_record(
                record[self.spec.image_key],
                record[self.spec.label_key],
                file_name,
                self.spec.label_lut,
                self.spec.max_label_id,
            )
        except Exception as e:
            raise CorruptRecordError(f"cannot decode {file_name!r}, {where}: {e}") from e

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} of {self.spec.tfds_name}/{self.split} ({n} records)")
        index %= n
        for attempt in range(n):
            try:
                return self._read((index + attempt) % n)
            except CorruptRecordError as e:
                if self.on_corrupt == "raise":
                    raise
                self.num_skipped += 1
                logging.warning(
                    "Skipping corrupt record (%d so far in this process): %s", self.num_skipped, e
                )
                if self.on_corrupt == "skip":
                    return None
        raise CorruptRecordError(f"{self.spec.tfds_name} split {self.split!r}: no readable record")

    def __repr__(self) -> str:
        return f"SegmentationSource({self.spec.tfds_name!r}, split={self.split!r}, n={len(self)})"


def load_source(
    data_config: Any, split: str, *, on_corrupt: str | None = None
) -> SegmentationSource:
    """Random-access decoded records {'image': uint8 (H, W, 3), 'label': uint8 (H, W), 'file_name'}.

    Labels are class indices (Cityscapes: trainIds) with 255 = ignore. on_corrupt defaults to
    'skip' with data.skip_corrupt, else 'raise'.
    """
    spec = _checked_spec(data_config)
    if on_corrupt is None:
        on_corrupt = "skip" if getattr(data_config, "skip_corrupt", False) else "raise"
    return SegmentationSource(spec, split, _config_path(data_config, "data_dir"), on_corrupt)


def _invalid_label_table(num_classes: int) -> np.ndarray:
    table = np.ones((256,), np.uint8)
    table[:num_classes] = 0
    table[IGNORE_LABEL] = 0
    return table


def _check_labels(label: np.ndarray, invalid: np.ndarray, num_classes: int, file_name: str) -> None:
    if cv2.LUT(label, invalid).max():  # A table lookup: ~10x cheaper than two comparisons.
        values = np.unique(label[invalid[label].astype(bool)])
        raise ValueError(
            f"{file_name}: label values {values.tolist()} are neither classes "
            f"0..{num_classes - 1} (data.num_classes={num_classes}) nor 255 (ignore)"
        )


def crop_matrix(
    height: int,
    width: int,
    scaled_height: int,
    scaled_width: int,
    y0: int,
    x0: int,
    crop_width: int,
    flip: bool,
) -> np.ndarray:
    """2x3 map from crop pixels to source pixels for resize -> crop at (y0, x0) -> h-flip.

    Uses cv2.resize's pixel-center convention, src = (dst + 0.5) * src_size / dst_size - 0.5,
    so warping with it (WARP_INVERSE_MAP) reproduces resize-then-crop-then-flip.
    """
    ry, rx = height / scaled_height, width / scaled_width
    if flip:  # Crop column x shows scaled column x0 + crop_width - 1 - x.
        ax, bx = -rx, rx * (x0 + crop_width - 0.5) - 0.5
    else:
        ax, bx = rx, rx * (x0 + 0.5) - 0.5
    return np.array([[ax, 0.0, bx], [0.0, ry, ry * (y0 + 0.5) - 0.5]], np.float64)


def train_transform(
    record: dict[str, Any],
    rng: np.random.Generator,
    *,
    crop_size: int,
    min_scale: float,
    max_scale: float,
    flip: bool,
    num_classes: int,
) -> dict[str, np.ndarray]:
    """Random scale, random crop, random flip of a decoded record.

    Returns {'image': uint8 (crop, crop, 3), 'label': uint8 (crop, crop), 'image_size': int32
    (2,)}: a crop smaller than `crop_size` (a small image) is padded bottom/right with label 255
    and image 0, and `image_size` = its (height, width) tells the train step, which normalizes
    on the device (`normalization.normalize_crops`), to set the padding to 0 after normalizing
    (the mean pixel, as mmseg pads).
    """
    image, label = record["image"], record["label"]
    height, width = label.shape
    scale = rng.uniform(min_scale, max_scale)
    scaled_h, scaled_w = max(1, round(height * scale)), max(1, round(width * scale))
    crop_h, crop_w = min(crop_size, scaled_h), min(crop_size, scaled_w)
    y0 = int(rng.integers(0, scaled_h - crop_h + 1))
    x0 = int(rng.integers(0, scaled_w - crop_w + 1))
    flipped = bool(rng.random() < 0.5) and flip  # Always drawn: same stream with flip on/off.
    if scaled_h * scaled_w <= _RESIZE_AREA_RATIO * crop_h * crop_w:
        # Resizing the whole image costs ~4x less per pixel than a warp (SIMD-tuned), so it wins
        # while the rescaled image is at most ~4 crops (always for VOC-sized inputs).
        window = (slice(y0, y0 + crop_h), slice(x0, x0 + crop_w))
        image = cv2.resize(image, (scaled_w, scaled_h), interpolation=cv2.INTER_LINEAR)[window]
        # NEAREST_EXACT samples pixel centers like the linear resize; plain INTER_NEAREST is
        # shifted by up to half a source pixel and would misalign mask and image.
        label = cv2.resize(label, (scaled_w, scaled_h), interpolation=cv2.INTER_NEAREST_EXACT)[
            window
        ]
        if flipped:
            image, label = cv2.flip(image, 1), cv2.flip(label, 1)
    else:  # Large rescaled image (e.g. Cityscapes at 2x): compute only the crop window.
        matrix = crop_matrix(height, width, scaled_h, scaled_w, y0, x0, crop_w, flipped)
        warp = functools.partial(
            cv2.warpAffine, M=matrix, dsize=(crop_w, crop_h), borderMode=cv2.BORDER_REPLICATE
        )
        image = warp(image, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        label = warp(label, flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
    _check_labels(label, _invalid_label_table(num_classes), num_classes, record["file_name"])
    if (crop_h, crop_w) == (crop_size, crop_size):
        out_image, out_label = image, label
    else:
        out_image = np.zeros((crop_size, crop_size, 3), np.uint8)
        out_image[:crop_h, :crop_w] = image
        out_label = np.full((crop_size, crop_size), IGNORE_LABEL, np.uint8)
        out_label[:crop_h, :crop_w] = label
    image_size = np.array([crop_h, crop_w], np.int32)
    return {"image": out_image, "label": out_label, "image_size": image_size}


def eval_transform(record: dict[str, Any], *, num_classes: int) -> dict[str, Any]:
    """Original resolution: the uint8 image (inference rescales it as uint8, as mmseg does, and
    normalizes it on the device), int32 label, file name."""
    _check_labels(
        record["label"], _invalid_label_table(num_classes), num_classes, record["file_name"]
    )
    return {
        "image": record["image"],
        "label": record["label"].astype(np.int32),
        "file_name": record["file_name"],
    }


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Only when asked: the data layer itself does not need jax.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    return process_index, process_count


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    cv2.setNumThreads(1)  # One core per worker: cv2's own thread pool would oversubscribe.
    # Ctrl-C reaches the whole process group: the training process saves a checkpoint and
    # stops, which needs its workers alive until then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _read_and_prefetch(ds: grain.MapDataset, data_config: Any) -> grain.IterDataset:
    num_workers = int(getattr(data_config, "num_workers", 0))
    prefetch = max(1, int(getattr(data_config, "prefetch", 2)))
    # In a worker, one thread per process; in the training process a few threads overlap the
    # GIL-free cv2 work.
    threads = 1 if num_workers > 0 else 4
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(prefetch, threads))
    )
    if num_workers > 0:
        # grain reads an absl flag in mp_prefetch; outside absl.app.run (pytest, notebooks) the
        # flags are unparsed and that read raises (google/grain#1355).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch),
            worker_init_fn=_worker_init,
        )
    return it_ds


def train_pipeline(
    source: Sequence[dict],
    data_config: Any,
    *,
    per_process_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    start_batch: int = 0,
) -> grain.IterDataset:
    """The training chain over any decoded-record source (see the module docstring), from its
    `start_batch`-th batch on (a resumed run: one batch per step)."""
    if per_process_batch_size < 1:
        raise ValueError(f"per_process_batch_size={per_process_batch_size}, expected >= 1")
    transform = functools.partial(
        train_transform,
        crop_size=int(data_config.crop_size),
        min_scale=float(data_config.min_scale),
        max_scale=float(data_config.max_scale),
        flip=bool(data_config.flip),
        num_classes=int(data_config.num_classes),
    )
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    ds = ds.random_map(transform)
    ds = ds[process_index::process_count]
    ds = ds.batch(per_process_batch_size, drop_remainder=True)
    # Random access: batch k is the same whatever the number of processes or workers and
    # wherever the iteration starts, so a run resumes at its step, not at a saved iterator
    # state (whose format depends on data.num_workers).
    ds = ds[start_batch:]
    return _read_and_prefetch(ds, data_config)


def train_dataset(
    data_config: Any,
    *,
    per_process_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    start_batch: int = 0,
) -> grain.IterDataset:
    """Infinite per-host training batches, from the `start_batch`-th on.

    Yields {'image': uint8 (B, crop, crop, 3), 'label': uint8 (B, crop, crop), 'image_size':
    int32 (B, 2)} (see `train_transform`; the train step normalizes on the device).
    process_index/count default to jax.process_index()/process_count().
    """
    process_index, process_count = _process(process_index, process_count)
    on_corrupt = "substitute" if getattr(data_config, "skip_corrupt", False) else "raise"
    source = load_source(data_config, data_config.train_split, on_corrupt=on_corrupt)
    return train_pipeline(
        source,
        data_config,
        per_process_batch_size=per_process_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        start_batch=start_batch,
    )


def train_batch_spec(data_config: Any, batch_size: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{key: (shape, dtype)} of `train_dataset`'s batches of `batch_size` rows, known before the
    first one is read (the trainer compiles its step from it while the input pipeline starts)."""
    crop = int(data_config.crop_size)
    return {
        "image": ((batch_size, crop, crop, 3), np.uint8),
        "label": ((batch_size, crop, crop), np.uint8),
        "image_size": ((batch_size, 2), np.int32),
    }


def eval_dataset(
    data_config: Any, *, process_index: int | None = None, process_count: int | None = None
) -> grain.IterDataset:
    """One image per element, at original resolution, every image of data.eval_split once.

    Yields {'image': uint8 (H, W, 3) RGB, 'label': int32 (H, W), 'file_name': str};
    process p gets records p, p + count, ... (none dropped; with data.skip_corrupt, corrupt
    records are left out and logged).
    """
    process_index, process_count = _process(process_index, process_count)
    source = load_source(data_config, data_config.eval_split)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.map(functools.partial(eval_transform, num_classes=int(data_config.num_classes)))
    ds = _read_and_prefetch(ds, data_config)
    if int(getattr(data_config, "num_workers", 0)) > 0:
        # Worker outputs live in shared memory that is unlinked when the array dies; callers
        # often keep eval outputs (predictions, reports), so hand out ordinary arrays. Cheap
        # next to a full-resolution forward pass; training batches skip this copy.
        ds = ds.map(_own_arrays)
    return ds


def _own_arrays(element: dict[str, Any]) -> dict[str, Any]:
    return {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in element.items()}
