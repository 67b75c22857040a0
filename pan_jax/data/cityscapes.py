"""Cityscapes label handling on top of tfds' `cityscapes/semantic_segmentation` builder.

tfds stores the raw `*_gtFine_labelIds.png` (label ids 0..33). Training and evaluation use the
19 trainIds with 255 as ignore, so the pipeline applies `cityscapes_train_id_lut()` to every
decoded label. The table is written out here (not imported from cityscapesscripts, a test-only
dependency) and tests compare it with cityscapesscripts' `labels` for every id.

The tfds config `semantic_segmentation_extra` has coarse labels for *every* split, validation
included, so evaluating on it would silently score against coarse polygons: the pipeline refuses
that split (see `pipeline.load_source`).
"""

import re
import zipfile

import numpy as np
from etils import epath

# trainId -> Cityscapes label id, from cityscapesScripts `helpers/labels.py`.
TRAIN_ID_TO_LABEL_ID = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 255
# Written into predictions where the model predicts "ignore"; label id 0 is 'unlabeled'.
UNLABELED_ID = 0
MAX_LABEL_ID = 33  # a *_gtFine_labelIds.png holds ids 0..33 (cityscapesscripts' labels.py)

# Files tfds' builder expects in its manual dir (cityscapes-dataset.com, registration needed).
MANUAL_FILES = ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip")
EXTRA_MANUAL_FILES = ("leftImg8bit_trainextra.zip", "gtCoarse.zip")  # semantic_segmentation_extra
# The only file names tfds' builder accepts in leftImg8bit/<split>/<city>/: it takes the image id
# from every name there and fails with an AttributeError on any other (Thumbs.db, .DS_Store).
LEFT_IMAGE_NAME = re.compile(r"[a-z\-]+_\d+_\d+_leftImg8bit\.png")
TFDS_CONFIGS = ("semantic_segmentation", "semantic_segmentation_extra")
# Splits whose labels are coarse polygons: never evaluate on them.
COARSE_EVAL_SPLITS = {"semantic_segmentation_extra": ("validation",)}


def manual_files(config: str) -> tuple[str, ...]:
    """The zips tfds' builder reads for `config` (one of TFDS_CONFIGS)."""
    if config == "semantic_segmentation_extra":  # coarse labels for every split, no gtFine
        return (MANUAL_FILES[0], *EXTRA_MANUAL_FILES)
    return MANUAL_FILES


def check_manual_zips(manual_dir: epath.PathLike, config: str) -> None:
    """Refuses, before tfds extracts anything, a missing or unreadable zip, or an image zip with
    a file tfds' builder cannot read as an image where it lists images (naming the zip and files).
    """
    paths = [epath.Path(manual_dir) / name for name in manual_files(config)]
    missing = [path for path in paths if not path.exists()]  # one request each in a bucket
    if missing:
        listing = "; ".join(f"{path} {'MISSING' if path in missing else 'found'}" for path in paths)
        raise FileNotFoundError(
            f"cityscapes/{config} is built from {len(paths)} zips: {listing}. Download the "
            "missing ones from https://www.cityscapes-dataset.com/downloads/ (free registration) "
            "into that folder (data.manual_dir), unextracted."
        )
    for path in paths:
        try:
            with path.open("rb") as file, zipfile.ZipFile(file) as archive:
                members = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(
                f"{path}: not a readable zip ({e}); a download cut short? Download it again."
            ) from e
        strays = [member for member in members if _is_stray_image_entry(member)]
        if strays:
            raise ValueError(
                f"{path}: {strays[:3]} ({len(strays)} in all) where tfds' builder reads only "
                "leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png; it cannot "
                f"build the dataset with them. Remove them (zip -d {path} '<entry>') and run again."
            )


def _is_stray_image_entry(member: str) -> bool:
    parts = member.split("/")
    if parts[0] != "leftImg8bit" or len(parts) < 3 or member.endswith("/"):
        return False  # outside the folders tfds lists, or a folder entry
    return len(parts) != 4 or not LEFT_IMAGE_NAME.fullmatch(parts[3])


def cityscapes_train_id_lut() -> np.ndarray:
    """Returns a (256,) uint8 table mapping a label id to its trainId, 255 for ignored ids.

    A gather through a full 256-entry table is order-independent, unlike a chain of
    `where(label == id, train_id, label)`, which is only right for one visiting order.
    """
    lut = np.full((256,), IGNORE_LABEL, np.uint8)
    lut[list(TRAIN_ID_TO_LABEL_ID)] = np.arange(NUM_CLASSES, dtype=np.uint8)
    return lut


def cityscapes_label_id_lut() -> np.ndarray:
    """Returns a (256,) uint8 table mapping a trainId to its label id (for the test server).

    Entries past trainId 18 (including 255) map to label id 0 ('unlabeled').
    """
    lut = np.full((256,), UNLABELED_ID, np.uint8)
    lut[:NUM_CLASSES] = TRAIN_ID_TO_LABEL_ID
    return lut


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Maps a predicted trainId map (any integer dtype) to uint8 label ids: trainIds 0..18 to
    their label ids, 19..255 (255: ignore) to 0 ('unlabeled'); other values are refused."""
    train_ids = np.asarray(train_ids)
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() > 255):
        raise ValueError(
            f"train_ids_to_label_ids: expected trainIds 0..{NUM_CLASSES - 1} (or up to 255, "
            f"written as label id {UNLABELED_ID}), got values in "
            f"[{train_ids.min()}, {train_ids.max()}]"
        )
    return cityscapes_label_id_lut()[train_ids.astype(np.intp)]
