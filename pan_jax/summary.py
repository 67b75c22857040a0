"""Metrics of a run: TensorBoard event files and a `metrics.jsonl` log, written by process 0.

TensorBoard events are written with the `tensorboard` package's own event writer, so neither
TensorFlow nor clu is needed; without `tensorboard` installed only the JSON lines are written.
"""

from __future__ import annotations

import json
import time
from typing import Any

from absl import logging
from etils import epath


class MetricWriter:
    """Scalars to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tensorboard`.

    A run resumed at `start_step` first forgets what the run before logged after that step (it
    was killed after logging steps it never checkpointed, which this run trains again): those
    records leave metrics.jsonl, and TensorBoard is told of a restart there, which makes it
    drop the earlier events past it.
    """

    def __init__(
        self, workdir: str | epath.Path, enabled: bool = True, start_step: int = 0
    ) -> None:
        self.enabled = enabled
        self._events = None
        if not enabled:
            return
        metrics_file = epath.Path(workdir) / "metrics.jsonl"
        _drop_records_after(metrics_file, start_step)
        self._jsonl = metrics_file.open("a")
        try:
            from tensorboard.compat.proto import event_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._events = EventFileWriter(str(epath.Path(workdir) / "tensorboard"))
            # TensorBoard keeps, of the events read before a START, those of earlier steps.
            restart = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._events.add_event(
                event_pb2.Event(wall_time=time.time(), step=start_step + 1, session_log=restart)
            )
        except ImportError:
            logging.warning("tensorboard is not installed: writing metrics.jsonl only")

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.write_json(step, scalars)
        if self._events is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            summary = summary_pb2.Summary(
                value=[
                    summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                    for tag, value in scalars.items()
                ]
            )
            self._events.add_event(
                event_pb2.Event(wall_time=time.time(), step=step, summary=summary)
            )

    def write_json(self, step: int, record: dict[str, Any]) -> None:
        if self.enabled:
            self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
            self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._events is not None:
                self._events.close()


def read_records(metrics_file: epath.Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a metrics.jsonl (none if it is absent), and the number of its lines
    that hold none (the last line of a killed run is cut short; a damaged file may hold
    anything): a record is an object with an integer "step"."""
    if not metrics_file.exists():
        return [], 0
    records, unreadable = [], 0
    for line in metrics_file.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable


def _drop_records_after(metrics_file: epath.Path, step: int) -> None:
    """Rewrites `metrics_file` without its records of steps after `step` (and a line cut by a
    kill), through a temporary file: a failure leaves it whole."""
    records, unreadable = read_records(metrics_file)
    kept = [record for record in records if record["step"] <= step]
    if len(kept) == len(records) and not unreadable:
        return
    logging.info(
        "metrics.jsonl: dropped %d records after step %d, logged by a run that stopped before "
        "its next checkpoint, and %d lines that held no record",
        len(records) - len(kept),
        step,
        unreadable,
    )
    temporary = metrics_file.with_name(metrics_file.name + ".tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in kept))
    temporary.replace(metrics_file)
