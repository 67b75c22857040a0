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
    """Scalars to `workdir/metrics.jsonl` and TensorBoard events under `workdir/tensorboard`."""

    def __init__(self, workdir: str | epath.Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._events = None
        if not enabled:
            return
        self._jsonl = (epath.Path(workdir) / "metrics.jsonl").open("a")
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            self._events = EventFileWriter(str(epath.Path(workdir) / "tensorboard"))
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
