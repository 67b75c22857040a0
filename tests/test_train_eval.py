"""What a run keeps of its evaluations: when a resumed run owes one, and the metric writer's
files (the periodic eval itself: tests/test_train.py)."""

import json

import ml_collections
import pytest
from etils import epath

from pan_jax import summary, train


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
    config = ml_collections.ConfigDict({"num_train_steps": 5, "eval_every_steps": 2})
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
