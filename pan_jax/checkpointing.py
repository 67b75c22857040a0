"""Orbax checkpoints: the training run's manager, and inference variables with their model spec.

A training workdir holds `checkpoints/<step>/{state,meta}`: `state` is the train state
(params, batch statistics, optimizer state, step) and `meta` a JSON record with the model spec.
The input pipeline's position is the step itself (one batch per step, `pipeline.train_dataset`'s
`start_batch`), so it fits any number of processes or data workers; checkpoints of earlier
versions also hold `data` (grain's iterator states), which is ignored. A converted or exported
model is a directory holding `variables/` (params and batch statistics) and `model.json` (the
model spec).

A model spec is the JSON-able dict `{"name", "backbone", "num_classes", "overrides"}` that
`model_from_spec` turns into `models.create(name, num_classes=..., backbone=..., **overrides)`.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import socket
import sys
from typing import IO, Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from pan_jax import models

ModelSpec = dict[str, Any]
CHECKPOINT_ITEMS = ("state", "meta")


class CheckpointMismatchError(ValueError):
    """A checkpoint was written for another model (name, backbone, classes or options)."""


class CheckpointDamagedError(ValueError):
    """A checkpoint folder cannot be read: cut short (a copy or a disk that filled) or damaged."""


class WorkdirInUseError(RuntimeError):
    """Another training run holds the workdir's lock (`WorkdirLock`)."""


def _damaged(manager: ocp.CheckpointManager, step: int, error: Exception) -> CheckpointDamagedError:
    """The error for an unreadable checkpoint: what failed and how to resume from the one
    before. Nothing is deleted: the folder may be repairable, or wanted for a post-mortem."""
    directory = manager.directory
    earlier = [s for s in manager.all_steps() if s < step]
    then = f"to resume from step {max(earlier)}" if earlier else "to start the run afresh"
    cause = " ".join(f"{type(error).__name__}: {error}".split())[:400]
    return CheckpointDamagedError(
        f"checkpoint {step} in {directory} is incomplete or damaged ({cause}). Move it aside "
        f"(mv {directory / str(step)} {directory / str(step)}.damaged) {then}."
    )


_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"


class _AbandonedReadsFilter(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        if "exception was never retrieved" not in record.getMessage():
            return True
        where = record.exc_info[2] if record.exc_info else None
        while where is not None:  # raised in orbax's reads
            if _ORBAX_SOURCE in where.tb_frame.f_code.co_filename:
                return False
            where = where.tb_next
        return True


def _quiet_abandoned_reads() -> None:
    """Called before each orbax restore. When one read fails, orbax closes its event loop and
    abandons the other reads, which go on in TensorStore's threads; as they end, or are
    collected, each reports its own failure: asyncio logs "Task exception was never retrieved",
    TensorStore's callbacks into the closed loop raise "Event loop is closed", and orbax's
    coroutines, collected unfinished, raise their read errors: dozens of tracebacks under the
    one error that says what failed. The first ones can come before the restore has raised,
    hence installed before it. Nothing else is dropped."""
    asyncio_log = std_logging.getLogger("asyncio")
    if any(isinstance(f, _AbandonedReadsFilter) for f in asyncio_log.filters):
        return
    asyncio_log.addFilter(_AbandonedReadsFilter())
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        where = unraisable.exc_traceback
        closed_loop = (  # raised in a TensorStore thread, outside any Python caller
            isinstance(unraisable.exc_value, RuntimeError)
            and "Event loop is closed" in str(unraisable.exc_value)
            and where is not None
            and where.tb_frame.f_code.co_name == "call_soon_threadsafe"
        )
        code = getattr(unraisable.object, "cr_code", None)  # an orbax coroutine collected
        orbax_read = code is not None and _ORBAX_SOURCE in code.co_filename
        if not (closed_loop or orbax_read):
            previous(unraisable)

    sys.unraisablehook = hook


def model_from_spec(spec: ModelSpec, **extra: Any) -> models.SegmentationModel:
    """The model a spec describes; `extra` adds options that do not change parameters (dtype).
    Options the model does not take are left out: specs written before `models.create`
    refused them (fcn with decoder_channels) hold some, and they never changed the model."""
    overrides = models.explicit_overrides(spec["name"], dict(spec.get("overrides") or {}))
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
            differences.append(
                f"{key}: checkpoint {saved.get(key)!r}, config {expected.get(key)!r}"
            )
    given = [json.loads(json.dumps(spec.get("overrides") or {})) for spec in (saved, expected)]
    explicit = [
        models.explicit_overrides(spec["name"], overrides)
        for spec, overrides in zip((saved, expected), given, strict=True)
    ]
    for key in sorted(set(explicit[0]) | set(explicit[1])):
        if key != "dtype" and explicit[0].get(key) != explicit[1].get(key):
            differences.append(  # as given: a default spelled out shows as itself, not None
                f"overrides.{key}: checkpoint {given[0].get(key)!r}, config {given[1].get(key)!r}"
            )
    if differences:
        raise CheckpointMismatchError(
            f"{where} was written for another model:\n  " + "\n  ".join(differences)
        )


def absolute_path(path: str | os.PathLike) -> epath.Path:
    """`path`, absolute if local: orbax's writers and readers refuse relative local paths
    (runs/demo), and jax hashes its cache directory's path into the cache's keys."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def check_writable_directory(path: str | os.PathLike, flag: str) -> None:
    """A local directory to write into, or the folder it would be made in, must be writable:
    a run learns it now, not after its work. Raises ValueError naming `flag` (e.g. --workdir)
    and the file in the way, if any."""
    text = os.fspath(path)
    if "://" in text:  # a bucket: its permissions show at the first write
        return
    existing = os.path.abspath(text)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag}={text}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}={text}: {existing} is not writable by this user")


def read_run_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The resolved run config (`config.json`) of a workdir as a dict; {} when it has none."""
    path = epath.Path(directory) / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def save_variables(directory: str | os.PathLike, variables: dict, spec: ModelSpec) -> None:
    """Writes `{'params', 'batch_stats'}` and the model spec to `directory` (local or gs://)."""
    path = absolute_path(directory)
    path.mkdir(parents=True, exist_ok=True)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / "variables", jax.device_get(variables), force=True)
    (path / "model.json").write_text(json.dumps(spec, indent=2, sort_keys=True))


def load_variables(directory: str | os.PathLike) -> tuple[dict, ModelSpec]:
    """Reads what `save_variables` wrote: (variables, spec), arrays on the default device."""
    path = absolute_path(directory)
    spec_file = path / "model.json"
    if not spec_file.exists():
        raise FileNotFoundError(
            f"{spec_file} not found: {directory} is not a pan_jax model directory "
            "(expected variables/ and model.json, as written by `python -m pan_jax.convert`)"
        )
    spec, model = _read_model_json(spec_file)
    size = model.min_input_size
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    where = f"{path / 'variables'} does not fit the model of {spec_file}"
    _quiet_abandoned_reads()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(path / "variables", template)
    except (ValueError, KeyError) as error:  # another structure (e.g. another backbone)
        raise CheckpointMismatchError(f"{where}: {error}") from error
    # orbax restores an array of another shape as it is stored (e.g. num_classes edited).
    stored_leaves = jax.tree_util.tree_leaves_with_path(variables)
    for (key_path, stored), expected in zip(stored_leaves, jax.tree.leaves(template), strict=True):
        if stored.shape != expected.shape:
            raise CheckpointMismatchError(
                f"{where}: {jax.tree_util.keystr(key_path)} is stored as {stored.shape}, the "
                f"model has {expected.shape}"
            )
    return variables, spec


def _read_model_json(spec_file: epath.Path) -> tuple[ModelSpec, models.SegmentationModel]:
    """A model directory's spec and the model it describes; CheckpointDamagedError naming the
    file where it is not JSON, lacks a field or names a model that cannot be."""
    try:
        spec = json.loads(spec_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointDamagedError(f"{spec_file}: not valid JSON ({error})") from None
    fields = ("name", "backbone", "num_classes")
    if not isinstance(spec, dict) or any(field not in spec for field in fields):
        raise CheckpointDamagedError(
            f"{spec_file}: expected an object with {', '.join(fields)} (and overrides), as "
            "`python -m pan_jax.convert` writes it"
        )
    try:
        return spec, model_from_spec(spec)
    except (ValueError, TypeError) as error:  # an unknown model, backbone or option
        raise CheckpointDamagedError(f"{spec_file}: {error}") from None


def load_any(
    directory: str | os.PathLike, step: int | None = None
) -> tuple[dict, ModelSpec, int | None]:
    """(variables, spec, step) of a model directory (`save_variables`; step None) or of a
    training workdir (its latest or `step` checkpoint)."""
    if directory_kind(directory, step) == "model":
        variables, spec = load_variables(directory)
        return variables, spec, None
    return restore_for_inference(directory, step)


def _is_model_directory(path: epath.Path) -> bool:
    """A `save_variables` directory. A training workdir also holds a model.json (next to
    checkpoints/): its checkpoints win."""
    is_model_directory = (path / "model.json").exists() and (path / "variables").exists()
    return is_model_directory and not (path / "checkpoints").exists()


def directory_kind(directory: str | os.PathLike, step: int | None = None) -> str:
    """'model' (a `save_variables` directory) or 'workdir' (a training run's), without loading;
    raises naming what is missing, so a CLI can check its arguments before the slow load."""
    path = epath.Path(directory)
    if _is_model_directory(path):
        if step is not None:
            raise ValueError(
                f"{directory} holds one set of weights (model.json): step={step} needs a workdir"
            )
        return "model"
    if not (path / "checkpoints").exists():
        hint = ""
        if path.suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt"):
            hint = (
                "; a PyTorch file is converted first: python -m pan_jax.convert --from=smp "
                f"--input={directory} --output=DIR"
            )
        raise FileNotFoundError(
            f"{directory} is neither a pan_jax model directory (model.json and variables/) nor "
            f"a training workdir (checkpoints/){hint}"
        )
    steps = finished_steps(path)
    if not steps:
        raise FileNotFoundError(f"{path / 'checkpoints'} holds no finished checkpoint yet")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"{path / 'checkpoints'} has no step {step}; it has {steps}")
    return "workdir"


# ----------------------------------------------------------------------------- training runs


def default_workdir(config_argument: str) -> str:
    """runs/<config name>, and for `file.py:ROW` runs/<config name>_<ROW>: one per row."""
    path, _, row = config_argument.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{row}" if row else name)


def prepare_workdir(
    workdir: str | os.PathLike,
    config: Any,
    spec: ModelSpec,
    manager: ocp.CheckpointManager,
    optimizer_layout: str | None = None,
) -> epath.Path:
    """Checks that this run may use the workdir: its latest checkpoint, if any, is of the same
    model and optimizer layout (see `save`), and it is no model directory. Creates it.

    The run's record (`write_run_record`) is written once its first step has run: a refused or
    failed run leaves the record of the run that owns the workdir as it was.

    Raises CheckpointMismatchError if the latest checkpoint was written for another model,
    CheckpointDamagedError if its meta cannot be read.
    """
    path = epath.Path(workdir)
    step = manager.latest_step()
    if step is not None:
        where = f"checkpoint {step} in {manager.directory}"
        meta = _read_meta(manager, step)
        check_spec(meta["model"], spec, where)
        saved_layout = meta.get("optimizer")  # absent in checkpoints of before 2026-11-27
        if saved_layout and optimizer_layout and saved_layout != optimizer_layout:
            raise CheckpointMismatchError(
                f"{where} holds the optimizer state of a run with config.{saved_layout}, this "
                f"config has config.{optimizer_layout}: their states differ in structure (one "
                "SGD, or one each for the backbone and the decoder). Resume with the "
                "checkpoint's setting, or train in another workdir."
            )
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
    return path


class WorkdirLock:
    """An advisory lock on `<workdir>/run.lock`, held by process 0 while a training run lives:
    a second run in the same workdir (a command started twice, a job queued twice) is refused
    instead of writing its checkpoints among the first's.

    The kernel drops the lock when its process ends, however it ends: the resume of a killed
    or preempted run finds it free. On NFS, a host that died holds it until the server's lease
    runs out (about 90 s on NFSv4), and a mount with `nolock` or `local_lock` locks for its own
    host only. An object store (gs://) has no locks; nor has a file system mounted without
    them (a warning says so). The file stays after the run, naming its last holder.
    """

    def __init__(self, workdir: str | os.PathLike) -> None:
        self.path = epath.Path(workdir) / "run.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Takes the lock (process 0; the others return). Raises WorkdirInUseError, naming the
        holder, if another run has it."""
        if jax.process_index() != 0:
            return
        if "://" in str(self.path):
            logging.info("%s: an object store has no locks, not taken", self.path)
            return
        import fcntl  # POSIX only: the rest of the module (inference) works without it

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.path, "a+")  # noqa: SIM115 (held open for the run's life)
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "unknown"
            lock_file.close()
            raise WorkdirInUseError(
                f"{self.path.parent} is in use by another training run ({holder}, per "
                f"{self.path}): wait for it to end, or train in another --workdir"
            ) from None
        except OSError as error:  # e.g. Lustre mounted without flock
            lock_file.close()
            logging.warning(
                "%s cannot be locked (%s): nothing stops a second run in this workdir",
                self.path,
                error,
            )
            return
        try:
            lock_file.truncate(0)
            lock_file.write(f"process {os.getpid()} on host {socket.gethostname()}\n")
            lock_file.flush()
        except BaseException:  # a full disk: no lock left held by a file no one closes
            lock_file.close()
            raise
        self._file = lock_file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the lock
            self._file = None

    def __enter__(self) -> WorkdirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def write_run_record(workdir: epath.Path, config: Any, spec: ModelSpec) -> None:
    """The resolved config and the model spec as `config.json` and `model.json` (process 0).
    A resumed run whose config differs from the recorded one says how, then records its own."""
    if jax.process_index() == 0:
        resolved = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
        try:
            recorded = read_run_config(workdir)  # {} for a new run
        except ValueError as error:  # cut by a crash while written: replaced below
            logging.warning("%s; replacing it with this run's", error)
            recorded = {}
        changed = _changed_fields(recorded, json.loads(resolved)) if recorded else []
        if changed:
            logging.warning(
                "resuming %s with a config that differs from its config.json: %s",
                workdir,
                ", ".join(f"{key} {old!r} -> {new!r}" for key, old, new in changed),
            )
        (workdir / "config.json").write_text(resolved)
        (workdir / "model.json").write_text(json.dumps(spec, indent=2, sort_keys=True))


def _changed_fields(old: dict, new: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted field, old value, new value) where two resolved configs differ."""
    changed = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changed += _changed_fields(before, after, f"{prefix}{key}.")
        elif before != after:
            changed.append((prefix + key, before, after))
    return changed


def finished_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps of a training workdir's finished checkpoints (`checkpoints/<step>` folders;
    orbax's temporaries carry a suffix), ascending."""
    directory = epath.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def has_checkpoints(workdir: str | os.PathLike) -> bool:
    """Whether a training workdir holds a finished checkpoint."""
    return bool(finished_steps(workdir))


def refuse_model_directory(workdir: str | os.PathLike) -> None:
    """Raises CheckpointMismatchError where `workdir` is a model directory: orbax would make
    its checkpoints/ there (a workdir without a checkpoint, whose run would then overwrite the
    model.json)."""
    if _is_model_directory(epath.Path(workdir)):
        raise CheckpointMismatchError(
            f"{workdir} is a model directory (model.json and variables/, e.g. from pan_jax."
            "convert), not a training workdir: train in another workdir and start from it "
            f"with --config.model.pretrained={workdir} --config.model.pretrained_kind=pan_jax"
        )


def create_manager(workdir: str | os.PathLike, config: Any) -> ocp.CheckpointManager:
    """The run's manager: async saves, the last `config.keep_checkpoints` kept. Refuses a
    model directory (`refuse_model_directory`) before it makes checkpoints/."""
    refuse_model_directory(workdir)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(config.keep_checkpoints),
        save_interval_steps=int(config.checkpoint_every_steps),
    )
    return ocp.CheckpointManager(
        absolute_path(workdir) / "checkpoints", options=options, item_names=CHECKPOINT_ITEMS
    )


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    spec: ModelSpec,
    force: bool = False,
    optimizer_layout: str | None = None,
) -> bool:
    """Saves the train state, the model spec and the optimizer layout, a description of what
    the optimizer state's structure depends on (every process calls it)."""
    meta = {"model": spec, "step": int(step), "optimizer": optimizer_layout}
    return manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    _quiet_abandoned_reads()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])
    except Exception as error:  # a missing or cut meta folder: orbax raises KeyError, OSError…
        raise _damaged(manager, step, error) from error


def restore_or_none(
    manager: ocp.CheckpointManager, abstract_state: Any, state_sharding: Any
) -> Any:
    """The train state of the latest checkpoint, or None if there is none.

    Raises CheckpointMismatchError if the checkpoint does not fit this run's state (its model
    spec is checked before, by `prepare_workdir`).
    """
    step = manager.latest_step()
    if step is None:
        return None
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state,
        jax.tree.map(lambda _: state_sharding, abstract_state),
    )
    _quiet_abandoned_reads()
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    except (ValueError, KeyError) as error:  # orbax's tree and shape mismatches
        where = f"checkpoint {step} in {manager.directory}"
        raise CheckpointMismatchError(
            f"{where} does not fit this run's state (or is damaged): {error}"
        ) from error
    except Exception as error:  # e.g. tensorstore's OUT_OF_RANGE on a cut file
        raise _damaged(manager, step, error) from error
    return restored["state"]


def restore_for_inference(
    workdir: str | os.PathLike, step: int | None = None
) -> tuple[dict, ModelSpec, int]:
    """(variables, spec, step) of the latest (or given) checkpoint of a training workdir."""
    directory = absolute_path(workdir) / "checkpoints"
    if not directory.exists():
        raise FileNotFoundError(f"{directory} not found: {workdir} holds no training checkpoints")
    manager = ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=CHECKPOINT_ITEMS,
    )
    try:  # closed on errors too: an open manager's threads bury the error in their own
        return _restore_variables(manager, directory, step)
    finally:
        manager.close()


def _restore_variables(
    manager: ocp.CheckpointManager, directory: epath.Path, step: int | None
) -> tuple[dict, ModelSpec, int]:
    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        raise FileNotFoundError(
            f"no checkpoint {'at all' if step is None else f'at step {step}'} in {directory} "
            f"(steps there: {manager.all_steps()})"
        )
    spec = _read_meta(manager, step)["model"]
    model = model_from_spec(spec)
    size = model.min_input_size
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        "params": abstract["params"],
        "batch_stats": abstract["batch_stats"],
    }
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), target)
    _quiet_abandoned_reads()
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )
    except (ValueError, KeyError) as error:
        raise CheckpointMismatchError(
            f"checkpoint {step} in {directory} does not fit its model.json's model (or is "
            f"damaged): {error}"
        ) from error
    except Exception as error:
        raise _damaged(manager, step, error) from error
    state = restored["state"]
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    # A partial restore leaves what the checkpoint lacks as the target's placeholders (a
    # checkpoint of a version that named a layer otherwise): they would fail far from here.
    missing = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
        if isinstance(leaf, jax.ShapeDtypeStruct)
    ]
    if missing:
        raise CheckpointMismatchError(
            f"checkpoint {step} in {directory} does not fit its model.json's model: it lacks "
            f"{len(missing)} of the model's arrays, e.g. {', '.join(missing[:3])}"
        )
    return variables, spec, int(step)
