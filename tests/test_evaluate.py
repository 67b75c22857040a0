"""Dataset evaluation (every image scored once, on every local device and process), reports and
the `evaluate(config, workdir)` entry."""

import json
import logging
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from pan_jax import checkpointing, evaluate, inference, metrics, models
from pan_jax.models import random_variables
from pan_jax.models.layers import resize_bilinear
from tests.test_inference import (
    NUM_CLASSES,
    binary_model,
    direct_logits,
    fcn_with_random_weights,
    random_image,
)


@pytest.fixture(scope="module")
def model_and_variables():
    return fcn_with_random_weights()


@pytest.mark.parametrize("flip", [False, True])
def test_a_one_class_model_is_scored_on_its_masks(flip):
    # Its argmax is always 0, which scored every pixel labelled 1 as ignored (mIoU 1.0).
    image = random_image(128, 128)
    model, variables = binary_model(image)
    label = np.random.default_rng(3).integers(0, 2, (128, 128)).astype(np.int32)
    mask = inference.predict_image(model, variables, image, flip=flip)
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
        inference.predict_image(model, variables, image), np.argmax(logits, axis=-1)
    )
    # A label of another size: logits are resized to it (bilinear) before the argmax.
    label = np.random.default_rng(1).integers(0, NUM_CLASSES, (96, 160)).astype(np.int32)
    resized = resize_bilinear(jnp.asarray(logits)[None], (96, 160), model.align_corners)[0]
    expected = metrics.confusion_matrix(label, jnp.argmax(resized, axis=-1), NUM_CLASSES)
    report = evaluate.evaluate_dataset(
        model, variables, [{"image": image, "label": label}], num_classes=NUM_CLASSES
    )
    np.testing.assert_array_equal(report["confusion_matrix"], np.asarray(expected))


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


def test_options_errors_name_the_field():
    with pytest.raises(ValueError, match=r"config\.eval\.mode='tile'"):
        evaluate.eval_options({"mode": "tile"})
    with pytest.raises(ValueError, match=r"config\.eval\.crop_size is required"):
        evaluate.eval_options({"mode": "slide"})
    with pytest.raises(ValueError, match=r"config\.eval\.stride"):
        evaluate.eval_options({"mode": "slide", "crop_size": 64, "stride": 65})
    with pytest.raises(ValueError, match=r"config\.eval\.scales"):
        evaluate.eval_options({"scales": ()})
    with pytest.raises(ValueError, match=r"config\.eval\.pad_multiple=0: expected an integer >= 1"):
        evaluate.eval_options({"pad_multiple": 0})
    options = evaluate.eval_options(ml_collections.ConfigDict({"mode": "slide", "crop_size": 769}))
    assert options["stride"] == (513, 513) and options["crop_size"] == (769, 769)
    # A stride equal to the crop leaves no gap between windows: accepted.
    options = evaluate.eval_options({"mode": "slide", "crop_size": 64, "stride": 64})
    assert options["stride"] == (64, 64)
    assert evaluate.eval_options({"flip": True})["flip"] is True
    assert evaluate.eval_options(None)["flip"] is False


def test_a_num_classes_other_than_the_models_is_refused(model_and_variables):
    # Scored with 4 classes, the model's fifth class would be dropped as out of range, silently.
    model, variables = model_and_variables
    element = {"image": random_image(16, 16), "label": np.zeros((16, 16), np.int32)}
    with pytest.raises(ValueError, match=r"num_classes=4, but the model predicts 5 classes"):
        evaluate.evaluate_dataset(model, variables, [element], num_classes=NUM_CLASSES - 1)


def test_class_names():
    assert evaluate.class_names_for("voc_aug", 21)[15] == "person"
    assert evaluate.class_names_for(None, 19)[0] == "road"
    assert evaluate.class_names_for("pan_synthetic", 13)[1] == "disk"
    # A dataset's names that do not fit the class count are not used (VOC's 21 names were
    # given to 19 classes, the synthetic set's 13 to 4).
    assert evaluate.class_names_for("voc_aug", 19)[0] == "road"
    assert evaluate.class_names_for("pan_synthetic", 4) == tuple(f"class_{i}" for i in range(4))
    assert evaluate.class_names_for("something_else", 4) == (
        "class_0",
        "class_1",
        "class_2",
        "class_3",
    )


def test_evaluate_entry_writes_reports(tmp_path, model_and_variables, capsys, caplog, monkeypatch):
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

    def refused(*args):
        raise PermissionError(13, "Permission denied", str(workdir / evaluate.REPORT_JSON))

    monkeypatch.setattr(evaluate, "write_report", refused)
    with pytest.raises(  # another user's run: scored and printed, then one line main reports
        evaluate.ReportWriteError,
        match=rf"cannot write eval_report\.json and eval_report\.md into {workdir} "
        r"\(Permission denied\); the figures are in the line above",
    ):
        evaluate.evaluate(config, workdir)
    assert "mIoU" in capsys.readouterr().out

    config.data.num_classes = 21  # a mismatch main reports in one line, before the data
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r"predicts 13 classes, but config\.data\.num_classes=21 \(pan_synthetic/tiny\)",
    ):
        evaluate.evaluate(config, workdir)


def test_evaluate_scores_the_checkpoint_of_the_step_asked_with_the_configs_options(
    tmp_path, monkeypatch
):
    """`--mode=eval --step=N` scores checkpoint N (not the latest), with config.eval's views
    (the paper's flip), and its report names that step."""
    from pan_jax import data, train

    model = models.create("fcn", num_classes=13, backbone="resnet18")
    spec = {"name": "fcn", "backbone": "resnet18", "num_classes": 13, "overrides": {}}
    workdir = tmp_path / "run"
    saving = ml_collections.ConfigDict({"keep_checkpoints": 3, "checkpoint_every_steps": 1})
    manager = checkpointing.create_manager(workdir, saving)
    saved = {}
    for step in (1, 2):  # two checkpoints of different parameters
        saved[step] = random_variables(model, seed=step)
        state = train.state_from_variables(saved[step], optax.sgd(0.1))
        checkpointing.save(manager, step, state.replace(step=step), spec, force=True)
    manager.wait_until_finished()
    manager.close()
    scored = []
    real_evaluate_dataset = evaluate.evaluate_dataset

    def evaluate_dataset(model, variables, dataset, **kwargs):
        scored.append((variables, kwargs))
        return real_evaluate_dataset(model, variables, dataset, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_dataset", evaluate_dataset)
    config = ml_collections.ConfigDict()
    config.data = data.default_data_config("pan_synthetic/tiny")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.eval_split = "val[:2]"
    config.eval = ml_collections.ConfigDict({"flip": True})

    for step, expected_step in ((1, 1), (None, 2)):
        report = evaluate.evaluate(config, workdir, step=step)
        variables, kwargs = scored.pop()
        for got, want in zip(
            jax.tree.leaves(variables), jax.tree.leaves(saved[expected_step]), strict=True
        ):
            np.testing.assert_array_equal(got, want)
        assert kwargs["flip"] is True and report["flip"] is True
        assert report["step"] == expected_step
        assert f"(step {expected_step})" in (workdir / evaluate.REPORT_MD).read_text()


MULTIHOST_WORKER = """
import os
import sys

import jax
import numpy as np

pid, port, tests_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
sys.path.insert(0, tests_dir)
sys.path.insert(0, os.path.dirname(tests_dir))  # for tests.test_inference
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

from pan_jax import evaluate, inference, models
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
    before = inference._forward._cache_size()
    result = run()
    return result, inference._forward._cache_size() - before


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

# Images of one size but of both kinds (uint8, and float normalized) never share a batch:
# stacked together, the uint8 ones would be read as normalized values.
rng = np.random.default_rng(3)
uint8_elements = [
    {**e, "image": rng.integers(0, 256, e["image"].shape).astype(np.uint8)}
    for e in multihost_elements()
]
mixed = (uint8_elements + multihost_elements()) * 2
spread, one = (
    evaluate.evaluate_dataset(model, variables, mixed, num_classes=NUM_CLASSES, devices=devices)
    for devices in (None, jax.devices()[:1])
)
np.testing.assert_array_equal(spread["confusion_matrix"], one["confusion_matrix"])
print("KINDS APART", flush=True)
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
    assert "KINDS APART" in result.stdout, result.stdout
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
