"""voc_aug from a tiny VOCdevkit tar and SBD tgz in the real layouts and formats."""

import dataclasses
import hashlib
import io
import os
import shutil
import socket
import tarfile
import types
import urllib.parse

import cv2
import numpy as np
import pytest
import scipy.io
import scipy.sparse
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from pan_jax import data
from pan_jax.data import voc_aug

# VOC train / val; SBD train / val, chosen to exercise every branch of the train_aug rule.
A, B, C, D, E = "2007_000032", "2007_000039", "2008_000008", "2007_000033", "2008_000009"
S1, S2, S3, S4 = "2008_000100", "2008_000101", "2009_000200", "2009_000201"
VOC_TRAIN, VOC_VAL = [A, B, C], [D, E]
SBD_TRAIN, SBD_VAL = [B, D, S1, S2], [C, S3, S4]  # B, C also in VOC train; D in VOC val.
EXPECTED_TRAIN_AUG = sorted({A, B, C, S1, S2, S3, S4})
GRAY, CMYK = S1, C  # A grayscale JPEG (SBD mask) and a CMYK JPEG (VOC mask).
ONLY_IN_SBD_IMG = S4  # Not in VOC JPEGImages: the builder must fall back to SBD img/.
ALL_IDS = sorted({*VOC_TRAIN, *VOC_VAL, *SBD_TRAIN, *SBD_VAL})


def _voc_palette() -> list[int]:
    """The VOC color map (bit-interleaved), as in VOCdevkit's VOClabelcolormap.m."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _size(image_id):
    k = ALL_IDS.index(image_id)
    return 30 + 4 * k, 44 - 2 * k  # (height, width), different per image.


def _voc_mask(image_id):
    """Blocks of two classes with a 255 band on their boundary and around the border."""
    h, w = _size(image_id)
    k = ALL_IDS.index(image_id)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : 3 * h // 4, w // 4 : w // 2] = 1 + k
    mask[h // 4 : 3 * h // 4, w // 2 : 3 * w // 4] = 20 - k
    band = np.zeros_like(mask, bool)
    band[h // 4 - 1 : 3 * h // 4 + 1, w // 4 - 1 : 3 * w // 4 + 1] = True
    band[h // 4 + 1 : 3 * h // 4 - 1, w // 4 + 1 : 3 * w // 4 - 1] = False
    band[:, w // 2] = band[:, w // 2] | (mask[:, w // 2] > 0)
    mask[band] = 255
    return mask


def _sbd_mask(image_id):
    """Different from the VOC mask of the same id (so precedence shows), no 255."""
    h, w = _size(image_id)
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, :] = 7
    mask[h // 2 :, w // 3 :] = 15
    return mask


def _image(image_id):
    h, w = _size(image_id)
    y, x = np.mgrid[0:h, 0:w]
    k = ALL_IDS.index(image_id)
    return np.stack([x * 5 + k, y * 7, (x + y) * 3 + 40 * k], -1).clip(0, 255).astype(np.uint8)


def _jpeg(image_id) -> bytes:
    image = Image.fromarray(_image(image_id))
    if image_id == GRAY:
        image = image.convert("L")
    elif image_id == CMYK:
        image = image.convert("CMYK")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _png_p(mask) -> bytes:
    image = Image.fromarray(mask)  # mode 'L'; putpalette makes it a palette ('P') image.
    image.putpalette(_voc_palette())
    assert image.mode == "P"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _mat(mask) -> bytes:
    boundaries = np.empty((20, 1), dtype=object)
    for i in range(20):
        boundaries[i, 0] = scipy.sparse.csc_matrix(mask.shape, dtype=bool)
    buffer = io.BytesIO()
    categories = np.unique(mask[(mask > 0) & (mask < 255)]).astype(np.uint8)
    scipy.io.savemat(
        buffer,
        {
            "GTcls": {
                "Segmentation": mask,
                "Boundaries": boundaries,
                "CategoriesPresent": categories,
            }
        },
    )
    return buffer.getvalue()


def _add(tar, name, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_archives(manual_dir, voc_masks=None, sbd_masks=None, drop=()):
    """Writes VOCtrainval_11-May-2012.tar and benchmark.tgz; returns the masks written."""
    voc_masks = voc_masks or {i: _voc_mask(i) for i in VOC_TRAIN + VOC_VAL}
    sbd_masks = sbd_masks or {i: _sbd_mask(i) for i in SBD_TRAIN + SBD_VAL}
    manual_dir.mkdir(parents=True, exist_ok=True)
    root = "VOCdevkit/VOC2012/"
    with tarfile.open(manual_dir / voc_aug.VOC.file_name, "w") as tar:
        for image_id in ALL_IDS:
            if image_id != ONLY_IN_SBD_IMG:
                _add(tar, f"{root}JPEGImages/{image_id}.jpg", _jpeg(image_id))
        for image_id, mask in voc_masks.items():
            if image_id not in drop:
                _add(tar, f"{root}SegmentationClass/{image_id}.png", _png_p(mask))
        lists = {"train": VOC_TRAIN, "val": VOC_VAL, "trainval": sorted(VOC_TRAIN + VOC_VAL)}
        for name, ids in lists.items():
            _add(
                tar,
                f"{root}ImageSets/Segmentation/{name}.txt",
                "".join(i + "\n" for i in ids).encode(),
            )
    root = "benchmark_RELEASE/dataset/"
    with tarfile.open(manual_dir / voc_aug.SBD.file_name, "w:gz") as tar:
        for image_id, mask in sbd_masks.items():
            _add(tar, f"{root}img/{image_id}.jpg", _jpeg(image_id))
            _add(tar, f"{root}cls/{image_id}.mat", _mat(mask))
        _add(tar, f"{root}train.txt", "".join(i + "\n" for i in SBD_TRAIN).encode())
        _add(tar, f"{root}val.txt", "".join(i + "\n" for i in SBD_VAL).encode())
    return voc_masks, sbd_masks


def _config(tmp_path):
    cfg = data.default_data_config("voc_aug")
    cfg.data_dir = str(tmp_path / "tfds")
    cfg.manual_dir = str(tmp_path / "manual")
    return cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("voc")
    masks = make_archives(tmp_path / "manual")
    cfg = _config(tmp_path)
    data.prepare(cfg)
    return cfg, masks


def _records(cfg, split):
    return {r["file_name"]: r for r in data.load_source(cfg, split)}


def test_splits_follow_the_train_aug_rule(built):
    cfg, _ = built
    builder = tfds.builder("voc_aug", data_dir=cfg.data_dir)
    assert builder.info.file_format.value == "array_record"
    expected = {
        "train_aug": EXPECTED_TRAIN_AUG,
        "val": sorted(VOC_VAL),
        "train": sorted(VOC_TRAIN),
        "trainval": sorted(VOC_TRAIN + VOC_VAL),
    }
    for split, ids in expected.items():
        assert sorted(_records(cfg, split)) == ids, split
    raw = builder.as_data_source("train_aug", decoders={"image": tfds.decode.SkipDecoding()})
    sources = {r["file_name"].decode(): r["source"].decode() for r in raw}
    assert sources == {i: "voc" if i in VOC_TRAIN else "sbd" for i in EXPECTED_TRAIN_AUG}


def test_labels_are_indices_and_voc_mask_wins(built):
    cfg, (voc_masks, sbd_masks) = built
    train_aug = _records(cfg, "train_aug")
    for image_id, record in train_aug.items():
        expected = voc_masks[image_id] if image_id in VOC_TRAIN else sbd_masks[image_id]
        np.testing.assert_array_equal(record["label"], expected, err_msg=image_id)
    # B and C are in SBD too, with other masks: the VOC mask (with its 255 band) won.
    for image_id in (B, C):
        assert (train_aug[image_id]["label"] == 255).any()
        assert not np.array_equal(train_aug[image_id]["label"], sbd_masks[image_id])
    for image_id, record in _records(cfg, "val").items():
        np.testing.assert_array_equal(record["label"], voc_masks[image_id])
        assert set(np.unique(record["label"])) <= set(range(21)) | {255}


def test_images_rgb_jpeg_bytes_kept_gray_and_cmyk_converted(built):
    cfg, _ = built
    builder = tfds.builder("voc_aug", data_dir=cfg.data_dir)
    raw = {
        r["file_name"].decode(): r["image"]
        for r in builder.as_data_source("train_aug", decoders={"image": tfds.decode.SkipDecoding()})
    }
    records = _records(cfg, "train_aug")
    for image_id in EXPECTED_TRAIN_AUG:
        image = records[image_id]["image"]
        assert image.shape == (*_size(image_id), 3) and image.dtype == np.uint8
        reference = np.asarray(Image.open(io.BytesIO(_jpeg(image_id))).convert("RGB"))
        if image_id in (GRAY, CMYK):
            # Converted once at build time, stored losslessly: exactly PIL's RGB.
            np.testing.assert_array_equal(image, reference)
            assert raw[image_id][:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert raw[image_id] == _jpeg(image_id)  # original bytes
            assert np.abs(image.astype(int) - reference).max() <= 2  # libjpeg differences only
    gray = records[GRAY]["image"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_compute_splits_rule_on_random_lists():
    rng = np.random.default_rng(0)
    universe = [f"{2007 + i // 100}_{i:06d}" for i in range(400)]
    for _ in range(20):
        train, val = set(), set()
        for i in universe:
            r = rng.random()
            if r < 0.2:
                train.add(i)
            elif r < 0.35:
                val.add(i)
        sbd_train = set(rng.choice(universe, 150, replace=False))
        sbd_val = set(rng.choice(universe, 60, replace=False))
        splits = voc_aug.compute_splits(
            sorted(train), sorted(val), sorted(train | val), sorted(sbd_train), sorted(sbd_val)
        )
        train_aug = dict(splits["train_aug"])
        assert set(train_aug) == (train | sbd_train | sbd_val) - val
        assert all((src == "voc") == (i in train) for i, src in train_aug.items())
        assert [i for i, _ in splits["val"]] == sorted(val)


def test_inconsistent_lists_are_rejected():
    with pytest.raises(voc_aug.VocAugError, match="share"):
        voc_aug.compute_splits([A, B], [B], [A, B], [], [])
    with pytest.raises(voc_aug.VocAugError, match=r"trainval\.txt"):
        voc_aug.compute_splits([A], [B], [A], [], [])


def _prepare_expecting(tmp_path, error, match, **archive_kwargs):
    make_archives(tmp_path / "manual", **archive_kwargs)
    cfg = _config(tmp_path)
    with pytest.raises(error, match=match):
        data.prepare(cfg)
    # The failed build left no prepared dataset behind: the next call builds again.
    assert not tfds.builder("voc_aug", data_dir=cfg.data_dir).is_prepared()


def test_bad_mask_value_names_the_file(tmp_path):
    masks = {i: _voc_mask(i) for i in VOC_TRAIN + VOC_VAL}
    masks[E][0, 0] = 42
    _prepare_expecting(
        tmp_path, voc_aug.VocAugError, rf"SegmentationClass/{E}\.png.*\[42\]", voc_masks=masks
    )


def test_size_mismatch_names_both_files(tmp_path):
    masks = {i: _sbd_mask(i) for i in SBD_TRAIN + SBD_VAL}
    masks[S3] = masks[S3][:-1]
    _prepare_expecting(
        tmp_path, voc_aug.VocAugError, rf"cls/{S3}\.mat.*JPEGImages/{S3}\.jpg", sbd_masks=masks
    )


def test_missing_mask_names_the_path(tmp_path):
    _prepare_expecting(
        tmp_path, voc_aug.VocAugError, rf"missing VOC mask .*SegmentationClass/{A}\.png", drop=(A,)
    )


def test_missing_archives_error_names_both_files_and_sources(tmp_path, monkeypatch):
    def no_network(dl_manager, urls):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(voc_aug, "_download", no_network)
    cfg = _config(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        data.prepare(cfg)
    message = str(info.value)
    for archive in voc_aug.ARCHIVES.values():
        assert archive.file_name in message and archive.url in message and archive.page in message
    assert cfg.manual_dir in message
    assert not tfds.builder("voc_aug", data_dir=cfg.data_dir).is_prepared()


@pytest.mark.parametrize("proxy", [False, True])
def test_an_unresolvable_host_is_reported_before_tfds_starts_retrying(
    tmp_path, monkeypatch, caplog, proxy
):
    def no_dns(host, port, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    warned_before_download = []

    def no_network(dl_manager, urls):
        warned_before_download.append(any("does not resolve" in m for m in caplog.messages))
        raise ConnectionError("no route to host")

    monkeypatch.setattr(voc_aug.socket, "getaddrinfo", no_dns)
    proxies = {"https": "http://proxy:3128"} if proxy else {}
    monkeypatch.setattr(voc_aug.urllib.request, "getproxies", lambda: proxies)
    monkeypatch.setattr(voc_aug, "_download", no_network)
    caplog.set_level("WARNING")
    with pytest.raises(FileNotFoundError):
        data.prepare(_config(tmp_path))
    warnings = [m for m in caplog.messages if "does not resolve" in m]
    if proxy:  # the proxy resolves the hosts: nothing to say
        assert not warnings and warned_before_download == [False]
    else:
        assert warned_before_download == [True]
        for archive in voc_aug.ARCHIVES.values():
            host = urllib.parse.urlsplit(archive.url).hostname
            assert any(archive.file_name in m and host in m for m in warnings)


def _as_official(monkeypatch, archive_dir, keys=("voc", "sbd")):
    """Makes the tiny archives (those of `keys`) count as the official ones (md5)."""
    official = {
        key: dataclasses.replace(
            archive, md5=hashlib.md5((archive_dir / archive.file_name).read_bytes()).hexdigest()
        )
        if key in keys
        else archive
        for key, archive in voc_aug.ARCHIVES.items()
    }
    monkeypatch.setattr(voc_aug, "ARCHIVES", official)


def test_archives_missing_from_the_manual_dir_are_downloaded(tmp_path, monkeypatch):
    make_archives(tmp_path / "mirror")
    _as_official(monkeypatch, tmp_path / "mirror")
    monkeypatch.setattr(
        voc_aug, "OFFICIAL_SPLIT_SIZES", {"train_aug": 7, "val": 2, "train": 3, "trainval": 5}
    )
    monkeypatch.setattr(voc_aug, "OFFICIAL_SBD_SIZES", {"train": 4, "val": 3})
    requested = {}

    def fake_download(dl_manager, urls):  # stands in for tfds' download manager
        requested.update(urls)
        by_url = {a.url: tmp_path / "mirror" / a.file_name for a in voc_aug.ARCHIVES.values()}
        return {key: by_url[url] for key, url in urls.items()}

    monkeypatch.setattr(voc_aug, "_download", fake_download)
    cfg = _config(tmp_path)  # its manual dir does not exist
    data.prepare(cfg)
    assert requested == {"voc": voc_aug.VOC.url, "sbd": voc_aug.SBD.url}
    assert len(data.load_source(cfg, "train_aug")) == 7
    # tfds itself checks the VOC download against the registered size and sha256.
    info = voc_aug.VocAug.url_infos[voc_aug.VOC.url]
    assert (info.size, info.filename) == (1_999_639_040, voc_aug.VOC.file_name)


def test_downloaded_sbd_with_another_md5_is_rejected(tmp_path, monkeypatch):
    make_archives(tmp_path / "mirror")
    monkeypatch.setattr(
        voc_aug, "_download", lambda dl, urls: {"sbd": tmp_path / "mirror" / voc_aug.SBD.file_name}
    )
    (tmp_path / "manual").mkdir()
    shutil.copy(tmp_path / "mirror" / voc_aug.VOC.file_name, tmp_path / "manual")
    with pytest.raises(voc_aug.VocAugError, match=r"benchmark\.tgz does not have md5"):
        data.prepare(_config(tmp_path))


def test_official_split_sizes_checked_only_on_official_archives(tmp_path, monkeypatch):
    make_archives(tmp_path / "manual")
    cfg = _config(tmp_path)
    # The official SBD with a VOC tar of another md5 (repacked, say): the sizes are not checked
    # and the build passes (a check once either archive is official would refuse it).
    _as_official(monkeypatch, tmp_path / "manual", keys=("sbd",))
    sbd_only = cfg.copy_and_resolve_references()
    sbd_only.data_dir = str(tmp_path / "tfds_sbd_only")
    data.prepare(sbd_only)
    assert len(data.load_source(sbd_only, "train_aug")) == 7
    # Pretend the tiny archives are the official ones: the 10,582-style size check fires.
    _as_official(monkeypatch, tmp_path / "manual")
    with pytest.raises(voc_aug.VocAugError, match=r"'train_aug': 7.*'train_aug': 10582"):
        data.prepare(cfg)
    # The right split sizes are not enough: the SBD lists' sizes are checked too.
    monkeypatch.setattr(
        voc_aug, "OFFICIAL_SPLIT_SIZES", {"train_aug": 7, "val": 2, "train": 3, "trainval": 5}
    )
    with pytest.raises(voc_aug.VocAugError, match=r"\{'train': 4, 'val': 3\}, expected .*8498"):
        data.prepare(cfg)
    # With the sizes these "official" archives really have, the same build passes.
    monkeypatch.setattr(voc_aug, "OFFICIAL_SBD_SIZES", {"train": 4, "val": 3})
    data.prepare(cfg)
    assert len(data.load_source(cfg, "train_aug")) == 7


def test_prepare_is_a_noop_when_built_and_keeps_the_data(built, tmp_path):
    cfg, _ = built
    before = sorted(_records(cfg, "val"))
    # Even with the archives gone, a prepared dataset is reused, not rebuilt or removed.
    cfg = cfg.copy_and_resolve_references()
    cfg.manual_dir = str(tmp_path / "empty")
    data.prepare(cfg)
    assert sorted(_records(cfg, "val")) == before


def test_wrong_num_classes_is_rejected(built):
    cfg, _ = built
    cfg = cfg.copy_and_resolve_references()
    cfg.num_classes = 19
    with pytest.raises(ValueError, match=r"data\.num_classes=19"):
        data.load_source(cfg, "val")


def test_unknown_split_is_rejected(built):
    cfg, _ = built
    with pytest.raises(ValueError, match="no split 'validation'"):
        data.load_source(cfg, "validation")


def test_copy_of_built_dir_is_readable(built, tmp_path):
    """A prepared dataset is self-contained (e.g. copied to a bucket or another host)."""
    cfg, _ = built
    shutil.copytree(cfg.data_dir, tmp_path / "copy")
    cfg = cfg.copy_and_resolve_references()
    cfg.data_dir = str(tmp_path / "copy")
    assert sorted(_records(cfg, "train")) == sorted(VOC_TRAIN)


def test_a_replaced_archive_is_extracted_afresh(tmp_path):
    # A download cut short and then completed keeps its name: tfds would reuse the folder it
    # extracted from the first archive, and rebuild the dataset from stale files.
    masks, _ = make_archives(tmp_path / "manual")
    cfg = _config(tmp_path)
    data.prepare(cfg)
    assert np.array_equal(_records(cfg, "val")[E]["label"], masks[E])
    corrected = {**masks, E: np.zeros_like(masks[E])}
    make_archives(tmp_path / "manual", voc_masks=corrected)
    shutil.rmtree(tmp_path / "tfds" / "voc_aug")
    data.prepare(cfg)
    assert not _records(cfg, "val")[E]["label"].any()


def test_an_unreadable_sbd_mat_names_the_file(tmp_path):
    # e.g. an HTML error page saved under the .mat's name by a proxy
    path = tmp_path / "cls" / f"{S1}.mat"
    path.parent.mkdir()
    path.write_bytes(b"<html><body>503 Service Unavailable</body></html>")
    with pytest.raises(voc_aug.VocAugError, match=rf"cannot read SBD mask .*cls/{S1}\.mat"):
        voc_aug._read_sbd_mask(epath.Path(path))


def test_an_empty_id_list_or_one_with_an_id_twice_is_refused_naming_it(tmp_path):
    # tfds said only "No examples were yielded" for the split, naming no file
    path = tmp_path / "val.txt"
    path.write_text("\n \n")
    with pytest.raises(voc_aug.VocAugError, match=rf"{path} lists no image ids"):
        voc_aug.read_id_list(epath.Path(path))
    assert voc_aug.read_id_list(epath.Path(path), allow_empty=True) == []  # SBD's lists
    # An id listed twice (two lists run together, say) must not be merged away without a word.
    path.write_text(f"{A}\n{B}\n{A}\n")
    with pytest.raises(voc_aug.VocAugError, match=rf"{path} lists some image ids twice"):
        voc_aug.read_id_list(epath.Path(path), allow_empty=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_float_sbd_masks_must_hold_whole_classes(tmp_path, dtype):
    path = tmp_path / "cls" / f"{S1}.mat"
    path.parent.mkdir()
    mask = _sbd_mask(S1).astype(dtype)
    path.write_bytes(_mat(mask))
    whole = voc_aug._check_mask(voc_aug._read_sbd_mask(epath.Path(path)), path)
    np.testing.assert_array_equal(whole, _sbd_mask(S1))
    mask[1, 2] = 2.5  # was read as class 2
    path.write_bytes(_mat(mask))
    with pytest.raises(voc_aug.VocAugError, match=rf"cls/{S1}\.mat holds .*\[2\.5\], expected"):
        voc_aug._check_mask(voc_aug._read_sbd_mask(epath.Path(path)), path)


@pytest.mark.parametrize("dtype, value", [(np.uint8, 21), (np.int16, -1)])
def test_mask_values_just_outside_the_classes_are_refused(tmp_path, dtype, value):
    # 21, one past tvmonitor, must not be taken for a class, nor a negative SBD label become 255
    # (ignore) in the cast to uint8.
    path = tmp_path / "cls" / f"{S1}.mat"
    path.parent.mkdir()
    mask = _sbd_mask(S1).astype(dtype)
    mask[1, 2] = value
    path.write_bytes(_mat(mask))
    expected = rf"cls/{S1}\.mat has label values \[{value}\], expected 0\.\.20 or 255"
    with pytest.raises(voc_aug.VocAugError, match=expected):
        voc_aug._check_mask(voc_aug._read_sbd_mask(epath.Path(path)), path)


def test_a_palette_mask_that_reaches_the_reader_is_refused_not_read_as_colors():
    # The builder stores VOC's palette masks as indices; one stored as it comes (a hand-made
    # dataset, say) read as grayscale would give its colors' gray levels: class 1 (dark red) 38.
    image = cv2.imencode(".png", np.zeros((*_size(E), 3), np.uint8))[1].tobytes()
    with pytest.raises(
        ValueError, match=r"single-channel 8-bit label PNG, got shape \(\d+, \d+, 3\)"
    ):
        data.pipeline.decode_record(image, _png_p(_voc_mask(E)), E)


def test_moved_archives_are_extracted_from_where_they_are_now(tmp_path):
    # The md5-named link of the first build pointed at the old place: the rebuild failed on it,
    # or, with another file now under the old name, would have extracted that one.
    masks, _ = make_archives(tmp_path / "old")
    cfg = _config(tmp_path)
    cfg.manual_dir = str(tmp_path / "old")
    data.prepare(cfg)
    shutil.rmtree(tmp_path / "tfds" / "downloads" / "extracted")  # frees the disk
    shutil.rmtree(tmp_path / "tfds" / "voc_aug")
    shutil.move(tmp_path / "old", tmp_path / "new")
    make_archives(tmp_path / "old", voc_masks={**masks, E: np.zeros_like(masks[E])})
    (tmp_path / "old" / voc_aug.VOC.file_name).write_bytes(
        (tmp_path / "new" / voc_aug.VOC.file_name).read_bytes()[:2048]  # and cut short
    )
    cfg.manual_dir = str(tmp_path / "new")
    data.prepare(cfg)
    assert np.array_equal(_records(cfg, "val")[E]["label"], masks[E])


def test_archives_in_a_bucket_are_extracted_without_a_local_link(tmp_path):
    # A local link to gs://... pointed at a relative "gs:/..." path that is not there: the
    # archives in a bucket with the dataset built on a local disk failed to extract.
    extracted = []
    dl_manager = types.SimpleNamespace(
        download_dir=str(tmp_path / "downloads"),
        extract=lambda path: extracted.append(path) or str(tmp_path / "out"),
    )
    archive = epath.Path(f"gs://bucket/archives/{voc_aug.VOC.file_name}")
    assert voc_aug._extract(dl_manager, archive, "0" * 32) == epath.Path(tmp_path / "out")
    assert [os.fspath(path) for path in extracted] == [os.fspath(archive)]
    assert not (tmp_path / "downloads").exists()


@pytest.mark.parametrize("cut", ["inside a member", "between members"])
def test_an_archive_cut_short_is_named_with_its_md5(tmp_path, cut):
    # Inside a member, extraction fails; between two, it succeeds and a later file is missing.
    make_archives(tmp_path / "manual")
    voc_tar = tmp_path / "manual" / voc_aug.VOC.file_name
    with tarfile.open(voc_tar) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members.sort(key=lambda pair: "ImageSets" not in pair[0].name)  # the lists first
    with tarfile.open(voc_tar, "w") as tar:
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload))
    with tarfile.open(voc_tar) as tar:
        last = tar.getmembers()[-1]
    end = last.offset if cut == "between members" else last.offset_data + last.size // 2
    voc_tar.write_bytes(voc_tar.read_bytes()[:end])
    with pytest.raises(voc_aug.VocAugError) as error:
        data.prepare(_config(tmp_path))
    message = str(error.value)
    assert f"Not the official archive: {voc_tar} ({voc_tar.stat().st_size:,} bytes" in message
    assert "download it again" in message
    assert not tfds.builder("voc_aug", data_dir=str(tmp_path / "tfds")).is_prepared()


def test_voc_masks_are_read_through_epath_as_in_a_bucket(tmp_path, monkeypatch):
    # launch/README.md builds into data_dir=gs://...: tfds extracts there, and PIL, handed the
    # path, would open it as a local file. A gs:// bucket is emulated by etils' mock_epath.
    from etils.epath import gpath
    from etils.epath import testing as epath_testing

    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # else tf.io.gfile serves it
    local = tmp_path / "bucket"
    (local / "SegmentationClass").mkdir(parents=True)
    (local / "SegmentationClass" / f"{E}.png").write_bytes(_png_p(_voc_mask(E)))

    def to_local(path):
        return str(path).replace("gs://bucket", str(local))

    with epath_testing.mock_epath(
        open=lambda open_, path, mode: open_(to_local(path), mode),
        exists=lambda exists, path: exists(to_local(path)),
    ):
        mask = voc_aug._read_voc_mask(epath.Path(f"gs://bucket/SegmentationClass/{E}.png"))
    assert np.array_equal(mask, _voc_mask(E))
