"""The grain pipeline on a tiny pan_synthetic build: determinism, sharding, resume, augmentation."""

import hashlib
import io
import logging
import shutil
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from pan_jax import data
from pan_jax.data import pipeline, synthetic
from pan_jax.normalization import normalize_crops

NUM_TRAIN, NUM_VAL, SIZE = 32, 12, 48  # the registered 'tiny' config


def reference_crop(image, label, size, origin, crop, flip):
    """Resize the whole image, then crop and flip: what the pipeline must equal."""
    (nh, nw), (y0, x0), (ch, cw) = size, origin, crop
    ref = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)[y0 : y0 + ch, x0 : x0 + cw]
    ref_label = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST_EXACT)[
        y0 : y0 + ch, x0 : x0 + cw
    ]
    if flip:
        ref, ref_label = ref[:, ::-1], ref_label[:, ::-1]
    return ref, ref_label


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    cfg = data.default_data_config("pan_synthetic/tiny")
    cfg.data_dir = str(tmp_path_factory.mktemp("tfds"))
    cfg.crop_size = 32
    data.prepare(cfg)
    return cfg


def _copy(cfg, **overrides):
    cfg = cfg.copy_and_resolve_references()
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _take(ds, n):
    it = iter(ds)
    out = [next(it) for _ in range(n)]
    return out, it


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_normalization_uses_imagenet_statistics():
    np.testing.assert_allclose(data.IMAGENET_MEAN, 255 * np.array([0.485, 0.456, 0.406]), rtol=1e-6)
    np.testing.assert_allclose(data.IMAGENET_STD, 255 * np.array([0.229, 0.224, 0.225]), rtol=1e-6)


def test_train_batches_shapes_values_and_seed_determinism(cfg):
    ds = data.train_dataset(cfg, per_process_batch_size=4, seed=3, process_index=0, process_count=1)
    batches, _ = _take(ds, 6)
    for batch in batches:
        # uint8 crops (the train step normalizes on the device): a quarter of float32's bytes.
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].shape == (4, 32, 32) and batch["label"].dtype == np.uint8
        assert batch["image_size"].shape == (4, 2) and batch["image_size"].dtype == np.int32
        # What the trainer compiles its step for before the first batch is read.
        spec = data.train_batch_spec(cfg, 4)
        assert {key: (value.shape, value.dtype) for key, value in batch.items()} == spec
        values = set(np.unique(batch["label"]).tolist())
        assert values <= set(range(synthetic.NUM_CLASSES)) | {255}
    again, _ = _take(
        data.train_dataset(cfg, per_process_batch_size=4, seed=3, process_index=0, process_count=1),
        6,
    )
    _assert_batches_equal(batches, again)
    other, _ = _take(
        data.train_dataset(cfg, per_process_batch_size=4, seed=4, process_index=0, process_count=1),
        1,
    )
    assert not np.array_equal(batches[0]["image"], other[0]["image"])


def test_padding_is_zero_image_and_ignore_label(cfg):
    small = _copy(cfg, min_scale=0.5, max_scale=0.5)  # 48 px -> 24 px inside a 32 px crop
    (batch,), _ = _take(
        data.train_dataset(
            small, per_process_batch_size=4, seed=0, process_index=0, process_count=1
        ),
        1,
    )
    assert (batch["label"][:, 24:] == 255).all() and (batch["label"][:, :, 24:] == 255).all()
    assert (batch["label"][:, :24, :24] != 255).mean() > 0.5
    np.testing.assert_array_equal(batch["image_size"], [[24, 24]] * 4)
    # On the device the padding becomes 0, the mean pixel, as mmseg pads normalized images;
    # inside each crop the values are the host normalization's (evaluation's) within one float32
    # ulp (XLA divides by a constant through its reciprocal).
    images = np.asarray(jax.jit(normalize_crops)(batch["image"], batch["image_size"]))
    assert (images[:, 24:] == 0).all() and (images[:, :, 24:] == 0).all()
    expected = data.normalize(batch["image"][:, :24, :24])
    np.testing.assert_allclose(images[:, :24, :24], expected, rtol=0, atol=2.5e-7)
    # A crop shorter than wide: image_size is (height, width), and the device keeps rows by the
    # height and columns by the width (square crops could not show either swapped).
    record, _ = _pattern_record(height=24, width=16)
    out = _unscaled_crop(record)
    np.testing.assert_array_equal(out["image_size"], [24, 16])
    image = np.asarray(jax.jit(normalize_crops)(out["image"][None], out["image_size"][None]))[0]
    assert (image[24:] == 0).all() and (image[:, 16:] == 0).all()
    expected = data.normalize(record["image"])
    np.testing.assert_allclose(image[:24, :16], expected, rtol=0, atol=2.5e-7)


def _identity_cfg(cfg):
    """No augmentation: the batch images are the source images, so they identify them."""
    return _copy(cfg, min_scale=1.0, max_scale=1.0, flip=False, crop_size=SIZE)


def _fingerprints(images):
    return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]


def test_process_shards_are_disjoint_and_cover_each_epoch(cfg):
    plain = _identity_cfg(cfg)
    source = data.load_source(plain, "train")
    index_of = {fp: i for i, fp in enumerate(_fingerprints(r["image"] for r in source))}
    assert len(index_of) == NUM_TRAIN
    epochs = {0: [], 1: []}
    for process_index in (0, 1):
        ds = data.train_dataset(
            plain, per_process_batch_size=4, seed=0, process_index=process_index, process_count=2
        )
        batches, _ = _take(ds, 8)  # 2 epochs of 16 records per process
        seen = [index_of[fp] for b in batches for fp in _fingerprints(b["image"])]
        epochs[0].append(seen[:16])
        epochs[1].append(seen[16:])
    for epoch, (shard0, shard1) in epochs.items():
        assert not set(shard0) & set(shard1), epoch
        assert sorted(shard0 + shard1) == list(range(NUM_TRAIN)), epoch
    assert epochs[0][0] != epochs[1][0]  # reshuffled every epoch


def test_worker_processes_give_the_same_batches(cfg):
    ds0 = data.train_dataset(
        cfg, per_process_batch_size=4, seed=2, process_index=0, process_count=1
    )
    expected, _ = _take(ds0, 4)
    workers = _copy(cfg, num_workers=1)
    ds1 = data.train_dataset(
        workers, per_process_batch_size=4, seed=2, process_index=0, process_count=1
    )
    it = iter(ds1)
    try:
        _assert_batches_equal(expected, [next(it) for _ in range(4)])
    finally:
        it.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_run_continues_at_its_step_with_any_workers_or_processes(cfg, num_workers):
    # The trainer resumes the pipeline at batch `step` (one batch per step), not from grain's
    # iterator state, whose format depends on the number of workers: a run saved with 2 workers
    # failed to resume with 0 or 3 (KeyError / IndexError). With augmentation on: each record's
    # scale, crop and flip come from its global position, not from its place in a host's shard.
    ds = data.train_dataset(cfg, per_process_batch_size=4, seed=1, process_index=0, process_count=1)
    expected, _ = _take(ds, 7)
    resumed = data.train_dataset(
        _copy(cfg, num_workers=num_workers),
        per_process_batch_size=4,
        seed=1,
        process_index=0,
        process_count=1,
        start_batch=3,
    )
    it = iter(resumed)
    try:
        _assert_batches_equal(expected[3:], [next(it) for _ in range(4)])
    finally:
        if num_workers:
            it.close()
    # Two processes with half the batch each: the same global batches, split between them (the
    # augmentation, drawn after sharding, would give two hosts other crops than one host).
    halves = [
        _take(
            data.train_dataset(
                cfg, per_process_batch_size=2, seed=1, process_index=p, process_count=2,
                start_batch=3,
            ),
            4,
        )[0]
        for p in (0, 1)
    ]  # fmt: skip
    for step, batch in enumerate(expected[3:]):
        together = [image for half in halves for image in half[step]["image"]]
        assert sorted(_fingerprints(together)) == sorted(_fingerprints(batch["image"]))


def test_eval_yields_every_image_once_at_original_resolution(cfg):
    source = {r["file_name"]: r for r in data.load_source(cfg, "val")}
    assert len(source) == NUM_VAL
    names = []
    for process_index in (0, 1):
        for element in data.eval_dataset(cfg, process_index=process_index, process_count=2):
            reference = source[element["file_name"]]
            # uint8, as decoded: inference rescales it as uint8 and normalizes on the device.
            assert element["image"].shape == (SIZE, SIZE, 3) and element["image"].dtype == np.uint8
            np.testing.assert_array_equal(element["image"], reference["image"])
            assert element["label"].dtype == np.int32
            np.testing.assert_array_equal(element["label"], reference["label"])
            names.append(element["file_name"])
    assert sorted(names) == sorted(source)  # each once, none dropped (12 is not a multiple of 5)
    odd = list(data.eval_dataset(cfg, process_index=4, process_count=5))
    assert len(odd) == 2


def _unscaled_crop(record: dict) -> dict:
    """`train_transform` of `record` into a 32 px crop, at scale 1 and unflipped (13 classes)."""
    return pipeline.train_transform(
        record,
        np.random.default_rng(0),
        crop_size=32,
        min_scale=1.0,
        max_scale=1.0,
        flip=False,
        num_classes=13,
    )


def _pattern_record(height=70, width=90, block=10, seed=0):
    """Blocks of pseudo-random classes; the image colors each block by its class."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 13, size=(height // block + 1, width // block + 1))
    yy, xx = np.mgrid[0:height, 0:width]
    label = classes[yy // block, xx // block].astype(np.uint8)
    colors = rng.integers(0, 256, size=(13, 3)).astype(np.uint8)
    return {"image": colors[label], "label": label, "file_name": "pattern"}, colors


def test_scale_crop_flip_keep_image_and_label_aligned():
    record, colors = _pattern_record()
    flips, sizes = 0, set()
    for seed in range(60):
        rng = np.random.default_rng(seed)
        out = pipeline.train_transform(
            record, rng, crop_size=64, min_scale=0.5, max_scale=2.0, flip=True, num_classes=13
        )
        label = out["label"]
        image = out["image"].astype(np.float32)
        valid = label != 255
        sizes.add(int(valid.sum()))
        # Away from block edges (3x3 neighbourhood of one class) the pixel has its class' color.
        # Crop borders never count: their bilinear footprint reaches blocks outside the crop.
        padded = np.pad(label, 1, constant_values=-1)
        same = np.ones_like(valid)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                same &= padded[dy : dy + 64, dx : dx + 64] == label
        interior = valid & same
        assert interior.sum() > 100
        np.testing.assert_allclose(image[interior], colors[label[interior]], atol=1.5)
        # Is this output flipped? The left-most valid column must match a mirrored layout.
        flips += _is_flipped(record, out, rng_seed=seed)
    assert 15 < flips < 45 and len(sizes) > 10


def _is_flipped(record, out, rng_seed):
    rng = np.random.default_rng(rng_seed)
    unflipped = pipeline.train_transform(
        record, rng, crop_size=64, min_scale=0.5, max_scale=2.0, flip=False, num_classes=13
    )
    return int(not np.array_equal(unflipped["label"], out["label"]))


@pytest.mark.parametrize("crop_size", [64, 40])
def test_train_transform_equals_resize_then_crop_then_flip(crop_size):
    """Both code paths (whole-image resize, crop-window warp) match the textbook chain."""
    h, w = 61, 83
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 3 + yy) % 256, (yy * 4) % 256, ((xx - yy) * 2) % 256], -1).astype(
        np.uint8
    )
    image = cv2.GaussianBlur(image, (5, 5), 0)
    label = (((yy // 7) * 5 + (xx // 9) * 3) % 21).astype(np.uint8)
    record = {"image": image, "label": label, "file_name": "x"}
    paths = set()
    for seed in range(80):
        out = pipeline.train_transform(
            record,
            np.random.default_rng(seed),
            crop_size=crop_size,
            min_scale=0.5,
            max_scale=2.0,
            flip=True,
            num_classes=21,
        )
        rng = np.random.default_rng(seed)  # the same draws, in train_transform's order
        scale = rng.uniform(0.5, 2.0)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        ch, cw = min(crop_size, nh), min(crop_size, nw)
        y0, x0 = rng.integers(0, nh - ch + 1), rng.integers(0, nw - cw + 1)
        flip = bool(rng.random() < 0.5)
        paths.add(nh * nw <= pipeline._RESIZE_AREA_RATIO * ch * cw)
        ref, ref_label = reference_crop(image, label, (nh, nw), (y0, x0), (ch, cw), flip)
        got = out["image"][:ch, :cw].astype(np.float32)
        assert np.abs(got - ref).max() <= 1.01  # fixed-point interpolation rounding
        np.testing.assert_array_equal(out["label"][:ch, :cw], ref_label)
        assert (out["label"][ch:] == 255).all() and (out["label"][:, cw:] == 255).all()
        assert (out["image"][ch:] == 0).all() and (out["image"][:, cw:] == 0).all()
    assert paths == {True, False}


def test_crop_matrix_equals_resize_then_crop_then_flip():
    rng = np.random.default_rng(0)
    h, w = 61, 83
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([(xx * 3 + yy) % 256, (yy * 4) % 256, ((xx - yy) * 2) % 256], -1).astype(
        np.uint8
    )
    image = cv2.GaussianBlur(image, (5, 5), 0)
    label = (((yy // 7) * 5 + (xx // 9) * 3) % 21).astype(np.uint8)
    for _ in range(100):
        scale = rng.uniform(0.5, 2.0)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        ch, cw = min(64, nh), min(64, nw)
        y0, x0 = rng.integers(0, nh - ch + 1), rng.integers(0, nw - cw + 1)
        flip = bool(rng.random() < 0.5)
        matrix = pipeline.crop_matrix(h, w, nh, nw, y0, x0, cw, flip)
        flags = cv2.WARP_INVERSE_MAP
        warped = cv2.warpAffine(
            image, matrix, (cw, ch), flags=cv2.INTER_LINEAR | flags, borderMode=cv2.BORDER_REPLICATE
        )
        warped_label = cv2.warpAffine(
            label,
            matrix,
            (cw, ch),
            flags=cv2.INTER_NEAREST | flags,
            borderMode=cv2.BORDER_REPLICATE,
        )
        ref, ref_label = reference_crop(image, label, (nh, nw), (y0, x0), (ch, cw), flip)
        assert np.abs(warped.astype(int) - ref).max() <= 1  # fixed-point interpolation rounding
        np.testing.assert_array_equal(warped_label, ref_label)


# 13 = num_classes is the first value that is no class: refused as 30 is, by evaluation too,
# whose confusion matrix would drop such pixels without a word.
@pytest.mark.parametrize("value", [30, 13])
def test_label_outside_classes_names_the_file_and_field(value):
    record, _ = _pattern_record()
    record["label"] = record["label"].copy()
    record["label"][:] = value
    record["file_name"] = "2007_000042"
    expected = rf"2007_000042.*\[{value}\].*data.num_classes=13"
    with pytest.raises(ValueError, match=expected):
        _unscaled_crop(record)
    with pytest.raises(ValueError, match=expected):
        pipeline.eval_transform(record, num_classes=13)


def test_exif_orientation_is_ignored_as_by_pil():
    # Masks are drawn on the stored pixels: a JPEG decoded with its EXIF rotation would be
    # refused for its mask's shape (or, square, silently misaligned with it).
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG", quality=95, exif=exif)
    ok, label = cv2.imencode(".png", np.zeros((20, 30), np.uint8))
    assert ok
    record = pipeline.decode_record(jpeg.getvalue(), label.tobytes(), "rotated")
    reference = np.asarray(Image.open(jpeg))  # PIL leaves EXIF rotations to the caller
    assert record["image"].shape == reference.shape == (20, 30, 3)
    assert np.abs(record["image"].astype(int) - reference).max() <= 2  # libjpeg differences only


def _corrupt(cfg, tmp_path, split, index):
    """Copies the dataset and breaks the image bytes of one record; returns (cfg, its file name)."""
    shutil.copytree(cfg.data_dir, tmp_path / "tfds")
    cfg = _copy(cfg, data_dir=str(tmp_path / "tfds"))
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
    raw = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})[index]
    (path,) = [
        fi.filename for fi in tfds.core.data_sources.base.file_instructions(builder.info, split)
    ]
    reader = array_record_module.ArrayRecordReader(path)
    records = reader.read_all()
    reader.close()
    start = records[index].find(raw["image"])
    assert start > 0
    broken = bytearray(records[index])
    broken[start + 8 : start + 40] = b"\x00" * 32  # smash the PNG header chunk, same length
    records[index] = bytes(broken)
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    return cfg, raw["file_name"].decode(), path


def test_corrupt_record_error_names_the_file(cfg, tmp_path):
    broken, file_name, path = _corrupt(cfg, tmp_path, "train", 5)
    source = data.load_source(broken, "train")
    with pytest.raises(data.CorruptRecordError, match=rf"{file_name}.*{path}"):
        source[5]
    # In a union of splits, the first record of the second part is named by its own file (it was
    # named by the first part's).
    union = data.load_source(broken, "val[:5]+train[5:]")
    with pytest.raises(data.CorruptRecordError, match=rf"{file_name}.*record 5 \({path}\)"):
        union[5]
    ds = data.train_dataset(
        broken, per_process_batch_size=4, seed=0, process_index=0, process_count=1
    )
    with pytest.raises(Exception, match=file_name):
        _take(ds, 2 * NUM_TRAIN // 4)


def test_skip_corrupt_counts_and_reports(cfg, tmp_path, caplog):
    broken, file_name, _ = _corrupt(cfg, tmp_path, "val", 2)
    broken.skip_corrupt = True
    with caplog.at_level(logging.WARNING):
        out = list(data.eval_dataset(broken, process_index=0, process_count=1))
    assert len(out) == NUM_VAL - 1 and file_name not in {e["file_name"] for e in out}
    assert any(file_name in r.getMessage() and "1 so far" in r.getMessage() for r in caplog.records)
    # Training substitutes the next readable record: batches stay full.
    source = data.load_source(broken, "val", on_corrupt="substitute")
    assert source[2]["file_name"] == source[3]["file_name"] and source.num_skipped == 1
    broken.train_split = "val"
    batches, _ = _take(
        data.train_dataset(
            broken, per_process_batch_size=4, seed=0, process_index=0, process_count=1
        ),
        6,
    )
    assert all(b["image"].shape[0] == 4 for b in batches)


def test_user_errors_name_the_field(cfg, tmp_path):
    with pytest.raises(ValueError, match=r"data\.name='coco'"):
        data.default_data_config("coco")
    with pytest.raises(FileNotFoundError, match=r"not prepared.*prepare"):
        data.load_source(_copy(cfg, data_dir=str(tmp_path / "empty")), "train")
    with pytest.raises(ValueError, match="no split 'test'"):
        data.load_source(cfg, "test")
    with pytest.raises(ValueError, match="process_index=2"):
        data.eval_dataset(cfg, process_index=2, process_count=2)


@pytest.mark.parametrize("name", ["voc_aug", "cityscapes", "pan_synthetic"])
def test_default_data_config_has_the_interface_fields(name):
    cfg = data.default_data_config(name)
    fields = {
        "name",
        "data_dir",
        "manual_dir",
        "train_split",
        "eval_split",
        "num_classes",
        "crop_size",
        "min_scale",
        "max_scale",
        "flip",
        "num_workers",
        "skip_corrupt",
        "prefetch",
    }
    assert set(cfg.keys()) == fields
    assert (cfg.min_scale, cfg.max_scale, cfg.flip, cfg.num_workers) == (0.5, 2.0, True, 0)
    assert cfg.num_classes == len(data.class_names(name))
    cfg.data_dir = "/some/dir"  # placeholders accept a string override
    expected_crop = {"voc_aug": 512, "cityscapes": 768, "pan_synthetic": 128}[name]
    assert cfg.crop_size == expected_crop


def test_input_workers_outlive_a_ctrl_c_to_the_process_group():
    """Ctrl-C reaches the workers too; they must live until the trainer has saved and stopped."""
    code = (
        "import os, signal, time\n"
        "from pan_jax.data import pipeline\n"
        "pipeline._worker_init(0, 1)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.1)\n"
        "print('alive')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "alive" in result.stdout, result.stderr[-2000:]
