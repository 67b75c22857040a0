"""Cityscapes: label ids -> trainIds equal cityscapesscripts' table, through tfds' own builder."""

import io
import pathlib
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from cityscapesscripts.helpers import labels as cs_labels
from PIL import Image

from pan_jax import data
from pan_jax.data import cityscapes

CITIES = {"train": ["aachen", "bochum"], "val": ["frankfurt"], "test": ["berlin"]}
H, W = 24, 48  # tfds declares 1024x2048 but stores the PNG bytes as given; small keeps it fast.


def _reference_train_id(label_id: int) -> int:
    label = cs_labels.id2label.get(label_id)
    if label is None or label.ignoreInEval or label.trainId in (-1, 255):
        return 255
    return label.trainId


def test_train_id_lut_equals_cityscapesscripts_for_every_id():
    lut = data.cityscapes_train_id_lut()
    assert lut.shape == (256,) and lut.dtype == np.uint8
    for label_id in range(256):
        assert lut[label_id] == _reference_train_id(label_id), label_id
    # The table's own trainId column agrees (ids not in the table, e.g. 34..255, are ignore).
    for label in cs_labels.labels:
        if label.id >= 0:
            assert lut[label.id] == (255 if label.trainId < 0 else label.trainId), label.name
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))


def test_label_id_lut_inverts_train_ids_for_the_test_server():
    inverse = data.cityscapes_label_id_lut()
    for train_id in range(19):
        label = cs_labels.id2label[int(inverse[train_id])]
        assert label.trainId == train_id and not label.ignoreInEval
        assert cs_labels.trainId2label[train_id].id == inverse[train_id]
    assert inverse[255] == 0  # 'unlabeled'
    predicted = np.arange(19).reshape(1, 19)
    np.testing.assert_array_equal(
        data.cityscapes_train_id_lut()[cityscapes.train_ids_to_label_ids(predicted)], predicted
    )
    # Past trainId 18 (255: ignore) is 'unlabeled'; a negative value, no trainId at all, was
    # wrapped around to the table's last entry and written as 'unlabeled' too.
    np.testing.assert_array_equal(cityscapes.train_ids_to_label_ids([[19, 255]]), [[0, 0]])
    for values in ([[-1, 3]], [[3, 256]]):
        with pytest.raises(ValueError, match=r"expected trainIds 0\.\.18 \(or up to 255"):
            cityscapes.train_ids_to_label_ids(np.array(values, np.int32))
    assert [cs_labels.trainId2label[t].name for t in range(19)] == list(cityscapes.CLASS_NAMES)


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def make_zips(manual_dir):
    """leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip in Cityscapes' layout."""
    manual_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_ids = np.arange(34, dtype=np.uint8)  # Every label id that appears in labelIds PNGs.
    label_ids = {}
    left = zipfile.ZipFile(manual_dir / "leftImg8bit_trainvaltest.zip", "w")
    fine = zipfile.ZipFile(manual_dir / "gtFine_trainvaltest.zip", "w")
    with left, fine:
        for split, cities in CITIES.items():
            for city in cities:
                for frame in (19, 20):
                    stem = f"{city}_000000_{frame:06d}"
                    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                    ids = rng.choice(all_ids, size=(H, W)).astype(np.uint8)
                    ids.flat[: len(all_ids)] = all_ids
                    label_ids[stem] = ids
                    left.writestr(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", _png(image))
                    base = f"gtFine/{split}/{city}/{stem}_gtFine"
                    fine.writestr(f"{base}_labelIds.png", _png(ids))
                    fine.writestr(f"{base}_color.png", _png(image))
                    fine.writestr(f"{base}_instanceIds.png", _png(ids.astype(np.uint16) * 1000))
                    fine.writestr(f"{base}_polygons.json", "{}")
    return label_ids


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cityscapes")
    label_ids = make_zips(tmp_path / "manual")
    cfg = data.default_data_config("cityscapes")
    cfg.data_dir = str(tmp_path / "tfds")
    cfg.manual_dir = str(tmp_path / "manual")
    data.prepare(cfg)
    return cfg, label_ids


def test_tfds_cityscapes_records_get_train_ids(built):
    cfg, label_ids = built
    assert (cfg.train_split, cfg.eval_split, cfg.num_classes) == ("train", "validation", 19)
    reference = np.array([_reference_train_id(i) for i in range(256)], np.uint8)
    for split, cities in (("train", CITIES["train"]), ("validation", CITIES["val"])):
        records = list(data.load_source(cfg, split))
        assert sorted(r["file_name"] for r in records) == sorted(
            f"{c}_000000_{f:06d}" for c in cities for f in (19, 20)
        )
        for record in records:
            raw = label_ids[record["file_name"]]
            np.testing.assert_array_equal(record["label"], reference[raw])
            assert record["image"].shape == (H, W, 3)


def test_eval_dataset_yields_train_ids_at_full_resolution(built):
    cfg, label_ids = built
    out = list(data.eval_dataset(cfg, process_index=0, process_count=1))
    assert len(out) == 2
    for element in out:
        assert element["label"].dtype == np.int32 and element["label"].shape == (H, W)
        np.testing.assert_array_equal(
            element["label"], data.cityscapes_train_id_lut()[label_ids[element["file_name"]]]
        )


def make_coarse_zips(manual_dir):
    """The extra config's zips: gtCoarse.zip (train, val, train_extra) + leftImg8bit_trainextra."""
    rng = np.random.default_rng(1)
    coarse = zipfile.ZipFile(manual_dir / "gtCoarse.zip", "w")
    extra = zipfile.ZipFile(manual_dir / "leftImg8bit_trainextra.zip", "w")
    with coarse, extra:
        for split, cities in {**CITIES, "train_extra": ["erlangen"]}.items():
            if split == "test":
                continue
            for city in cities:
                for frame in (19, 20):
                    stem = f"{city}_000000_{frame:06d}"
                    ids = rng.integers(0, 34, (H, W), dtype=np.uint8)
                    coarse.writestr(
                        f"gtCoarse/{split}/{city}/{stem}_gtCoarse_labelIds.png", _png(ids)
                    )
                    if split == "train_extra":
                        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                        extra.writestr(
                            f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", _png(image)
                        )


def test_coarse_validation_is_refused_coarse_training_allowed(built):
    cfg, _ = built
    make_coarse_zips(pathlib.Path(cfg.manual_dir))
    cfg = cfg.copy_and_resolve_references()
    cfg.name = "cityscapes/semantic_segmentation_extra"
    data.prepare(cfg)
    with pytest.raises(ValueError, match="coarse labels"):
        data.load_source(cfg, "validation")
    with pytest.raises(ValueError, match="coarse labels"):
        data.eval_dataset(cfg, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="coarse labels"):  # not only the expression's first part
        data.load_source(cfg, "train_extra[:1]+validation")
    assert len(data.load_source(cfg, "train_extra")) == 2


def test_split_unions_are_read_and_each_part_checked(built):
    cfg, _ = built
    both = len(data.load_source(cfg, "train")) + len(data.load_source(cfg, "validation"))
    assert len(data.load_source(cfg, "train+validation")) == both  # e.g. for the test server
    with pytest.raises(ValueError, match=r"no split 'val' \(in 'train\+val\[:1\]'"):
        data.load_source(cfg, "train+val[:1]")


def test_missing_zips_error_says_where_they_come_from(tmp_path):
    cfg = data.default_data_config("cityscapes")
    cfg.data_dir = str(tmp_path / "tfds")
    cfg.manual_dir = str(tmp_path / "manual")
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "unrelated.txt").write_text("x")
    with pytest.raises(
        FileNotFoundError, match=r"gtFine_trainvaltest\.zip MISSING.*cityscapes-dataset\.com"
    ):
        data.prepare(cfg)
    assert not tfds.builder("cityscapes/semantic_segmentation", data_dir=cfg.data_dir).is_prepared()


def test_the_extra_configs_missing_zips_are_the_ones_named(tmp_path):
    make_zips(tmp_path / "manual")  # the fine config's zips: the extra one needs other labels
    cfg = data.default_data_config("cityscapes/semantic_segmentation_extra")
    cfg.data_dir, cfg.manual_dir = str(tmp_path / "tfds"), str(tmp_path / "manual")
    with pytest.raises(FileNotFoundError) as error:
        data.prepare(cfg)
    message = str(error.value)
    assert "leftImg8bit_trainvaltest.zip found" in message
    assert "leftImg8bit_trainextra.zip MISSING" in message
    assert "gtCoarse.zip MISSING" in message
    assert "gtFine" not in message


def test_a_tilde_in_data_dir_and_manual_dir_is_the_home_folder(built, tmp_path, monkeypatch):
    # The shell leaves `~` in --config.data.data_dir=~/tfds (a word, not an assignment): tfds
    # made a folder named ~ in the working directory, and every zip of ~/manual was MISSING.
    cfg, _ = built
    working = tmp_path / "working"
    working.mkdir()
    monkeypatch.chdir(working)
    monkeypatch.setenv("HOME", str(pathlib.Path(cfg.data_dir).parent))
    tilde = data.default_data_config("cityscapes")
    tilde.data_dir = "~/tfds"
    data.prepare(tilde)  # found prepared
    assert len(data.load_source(tilde, "validation")) == len(data.load_source(cfg, "validation"))
    monkeypatch.setenv("HOME", str(tmp_path))
    make_zips(tmp_path / "manual")  # the fine config's: the extra one needs more
    extra = data.default_data_config("cityscapes/semantic_segmentation_extra")
    extra.data_dir, extra.manual_dir = "~/extra", "~/manual"
    with pytest.raises(FileNotFoundError) as error:
        data.prepare(extra)
    assert f"{tmp_path / 'manual' / 'leftImg8bit_trainvaltest.zip'} found" in str(error.value)
    assert not list(working.iterdir())


def test_label_ids_past_33_are_refused_not_ignored():
    # A trainIds PNG (255 for void) or another file where *_labelIds.png belongs would otherwise
    # train on shifted classes, its unknown values silently ignored.
    assert max(label.id for label in cs_labels.labels) == cityscapes.MAX_LABEL_ID
    spec = data.pipeline.dataset_spec("cityscapes")
    image = _png(np.zeros((4, 6, 3), np.uint8))
    ids = np.full((4, 6), 33, np.uint8)
    record = data.pipeline.decode_record(image, _png(ids), "a", spec.label_lut, spec.max_label_id)
    assert (record["label"] == 18).all()  # bicycle
    ids[0, 0] = 255
    with pytest.raises(ValueError, match=r"value 255: expected label ids 0\.\.33"):
        data.pipeline.decode_record(image, _png(ids), "a", spec.label_lut, spec.max_label_id)


@pytest.mark.parametrize(
    "stray", ["leftImg8bit/train/aachen/Thumbs.db", "leftImg8bit/val/README.txt"]
)
def test_stray_file_among_images_is_refused_naming_zip_and_entry(tmp_path, stray):
    # tfds' builder takes an image id from every file in a city folder: any other file gave
    # "AttributeError: 'NoneType' object has no attribute 'groups'", after extracting everything.
    make_zips(tmp_path / "manual")
    with zipfile.ZipFile(tmp_path / "manual" / "leftImg8bit_trainvaltest.zip", "a") as left:
        left.writestr(stray, b"not an image")
        left.writestr("leftImg8bit/README", "top-level files outside the split folders are fine")
    cfg = data.default_data_config("cityscapes")
    cfg.data_dir, cfg.manual_dir = str(tmp_path / "tfds"), str(tmp_path / "manual")
    expected = rf"leftImg8bit_trainvaltest\.zip: \['{stray}'\] \(1 in all\)"
    with pytest.raises(ValueError, match=expected):
        data.prepare(cfg)
    assert not (tmp_path / "tfds" / "downloads" / "extracted").exists()  # refused before extracting


def test_truncated_zip_is_refused_naming_it(tmp_path):
    make_zips(tmp_path / "manual")
    fine = tmp_path / "manual" / "gtFine_trainvaltest.zip"
    fine.write_bytes(fine.read_bytes()[:200])
    cfg = data.default_data_config("cityscapes")
    cfg.data_dir, cfg.manual_dir = str(tmp_path / "tfds"), str(tmp_path / "manual")
    with pytest.raises(ValueError, match=r"gtFine_trainvaltest\.zip: not a readable zip"):
        data.prepare(cfg)
