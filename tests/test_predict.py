"""`python -m pan_jax.predict`: odd image formats, a bad file among good ones, mask formats."""

import copy
import io
import json
import logging as std_logging
import os
import shutil
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from cityscapesscripts.helpers import labels as cs_labels
from PIL import Image, ImageOps

from pan_jax import checkpointing, evaluate, inference, models, predict
from pan_jax.models import random_variables

NUM_CLASSES = 21  # VOC-like: the masks are palette PNGs


def smooth_rgb(height, width, seed=0):
    """A blocky color image: survives JPEG well enough to compare after a round trip."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (-(-height // 8), -(-width // 8), 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 8, axis=0), 8, axis=1)[:height, :width]


def exif_rotated_jpeg(path, stored):
    """A JPEG whose pixels are stored sideways, with EXIF Orientation 6 (rotate 90° clockwise)."""
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, quality=95, subsampling=0, exif=exif)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One image per odd format (expected upright RGB as value), a non-image, a nested file."""
    root = tmp_path_factory.mktemp("inputs")
    expected = {}
    rgb = smooth_rgb(60, 80)
    Image.fromarray(rgb).save(root / "rgb.jpg", quality=95, subsampling=0)
    expected["rgb.jpg"] = (rgb, 2.0)
    gray = rgb[..., 0]
    Image.fromarray(gray).save(root / "gray.png")
    expected["gray.png"] = (np.repeat(gray[..., None], 3, axis=-1), 0.0)
    rgba = np.concatenate([smooth_rgb(70, 50, 1), np.full((70, 50, 1), 40, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(root / "rgba.png")
    expected["rgba.png"] = (rgba[..., :3], 0.0)
    cmyk = smooth_rgb(64, 64, 2)
    Image.fromarray(cmyk).convert("CMYK").save(root / "cmyk.jpg", quality=95, subsampling=0)
    expected["cmyk.jpg"] = (cmyk, 2.0)
    gray16 = np.tile(np.array([0, 257 * 128, 65535, 1000], np.uint16), (40, 23))[:, :90]
    Image.fromarray(gray16).save(root / "gray16.png")
    assert Image.open(root / "gray16.png").mode.startswith("I")  # really 16-bit on disk
    scaled = np.round(gray16 / 257.0).astype(np.uint8)
    expected["gray16.png"] = (np.repeat(scaled[..., None], 3, axis=-1), 0.0)
    stored = smooth_rgb(48, 96, 3)
    exif_rotated_jpeg(root / "rotated.jpg", stored)
    expected["rotated.jpg"] = (np.rot90(stored, k=-1), 2.0)  # displayed 96 high, 48 wide
    palette = Image.fromarray(smooth_rgb(33, 47, 4)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(root / "palette.png")
    expected["palette.png"] = (np.asarray(palette.convert("RGB")), 0.0)
    (root / "sub").mkdir()
    Image.fromarray(smooth_rgb(30, 30, 5)).save(root / "sub" / "nested.png")
    expected[os.path.join("sub", "nested.png")] = (smooth_rgb(30, 30, 5), 0.0)
    (root / "notes.jpg").write_text("this is not an image")
    (root / "README.txt").write_text("not an image extension: not an input of a directory")
    return root, expected


@pytest.mark.parametrize(
    "name",
    ["rgb.jpg", "gray.png", "rgba.png", "cmyk.jpg", "gray16.png", "rotated.jpg", "palette.png"],
)
def test_load_image_handles_odd_formats(inputs, name):
    root, expected = inputs
    image = predict.load_image(root / name)
    want, tolerance = expected[name]
    assert image.dtype == np.uint8 and image.shape == want.shape
    assert np.abs(image.astype(int) - want).mean() <= tolerance


def test_load_image_names_a_bad_file(inputs, tmp_path):
    root, _ = inputs
    with pytest.raises(predict.ImageReadError, match=r"notes\.jpg: not an image") as error:
        predict.load_image(root / "notes.jpg")
    assert "BufferedReader" not in str(error.value)
    png = io.BytesIO()
    Image.fromarray(smooth_rgb(64, 64)).save(png, format="PNG")
    (tmp_path / "truncated.png").write_bytes(png.getvalue()[:200])
    with pytest.raises(predict.ImageReadError, match=r"truncated\.png"):
        predict.load_image(tmp_path / "truncated.png")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_are_pillows(tmp_path, orientation):
    stored = smooth_rgb(24, 40, orientation)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "a.png", exif=exif)
    with Image.open(tmp_path / "a.png") as opened:
        want = np.asarray(ImageOps.exif_transpose(opened).convert("RGB"))
    np.testing.assert_array_equal(predict.load_image(tmp_path / "a.png"), want)


def test_a_malformed_exif_tag_does_not_stop_the_image(tmp_path):
    # Orientation 6 beside YPosition stored as ASCII instead of RATIONAL, as some cameras write:
    # ImageOps.exif_transpose raised a TypeError rewriting the block, which ended the whole run.
    def entry(tag, kind, count, value):
        return struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")

    entries = [entry(0x0112, 3, 1, struct.pack("<H", 6)), entry(0x011F, 2, 4, b"Cam\0")]
    tiff = b"II*\0" + struct.pack("<IH", 8, len(entries)) + b"".join(entries) + b"\0" * 4
    stored = smooth_rgb(24, 32)
    Image.fromarray(stored).save(tmp_path / "a.png", exif=b"Exif\0\0" + tiff)
    np.testing.assert_array_equal(predict.load_image(tmp_path / "a.png"), np.rot90(stored, k=-1))


@pytest.mark.parametrize(
    "values, mode, want",
    [
        (np.full((4, 5), 200, np.int32), "I", 200),  # 32-bit integers within 0..255: as they are
        (np.full((4, 5), 257 * 100, np.int32), "I", 100),  # beyond: as 16-bit samples
        (np.full((4, 5), 0.5, np.float32), "F", 128),  # floats within 0..1: scaled by 255
        (np.full((4, 5), 1.0, np.float32), "F", 255),  # 1.0 included: white, not near black
        (np.full((4, 5), 77.0, np.float32), "F", 77),
    ],
)
def test_wide_grayscale_tiffs_keep_their_brightness(tmp_path, values, mode, want):
    Image.fromarray(values).save(tmp_path / "a.tif")
    assert Image.open(tmp_path / "a.tif").mode == mode
    np.testing.assert_array_equal(predict.load_image(tmp_path / "a.tif"), np.full((4, 5, 3), want))


def test_integers_beyond_16_bits_are_scaled_from_their_maximum(tmp_path):
    # Scaled from 0..65535 alone, everything from 65535 up would be white.
    Image.fromarray(np.array([[0, 65535, 131070]], np.int32)).save(tmp_path / "a.tif")
    np.testing.assert_array_equal(predict.load_image(tmp_path / "a.tif")[0, :, 0], [0, 128, 255])


def test_a_16_bit_pgm_is_scaled_as_16_bit_samples(tmp_path):
    # Pillow opens it as mode I (format PPM); dark ones, all ≤ 255, came out 257× too bright.
    Image.fromarray(np.full((4, 5), 257 * 100, np.uint16)).save(tmp_path / "a.pgm")
    (tmp_path / "dark.pgm").write_bytes(b"P5 5 4 65535\n" + np.full(20, 200, ">u2").tobytes())
    assert Image.open(tmp_path / "dark.pgm").mode == "I"
    np.testing.assert_array_equal(predict.load_image(tmp_path / "a.pgm"), np.full((4, 5, 3), 100))
    np.testing.assert_array_equal(predict.load_image(tmp_path / "dark.pgm"), np.full((4, 5, 3), 1))


def test_a_directory_lists_only_formats_pil_can_open(tmp_path):
    Image.fromarray(smooth_rgb(8, 8)).save(tmp_path / "a.png")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")  # PIL writes PDFs, never reads them
    (tmp_path / "data.h5").write_bytes(b"\x89HDF")  # a stub: PIL needs a handler for it
    assert [name for _, name in predict.list_inputs(str(tmp_path))] == ["a"]


def test_a_directory_takes_camera_files_and_skips_hidden_files_postscript_and_video(tmp_path):
    # Cameras write IMG_0001.JPG (and .MPO, JPEG's multi-picture kin); macOS leaves an
    # AppleDouble ._IMG_0001.JPG beside it and viewers keep hidden .thumbnails folders; PIL
    # names .eps and .mpg but cannot decode them here. Each of those would fail the run.
    (tmp_path / ".thumbnails").mkdir()
    for name in ("IMG_0001.JPG", "photo.Png", "3d.MPO"):
        Image.fromarray(smooth_rgb(8, 8)).save(tmp_path / name, format="JPEG")
    for name in ("._IMG_0001.JPG", ".thumbnails/IMG_0001.png", "figure.eps", "clip.mpg"):
        (tmp_path / name).write_bytes(b"not an image this run can read")
    names = [name for _, name in predict.list_inputs(str(tmp_path))]
    assert names == ["3d", "IMG_0001", "photo"]


def test_a_folder_that_cannot_be_listed_is_named_in_a_warning(tmp_path, monkeypatch, caplog):
    Image.fromarray(smooth_rgb(20, 20)).save(tmp_path / "a.png")
    (tmp_path / "locked").mkdir()
    listdir = os.scandir

    def scandir(path):  # chmod 000 does not stop root, who runs CI
        if os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied", path)
        return listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(std_logging.WARNING):
        found = predict.list_inputs(str(tmp_path))
    assert [name for _, name in found] == ["a"]  # the stem its mask is named after
    assert f"{tmp_path / 'locked'}: skipped, cannot list it (Permission denied)" in caplog.text


def test_a_directory_keeps_the_folder_of_its_only_image(tmp_path):
    # Outputs keep the path below --input, even when a single subfolder holds every image
    # (Cityscapes' val/<city>/ for one city).
    (tmp_path / "val" / "frankfurt").mkdir(parents=True)
    image = tmp_path / "val" / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png"
    Image.fromarray(smooth_rgb(8, 8)).save(image)
    name = os.path.join("frankfurt", "frankfurt_000000_000294_leftImg8bit")
    assert predict.list_inputs(str(tmp_path / "val")) == [(str(image), name)]


def test_inputs_sharing_a_stem_keep_their_outputs_apart(tmp_path):
    # a.jpg and a.png: both masks went to a.png, the second over the first.
    for name in ("a.jpg", "a.png", "b.png"):
        Image.fromarray(smooth_rgb(8, 8)).save(tmp_path / name)
    inputs = predict.list_inputs(str(tmp_path))
    assert [name for _, name in inputs] == ["a", "a.png", "b"]
    predict.check_outputs_spare_inputs(inputs, tmp_path / "out", write_overlay=True)


def test_a_relative_glob_keeps_the_subdirectories(tmp_path, monkeypatch):
    for folder in ("x", "y", "z"):
        (tmp_path / folder).mkdir()
        Image.fromarray(smooth_rgb(8, 8)).save(tmp_path / folder / "a.png")
    monkeypatch.chdir(tmp_path)
    for pattern in ("*/a.png", "./*/a.png"):
        names = [name for _, name in predict.list_inputs(pattern)]
        assert names == [os.path.join(folder, "a") for folder in ("x", "y", "z")], pattern


def test_a_forced_format_must_hold_the_models_classes():
    predict.check_output_format("cityscapes", 19)
    predict.check_output_format("voc", 256)
    with pytest.raises(ValueError, match=r"--dataset=cityscapes.*21 classes"):
        predict.check_output_format("cityscapes", 21)
    with pytest.raises(ValueError, match=r"--dataset=voc.*301 classes"):
        predict.check_output_format("voc", 301)
    with pytest.raises(ValueError, match="expected one of"):
        predict.check_output_format("coco", 21)


def test_list_inputs(inputs):
    root, _ = inputs
    names = dict((os.path.relpath(p, root), n) for p, n in predict.list_inputs(str(root)))
    assert "README.txt" not in names and names["notes.jpg"] == "notes"
    assert names[os.path.join("sub", "nested.png")] == os.path.join("sub", "nested")
    globbed = predict.list_inputs(str(root / "*.png"))
    assert [n for _, n in globbed] == ["gray", "gray16", "palette", "rgba"]
    assert predict.list_inputs(str(root / "rgb.jpg")) == [(str(root / "rgb.jpg"), "rgb")]
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        predict.list_inputs(str(root / "nothing_here*"))


def test_palettes_and_label_ids():
    palette = predict.voc_palette()
    assert palette[0].tolist() == [0, 0, 0] and palette[1].tolist() == [128, 0, 0]
    assert palette[15].tolist() == [192, 128, 128] and palette[255].tolist() == [224, 224, 192]
    by_train_id = {label.trainId: label for label in cs_labels.labels if 0 <= label.trainId < 19}
    for train_id, color in enumerate(predict.CITYSCAPES_PALETTE):
        assert tuple(color) == by_train_id[train_id].color
    classes = np.arange(19, dtype=np.int32).reshape(1, 19)
    ids = np.asarray(predict.mask_image(classes, "cityscapes", 19))
    assert ids.tolist() == [[by_train_id[t].id for t in range(19)]]
    voc = predict.mask_image(np.array([[0, 15, 20]]), "voc", 21)
    assert voc.mode == "P" and np.asarray(voc).tolist() == [[0, 15, 20]]
    # Indices: 8-bit up to 256 classes (255 the last), 16-bit above, the values unchanged.
    gray = predict.mask_image(np.array([[0, 255]]), "indices", 256)
    assert gray.mode == "L" and np.asarray(gray).tolist() == [[0, 255]]
    wide = predict.mask_image(np.array([[0, 260]]), "indices", 301)
    assert wide.mode == "I;16" and np.asarray(wide).tolist() == [[0, 260]]
    assert predict.output_format_for("voc_aug", 21) == "voc"
    assert predict.output_format_for("cityscapes", 19) == "cityscapes"
    # A tfds config after the name (Cityscapes' own default) is still Cityscapes.
    assert predict.output_format_for("cityscapes/semantic_segmentation", 19) == "cityscapes"
    # Another dataset of 21 classes is not VOC: plain indices, no palette.
    assert predict.output_format_for("pan_synthetic", 21) == "indices"
    assert predict.output_format_for("pan_synthetic/tiny", 13) == "indices"
    assert predict.output_format_for(None, 21) == "voc"  # a palette PNG still holds indices
    assert predict.output_format_for(None, 7) == "indices"
    # A converted model's 19 classes are not assumed to be Cityscapes (label ids ≠ indices).
    assert predict.output_format_for(None, 19) == "indices"
    # Cityscapes overlays use its own trainId colors.
    np.testing.assert_array_equal(predict.palette_for("cityscapes", 19), predict.CITYSCAPES_PALETTE)
    # A one-class (binary) model's masks hold 0 and 1: two colors, two names.
    assert len(predict.palette_for("indices", 1)) == 2
    assert evaluate.class_names_for(None, 1) == ("class_0", "class_1")


def test_overlay_blends_each_pixel_with_its_class_color():
    # Checked only for its size: colors of the next class, or alpha applied to the image
    # instead of the colors, went unnoticed.
    palette = predict.voc_palette()[:21]
    image = np.random.default_rng(0).integers(0, 256, (2, 3, 3), np.uint8)
    classes = np.array([[0, 1, 15], [20, 7, 300]])  # 300: beyond the palette, black
    colors = np.concatenate([palette, np.zeros((280, 3), np.uint8)])[classes]
    expected = np.round(0.75 * image + 0.25 * colors.astype(np.float64)).astype(np.uint8)
    np.testing.assert_array_equal(predict.overlay(image, classes, palette, alpha=0.25), expected)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """(model, variables, model directory) of a small random FCN, saved once for every CLI test."""
    model = models.create("fcn", num_classes=NUM_CLASSES, backbone="resnet18")
    variables = random_variables(model)
    model_dir = tmp_path_factory.mktemp("model")
    spec = {"name": "fcn", "backbone": "resnet18", "num_classes": NUM_CLASSES, "overrides": {}}
    checkpointing.save_variables(model_dir, variables, spec)
    return model, variables, model_dir


def run_predict(*args, **env):
    """`python -m pan_jax.predict ARGS` on the CPU: the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "pan_jax.predict", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
    )


def test_predict_cli_writes_masks_and_names_the_bad_file(inputs, saved_model, tmp_path):
    root, expected = inputs
    model, variables, model_dir = saved_model
    out = tmp_path / "out"
    home = tmp_path.parent  # which holds the fixtures' folders too: a shell leaves `~` in --x=~/y
    result = run_predict(
        f"--model_dir=~/{model_dir.relative_to(home)}",
        f"--input=~/{root.relative_to(home)}",
        f"--output=~/{out.relative_to(home)}",
        "--overlay",
        "--flip",
        HOME=str(home),
    )
    assert result.returncode == 1, result.stderr[-3000:]  # one file failed
    assert "notes.jpg" in result.stdout and "notes.jpg" in result.stderr
    assert f"Wrote {len(expected)} masks" in result.stdout
    # Its own lines, without orbax's INFO chatter (was 20 of 45 lines; main filtered it already).
    assert "orbax-checkpoint version" not in result.stderr
    assert "Closing _NonBlockingMetadataStore" not in result.stderr
    for name, (image, _) in expected.items():
        stem = os.path.splitext(name)[0]
        mask = Image.open(out / f"{stem}.png")
        assert mask.mode == "P" and mask.size == (image.shape[1], image.shape[0]), name
        assert np.asarray(mask).max() < NUM_CLASSES
        assert Image.open(out / f"{stem}_overlay.jpg").size == mask.size
    assert not (out / "notes.png").exists()
    # The mask holds exactly the classes this process predicts for the same image, padded as
    # the CLI pads for a model directory.
    image = predict.load_image(root / "rgb.jpg")
    classes = predict.segment(model, variables, image, flip=True, pad_multiple=predict.PAD_MULTIPLE)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "rgb.png")), classes)


def test_importing_predict_with_the_other_programs_defines_no_flag_twice():
    # A notebook or a script may import predict with main or bench: the flags of each are
    # absl's global ones, and predict shares names with both (--workdir, --step, --dtype).
    script = "import pan_jax.predict, pan_jax.main, pan_jax.bench, pan_jax.convert.cli"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_predict_computes_in_the_dtype_asked_for(inputs, saved_model, tmp_path):
    root, _ = inputs
    _, variables, model_dir = saved_model
    out = tmp_path / "out"
    result = run_predict(
        f"--model_dir={model_dir}",
        f"--input={root / 'rgb.jpg'}",
        f"--output={out}",
        "--dtype=bfloat16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in bfloat16" in result.stderr
    model, _, _, _ = inference.load_model(model_dir, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    image = predict.load_image(root / "rgb.jpg")
    classes = predict.segment(model, variables, image, pad_multiple=predict.PAD_MULTIPLE)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "rgb.png")), classes)
    assert inference.load_model(model_dir)[0].dtype == jnp.float32  # the default


def test_a_workdirs_step_chooses_its_checkpoint_and_the_latest_is_the_default(
    saved_model, tmp_path
):
    model, variables, _ = saved_model
    spec = {"name": "fcn", "backbone": "resnet18", "num_classes": NUM_CLASSES, "overrides": {}}
    config = ml_collections.ConfigDict({"keep_checkpoints": 3, "checkpoint_every_steps": 1})
    manager = checkpointing.create_manager(tmp_path / "run", config)
    for step in (10, 20):  # the parameters of step n, each n times the first's
        scaled = jax.tree.map(lambda leaf, n=step: leaf * (n / 10), variables)
        checkpointing.save(manager, step, scaled, spec, force=True)
    manager.wait_until_finished()
    manager.close()
    kernel = variables["params"]["head"]["kernel"]
    for step, want in ((10, 1.0), (20, 2.0), (None, 2.0)):
        loaded, restored, _, at = inference.load_model(tmp_path / "run", step)
        assert at == (step or 20) and loaded.num_classes == model.num_classes
        np.testing.assert_allclose(restored["params"]["head"]["kernel"], kernel * want)
    # A step it lacks is named as missing, with the steps there: no "damaged" checkpoint.
    with pytest.raises(FileNotFoundError, match=r"has no step 15; it has \[10, 20\]"):
        inference.load_model(tmp_path / "run", 15)
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint at step 15 .*steps there: \[10, 20"
    ):
        checkpointing.restore_for_inference(tmp_path / "run", 15)


def test_predict_files_makes_the_output_folders_it_needs(saved_model, tmp_path):
    # --output=runs/new/masks, and masks kept in their input's subfolder (Cityscapes' city):
    # folders that do not exist yet, at any depth.
    model, variables, _ = saved_model
    Image.fromarray(smooth_rgb(60, 80)).save(tmp_path / "a.png")
    out = tmp_path / "runs" / "new" / "masks"
    inputs = [(str(tmp_path / "a.png"), os.path.join("frankfurt", "a"))]
    written, errors = predict.predict_files(
        model, variables, inputs, out, output_format="voc", write_overlay=True
    )
    assert errors == [] and written == [os.fspath(out / "frankfurt" / "a.png")]
    assert Image.open(out / "frankfurt" / "a.png").size == (80, 60)
    assert Image.open(out / "frankfurt" / "a_overlay.jpg").size == (80, 60)


def test_segment_refuses_a_float_image(saved_model):
    # A float image (e.g. decoded to 0..1) must not be taken as already normalized.
    model, variables, _ = saved_model
    image = smooth_rgb(16, 16).astype(np.float32)
    with pytest.raises(ValueError, match=r"expected a uint8 RGB image \(as load_image returns\)"):
        predict.segment(model, variables, image)


def test_predict_refuses_a_format_that_cannot_hold_the_models_classes(saved_model, tmp_path):
    # --dataset=cityscapes on a 21-class model wrote classes 19 and 20 as label id 0, exit 0.
    _, _, model_dir = saved_model
    Image.fromarray(smooth_rgb(40, 40)).save(tmp_path / "a.png")
    result = run_predict(
        f"--model_dir={model_dir}",
        f"--input={tmp_path / 'a.png'}",
        f"--output={tmp_path / 'out'}",
        "--dataset=cityscapes",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --dataset=cityscapes")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, names",
    [({"num_classes": 19}, "['params']['head']['bias'] is stored as (21,), the model has (19,)"),
     ({"backbone": "resnet34"}, "")],
)  # fmt: skip
def test_a_model_json_that_does_not_fit_its_variables_is_named(saved_model, tmp_path, edit, names):
    # Both were accepted: the first failed on the first image with flax's shape error, the
    # second with orbax's structure dump; neither named the model directory.
    _, _, model_dir = saved_model
    shutil.copytree(model_dir, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    (tmp_path / "m" / "model.json").write_text(json.dumps({**spec, **edit}))
    with pytest.raises(checkpointing.CheckpointMismatchError) as error:
        checkpointing.load_variables(tmp_path / "m")
    assert f"{tmp_path / 'm' / 'variables'} does not fit the model of" in str(error.value)
    assert names in str(error.value)
    Image.fromarray(smooth_rgb(40, 40)).save(tmp_path / "a.png")
    result = run_predict(
        f"--model_dir={tmp_path / 'm'}",
        f"--input={tmp_path / 'a.png'}",
        f"--output={tmp_path / 'o'}",
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'm'}")


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"name": "pan_smp", "backb', r"model\.json: not valid JSON"),  # cut short
        ('{"name": "pan_smp", "backbone": "resnet18"}', r"model\.json: expected an object with"),
        ('{"name": "pan_smp", "backbone": "resnet19", "num_classes": 3}', r"unknown backbone"),
    ],
)
def test_a_damaged_model_json_is_named(saved_model, tmp_path, text, expected):
    # It was "error: Unterminated string starting at: line 3 column 11" (no file named), or a
    # KeyError traceback, in predict, and a JSONDecodeError traceback in --mode=eval.
    _, _, model_dir = saved_model
    shutil.copytree(model_dir, tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text(text)
    with pytest.raises(checkpointing.CheckpointDamagedError, match=expected):
        checkpointing.load_variables(tmp_path / "m")
    Image.fromarray(smooth_rgb(40, 40)).save(tmp_path / "a.png")
    result = run_predict(
        f"--model_dir={tmp_path / 'm'}", f"--input={tmp_path / 'a.png'}", f"--output={tmp_path}/o"
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path / 'm' / 'model.json'}: "), last


def test_predict_refuses_to_overwrite_its_inputs(saved_model, tmp_path):
    # The reviewer's data loss: --output=--input wrote photos/rgb.png's mask over photos/rgb.png.
    _, _, model_dir = saved_model
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(smooth_rgb(40, 40)).save(photos / "rgb.png")
    original = (photos / "rgb.png").read_bytes()
    result = run_predict(
        f"--model_dir={model_dir}", f"--input={photos}", f"--output={photos}", "--overlay"
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert (photos / "rgb.png").read_bytes() == original
    assert sorted(os.listdir(photos)) == ["rgb.png"]  # no overlay written either
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert f"input {photos / 'rgb.png'}" in message and f"--output={photos}" in message
    assert "Wrote" not in result.stdout


def test_outputs_must_spare_inputs_by_resolved_path_masks_and_overlays(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(smooth_rgb(16, 16)).save(photos / "rgb.png")
    single = predict.list_inputs(str(photos / "rgb.png"))
    # The output directory spelled another way still resolves to the input's directory.
    with pytest.raises(ValueError, match=r"mask of .*rgb\.png .*overwriting the input"):
        predict.check_outputs_spare_inputs(single, photos / "x" / "..", write_overlay=False)
    predict.check_outputs_spare_inputs(single, tmp_path / "masks", write_overlay=True)
    # street.jpg's overlay, street_overlay.jpg, is also an input.
    Image.fromarray(smooth_rgb(16, 16)).save(tmp_path / "street.jpg")
    Image.fromarray(smooth_rgb(16, 16)).save(tmp_path / "street_overlay.jpg")
    street = predict.list_inputs(str(tmp_path / "street*"))
    with pytest.raises(ValueError, match=r"the overlay of .*street\.jpg would be written to"):
        predict.check_outputs_spare_inputs(street, tmp_path, write_overlay=True)
    predict.check_outputs_spare_inputs(street, tmp_path, write_overlay=False)
    predict.check_outputs_spare_inputs(street, tmp_path / "masks", write_overlay=True)
    # Two outputs that resolve to one file (a link in the output directory) are refused too.
    (tmp_path / "out" / "b").mkdir(parents=True)
    (tmp_path / "out" / "a").symlink_to(tmp_path / "out" / "b")
    twins = [(str(photos / "rgb.png"), "a/x"), (str(tmp_path / "street.jpg"), "b/x")]
    with pytest.raises(ValueError, match=r"the mask of .*street\.jpg and the mask of .*rgb\.png"):
        predict.check_outputs_spare_inputs(twins, tmp_path / "out", write_overlay=False)


def test_cityscapes_evaluation_finds_one_prediction_per_image_with_overlays(tmp_path):
    # With the overlays as <stem>_overlay.png, cityscapesscripts found two predictions for
    # every image (its search takes <city>_<seq>_<frame>*.png at any depth) and exited.
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval  # noqa: N813

    image = tmp_path / "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    image.parent.mkdir(parents=True)
    Image.fromarray(smooth_rgb(16, 16)).save(image)
    results = tmp_path / "results"
    inputs = predict.list_inputs(str(tmp_path / "leftImg8bit" / "val"), exclude_dir=str(results))
    predict.check_outputs_spare_inputs(inputs, results, write_overlay=True)
    (name,) = [name for _, name in inputs]
    mask, overlay = predict.output_paths(results, name, write_overlay=True)
    mask.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(mask)
    Image.fromarray(smooth_rgb(16, 16)).save(overlay)
    arguments = copy.copy(cs_eval.args)
    arguments.predictionPath, arguments.predictionWalk = str(results), None
    ground_truth = tmp_path / "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png"
    assert cs_eval.getPrediction(arguments, str(ground_truth)) == os.fspath(mask)


def test_list_inputs_skips_files_inside_the_output_directory(tmp_path):
    photos = tmp_path / "photos2"
    (photos / "masks" / "masks").mkdir(parents=True)
    for name in ("rgb.png", "masks/rgb.png", "masks/rgb_overlay.jpg", "masks/masks/rgb.png"):
        Image.fromarray(smooth_rgb(16, 16)).save(photos / name)
    masks = str(photos / "masks")
    assert predict.list_inputs(str(photos), exclude_dir=masks) == [(str(photos / "rgb.png"), "rgb")]
    globbed = predict.list_inputs(str(photos / "**" / "*.png"), exclude_dir=masks)
    assert globbed == [(str(photos / "rgb.png"), "rgb")]
    # Spelled with "..", the output directory is still recognised.
    spelled = os.path.join(masks, "..", "masks")
    assert len(predict.list_inputs(str(photos), exclude_dir=spelled)) == 1
    # Every match is an output: the error says where they went.
    with pytest.raises(FileNotFoundError, match=r"besides 1 file\(s\) inside --output="):
        predict.list_inputs(str(photos / "**" / "*_overlay.jpg"), exclude_dir=masks)
    # --output is the input directory itself: skipping would leave nothing, so all are inputs
    # (and check_outputs_spare_inputs refuses what would overwrite them).
    assert len(predict.list_inputs(str(photos), exclude_dir=str(photos))) == 4
    assert len(predict.list_inputs(str(photos / "*.png"), exclude_dir=str(photos))) == 1


def test_predict_does_not_read_its_own_masks_back(saved_model, tmp_path):
    # The reviewer's second run of --input=photos2 --output=photos2/masks --overlay segmented the
    # first run's masks and overlays into masks/masks/*_overlay_overlay.png.
    _, _, model_dir = saved_model
    photos = tmp_path / "photos2"
    (photos / "masks").mkdir(parents=True)
    Image.fromarray(smooth_rgb(40, 40)).save(photos / "rgb.png")
    for left_by_a_first_run in ("rgb.png", "rgb_overlay.jpg"):
        Image.fromarray(smooth_rgb(40, 40, 1)).save(photos / "masks" / left_by_a_first_run)
    output = photos / "masks"
    result = run_predict(
        f"--model_dir={model_dir}", f"--input={photos}", f"--output={output}", "--overlay"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote 1 masks" in result.stdout
    assert sorted(os.listdir(output)) == ["rgb.png", "rgb_overlay.jpg"]


def test_predict_checks_its_arguments_before_loading_the_model(tmp_path):
    def error_line(model_dir):
        result = run_predict(
            f"--model_dir={model_dir}",
            f"--input={tmp_path / 'nothing_here*.png'}",
            f"--output={tmp_path / 'out'}",
        )
        assert result.returncode == 1
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        return result.stderr.strip().splitlines()[-1]

    # A model directory that is not one (here a PyTorch file): one line, pointing at convert.
    (tmp_path / "smp_pan.pth").write_bytes(b"not loaded")
    last = error_line(tmp_path / "smp_pan.pth")
    assert last.startswith("error: ") and "python -m pan_jax.convert" in last, last
    # A directory that looks like a model (never read: its variables are empty): the inputs
    # are refused before anything loads it.
    model_dir = tmp_path / "model"
    (model_dir / "variables").mkdir(parents=True)
    (model_dir / "model.json").write_text("{}")
    last = error_line(model_dir)
    assert last.startswith("error: --input=") and "nothing_here*.png" in last, last
    assert not (tmp_path / "out").exists()
    # A workdir whose checkpoints/ holds no finished step (orbax's temporaries do not count).
    workdir = tmp_path / "run"
    (workdir / "checkpoints" / "5.orbax-checkpoint-tmp-1").mkdir(parents=True)
    last = error_line(workdir)
    assert last.startswith("error: ") and "holds no finished checkpoint" in last, last
    (workdir / "checkpoints" / "20").mkdir()
    result = run_predict(f"--workdir={workdir}", "--step=7", f"--input={tmp_path}",
                         f"--output={tmp_path / 'out'}")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "has no step 7; it has [20]" in result.stderr.strip().splitlines()[-1]
    # An output that is a file, not a directory, and survives the refusal.
    (tmp_path / "out.png").write_bytes(b"keep me")
    result = run_predict(f"--model_dir={model_dir}", f"--input={tmp_path}",
                         f"--output={tmp_path / 'out.png'}")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{tmp_path / 'out.png'} is a file, not a directory" in result.stderr.splitlines()[-1]
    assert (tmp_path / "out.png").read_bytes() == b"keep me"
    result = run_predict(f"--model_dir={model_dir}", f"--input={tmp_path}",
                         f"--output={tmp_path / 'out.png' / 'masks'}")  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{tmp_path / 'out.png'} is a file, not a directory" in result.stderr.splitlines()[-1]


def test_padding_defaults_to_the_runs_evaluation_else_sixteen():
    # A training workdir predicts as it was evaluated; a converted model pads to multiples of
    # 16, so a size SMP accepts (e.g. 320×256) runs unpadded, as in SMP.
    assert predict.inference_options({"pad_multiple": 128})["pad_multiple"] == 128
    assert predict.inference_options({})["pad_multiple"] == predict.PAD_MULTIPLE == 16
    assert predict.inference_options({"pad_multiple": 128}, pad_multiple=1)["pad_multiple"] == 1


def test_multiscale_and_flip_flags_reach_the_options():
    # An ignored --multiscale (one scale, and no error) went unseen.
    assert predict.inference_options({})["scales"] == (1.0,)
    assert predict.inference_options({}, multiscale=True)["scales"] == inference.MS_SCALES
    assert predict.inference_options({})["flip"] is False
    assert predict.inference_options({}, flip=True)["flip"] is True


def test_a_crop_flag_without_stride_slides_by_two_thirds_of_that_crop():
    # A workdir evaluated with crop 512, stride 341: its stride does not fit --crop_size=256.
    config = {"mode": "slide", "crop_size": [512, 512], "stride": [341, 341]}
    options = predict.inference_options(config, crop_size=256)
    assert options["crop_size"] == (256, 256) and options["stride"] == (171, 171)
    assert predict.inference_options(config)["stride"] == (341, 341)
    assert predict.inference_options(config, crop_size=256, stride=128)["stride"] == (128, 128)
    assert predict.inference_options(config, mode="whole", crop_size=256)["mode"] == "whole"
    # Both from the flags: the message blames neither on the config.
    with pytest.raises(ValueError, match=r"^--stride=\(300, 300\) is larger .* predicted$"):
        predict.inference_options(config, crop_size=256, stride=300)
    # Both from the config: the message says so, and that the flags override it.
    bad = {**config, "stride": 600}
    # Only the values the message names (crop and stride, not the mode) are blamed on it.
    with pytest.raises(ValueError, match=r"\(crop_size, stride from the eval section .*\.json"):
        predict.inference_options(bad)
    with pytest.raises(ValueError, match=r"--crop_size is required with mode='slide'"):
        predict.inference_options({}, mode="slide")


def test_a_window_flag_in_whole_mode_is_ignored_with_a_warning(caplog):
    # --crop_size=512 alone reads as a request for sliding windows: whole-image inference runs
    # instead, and the log names the flag, where the mode came from and the flag that slides.
    with caplog.at_level(std_logging.WARNING):
        options = predict.inference_options({"mode": "whole"}, crop_size=512)
    assert options["mode"] == "whole" and options["crop_size"] is None
    assert "--crop_size ignored: mode 'whole' of the eval section of config.json" in caplog.text
    assert "(give --mode=slide)" in caplog.text
    caplog.clear()
    with caplog.at_level(std_logging.WARNING):  # sliding: nothing to say
        predict.inference_options({"mode": "slide", "crop_size": 512}, stride=100)
    assert caplog.text == ""


def test_predict_follows_the_workdir_config_with_a_smaller_crop(saved_model, tmp_path):
    # No --mode, --pad_multiple nor --dataset: the run's eval section and dataset decide (a
    # Cityscapes workdir slides, pads as it was evaluated and writes label ids).
    _, _, model_dir = saved_model
    workdir = tmp_path / "workdir"
    shutil.copytree(model_dir, workdir)
    eval_config = {
        "mode": "slide",
        "crop_size": [512, 512],
        "stride": [341, 341],
        "pad_multiple": 32,
    }
    config = {"eval": eval_config, "data": {"name": "pan_synthetic"}}  # 21 classes, not VOC's
    (workdir / "config.json").write_text(json.dumps(config))
    Image.fromarray(smooth_rgb(40, 60)).save(tmp_path / "rgb.png")
    out = tmp_path / "out"
    result = run_predict(
        f"--model_dir={workdir}",
        f"--input={tmp_path / 'rgb.png'}",
        f"--output={out}",
        "--crop_size=256",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The options, logged: the config's mode and padding, the stride of the flag's crop.
    for option in ("'mode': 'slide'", "'stride': (171, 171)", "'pad_multiple': 32"):
        assert option in result.stderr, option
    mask = Image.open(out / "rgb.png")
    assert mask.size == (60, 40) and mask.mode == "L"  # indices, not a VOC palette PNG
