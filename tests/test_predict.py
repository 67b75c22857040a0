"""`python -m pan_jax.predict`: odd image formats, a bad file among good ones, mask formats."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from cityscapesscripts.helpers import labels as cs_labels
from PIL import Image

from pan_jax import checkpointing, models, predict
from tests.helpers import random_variables

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
    with pytest.raises(predict.ImageReadError, match=r"notes\.jpg"):
        predict.load_image(root / "notes.jpg")
    png = io.BytesIO()
    Image.fromarray(smooth_rgb(64, 64)).save(png, format="PNG")
    (tmp_path / "truncated.png").write_bytes(png.getvalue()[:200])
    with pytest.raises(predict.ImageReadError, match=r"truncated\.png"):
        predict.load_image(tmp_path / "truncated.png")


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
    assert predict.output_format_for("voc_aug", 21) == "voc"
    assert predict.output_format_for("cityscapes", 19) == "cityscapes"
    assert predict.output_format_for("pan_synthetic/tiny", 13) == "indices"
    assert predict.output_format_for(None, 21) == "voc"
    assert predict.output_format_for(None, 7) == "indices"


def test_predict_cli_writes_masks_and_names_the_bad_file(inputs, tmp_path):
    root, expected = inputs
    model = models.create("fcn", num_classes=NUM_CLASSES, backbone="resnet18")
    variables = random_variables(model)
    model_dir = tmp_path / "model"
    spec = {"name": "fcn", "backbone": "resnet18", "num_classes": NUM_CLASSES, "overrides": {}}
    checkpointing.save_variables(model_dir, variables, spec)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "pan_jax.predict",
        f"--model_dir={model_dir}",
        f"--input={root}",
        f"--output={out}",
        "--overlay",
        "--flip",
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 1, result.stderr[-3000:]  # one file failed
    assert "notes.jpg" in result.stdout and "notes.jpg" in result.stderr
    assert f"Wrote {len(expected)} masks" in result.stdout
    for name, (image, _) in expected.items():
        stem = os.path.splitext(name)[0]
        mask = Image.open(out / f"{stem}.png")
        assert mask.mode == "P" and mask.size == (image.shape[1], image.shape[0]), name
        assert np.asarray(mask).max() < NUM_CLASSES
        assert Image.open(out / f"{stem}_overlay.png").size == mask.size
    assert not (out / "notes.png").exists()
    # The mask holds exactly the classes this process predicts for the same image.
    image = predict.load_image(root / "rgb.jpg")
    classes = predict.segment(model, variables, image, flip=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "rgb.png")), classes)
