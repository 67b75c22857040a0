"""`pan_synthetic`: an embedded segmentation dataset that needs no download.

Each foreground class is a *shape family* (disk, square, triangle, ring, ...), never a color:
every object and the background draw their colors and textures from one palette shared by all
classes, so a per-pixel color rule cannot segment it (a test checks this) and a model has to
learn shape and context, as on real data. Objects range from a few % of the image to about
half of it, overlap (larger ones are painted first), sit on textured backgrounds, and an
optional 255 "void" band follows every boundary as in VOC.

Examples are a pure function of (seed, split, index), so a build is reproducible anywhere and
the generator can also be called directly (`generate_example`) without building the dataset.
"""

import dataclasses
from typing import ClassVar

import cv2
import numpy as np
import tensorflow_datasets as tfds

CLASS_NAMES = (
    "background", "disk", "square", "triangle", "ring", "cross", "star", "ellipse",
    "crescent", "l_shape", "frame", "arrow", "hexagon",
)  # fmt: skip
NUM_CLASSES = len(CLASS_NAMES)
IGNORE_LABEL = 255

# One palette for objects and backgrounds alike, so color carries no class information.
PALETTE = np.array(
    [
        (220, 40, 40), (40, 170, 60), (40, 80, 220), (235, 210, 40), (40, 200, 210),
        (200, 60, 200), (240, 140, 30), (120, 60, 170), (128, 128, 128), (235, 235, 235),
        (30, 30, 30), (140, 90, 40),
    ],
    np.float32,
)  # fmt: skip

_SPLIT_CODES = {"train": 0, "val": 1}
# Object radius as a fraction of the image side: 0.08 (a disk covers 2% of the image) to 0.42 (55%).
_MIN_RADIUS, _MAX_RADIUS = 0.08, 0.42
_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point precision: smoother edges, still integer-exact.


def _circle(radius: float = 1.0, cx: float = 0.0, cy: float = 0.0, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t)], axis=-1)


def _regular(n: int, radius: float = 1.0, phase: float = np.pi / 2) -> np.ndarray:
    t = phase + np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=-1)


def _star(points: int = 5, outer: float = 1.0, inner: float = 0.42) -> np.ndarray:
    t = np.pi / 2 + np.linspace(0.0, 2.0 * np.pi, 2 * points, endpoint=False)
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=-1)


def _box(half: float) -> np.ndarray:
    return np.array([(-half, -half), (half, -half), (half, half), (-half, half)])


# Class id -> list of (polygon in unit coordinates, fill value); value 0 cuts a hole.
_SHAPES: dict[int, list[tuple[np.ndarray, int]]] = {
    1: [(_circle(), 1)],
    2: [(_box(0.8), 1)],
    3: [(_regular(3), 1)],
    4: [(_circle(), 1), (_circle(0.55), 0)],
    5: [
        (
            np.array(
                [
                    (-0.3, -1),
                    (0.3, -1),
                    (0.3, -0.3),
                    (1, -0.3),
                    (1, 0.3),
                    (0.3, 0.3),
                    (0.3, 1),
                    (-0.3, 1),
                    (-0.3, 0.3),
                    (-1, 0.3),
                    (-1, -0.3),
                    (-0.3, -0.3),
                ]
            ),
            1,
        )
    ],
    6: [(_star(), 1)],
    7: [(_circle() * np.array([1.0, 0.4]), 1)],
    8: [(_circle(), 1), (_circle(0.85, cx=0.45), 0)],
    9: [
        (
            np.array(
                [(-0.8, -0.9), (-0.2, -0.9), (-0.2, 0.3), (0.8, 0.3), (0.8, 0.9), (-0.8, 0.9)]
            ),
            1,
        )
    ],
    10: [(_box(0.85), 1), (_box(0.5), 0)],
    11: [
        (
            np.array(
                [
                    (-0.9, -0.25),
                    (0.2, -0.25),
                    (0.2, -0.65),
                    (0.95, 0.0),
                    (0.2, 0.65),
                    (0.2, 0.25),
                    (-0.9, 0.25),
                ]
            ),
            1,
        )
    ],
    12: [(_regular(6, phase=0.0), 1)],
}
assert sorted(_SHAPES) == list(range(1, NUM_CLASSES))


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
    """Sizes of a `pan_synthetic` build; pass one as `tfds.builder(..., config=...)` for others."""

    image_size: int = 128
    num_train: int = 2048
    num_val: int = 256
    min_objects: int = 2
    max_objects: int = 5
    void_width: int = 1  # pixels of 255 on each side of a boundary; 0 disables the band.
    noise_std: float = 8.0
    seed: int = 0


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float32 texture from two palette colors: solid, stripes, checker, ..."""
    a, b = PALETTE[rng.choice(len(PALETTE), size=2, replace=False)]
    kind = rng.integers(5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:  # solid
        t = np.zeros((size, size), np.float32)
    elif kind == 1:  # stripes at any angle
        theta = rng.uniform(0.0, np.pi)
        period = rng.uniform(3.0, 12.0)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform()
        t = (phase % 1.0 < 0.5).astype(np.float32)
    elif kind == 2:  # checkerboard
        p = rng.integers(3, 12)
        ox, oy = rng.integers(0, p, size=2)
        t = (((xx + ox) // p + (yy + oy) // p) % 2).astype(np.float32)
    elif kind == 3:  # linear gradient
        theta = rng.uniform(0.0, 2.0 * np.pi)
        ramp = (xx * np.cos(theta) + yy * np.sin(theta)) / size
        t = np.clip(ramp - ramp.min(), 0.0, 1.0).astype(np.float32)
    else:  # smooth blotches: coarse random field, bilinearly upsampled
        cells = int(rng.integers(3, 9))
        field = rng.uniform(size=(cells, cells)).astype(np.float32)
        t = cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)
    return a * (1.0 - t[..., None]) + b * t[..., None]


def _shape_mask(cls: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Rasterizes one randomly placed, rotated and scaled member of shape family `cls`."""
    radius = size * np.exp(rng.uniform(np.log(_MIN_RADIUS), np.log(_MAX_RADIUS)))
    angle = rng.uniform(0.0, 2.0 * np.pi)
    # Mild anisotropy varies the family without turning one family into another.
    stretch = np.array([1.0, rng.uniform(0.85, 1.15)])
    center = rng.uniform(0.15 * size, 0.85 * size, size=2)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    mask = np.zeros((size, size), np.uint8)
    for poly, value in _SHAPES[cls]:
        pts = (poly * stretch) @ rot.T * radius + center
        pts = np.round(pts * (1 << _SUBPIXEL_BITS)).astype(np.int32)
        cv2.fillPoly(mask, [pts], int(value), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask.astype(bool)


def generate_example(
    config: SyntheticConfig, split: str, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image uint8 (S, S, 3), mask uint8 (S, S)) of example `index` of `split`."""
    if split not in _SPLIT_CODES:
        raise ValueError(
            f"pan_synthetic: unknown split {split!r}, expected one of {list(_SPLIT_CODES)}"
        )
    rng = np.random.default_rng([config.seed, _SPLIT_CODES[split], index])
    size = config.image_size
    image = _texture(rng, size)
    label = np.zeros((size, size), np.uint8)
    num_objects = int(rng.integers(config.min_objects, config.max_objects + 1))
    objects = []
    for _ in range(num_objects):
        cls = int(rng.integers(1, NUM_CLASSES))
        objects.append((cls, _shape_mask(cls, rng, size)))
    # Paint large objects first so small ones stay visible while still overlapping them.
    objects.sort(key=lambda obj: -int(obj[1].sum()))
    for cls, mask in objects:
        image[mask] = _texture(rng, size)[mask]
        label[mask] = cls
    image += rng.normal(0.0, config.noise_std, size=image.shape).astype(np.float32)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    if config.void_width > 0:
        kernel = np.ones((2 * config.void_width + 1,) * 2, np.uint8)
        band = cv2.dilate(label, kernel) != cv2.erode(label, kernel)
        label[band] = IGNORE_LABEL
    return image, label


def _png(array: np.ndarray) -> bytes:
    """PNG bytes of an RGB (H, W, 3) or single-channel (H, W) uint8 array."""
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


class PanSynthetic(tfds.core.GeneratorBasedBuilder):
    """Shapes-as-classes segmentation set with splits `train` and `val`; no download."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS: ClassVar[list[SyntheticConfig]] = [
        SyntheticConfig(name="default", description="128 px, 2048 train / 256 val images."),
        SyntheticConfig(
            name="tiny",
            description="48 px, 32 train / 12 val; for tests.",
            image_size=48,
            num_train=32,
            num_val=12,
        ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "mask": tfds.features.LabeledImage(
                        labels=list(CLASS_NAMES), shape=(size, size, 1)
                    ),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "mask"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # Nothing to download.
        config = self.builder_config
        return {
            "train": self._generate_examples("train", config.num_train),
            "val": self._generate_examples("val", config.num_val),
        }

    def _generate_examples(self, split: str, num_examples: int):
        for index in range(num_examples):
            image, mask = generate_example(self.builder_config, split, index)
            name = f"{split}_{index:05d}"
            yield name, {"image": _png(image), "mask": _png(mask), "file_name": name}
