"""Multi-host on one machine: 2 processes × 4 CPU devices against 1 process × 8 devices.

Every run is the real `python -m pan_jax.main` in subprocesses; the two processes find each
other through `jax.distributed.initialize` on localhost (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID) and talk over gloo CPU collectives. One chain of runs:

1. 2×4 training, SIGTERM to both processes after a few steps: JAX's preemption sync service
   makes both save at the same step and exit 0; only process 0 wrote summaries.
2. 2×4 relaunch: resumes from that step and runs one more.
3. 1×8 fresh run of the same length: per step, the two processes' examples are disjoint and
   together make up the 1×8 run's global batch; after the first step the parameters agree.
4. 1×8 relaunch of the preempted 2×4 workdir: the checkpoint (state and data position)
   restores in the other layout, and its step equals the 2×4 relaunch's step.
5. `--mode=eval` with 2 processes: the confusion matrices are summed over both processes.

The model is an FCN (ResNet-18, torchvision stem): PAN's globally pooled 1×1 BatchNorms
amplify float rounding far past 1e-5 at this batch size (see tests/test_train.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from pan_jax import checkpointing, evaluate, train
from pan_jax.config_errors import ConfigError
from pan_jax.data import pipeline

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for any one run
# Largest leaf difference after one step in either layout, relative to the leaf's magnitude.
# The layouts sum the global batch in another order. On the flat, zero-padded synthetic crops
# the gradients are so sensitive to that rounding (near-ties in max pooling and ReLU) that they
# differ by ~1e-3 (as much as between two row orders of one batch in one process); the small
# learning rate keeps a step's parameter difference below 1e-5. Over several steps the runs
# drift apart chaotically, so the comparisons are of single steps from the same state.
TOLERANCE = 1e-5

# Constant learning rate (poly power 0): a run preempted inside a 1000-step schedule and a
# shorter run take the same steps.
CONFIG_FILE = '''
"""The demo config, small: FCN/ResNet-18, global batch 8, per-example digests logged."""
import ml_collections

from configs import demo


def get_config():
    config = demo.get_config()
    config.model.name = "fcn"
    config.model.backbone = "resnet18"
    config.model.overrides = ml_collections.ConfigDict({"stem": "torchvision"})
    config.data.name = "pan_synthetic/tiny"
    config.batch_size = 8
    config.warmup_steps = 0
    config.learning_rate = 0.0005
    config.poly_power = 0.0
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.keep_checkpoints = 10
    config.log_batch_digests = True
    return config
'''

# Variables through which a cluster would make a run multi-process: kept out of the runs.
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "JAX_", "MEGASCALE_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(
    config_file: Path, workdir: Path, data_dir: str, processes: int, *flags: str
) -> list[tuple[subprocess.Popen, Path]]:
    """Starts `python -m pan_jax.main` as `processes` processes sharing 8 CPU devices."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}
    base.update(
        PYTHONUNBUFFERED="1",
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}",
        # Runs of the same layout and length reuse compiled programs (time only).
        JAX_COMPILATION_CACHE_DIR=str(config_file.parent / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "pan_jax.main",
        f"--config={config_file}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *flags,
    ]
    runs = []
    for index in range(processes):
        env = dict(base)
        if processes > 1:
            env.update(
                JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                JAX_NUM_PROCESSES=str(processes),
                JAX_PROCESS_ID=str(index),
            )
        log = workdir.parent / f"{workdir.name}.{port}.{index}.log"
        with log.open("w") as out:  # files, not pipes: no process can block on a full pipe
            runs.append(
                (
                    subprocess.Popen(
                        command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
                    ),
                    log,
                )
            )
    return runs


def finish(runs: list[tuple[subprocess.Popen, Path]]) -> list[str]:
    """Waits for every process; all must exit 0. Returns their logs."""
    deadline = time.time() + TIMEOUT
    for process, _ in runs:
        try:
            process.wait(timeout=max(deadline - time.time(), 1))
        except subprocess.TimeoutExpired:
            for other, _ in runs:
                other.kill()
            process.wait()
    logs = [log.read_text() for _, log in runs]
    for index, ((process, _), text) in enumerate(zip(runs, logs, strict=True)):
        assert process.returncode == 0, (
            f"process {index} exited {process.returncode}:\n" + text[-4000:]
        )
    return logs


def run(config_file: Path, workdir: Path, data_dir: str, processes: int, *flags: str) -> list[str]:
    return finish(launch(config_file, workdir, data_dir, processes, *flags))


def wait_for(runs: list[tuple[subprocess.Popen, Path]], needle: str) -> None:
    """Until every process's log holds `needle`."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline:
        if all(needle in log.read_text() for _, log in runs):
            return
        if any(process.poll() is not None for process, _ in runs):
            break
        time.sleep(0.2)
    for process, _ in runs:
        process.kill()
    tails = "\n".join(log.read_text()[-3000:] for _, log in runs)
    raise AssertionError(f"{needle!r} never appeared in every process's log:\n{tails}")


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def example_digests(workdir: Path, process: int) -> dict[int, list[str]]:
    """Per step, the digests of the examples `process` fed (the last record of a step wins)."""
    out = {}
    for line in (workdir / f"example_digests.{process}.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["examples"]
    return out


def variables_at(workdir: Path, step: int) -> dict:
    variables, _, restored_step = checkpointing.restore_for_inference(workdir, step)
    assert restored_step == step
    return jax.device_get(variables)


def relative_difference(a: dict, b: dict) -> float:
    """Largest leaf difference, relative to the leaf's magnitude (floored at 1)."""
    return max(
        float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1.0))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def load_config(config_file: Path, data_dir: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("multihost_config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.data_dir = data_dir
    return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("multihost")
    config_file = root / "multihost_config.py"
    config_file.write_text(CONFIG_FILE)
    data_dir = str(root / "tfds")
    pipeline.prepare(load_config(config_file, data_dir).data)
    return config_file, data_dir


def test_two_processes_train_like_one_survive_sigterm_and_resume_in_either_layout(tmp_path, setup):
    config_file, data_dir = setup

    # 1. Two processes, SIGTERM to both (not at the same instant) once both are training.
    two = tmp_path / "two"
    runs = launch(
        config_file,
        two,
        data_dir,
        2,
        "--config.num_train_steps=1000",
        "--config.checkpoint_every_steps=1",
    )
    wait_for(runs, "saved checkpoint at step 1")
    runs[1][0].send_signal(signal.SIGTERM)
    time.sleep(0.5)
    runs[0][0].send_signal(signal.SIGTERM)
    logs = finish(runs)
    preempted = checkpoint_steps(two)[-1]
    assert checkpoint_steps(two) == list(range(1, preempted + 1))
    assert 2 <= preempted < 1000
    for log in logs:
        assert f"preempted: checkpoint at step {preempted} written" in log, log[-3000:]
    # Only process 0 wrote summaries: one TensorBoard event file, each step logged once.
    assert len(list((two / "tensorboard").iterdir())) == 1
    records = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [r["step"] for r in records if "train/loss" in r]
    assert loss_steps == list(range(1, preempted + 1)), loss_steps
    across = tmp_path / "across"  # the preempted run, for a relaunch in the other layout
    shutil.copytree(two, across)

    # 2. Relaunching with two processes resumes from the preemption step.
    final = preempted + 1
    logs = run(config_file, two, data_dir, 2, f"--config.num_train_steps={final}")
    for log in logs:
        assert f"start at step {preempted} of {final}" in log, log[-3000:]
    assert checkpoint_steps(two)[-1] == final

    # 3. One process with 8 devices from scratch: per step, the two processes fed disjoint
    # halves of its global batch, and its first step gives the 2×4 run's parameters.
    one = tmp_path / "one"
    run(
        config_file,
        one,
        data_dir,
        1,
        f"--config.num_train_steps={final}",
        "--config.checkpoint_every_steps=1",
    )
    first, second, single = (
        example_digests(two, 0),
        example_digests(two, 1),
        example_digests(one, 0),
    )
    assert sorted(first) == sorted(second) == sorted(single) == list(range(1, final + 1))
    for step in single:
        assert len(first[step]) == len(second[step]) == 4 and len(single[step]) == 8
        assert not set(first[step]) & set(second[step]), f"step {step}: shards overlap"
        assert set(first[step]) | set(second[step]) == set(single[step]), (
            f"step {step}: the two processes' batches are not the 1-process global batch"
        )
    error = relative_difference(variables_at(two, 1), variables_at(one, 1))
    assert error < TOLERANCE, ("step 1: 2×4 vs 1×8", error)

    # 4. The 2×4 preemption checkpoint resumed by one process with 8 devices: its step
    # from the same state and data position equals the 2×4 relaunch's.
    logs = run(config_file, across, data_dir, 1, f"--config.num_train_steps={final}")
    assert f"start at step {preempted} of {final}" in logs[0], logs[0][-3000:]
    assert sorted(example_digests(across, 0)[final]) == sorted(single[final])
    resumed = variables_at(two, final)
    error = relative_difference(variables_at(across, final), resumed)
    assert error < TOLERANCE, (f"step {final} from the 2×4 checkpoint: 1×8 vs 2×4", error)
    # A step changes the parameters far more than the tolerance.
    moved = relative_difference(resumed, variables_at(across, preempted))
    assert moved > 100 * TOLERANCE, moved


def test_evaluation_across_two_processes_sums_the_confusion_matrices(tmp_path, setup):
    config_file, data_dir = setup
    config = load_config(config_file, data_dir)
    # A training workdir with a checkpoint as train.train_and_evaluate writes it (untrained).
    model, optimizer, spec = (
        train.create_model(config),
        train.create_optimizer(config),
        train.model_spec(config),
    )
    manager = checkpointing.create_manager(str(tmp_path / "run"), config)
    workdir = checkpointing.prepare_workdir(str(tmp_path / "run"), config, spec, manager)
    checkpointing.write_run_record(workdir, config, spec)
    state = train.init_state(model, optimizer, jax.random.key(0), model.min_input_size)
    checkpointing.save(manager, 1, state, spec, force=True)
    manager.wait_until_finished()
    manager.close()
    expected = pipeline.num_examples(config.data, config.data.eval_split)
    single = evaluate.evaluate(config, workdir)  # one process: this one
    other = config.copy_and_resolve_references()
    other.model.backbone = "resnet34"  # the config of another run: refused, as training does
    with pytest.raises(checkpointing.CheckpointMismatchError, match="backbone: checkpoint"):
        evaluate.evaluate(other, workdir)
    other = config.copy_and_resolve_references()
    other.model.name = "pann"  # a ConfigError: main says it in one line (was a traceback)
    with pytest.raises(ConfigError, match=r"config\.model: unknown model 'pann'"):
        evaluate.evaluate(other, workdir)
    other = config.copy_and_resolve_references()
    other.model.overrides.output_stride = 8  # set, and unlike the checkpoint's (16): refused
    with pytest.raises(checkpointing.CheckpointMismatchError, match="output_stride"):
        evaluate.evaluate(other, workdir)
    # Options the config leaves unset are the run's: not repeated on the command line.
    other.model.overrides = {}
    assert evaluate.evaluate(other, workdir)["miou"] == single["miou"]

    logs = run(config_file, Path(workdir), data_dir, 2, "--mode=eval")
    report = json.loads((Path(workdir) / evaluate.REPORT_JSON).read_text())
    assert report["num_images"] == expected == single["num_images"] == 12
    assert report["confusion_matrix"] == single["confusion_matrix"]
    assert report["miou"] == pytest.approx(single["miou"], abs=1e-12)
    # Each process scored only its half, yet both report the global result.
    for log in logs:
        assert "eval done: 6/6 images" in log and "| 12 images" in log, log[-3000:]


PREPARE_ON_HOSTS = """
import os, socket, sys
root, index = sys.argv[1], os.environ["JAX_PROCESS_ID"]
host = "host-a" if index == "0" else "host-b"  # processes 1 and 2: two GPUs of one node
socket.gethostname = lambda: host
from pan_jax import sharding
from pan_jax.data import pipeline

sharding.initialize_distributed()
config = pipeline.default_data_config("pan_synthetic")
config.name, config.data_dir = "pan_synthetic/tiny", os.path.join(root, host)  # host-local
config.num_classes = int(sys.argv[2])


def work():
    with open(os.path.join(root, "order"), "a") as f:
        f.write(f"start {index}\\n")
    pipeline.prepare(config)
    with open(os.path.join(root, "order"), "a") as f:
        f.write(f"end {index}\\n")


sharding.process_zero_first(work, "dataset prepared")
"""


def prepare_on_hosts(root: Path, num_classes: int) -> list[tuple[int, str]]:
    """(exit status, output) of the three processes of PREPARE_ON_HOSTS."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}
    base.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}")
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE_ON_HOSTS, str(root), str(num_classes)],
            cwd=REPO,
            env={**base, "JAX_NUM_PROCESSES": "3", "JAX_PROCESS_ID": str(index)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(3)
    ]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in runs]
    finally:
        for process in runs:
            process.kill()
    return [(process.returncode, output) for process, output in zip(runs, outputs, strict=True)]


def test_a_host_local_dataset_is_built_by_one_process_of_each_host(tmp_path):
    # The processes of one host (one per GPU, as gpu_slurm.sbatch starts them) built into the
    # same folder at once after process 0: all but one failed on tfds's final rename.
    for code, output in prepare_on_hosts(
        tmp_path, pipeline.dataset_spec("pan_synthetic").num_classes
    ):
        assert code == 0, output[-3000:]
    order = (tmp_path / "order").read_text().split("\n")
    assert order == ["start 0", "end 0", "start 1", "end 1", "start 2", "end 2", ""], order
    # An error in process 0's turn: the others waited for it at the next turn for ever (and it
    # for them, at exit). Now each process raises it, or says where it came from.
    (tmp_path / "bad").mkdir()
    (first, zero), *others = prepare_on_hosts(tmp_path / "bad", 5)
    assert first != 0 and "ConfigError: data.num_classes=5" in zero, zero[-3000:]
    for code, output in others:
        assert code != 0, output[-3000:]
        assert "process 0 failed where every process waits for 'dataset prepared'" in output
    assert (tmp_path / "bad" / "order").read_text() == "start 0\n"
