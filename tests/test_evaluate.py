"""Inference modes, dataset evaluation, reports and the `evaluate(config, workdir)` entry."""

import functools
import json
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pan_jax import checkpointing, evaluate, metrics, models
from pan_jax.models import random_variables
from pan_jax.models.layers import resize_bilinear

NUM_CLASSES = 5


@pytest.fixture(scope="module")
def model_and_variables():
    # The evaluator does not care which model it runs: the FCN baseline compiles fastest.
    model = models.create("fcn", num_classes=NUM_CLASSES, backbone="resnet18")
    return model, random_variables(model)


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).normal(size=(height, width, 3)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, images):
    return model.apply(variables, images, train=False)


def direct_logits(model, variables, image):
    """A plain forward pass on the unpadded image: the reference for every mode."""
    return np.asarray(_apply(model, variables, jnp.asarray(image)[None])[0])


def binary_model(image):
    """SMP's binary PAN (classes=1) stand-in whose logits on `image` are above 0 for half of
    the pixels."""
    model = models.create("fcn", num_classes=1, backbone="resnet18")
    variables = random_variables(model)
    logits = direct_logits(model, variables, image)[..., 0]
    params = jax.tree.map(lambda x: x, variables["params"])
    params["head"]["bias"] = params["head"]["bias"] - np.median(logits)
    return model, {**variables, "params": params}


def test_a_one_class_model_masks_where_its_sigmoid_passes_one_half():
    # A mask by argmax would be all 0.
    image = random_image(128, 128)
    model, variables = binary_model(image)
    logits = direct_logits(model, variables, image)[..., 0]
    mask = evaluate.predict_image(model, variables, image, pad_multiple=1)
    np.testing.assert_array_equal(mask, logits > 0)
    assert 0.3 < mask.mean() < 0.7
    # Views merged as mean probabilities: the sigmoid, not a softmax over one class (always 1).
    mirrored = direct_logits(model, variables, image[:, ::-1])[:, ::-1, 0]
    mean = (jax.nn.sigmoid(logits) + jax.nn.sigmoid(mirrored)) / 2
    both = evaluate.predict_image(model, variables, image, flip=True, pad_multiple=1)
    np.testing.assert_array_equal(both, np.asarray(mean) > 0.5)
    assert (both != mask).any()  # the flipped view counts


@pytest.mark.parametrize("flip", [False, True])
def test_a_one_class_model_is_scored_on_its_masks(flip):
    # Its argmax is always 0, which scored every pixel labelled 1 as ignored (mIoU 1.0).
    image = random_image(128, 128)
    model, variables = binary_model(image)
    label = np.random.default_rng(3).integers(0, 2, (128, 128)).astype(np.int32)
    mask = evaluate.predict_image(model, variables, image, flip=flip)
    assert 0.2 < mask.mean() < 0.8
    report = evaluate.evaluate_dataset(
        model, variables, [{"image": image, "label": label}], num_classes=1, flip=flip
    )
    expected = np.asarray(metrics.confusion_matrix(label, mask, 2))
    np.testing.assert_array_equal(report["confusion_matrix"], expected)
    names = evaluate.class_names_for(None, 1)
    assert len(evaluate.report_to_json(report, names)["per_class"]) == 2


def test_whole_image_scores_at_the_label_size(model_and_variables):
    model, variables = model_and_variables
    image = random_image(128, 128)  # a bucket size: no padding, so the forward pass is exact
    logits = direct_logits(model, variables, image)
    np.testing.assert_array_equal(
        evaluate.predict_image(model, variables, image), np.argmax(logits, axis=-1)
    )
    # A label of another size: logits are resized to it (bilinear) before the argmax.
    label = np.random.default_rng(1).integers(0, NUM_CLASSES, (96, 160)).astype(np.int32)
    resized = resize_bilinear(jnp.asarray(logits)[None], (96, 160), model.align_corners)[0]
    expected = metrics.confusion_matrix(label, jnp.argmax(resized, axis=-1), NUM_CLASSES)
    report = evaluate.evaluate_dataset(
        model, variables, [{"image": image, "label": label}], num_classes=NUM_CLASSES
    )
    np.testing.assert_array_equal(report["confusion_matrix"], np.asarray(expected))


@pytest.mark.parametrize("size, pad_multiple", [((128, 128), 128), ((131, 150), 1)])
def test_multiscale_with_scale_one_and_no_flip_equals_single_scale(
    model_and_variables, size, pad_multiple
):
    model, variables = model_and_variables
    image = random_image(*size, seed=2)
    reference = np.argmax(direct_logits(model, variables, image), axis=-1)
    options = dict(pad_multiple=pad_multiple, flip=False)
    single = evaluate.predict_image(model, variables, image, **options)
    one_scale = evaluate.predict_image(model, variables, image, scales=(1.0,), **options)
    # Two identical views go through the softmax-averaging path of multi-scale inference.
    merged = evaluate.predict_image(model, variables, image, scales=(1.0, 1.0), **options)
    np.testing.assert_array_equal(single, reference)
    np.testing.assert_array_equal(one_scale, reference)
    np.testing.assert_array_equal(merged, reference)


def test_views_are_merged_by_averaging_softmax_probabilities(model_and_variables):
    model, variables = model_and_variables
    image = random_image(100, 120, seed=9)

    def single_view(picture, scale):  # one view: its logits at the original size
        return np.asarray(evaluate.predict_scores(model, variables, picture, scales=(scale,)))

    views = []
    for scale in (0.75, 1.5):
        views.append(single_view(image, scale)[:100, :120])
        views.append(single_view(image[:, ::-1], scale)[:100, :120][:, ::-1])  # mirrored back
    expected = np.mean([jax.nn.softmax(v, axis=-1) for v in views], axis=0)
    merged = evaluate.predict_scores(model, variables, image, scales=(0.75, 1.5), flip=True)
    # 1e-5: the evaluator flips after rescaling, this reference before (cv2 rounding differs).
    np.testing.assert_allclose(np.asarray(merged)[:100, :120], expected, rtol=0, atol=1e-5)


def test_flip_averaging_of_a_mirror_symmetric_input_is_mirror_symmetric(model_and_variables):
    model, variables = model_and_variables
    half = random_image(120, 60, seed=3)
    image = np.concatenate([half, half[:, ::-1]], axis=1)  # 120×120: also padded at the right
    plain = evaluate.predict_image(model, variables, image)
    # The network itself is not mirror-equivariant, so without flip the prediction is not
    # symmetric; that is what makes the flipped check below meaningful.
    assert (plain != plain[:, ::-1]).mean() > 0.05
    flipped = evaluate.predict_image(model, variables, image, flip=True)
    np.testing.assert_array_equal(flipped, flipped[:, ::-1])
    scores = np.asarray(evaluate.predict_scores(model, variables, image, flip=True))[:120, :120]
    np.testing.assert_allclose(scores, scores[:, ::-1], rtol=0, atol=1e-6)
    # With rescaled views too (resampling is symmetric up to float rounding).
    multi = np.asarray(
        evaluate.predict_scores(model, variables, image, scales=(0.75, 1.25), flip=True)
    )[:120, :120]
    np.testing.assert_allclose(multi, multi[:, ::-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "size, crop, pad_multiple",
    [((128, 256), (128, 256), 128), ((128, 256), 300, 128), ((131, 150), (131, 150), 1)],
)
def test_sliding_window_as_large_as_the_image_equals_whole(
    model_and_variables, size, crop, pad_multiple
):
    model, variables = model_and_variables
    image = random_image(*size, seed=4)
    h, w = size
    whole = np.asarray(evaluate.predict_scores(model, variables, image, pad_multiple=pad_multiple))
    slide = np.asarray(
        evaluate.predict_scores(
            model,
            variables,
            image,
            mode="slide",
            crop_size=crop,
            stride=17,
            pad_multiple=pad_multiple,
        )
    )
    np.testing.assert_allclose(slide[:h, :w], whole[:h, :w], rtol=0, atol=1e-6)
    np.testing.assert_allclose(slide[:h, :w], direct_logits(model, variables, image), atol=1e-4)


def test_sliding_windows_follow_mmseg(model_and_variables):
    model, variables = model_and_variables
    image = random_image(128, 200, seed=5)
    # mmseg: grid = ceil((200 − 128) / 64) + 1 = 3 columns at x = 0, 64 and 200 − 128 = 72.
    total, count = np.zeros((128, 200, NUM_CLASSES)), np.zeros((128, 200, 1))
    for x in (0, 64, 72):
        total[:, x : x + 128] += direct_logits(model, variables, image[:, x : x + 128])
        count[:, x : x + 128] += 1
    expected = total / count
    scores = evaluate.predict_scores(
        model, variables, image, mode="slide", crop_size=128, stride=64
    )
    np.testing.assert_allclose(np.asarray(scores)[:128, :200], expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(
        evaluate.predict_image(model, variables, image, mode="slide", crop_size=128, stride=64),
        np.argmax(expected, axis=-1),
    )


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"scales": (0.5, 1.0), "flip": True},
        {"mode": "slide", "crop_size": 128, "stride": 85},
    ],
    ids=["whole", "multiscale-flip", "slide"],
)
def test_no_image_is_dropped(model_and_variables, options):
    model, variables = model_and_variables
    rng = np.random.default_rng(6)
    # Smaller than the model's 128 px minimum, odd sizes, one pixel, larger than a bucket.
    sizes = [(48, 48), (1, 1), (5, 7), (97, 121), (128, 128), (131, 200)]
    elements = []
    for i, (h, w) in enumerate(sizes):
        label = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.int32)
        label[rng.random((h, w)) < 0.1] = 255
        elements.append({"image": random_image(h, w, seed=i), "label": label, "file_name": str(i)})
    report = evaluate.evaluate_dataset(
        model, variables, iter(elements), num_classes=NUM_CLASSES, **options
    )
    assert report["num_images"] == len(sizes)
    assert report["confusion_matrix"].sum() == sum((e["label"] != 255).sum() for e in elements)
    assert report["confusion_matrix"].dtype == np.int64


def test_compilations_are_bounded_by_buckets(model_and_variables):
    model, variables = model_and_variables
    evaluate.predict_image(model, variables, random_image(128, 128))  # compile the 128² bucket
    before = evaluate._forward._cache_size()
    for i, (h, w) in enumerate([(100, 101), (37, 128), (128, 64), (77, 77), (3, 120), (128, 1)]):
        evaluate.predict_image(model, variables, random_image(h, w, seed=i))
    # Sliding windows of images of any size larger than the crop: the crop's one program.
    for i, (h, w) in enumerate([(200, 150), (131, 260), (256, 256)]):
        options = {"mode": "slide", "crop_size": 128, "stride": 100}
        evaluate.predict_image(model, variables, random_image(h, w, seed=i), **options)
    assert evaluate._forward._cache_size() == before


@pytest.mark.parametrize("align_corners", [True, False])
def test_resize_logits_equals_torch_bilinear(align_corners):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(40, 50, 3)).astype(np.float32)
    valid = logits[:29, :41]
    for out in [(29, 41), (57, 23), (12, 90)]:
        expected = resize_bilinear(jnp.asarray(valid)[None], out, align_corners)[0]
        got = evaluate.resize_logits(logits, (29, 41), out, align_corners=align_corners)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        mirrored = evaluate.resize_logits(
            logits[:29, :41][:, ::-1],
            (29, 41),
            out,
            align_corners=align_corners,
            flip=True,
            padded_out=(out[0] + 3, out[1] + 5),
        )
        np.testing.assert_allclose(mirrored[: out[0], : out[1]], expected, rtol=0, atol=1e-5)


def test_options_errors_name_the_field():
    with pytest.raises(ValueError, match=r"config\.eval\.mode='tile'"):
        evaluate.eval_options({"mode": "tile"})
    with pytest.raises(ValueError, match=r"config\.eval\.crop_size is required"):
        evaluate.eval_options({"mode": "slide"})
    with pytest.raises(ValueError, match=r"config\.eval\.stride"):
        evaluate.eval_options({"mode": "slide", "crop_size": 64, "stride": 65})
    with pytest.raises(ValueError, match=r"config\.eval\.scales"):
        evaluate.eval_options({"scales": ()})
    options = evaluate.eval_options(ml_collections.ConfigDict({"mode": "slide", "crop_size": 769}))
    assert options["stride"] == (513, 513) and options["crop_size"] == (769, 769)


def test_class_names():
    assert evaluate.class_names_for("voc_aug", 21)[15] == "person"
    assert evaluate.class_names_for(None, 19)[0] == "road"
    assert evaluate.class_names_for("pan_synthetic", 13)[1] == "disk"
    assert evaluate.class_names_for("something_else", 4) == (
        "class_0",
        "class_1",
        "class_2",
        "class_3",
    )


def test_evaluate_entry_writes_reports(tmp_path, model_and_variables, capsys, caplog):
    """`evaluate(config, workdir)` on the embedded synthetic dataset (tiny config, 12 images),
    which it builds first, as training does (it used to fail: "not prepared")."""
    from pan_jax import data

    config = ml_collections.ConfigDict()
    config.data = data.default_data_config("pan_synthetic/tiny")
    config.data.data_dir = str(tmp_path / "tfds")
    config.eval = ml_collections.ConfigDict(
        {"mode": "whole", "scales": (1.0,), "flip": False, "crop_size": None, "stride": None}
    )
    model = models.create("fcn", num_classes=config.data.num_classes, backbone="resnet18")
    variables = random_variables(model, seed=1)
    workdir = tmp_path / "run"
    checkpointing.save_variables(
        workdir,
        variables,
        {"name": "fcn", "backbone": "resnet18", "num_classes": 13, "overrides": {}},
    )

    (workdir / "config.json").write_text(json.dumps({"data": {"name": "pan_synthetic"}}))

    report = evaluate.evaluate(config, workdir)
    assert report["num_images"] == report["num_images_expected"] == 12
    assert (  # scored on other data than the run's: said, not silent
        "evaluating on data.name=pan_synthetic/tiny (built first where it is not prepared), "
        f"but the run in {workdir} trained on pan_synthetic (its config.json)"
    ) in caplog.text
    assert f"mIoU {100 * report['miou']:.2f} % | pixel acc" in capsys.readouterr().out
    saved = json.loads((workdir / evaluate.REPORT_JSON).read_text())
    assert saved["num_images"] == 12 and saved["dataset"] == "pan_synthetic/tiny"
    names = [row["name"] for row in saved["per_class"]]
    assert names == list(data.class_names("pan_synthetic"))
    assert np.asarray(saved["confusion_matrix"]).sum() > 0
    for row in saved["per_class"]:  # absent classes are null, not NaN (strict JSON)
        assert row["iou"] is None or 0 <= row["iou"] <= 1
    markdown = (workdir / evaluate.REPORT_MD).read_text()
    assert "| 1 | disk |" in markdown and "mIoU" in markdown
    assert "paper" not in markdown and "paper_miou" not in saved

    config.paper_miou_percent = 78.37  # configs/voc_ablation.py's rows carry the paper's figure
    report = evaluate.evaluate(config, workdir)
    assert report["paper_miou"] == pytest.approx(0.7837)
    assert "the paper: mIoU 78.37 %" in capsys.readouterr().out
    assert "The paper reports mIoU 78.37" in (workdir / evaluate.REPORT_MD).read_text()

    config.data.num_classes = 21
    with pytest.raises(ValueError, match="num_classes"):
        evaluate.evaluate(config, workdir)


MULTIHOST_WORKER = """
import os
import sys

import jax
import numpy as np

pid, port, tests_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
sys.path.insert(0, tests_dir)
sys.path.insert(0, os.path.dirname(tests_dir))  # for tests.helpers
from jax.sharding import NamedSharding, PartitionSpec as P
from pan_jax import evaluate, models
from test_evaluate import NUM_CLASSES, multihost_elements, random_variables

model = models.create("fcn", num_classes=NUM_CLASSES, backbone="resnet18")
# As in training: the variables are global arrays replicated over both processes' devices.
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
replicated = NamedSharding(mesh, P())
variables = jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)),
    random_variables(model),
)
shard = multihost_elements()[pid::2]  # process 0: two images, process 1: one
report = evaluate.evaluate_dataset(model, variables, shard, num_classes=NUM_CLASSES)
print("RESULT", report["num_images"], report["confusion_matrix"].tolist(), flush=True)
"""


def multihost_elements():
    rng = np.random.default_rng(8)
    elements = []
    for i, (h, w) in enumerate([(48, 48), (97, 121), (128, 128)]):
        label = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.int32)
        elements.append({"image": random_image(h, w, seed=10 + i), "label": label})
    return elements


def test_two_processes_sum_their_shards(tmp_path, model_and_variables):
    import os
    import pathlib
    import socket
    import subprocess
    import sys

    model, variables = model_and_variables
    elements = multihost_elements()
    expected = evaluate.evaluate_dataset(model, variables, elements, num_classes=NUM_CLASSES)
    script = tmp_path / "worker.py"
    script.write_text(MULTIHOST_WORKER)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    tests_dir = str(pathlib.Path(__file__).parent)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), tests_dir],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    line = f"RESULT 3 {expected['confusion_matrix'].tolist()}"
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert line in out, (out, err[-2000:])


MULTIDEVICE_WORKER = """
import os
import sys

os.environ["XLA_FLAGS"] = (
    "--xla_force_host_platform_device_count=4 --xla_dump_hlo_as_text --xla_dump_to=" + sys.argv[2]
)
sys.path.insert(0, sys.argv[1])
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from pan_jax import evaluate, models
from tests.test_evaluate import NUM_CLASSES, multihost_elements, random_variables

model = models.create("fcn", num_classes=NUM_CLASSES, backbone="resnet18")
# As in training: the variables replicated over a mesh of every device.
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
variables = jax.device_put(random_variables(model), NamedSharding(mesh, P()))
used = set()
score = evaluate._score


def spy(scores, *args):
    used.update(scores.devices())
    return score(scores, *args)


evaluate._score = spy

def compilations(run):
    before = evaluate._forward._cache_size()
    result = run()
    return result, evaluate._forward._cache_size() - before


elements = multihost_elements() * 3  # 3 images of each size: batches of 4 are filled up
for options in [
    dict(scales=(0.75, 1.0), flip=True),
    dict(mode="slide", crop_size=64, stride=48),  # 1 to 4 windows
]:
    used.clear()
    spread, spread_compiled = compilations(
        lambda: evaluate.evaluate_dataset(
            model, variables, elements, num_classes=NUM_CLASSES, **options
        )
    )
    print("DEVICES", sorted(d.id for d in used), flush=True)
    used.clear()
    one, one_compiled = compilations(
        lambda: evaluate.evaluate_dataset(
            model, variables, elements, num_classes=NUM_CLASSES, devices=jax.devices()[:1],
            **options,
        )
    )
    print("DEVICES", sorted(d.id for d in used), flush=True)
    assert spread["num_images"] == one["num_images"] == 9
    np.testing.assert_array_equal(spread["confusion_matrix"], one["confusion_matrix"])
    # One program per input shape for all devices, not one per shape and device.
    assert spread_compiled == one_compiled, (spread_compiled, one_compiled)
    # Batches run incomplete when too many images wait for theirs: still the same matrix.
    limit, evaluate._MAX_WAITING = evaluate._MAX_WAITING, 0
    hurried = evaluate.evaluate_dataset(
        model, variables, elements, num_classes=NUM_CLASSES, **options
    )
    evaluate._MAX_WAITING = limit
    np.testing.assert_array_equal(hurried["confusion_matrix"], one["confusion_matrix"])
    print("EQUAL", flush=True)
"""


def test_images_are_spread_over_the_local_devices(tmp_path):
    # Every device busy, the same confusion matrix as one device, the same number of programs,
    # and no program where a device waits for another (each holds whole images).
    import os
    import pathlib
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(MULTIDEVICE_WORKER)
    root = str(pathlib.Path(__file__).parents[1])
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, str(script), root, str(tmp_path / "hlo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("DEVICES [0, 1, 2, 3]") == 2, result.stdout
    assert result.stdout.count("DEVICES [0]\n") == 2, result.stdout
    assert result.stdout.count("EQUAL") == 2, result.stdout
    programs = list((tmp_path / "hlo").glob("*after_optimizations.txt"))
    assert len(programs) > 10
    for program in programs:
        text = program.read_text()
        for collective in ("all-reduce", "all-gather", "collective-permute", "all-to-all"):
            assert f" {collective}(" not in text, (program.name, collective)


@pytest.mark.parametrize("hint", [None, 1])
def test_the_last_progress_line_has_no_eta(model_and_variables, caplog, hint):
    model, variables = model_and_variables
    image = random_image(128, 128)
    label = np.zeros((128, 128), np.int32)
    with caplog.at_level(logging.INFO):
        evaluate.evaluate_dataset(
            model,
            variables,
            [{"image": image, "label": label}],
            num_classes=NUM_CLASSES,
            num_images_hint=hint,
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval")]
    count = "1" if hint is None else "1/1"  # this process's images, of its share
    expected = rf"eval done: {count} images, [\d.]+ img/s"
    assert re.fullmatch(expected, lines[-1]), lines  # it ended in "ETA nan s"
