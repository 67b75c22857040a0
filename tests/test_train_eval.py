"""What a run reports of its evaluations: which parameters the periodic eval scores, the figures
it logs and at which step, when a resumed run owes one, and the metric writer's files."""

import json
import logging
import types

import jax
import ml_collections
import numpy as np
import pytest
from etils import epath

from configs import demo
from pan_jax import checkpointing, evaluate, summary, train
from pan_jax.data import pipeline


def tiny_run_config(data_dir: str, **fields) -> ml_collections.ConfigDict:
    config = demo.get_config()
    config.model.name = "fcn"  # what is evaluated matters here, not the model: the quickest
    config.model.overrides = ml_collections.ConfigDict()
    config.data.name = "pan_synthetic/tiny"
    config.data.data_dir = data_dir
    config.batch_size = 2
    config.warmup_steps = 0
    config.learning_rate = 0.01
    config.log_every_steps = 1
    config.update(fields)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tfds"))
    pipeline.prepare(tiny_run_config(path).data)
    return path


def test_periodic_eval_scores_its_steps_state_and_logs_its_own_figures(
    tmp_path, data_dir, monkeypatch, caplog
):
    """Each eval scores the parameters of the step it is logged at (the checkpoint of that step,
    the state the run returns at the end), its mIoU and pixel accuracy are logged under their own
    names, and the time an eval takes is left out of the next step's img/s."""
    real_evaluate_dataset = evaluate.evaluate_dataset
    scored = []  # (variables, report) of each eval
    clock = types.SimpleNamespace(offset=0.0)
    real_time = train.time

    def evaluate_dataset(model, variables, *args, **kwargs):
        report = real_evaluate_dataset(model, variables, *args, **kwargs)
        scored.append((jax.device_get(variables), report))
        clock.offset += 1000.0  # an eval of 1,000 s: the host's clock, as train reads it
        return report

    monkeypatch.setattr(evaluate, "evaluate_dataset", evaluate_dataset)
    monkeypatch.setattr(
        train,
        "time",
        types.SimpleNamespace(perf_counter=lambda: real_time.perf_counter() + clock.offset),
    )
    workdir = tmp_path / "run"
    config = tiny_run_config(
        data_dir, num_train_steps=2, eval_every_steps=1, checkpoint_every_steps=1
    )
    config.data.eval_split = "val[:2]"  # two images: what is scored matters here, not how
    with caplog.at_level(logging.INFO):
        state = train.train_and_evaluate(config, str(workdir))
    assert caplog.text.count("eval done: 2/2 images") == 2  # out of how many: its progress

    records, _ = summary.read_records(epath.Path(workdir) / "metrics.jsonl")
    evals = [r for r in records if "eval/miou" in r]
    assert [r["step"] for r in evals] == [1, 2]
    at_step_1, _, _ = checkpointing.restore_for_inference(workdir, 1)
    for (variables, report), expected, record in zip(
        scored, (at_step_1, jax.device_get(state.variables)), evals, strict=True
    ):
        for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected), strict=True):
            np.testing.assert_array_equal(got, want)
        assert record["eval/miou"] == pytest.approx(report["miou"])
        assert record["eval/pixel_accuracy"] == pytest.approx(report["pixel_accuracy"])
    assert scored[0][1]["miou"] != scored[0][1]["pixel_accuracy"]  # the names tell them apart
    rates = {r["step"]: r.get("train/images_per_second") for r in records if "train/loss" in r}
    assert rates[2] > 2 / 100, rates  # one step of 2 images, not the 1,000 s eval before it


def write_metrics(workdir, records) -> epath.Path:
    path = epath.Path(workdir) / "metrics.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return epath.Path(workdir)


@pytest.mark.parametrize(
    ("step", "records", "owed"),
    [
        (4, [{"step": 4, "train/loss": 1.0}], True),  # saved, stopped before its eval
        (5, [{"step": 4, "eval/miou": 0.1}], True),  # the last step, off the period of 2
        (4, [{"step": 4, "train/loss": 1.0}, {"step": 4, "eval/miou": 0.1}], False),
        (3, [], False),  # not an eval step: nothing owed, nothing read
        (0, [], False),  # a fresh run scores no untrained model
    ],
)
def test_a_resumed_run_owes_only_the_eval_of_an_unevaluated_eval_step(
    tmp_path, step, records, owed
):
    config = tiny_run_config("unused", num_train_steps=5, eval_every_steps=2)
    workdir = write_metrics(tmp_path, records)
    assert train._eval_owed(workdir, step, config) is owed
    config.eval_every_steps = 0  # evaluations off: none is ever owed
    assert train._eval_owed(workdir, step, config) is False


def test_a_metric_record_reaches_the_file_when_it_is_written(tmp_path):
    # A run killed by the OS (or read by `tail -f`) leaves what it logged on disk, and the
    # evaluation a resumed run looks for there.
    writer = summary.MetricWriter(tmp_path)
    writer.write_scalars(2, {"eval/miou": 0.25})
    writer.write_json(3, {"batch_digest": "abc"})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 2, "eval/miou": 0.25},
        {"step": 3, "batch_digest": "abc"},
    ]
    writer.close()


def test_the_metric_writer_of_another_process_writes_nothing(tmp_path):
    # Every process runs the loop; only process 0 writes, else each would append its copy of
    # every record to a shared workdir's metrics.jsonl (and drop the others' on resume).
    write_metrics(tmp_path, [{"step": 1, "train/loss": 1.0}, {"step": 5, "train/loss": 0.5}])
    before = (tmp_path / "metrics.jsonl").read_bytes()
    writer = summary.MetricWriter(tmp_path, enabled=False, start_step=2)
    writer.write_scalars(3, {"train/loss": 0.9})
    writer.write_json(3, {"batch_digest": "abc"})
    writer.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
