"""Orbax checkpoints: the training run's manager, and inference variables with their model spec.

A training workdir holds `checkpoints/<step>/{state,data,meta}`: `state` is the train state
(params, batch statistics, optimizer state, step), `data` the grain iterator of each process and
`meta` a JSON record with the model spec. A converted or exported model is a directory holding
`variables/` (params and batch statistics) and `model.json` (the model spec).

A model spec is the JSON-able dict `{"name", "backbone", "num_classes", "overrides"}` that
`model_from_spec` turns into `models.create(name, num_classes=..., backbone=..., **overrides)`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from pan_jax import models

ModelSpec = dict[str, Any]
CHECKPOINT_ITEMS = ("state", "data", "meta")


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for another model (name, backbone, classes or options)."""


def model_from_spec(spec: ModelSpec, **extra: Any) -> models.SegmentationModel:
    """The model a spec describes; `extra` adds options that do not change parameters (dtype)."""
    overrides = dict(spec.get("overrides") or {})
    for key, value in overrides.items():
        if isinstance(value, list):
            overrides[key] = tuple(value)
    overrides.update(extra)
    return models.create(
        spec["name"], num_classes=int(spec["num_classes"]), backbone=spec["backbone"], **overrides
    )


def check_spec(saved: ModelSpec, expected: ModelSpec, where: str) -> None:
    """Raises CheckpointMismatchError naming each field where `saved` differs from `expected`."""
    differences = []
    for key in ("name", "backbone", "num_classes"):
        if saved.get(key) != expected.get(key):
            differences.append(f"{key}: checkpoint {saved.get(key)!r}, config {expected.get(key)!r}")
    saved_overrides = json.loads(json.dumps(saved.get("overrides") or {}))
    expected_overrides = json.loads(json.dumps(expected.get("overrides") or {}))
    for key in sorted(set(saved_overrides) | set(expected_overrides)):
        if key != "dtype" and saved_overrides.get(key) != expected_overrides.get(key):
            differences.append(
                f"overrides.{key}: checkpoint {saved_overrides.get(key)!r}, "
                f"config {expected_overrides.get(key)!r}"
            )
    if differences:
        raise CheckpointMismatchError(
            f"{where} was written for another model:\n  " + "\n  ".join(differences)
        )


def save_variables(directory: str | os.PathLike, variables: dict, spec: ModelSpec) -> None:
    """Writes `{'params', 'batch_stats'}` and the model spec to `directory` (local or gs://)."""
    path = epath.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "variables", jax.device_get(variables), force=True)
    (path / "model.json").write_text(json.dumps(spec, indent=2, sort_keys=True))


def load_variables(directory: str | os.PathLike) -> tuple[dict, ModelSpec]:
    """Reads what `save_variables` wrote: (variables, spec), arrays on the default device."""
    path = epath.Path(directory)
    spec_file = path / "model.json"
    if not spec_file.exists():
        raise FileNotFoundError(
            f"{spec_file} not found: {directory} is not a pan_jax model directory "
            "(expected variables/ and model.json, as written by `python -m pan_jax.convert`)"
        )
    spec = json.loads(spec_file.read_text())
    model = model_from_spec(spec)
    size = model.min_input_size
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    with ocp.StandardCheckpointer() as checkpointer:
        variables = checkpointer.restore(path / "variables", template)
    return variables, spec
