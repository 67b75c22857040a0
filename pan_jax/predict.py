r"""Segmentation masks for image files.

    python -m pan_jax.predict --workdir=DIR | --model_dir=DIR --input=FILE|DIR|GLOB --output=DIR \
        [--multiscale] [--flip] [--overlay] [--mode=whole|slide --crop_size=769 --stride=513] \
        [--dtype=float32|bfloat16]

Writes one PNG of class indices per input image into --output, keeping the input's relative
path and stem (where two inputs share a stem, a.jpg and a.png, the second keeps its extension:
a.png.png):

- VOC (21 classes): a palette PNG whose pixel values are the class indices, like VOC's own
  `SegmentationClass` files (the palette only colors them);
- Cityscapes (19 trainIds): 8-bit Cityscapes *label ids* (trainId → labelId, e.g. 0 → 7 road),
  what the benchmark server expects;
- any other dataset: 8-bit grayscale class indices (16-bit above 256 classes).

The dataset is read from the workdir's `config.json` (`data.name`); without one (a converted
model) 21 classes are written as VOC palette PNGs, anything else as indices; --dataset
overrides. A one-class model (SMP's binary `classes=1`) writes 1 where its sigmoid passes 0.5.
The model computes in float32 whatever dtype it trained in (as `--mode=eval` scores it);
--dtype=bfloat16 is faster on GPUs and TPUs.
--overlay also writes `<stem>_overlay.jpg`, the image blended with class colors (a JPEG, so that
evaluation scripts, which take every PNG of a results folder for a mask, never see it). Mode, crop,
stride and padding default to the workdir config's `eval` section; in slide mode (--mode=slide or
the config's) a --crop_size without --stride slides by 2/3 of that crop (whole mode uses no crop:
a --crop_size or --stride given there is ignored, with a warning).

Padding: each input is padded (gray, the mean pixel) at the bottom/right to a multiple of
--pad_multiple, to bound compilations; the global pooling of FPA and GAU sees the padding, so it
shifts predictions. A training workdir uses its evaluation's value (128 in the paper configs);
otherwise the default is 16, so every size SMP's PAN accepts (multiples of its output stride,
16 or 32) runs unpadded and gives SMP's own masks. --pad_multiple=1 pads only an image
below the model's minimum input (PAN: 8 × its output stride), which it could not run otherwise
(one compilation per image size).

Inputs: a file, a directory (every file in a format PIL decodes, recursively) or a glob.
Images are read with PIL in any mode: EXIF orientation is applied, grayscale/palette/CMYK are
converted to RGB, alpha is dropped, 16-bit samples are scaled to 8 bits (32-bit and float
grayscale: see `_gray_to_uint8`). A file that cannot be
read as an image is reported by name and skipped; the others are still processed, and the exit
status is 1 if any file failed. A directory or glob skips the files inside --output (a previous
run's masks). Inputs and options are checked before the model loads: no inputs, or a mask or
overlay that would overwrite an input file, is a one-line `error: ...` and exit status 1.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging
from etils import epath
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from pan_jax import checkpointing, inference, logs

FORMATS = ("voc", "cityscapes", "indices")
# Without a run config: every size SMP's PAN accepts (a multiple of its output stride, 16 or
# 32) is a multiple of 16, so runs unpadded (the dataset evaluation's 128 would shift masks).
PAD_MULTIPLE = 16
# Cityscapes trainId colors, from cityscapesScripts `helpers/labels.py`.
CITYSCAPES_PALETTE = np.array(
    [
        (128, 64, 128),
        (244, 35, 232),
        (70, 70, 70),
        (102, 102, 156),
        (190, 153, 153),
        (153, 153, 153),
        (250, 170, 30),
        (220, 220, 0),
        (107, 142, 35),
        (152, 251, 152),
        (70, 130, 180),
        (220, 20, 60),
        (255, 0, 0),
        (0, 0, 142),
        (0, 0, 70),
        (0, 60, 100),
        (0, 80, 100),
        (0, 0, 230),
        (119, 11, 32),
    ],
    np.uint8,
)


class ImageReadError(ValueError):
    """A file that cannot be read as an image; the message names it."""


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC color map (devkit `VOClabelcolormap.m`): (num_colors, 3) uint8.

    Class i's color spreads the bits of i over the high bits of R, G and B; 255 (void) is
    (224, 224, 192). Also the default color map for datasets without their own.
    """
    palette = np.zeros((num_colors, 3), np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    return palette


def palette_for(output_format: str, num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 colors of the classes for overlays and legends (two for a
    one-class model, whose masks hold 0 and 1)."""
    if output_format == "cityscapes" and num_classes == len(CITYSCAPES_PALETTE):
        return CITYSCAPES_PALETTE
    return voc_palette(max(256, num_classes))[: inference.mask_classes(num_classes)]


def output_format_for(dataset_name: str | None, num_classes: int) -> str:
    """'voc', 'cityscapes' or 'indices' for a dataset name (or None) and number of classes."""
    base = (dataset_name or "").partition("/")[0]
    if base.startswith("voc") and num_classes == 21:
        return "voc"
    if base == "cityscapes" and num_classes == 19:
        return "cityscapes"
    if base:
        return "indices"
    # No dataset (a converted model): a VOC palette PNG still holds the class indices, but
    # Cityscapes output would rewrite trainIds 0..18 to label ids, a guess too costly to make.
    return "voc" if num_classes == 21 else "indices"


# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(image: Image.Image, path: str | os.PathLike) -> Image.Image:
    """The image rotated as displayed (camera JPEGs). Not `ImageOps.exif_transpose`: it rewrites
    the EXIF block, and raises on malformed tags that leave the pixels perfectly readable."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as e:  # an unreadable EXIF block: shown unrotated by most viewers too
        logging.warning("%s: EXIF orientation not read (%s); taken as upright", path, e)
        return image
    method = _EXIF_TRANSPOSE.get(orientation)
    return image.transpose(method) if method is not None else image


def _gray_to_uint8(image: Image.Image, file_format: str | None) -> np.ndarray:
    """A 16-bit, 32-bit integer or float grayscale image as uint8 (H, W).

    16-bit samples (PIL's I;16 modes; I from a PNG or a 16-bit PGM) span 0..65535: scaled by
    1/257, where convert("L") would clip everything above 255 to white. For 32-bit integers
    and floats the file says nothing of the range: integers within 0..255 are taken as they
    are, others scaled from 0..65535 (or their maximum, if larger); floats within 0..1 are
    scaled by 255, others clipped to 0..255.
    """
    gray = np.asarray(image).astype(np.float64)
    top = float(gray.max(initial=0.0))
    if image.mode == "F":
        scale = 255.0 if top <= 1.0 else 1.0
    elif image.mode.startswith("I;16") or file_format in ("PNG", "PPM") or top > 255:
        scale = 255.0 / max(65535.0, top)
    else:
        scale = 1.0
    return np.clip(np.round(gray * scale), 0, 255).astype(np.uint8)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file (local or gs://) as uint8 RGB (H, W, 3), upright.

    Raises ImageReadError naming the file when it cannot be read as an image.
    """
    try:
        # Through epath, so that gs:// paths work too (notebooks).
        with epath.Path(path).open("rb") as f, Image.open(f) as opened:
            opened.load()
            image = _upright(opened, path)
            if image.mode.startswith("I") or image.mode == "F":
                return np.repeat(_gray_to_uint8(image, opened.format)[..., None], 3, axis=-1)
            if image.mode == "P":
                image = image.convert("RGBA")  # A palette may carry transparency.
            # Grayscale, CMYK, YCbCr, alpha modes: PIL's conversion; alpha is dropped (the
            # stored colors are kept as they are under transparent pixels).
            rgb = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:  # PIL's own message shows its file object's repr
        raise ImageReadError(
            f"{os.fspath(path)}: not an image (its bytes are in no format PIL reads)"
        ) from None
    except Exception as e:  # PIL's decoders fail on malformed files in many ways
        raise ImageReadError(f"{os.fspath(path)}: cannot read it as an image ({e})") from e
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8 or min(rgb.shape[:2]) < 1:
        raise ImageReadError(f"{os.fspath(path)}: decoded to {rgb.shape} {rgb.dtype}, not RGB")
    return rgb


def colorize(classes: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class indices → (H, W, 3) uint8 colors (indices beyond the palette: black)."""
    colors = np.zeros((max(256, len(palette), int(classes.max(initial=0)) + 1), 3), np.uint8)
    colors[: len(palette)] = palette
    return colors[classes]


def overlay(
    image: np.ndarray, classes: np.ndarray, palette: np.ndarray, alpha: float = 0.5
) -> np.ndarray:
    """The image blended with the class colors: (1 − alpha)·image + alpha·color, uint8."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize(classes, palette)
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def mask_image(classes: np.ndarray, output_format: str, num_classes: int) -> Image.Image:
    """The PIL image to save for a (H, W) class-index map in `output_format`."""
    if output_format == "voc":
        mask = Image.fromarray(classes.astype(np.uint8))
        mask.putpalette(voc_palette(256).reshape(-1).tolist())  # L -> P, indices unchanged.
        return mask
    if output_format == "cityscapes":
        from pan_jax.data import cityscapes  # tfds: imported only when needed.

        return Image.fromarray(cityscapes.train_ids_to_label_ids(classes))
    if num_classes <= 256:
        return Image.fromarray(classes.astype(np.uint8))
    return Image.fromarray(classes.astype(np.uint16))  # 16-bit grayscale PNG (I;16).


def segment(model: Any, variables: Any, image: np.ndarray, **options: Any) -> np.ndarray:
    """Class indices (H, W) int32 of one uint8 RGB (H, W, 3) image.

    `options` are `inference.predict_scores`'s: mode, scales, flip, crop_size, stride, pad_multiple.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:  # a float image here would be taken as already normalized
        raise ValueError(f"expected a uint8 RGB image (as load_image returns), got {image.dtype}")
    return inference.predict_image(model, variables, image, **options)


def _is_inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or below it, after resolving links and `..`."""
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _glob_root(pattern: str) -> str:
    """The directory a glob searches: its leading directories without wildcards."""
    literal = []
    for part in pattern.split(os.sep)[:-1]:  # the last part names the files
        if any(char in part for char in "*?["):
            break
        literal.append(part)
    return os.sep.join(literal) or (os.sep if pattern.startswith(os.sep) else os.curdir)


def _image_extensions() -> set[str]:
    """Extensions of the formats PIL decodes by itself. Not the write-only ones (.pdf, .palm),
    the stubs that need a handler (.h5, .grib), PostScript (Ghostscript) nor MPEG video."""
    Image.init()

    def decodes(file_format: str) -> bool:
        factory = Image.OPEN.get(file_format, (None,))[0]
        return factory is not None and not (
            isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
        )

    extensions = {ext.lower() for ext, fmt in Image.registered_extensions().items() if decodes(fmt)}
    return (extensions | {".mpo"}) - {".eps", ".ps", ".mpeg", ".mpg"}  # MPO: JPEG's plugin opens


def list_inputs(pattern: str, exclude_dir: str | None = None) -> list[tuple[str, str]]:
    """(path, name for outputs) of every input: a file, a directory (recursive) or a glob.

    A directory or glob skips the files inside `exclude_dir` (the --output directory), so that
    a second run does not take the first one's masks and overlays for images; unless the whole
    directory searched is inside `exclude_dir`, which would leave nothing (then the check that
    no output overwrites an input, `check_outputs_spare_inputs`, guards the inputs).
    """
    if os.path.isfile(pattern):
        return [(pattern, os.path.splitext(os.path.basename(pattern))[0])]
    if os.path.isdir(pattern):
        extensions = _image_extensions()
        paths = []

        def unreadable(error: OSError) -> None:  # os.walk would skip the folder in silence
            logging.warning("%s: skipped, cannot list it (%s)", error.filename, error.strerror)

        for root, dirs, files in os.walk(pattern, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                    paths.append(os.path.join(root, name))
        searched = pattern
    else:
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        searched = _glob_root(pattern)
    skipped = 0
    if exclude_dir is not None and not _is_inside(searched, exclude_dir):
        kept = [p for p in paths if not _is_inside(p, exclude_dir)]
        skipped = len(paths) - len(kept)
        paths = kept
    if not paths:
        also = f" (besides {skipped} file(s) inside --output={exclude_dir})" if skipped else ""
        raise FileNotFoundError(
            f"--input={pattern}: no such file, no images in such a directory, no glob match" + also
        )
    if skipped:
        logging.info(
            "--input=%s: skipped %d file(s) inside --output=%s", pattern, skipped, exclude_dir
        )
    if os.path.isdir(pattern):
        base = pattern
    else:
        base = os.path.commonpath([os.path.dirname(p) for p in paths])
    named = []
    seen: set[str] = set()
    for path in paths:
        relative = os.path.relpath(path, base or os.curdir)  # '' for a glob like */a.png
        stem = os.path.splitext(relative)[0]
        if stem in seen:  # a.jpg and a.png: keep both outputs apart.
            stem = relative
        seen.add(stem)
        named.append((path, stem))
    return named


def output_paths(output_dir: str | os.PathLike, name: str, write_overlay: bool) -> list[epath.Path]:
    """The files written for the input named `name`: its mask, then its overlay (if asked).

    Overlays are JPEGs: the evaluation scripts take every PNG under a results folder for a mask
    (cityscapesscripts finds `<city>_<seq>_<frame>*.png` at any depth, and a second match for one
    image is an error there).
    """
    mask = epath.Path(output_dir) / f"{name}.png"
    return [mask, mask.parent / f"{mask.stem}_overlay.jpg"] if write_overlay else [mask]


def check_outputs_spare_inputs(
    inputs: Sequence[tuple[str, str]], output_dir: str | os.PathLike, *, write_overlay: bool
) -> None:
    """Raises ValueError when a mask or overlay would be written over one of the input files,
    or over another input's output (two outputs that resolve to one file, through a link)."""
    by_resolved = {os.path.realpath(path): path for path, _ in inputs}
    written: dict[str, str] = {}  # resolved output path -> what writes it
    for path, name in inputs:
        for kind, target in zip(
            ("mask", "overlay"), output_paths(output_dir, name, write_overlay), strict=False
        ):
            resolved = os.path.realpath(os.fspath(target))
            clash = by_resolved.get(resolved)
            if clash is not None:
                raise ValueError(
                    f"--output={os.fspath(output_dir)}: the {kind} of {path} would be written to "
                    f"{target}, overwriting the input {clash}; give another --output directory, "
                    "one that holds no inputs"
                )
            if resolved in written:
                raise ValueError(
                    f"--output={os.fspath(output_dir)}: the {kind} of {path} and the "
                    f"{written[resolved]} would both be written to {target}; rename one input or "
                    "give another --output"
                )
            written[resolved] = f"{kind} of {path}"


def check_output_format(output_format: str, num_classes: int) -> None:
    """Refuses a format that cannot hold the model's classes (e.g. a forced --dataset)."""
    if output_format not in FORMATS:
        raise ValueError(f"output format {output_format!r}: expected one of {FORMATS}")
    if output_format == "cityscapes" and num_classes != len(CITYSCAPES_PALETTE):
        raise ValueError(
            f"--dataset=cityscapes writes the 19 trainIds as label ids, but the model has "
            f"{num_classes} classes; use --dataset=indices (or auto)"
        )
    if output_format == "voc" and inference.mask_classes(num_classes) > 256:
        raise ValueError(
            f"--dataset=voc writes 8-bit palette PNGs, but the model has {num_classes} classes; "
            "use --dataset=indices (16-bit) or auto"
        )


def predict_files(
    model: Any,
    variables: Any,
    inputs: Sequence[tuple[str, str]],
    output_dir: str | os.PathLike,
    *,
    output_format: str,
    write_overlay: bool = False,
    **options: Any,
) -> tuple[list[str], list[str]]:
    """Writes `<output_dir>/<name>.png` (and `<name>_overlay.jpg`) for every (path, name).

    Returns (written mask paths, error messages); a failing file is logged and skipped.
    """
    check_output_format(output_format, model.num_classes)
    palette = palette_for(output_format, model.num_classes)
    written, errors = [], []
    for index, (path, name) in enumerate(inputs):
        try:
            image = load_image(path)
        except ImageReadError as e:
            logging.error("%s", e)
            errors.append(str(e))
            continue
        classes = segment(model, variables, image, **options)
        targets = output_paths(output_dir, name, write_overlay)
        target = targets[0]
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as f:
            mask_image(classes, output_format, model.num_classes).save(f, format="PNG")
        if write_overlay:
            with targets[1].open("wb") as f:
                Image.fromarray(overlay(image, classes, palette)).save(f, format="JPEG", quality=90)
        written.append(os.fspath(target))
        logging.info("[%d/%d] %s -> %s", index + 1, len(inputs), path, target)
    return written, errors


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the CLI's flags: run as a program only, so that importing this module (a
    notebook, with pan_jax.main or pan_jax.bench) defines none of its names twice."""
    flags.DEFINE_string("workdir", None, "Training workdir: its latest (or --step) checkpoint.")
    flags.DEFINE_string(
        "model_dir", None, "Model directory (model.json + variables/), e.g. converted weights."
    )
    flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
    flags.DEFINE_string("input", None, "An image file, a directory of images or a glob.")
    flags.DEFINE_string("output", None, "Directory for the masks (and overlays).")
    flags.DEFINE_bool(
        "multiscale", False, f"Average softmax over the scales {inference.MS_SCALES}."
    )
    flags.DEFINE_bool("flip", False, "Also average over horizontally flipped views.")
    flags.DEFINE_bool(
        "overlay", False, "Also write <name>_overlay.jpg, the image blended with class colors."
    )
    flags.DEFINE_enum(
        "mode",
        None,
        list(inference.MODES),
        "Inference mode (default: the workdir's eval.mode, else whole).",
    )
    flags.DEFINE_list(
        "crop_size", None, "Slide mode window: N or H,W (default: the workdir's eval.crop_size)."
    )
    flags.DEFINE_list(
        "stride",
        None,
        "Slide mode stride: N or H,W (default: 2/3 of --crop_size if given, else eval.stride, else "
        "2/3 of the crop).",
    )
    flags.DEFINE_integer(
        "pad_multiple",
        None,
        "Pad inputs to multiples of this (bounds compilations; the padding shifts predictions). "
        "Default: the workdir's eval.pad_multiple, else 16 (unpadded wherever SMP is; see above).",
    )
    flags.DEFINE_enum(
        "dtype",
        "float32",
        ["float32", "bfloat16"],
        "Compute dtype (parameters stay float32): bfloat16 is faster on GPUs and TPUs; a few "
        "pixels near class boundaries may change.",
    )
    flags.DEFINE_enum(
        "dataset",
        "auto",
        ["auto", *FORMATS],
        "Output format; auto: from the config or class count.",
    )


def _int_pair(values: list[str] | None, name: str) -> int | tuple[int, ...] | None:
    if values is None:
        return None
    try:
        ints = tuple(int(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{name}={','.join(values)}: expected N or H,W integers") from None
    return ints[0] if len(ints) == 1 else ints


def inference_options(
    eval_config: dict[str, Any],
    *,
    mode: str | None = None,
    crop_size: int | tuple[int, ...] | None = None,
    stride: int | tuple[int, ...] | None = None,
    pad_multiple: int | None = None,
    multiscale: bool = False,
    flip: bool = False,
    config_path: str = "config.json",
) -> dict[str, Any]:
    """`segment`'s options: the flags given (not None) over the workdir's `eval` config section.

    In slide mode a --crop_size without --stride slides by 2/3 of that crop: the config's
    stride was chosen for the config's crop and may not fit another. Raises ValueError naming
    the flags (and `config_path` for the values that came from the config).
    """
    given = {
        name: value
        for name, value in (
            ("mode", mode),
            ("crop_size", crop_size),
            ("stride", stride),
            ("pad_multiple", pad_multiple),
        )
        if value is not None
    }
    config = {name: value for name, value in eval_config.items() if value is not None}
    if "crop_size" in given and "stride" not in given:
        config.pop("stride", None)
    merged = {**config, **given}
    try:
        options = inference.check_options(
            mode=merged.get("mode", "whole"),
            scales=inference.MS_SCALES if multiscale else (1.0,),
            crop_size=merged.get("crop_size"),
            stride=merged.get("stride"),
            pad_multiple=merged.get("pad_multiple", PAD_MULTIPLE),
            where="--",  # errors name the flags that set (or override) each value
        )
    except ValueError as error:
        # The message names each value by its flag; say which of them the config set instead.
        from_config = [
            name
            for name in ("mode", "crop_size", "stride", "pad_multiple")
            if name in config and name not in given and f"--{name}" in str(error)
        ]
        if not from_config:
            raise
        raise ValueError(
            f"{error} ({', '.join(from_config)} from the eval section of {config_path}; "
            "the flags override it)"
        ) from None
    ignored = [f"--{name}" for name in ("crop_size", "stride") if name in given]
    if options["mode"] == "whole" and ignored:  # windows asked for, and none would slide
        if "mode" in given:
            whose = "--mode=whole"
        elif "mode" in config:
            whose = f"mode 'whole' of the eval section of {config_path}"
        else:
            whose = "the default mode, whole,"
        logging.warning(
            "%s ignored: %s runs no sliding windows (give --mode=slide)",
            " and ".join(ignored),
            whose,
        )
    options["flip"] = flip
    return options


def main(argv: Sequence[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.workdir is None) == (FLAGS.model_dir is None):
        raise app.UsageError("give exactly one of --workdir and --model_dir")
    if not FLAGS.input or not FLAGS.output:
        raise app.UsageError("--input and --output are required")
    for name in ("workdir", "model_dir", "input", "output"):  # the shell leaves --output=~/x
        if FLAGS[name].value:
            FLAGS[name].value = os.path.expanduser(FLAGS[name].value)
    logs.quiet_libraries()
    directory = FLAGS.workdir or FLAGS.model_dir
    crop_size = _int_pair(FLAGS.crop_size, "crop_size")
    stride = _int_pair(FLAGS.stride, "stride")
    # Everything that can be checked without the model is checked before loading it (slow):
    # a mistake costs a one-line error, not a traceback minutes later.
    try:
        checkpointing.directory_kind(directory, FLAGS.step)
        run_config = checkpointing.read_run_config(directory)
        options = inference_options(
            dict(run_config.get("eval") or {}),
            mode=FLAGS.mode,
            crop_size=crop_size,
            stride=stride,
            pad_multiple=FLAGS.pad_multiple,
            multiscale=FLAGS.multiscale,
            flip=FLAGS.flip,
            config_path=os.fspath(epath.Path(directory) / "config.json"),
        )
        checkpointing.check_writable_directory(FLAGS.output, "--output")
        inputs = list_inputs(FLAGS.input, exclude_dir=FLAGS.output)
        check_outputs_spare_inputs(inputs, FLAGS.output, write_overlay=FLAGS.overlay)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1

    try:  # weights that do not fit their model.json, a format that cannot hold the classes
        model, variables, spec, step = inference.load_model(
            directory, FLAGS.step, dtype=FLAGS.dtype
        )
        output_format = FLAGS.dataset
        if output_format == "auto":
            dataset_name = (run_config.get("data") or {}).get("name")
            output_format = output_format_for(dataset_name, model.num_classes)
        check_output_format(output_format, model.num_classes)
    except ValueError as error:  # CheckpointMismatchError is one
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    logging.info(
        "%s (%s, %d classes, step %s, in %s): %d inputs -> %s as %s, %s",
        directory,
        spec["name"],
        model.num_classes,
        step,
        FLAGS.dtype,
        len(inputs),
        FLAGS.output,
        output_format,
        options,
    )
    written, errors = predict_files(
        model,
        variables,
        inputs,
        FLAGS.output,
        output_format=output_format,
        write_overlay=FLAGS.overlay,
        **options,
    )
    print(f"Wrote {len(written)} masks to {FLAGS.output}", flush=True)
    if errors:
        print(f"{len(errors)} file(s) failed:", *errors, sep="\n  ", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
