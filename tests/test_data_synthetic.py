"""pan_synthetic: deterministic, shapes (not colors) carry the class, sizes vary, void band."""

import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pan_jax import data
from pan_jax.config_errors import ConfigError
from pan_jax.data import synthetic

DEFAULT = synthetic.PanSynthetic.BUILDER_CONFIGS[0]


def _sample(config, split, n):
    pairs = [synthetic.generate_example(config, split, i) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _color_rule_miou(train, val, levels, num_classes=synthetic.NUM_CLASSES):
    """Dataset-level mIoU on `val` of the best lookup rule quantized color -> class on `train`."""

    def bins(images):
        q = images.astype(np.int64) * levels // 256
        return (q[..., 0] * levels + q[..., 1]) * levels + q[..., 2]

    (train_images, train_labels), (val_images, val_labels) = train, val
    keep = train_labels != 255
    votes = np.zeros((levels**3, num_classes), np.int64)
    np.add.at(votes, (bins(train_images)[keep], train_labels[keep].astype(np.int64)), 1)
    rule = votes.argmax(axis=1)  # Unseen colors -> class 0 (background, the majority).
    pred = rule[bins(val_images)]
    keep = val_labels != 255
    conf = np.bincount(
        val_labels[keep].astype(np.int64) * num_classes + pred[keep], minlength=num_classes**2
    ).reshape(num_classes, num_classes)
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore"):
        return float(np.nanmean(inter / union))


@pytest.fixture(scope="module")
def samples():
    return _sample(DEFAULT, "train", 240), _sample(DEFAULT, "val", 80)


@pytest.mark.parametrize("levels", [8, 32])
def test_best_color_rule_scores_at_most_0_3_miou(samples, levels):
    train, val = samples
    assert _color_rule_miou(train, val, levels) <= 0.3


def test_color_rule_test_detects_color_coded_classes(samples):
    """The same rule on a copy whose colors follow the class scores high: the test has power."""
    (_, train_labels), (_, val_labels) = samples
    rng = np.random.default_rng(0)

    def recolor(labels):
        image = synthetic.PALETTE[labels % len(synthetic.PALETTE)]
        return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)

    # 13 classes over 12 palette colors: two classes share one color, so not quite 1.0.
    miou = _color_rule_miou(
        (recolor(train_labels), train_labels), (recolor(val_labels), val_labels), 8
    )
    assert miou > 0.75


def test_classes_shapes_sizes_and_void_band(samples):
    (images, labels), _ = samples
    assert images.shape == (240, 128, 128, 3) and images.dtype == np.uint8
    present = set(np.unique(labels).tolist())
    assert present == set(range(synthetic.NUM_CLASSES)) | {255}
    assert synthetic.NUM_CLASSES - 1 >= 10
    # Objects from a few % of the image to a large part of it.
    fractions = [(lab == c).mean() for lab in labels for c in np.unique(lab) if 0 < c < 255]
    assert min(fractions) < 0.03 and max(fractions) > 0.3
    # Each class covers a range of sizes, not a fixed one (so size is no shortcut either).
    for c in range(1, synthetic.NUM_CLASSES):
        per_image = [(lab == c).mean() for lab in labels if (lab == c).any()]
        assert max(per_image) > 3 * min(per_image), c
    # Void band of the default config along boundaries; none without it.
    assert 0.02 < (labels == 255).mean() < 0.15
    no_void = dataclasses.replace(DEFAULT, void_width=0)
    assert not (synthetic.generate_example(no_void, "train", 0)[1] == 255).any()


def test_background_is_textured(samples):
    (images, labels), _ = samples
    # Background pixels of most images vary far more than the 8-level pixel noise.
    stds = [images[i][labels[i] == 0].std(axis=0).max() for i in range(len(images))]
    assert np.median(stds) > 20


def test_deterministic_from_seed():
    a = synthetic.generate_example(DEFAULT, "train", 7)
    b = synthetic.generate_example(DEFAULT, "train", 7)
    c = synthetic.generate_example(dataclasses.replace(DEFAULT, seed=1), "train", 7)
    d = synthetic.generate_example(DEFAULT, "val", 7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])


def _generate_recording_objects(monkeypatch, config, index):
    """generate_example's (label, [(class, mask) of every object drawn, in drawing order])."""
    drawn = []
    shape_mask = synthetic._shape_mask

    def recording(cls, rng, size):
        drawn.append((cls, shape_mask(cls, rng, size)))
        return drawn[-1][1]

    monkeypatch.setattr(synthetic, "_shape_mask", recording)
    _, label = synthetic.generate_example(config, "train", index)
    return label, drawn


def test_smaller_objects_are_painted_over_larger_ones(monkeypatch):
    # Painted small-first, large objects would hide the small ones they overlap.
    no_void = dataclasses.replace(DEFAULT, void_width=0)
    hidden = 0
    for index in range(8):
        label, drawn = _generate_recording_objects(monkeypatch, no_void, index)
        # Each pixel shows the smallest object over it (of equal ones, the later drawn).
        order = sorted(range(len(drawn)), key=lambda i: (drawn[i][1].sum(), -i))
        expected = np.zeros_like(label)
        covered = np.zeros(label.shape, bool)
        for i in order:
            cls, mask = drawn[i]
            expected[mask & ~covered] = cls
            covered |= mask
        np.testing.assert_array_equal(label, expected, err_msg=str(index))
        hidden += sum(mask.sum() > (label == cls)[mask].sum() for cls, mask in drawn)
    assert hidden > 0  # the objects do overlap


def test_object_counts_include_max_objects(monkeypatch):
    # Were max_objects exclusive, 2..5 objects would draw 2 to 4, and min_objects = max_objects
    # would raise.
    config = dataclasses.replace(DEFAULT, min_objects=1, max_objects=2)
    counts = {len(_generate_recording_objects(monkeypatch, config, i)[1]) for i in range(12)}
    assert counts == {1, 2}


def test_tfds_build_matches_generator(tmp_path):
    config = synthetic.SyntheticConfig(name="test_small", image_size=40, num_train=6, num_val=3)
    builder = tfds.builder("pan_synthetic", config=config, data_dir=tmp_path)
    builder.download_and_prepare(file_format="array_record")
    assert builder.info.splits["train"].num_examples == 6
    assert builder.info.splits["val"].num_examples == 3
    source = builder.as_data_source("val")
    for record in source:
        name = record["file_name"].decode()
        image, mask = synthetic.generate_example(config, "val", int(name.split("_")[1]))
        np.testing.assert_array_equal(record["image"], image)
        np.testing.assert_array_equal(record["mask"][..., 0], mask)


def test_default_config_fields():
    cfg = data.default_data_config("pan_synthetic")
    assert cfg.num_classes == synthetic.NUM_CLASSES == len(data.class_names("pan_synthetic"))
    assert (cfg.train_split, cfg.eval_split, cfg.crop_size) == ("train", "val", 128)
    assert DEFAULT.image_size == 128


def test_a_dataset_folder_without_its_info_is_refused_and_kept(tmp_path):
    # A copy cut short leaves the version folder without dataset_info.json: tfds would reuse it
    # ("Reusing dataset") and every reader would fail on it later.
    cfg = data.default_data_config("pan_synthetic")
    cfg.name, cfg.data_dir = "pan_synthetic/tiny", str(tmp_path)
    folder = tmp_path / "pan_synthetic" / "tiny" / "1.0.0"
    folder.mkdir(parents=True)
    (folder / "pan_synthetic-train.array_record-00000-of-00001").write_bytes(b"partial")
    with pytest.raises(ConfigError, match="holds no prepared dataset"):  # main: one line
        data.prepare(cfg)
    assert (folder / "pan_synthetic-train.array_record-00000-of-00001").exists()


def test_a_data_dir_or_class_count_that_cannot_be_is_refused_before_building(tmp_path):
    # A file as data_dir was a NotADirectoryError traceback; a wrong class count a ValueError
    # traceback once the dataset was built and the workdir written.
    cfg = data.default_data_config("pan_synthetic")
    cfg.name, cfg.data_dir = "pan_synthetic/tiny", str(tmp_path / "file")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"data\.data_dir=.*file is a file: expected a dir"):
        data.prepare(cfg)
    cfg.data_dir, cfg.num_classes = str(tmp_path / "tfds"), 5
    with pytest.raises(ConfigError, match=r"data\.num_classes=5, but pan_synthetic/tiny has 13"):
        data.prepare(cfg)
    assert not (tmp_path / "tfds").exists()
