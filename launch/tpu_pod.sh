#!/usr/bin/env bash
# Trains pan_jax on a Cloud TPU VM slice: every worker runs the same `python -m pan_jax.main`,
# which finds the others through jax.distributed's Cloud TPU detection (PAN_JAX_DISTRIBUTED=1).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [--dry-run] COMMAND [-- MAIN_FLAGS...]

Commands (run in this order, or `all`):
  create       request the slice as a queued resource (spot or reserved) and wait until ACTIVE;
               an existing one is used (refused if SUSPENDED or FAILED: delete it first)
  setup        copy this checkout (git HEAD) to every worker; install Python, jax[tpu], pan_jax
  train        start `python -m pan_jax.main` on every worker, detached (same flags everywhere);
               run it again to resume after a preemption: the workdir holds the checkpoints
  logs         follow worker 0's training log until the run ends
  maintenance  simulate a maintenance event: the run saves a checkpoint and exits; `train` resumes
  status       the queued resource's state and the last log lines of every worker
  delete       delete the queued resource and its TPU VMs
  all          create, setup, train, logs, then delete once the run has reached its last step
               (also if create or setup fail, where it created the slice; a run still going or
               preempted keeps its slice)

--dry-run prints every command (gcloud, git) instead of running it.
MAIN_FLAGS are passed to pan_jax.main after the defaults, e.g. `-- --config.batch_size=32`.

Settings are environment variables (defaults in brackets):
  PROJECT [gcloud's default]  ZONE [us-central2-b]  NAME [pan-jax]  QR_ID [$NAME-qr]
  ACCELERATOR [v4-32]  RUNTIME [tpu-ubuntu2204-base]  PROVISIONING [spot | reserved | on-demand]
  BUCKET [gs://my-bucket]  TFDS_DATA_DIR [$BUCKET/tensorflow_datasets]
  CONFIG [configs/voc.py]  WORKDIR [$BUCKET/runs/<config name>, or <name>_<ROW> for file.py:ROW]
  PYTHON [python3.11]  JAX_SPEC [jax[tpu]>=0.10,<0.12]  LOG [pan_jax_train.log, in each
  worker's home]  NUM_WORKERS [8: grain decoding processes per worker]
EOF
}

# ----------------------------------------------------------------------------- settings
PROJECT="${PROJECT:-}"
ZONE="${ZONE:-us-central2-b}"
NAME="${NAME:-pan-jax}"
QR_ID="${QR_ID:-${NAME}-qr}"
ACCELERATOR="${ACCELERATOR:-v4-32}"         # 16 v4 chips on 4 workers
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"   # v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e
PROVISIONING="${PROVISIONING:-spot}"
BUCKET="${BUCKET:-gs://my-bucket}"
TFDS_DATA_DIR="${TFDS_DATA_DIR:-${BUCKET}/tensorflow_datasets}"
CONFIG="${CONFIG:-configs/voc.py}"
config_name=$(basename "${CONFIG%%:*}" .py)  # configs/voc_ablation.py:ROW -> voc_ablation_ROW
[[ $CONFIG == *:* ]] && config_name+="_${CONFIG#*:}"
WORKDIR="${WORKDIR:-${BUCKET}/runs/${config_name}}"
NUM_WORKERS="${NUM_WORKERS:-8}"
PYTHON="${PYTHON:-python3.11}"              # pan_jax needs Python >= 3.11 (Ubuntu 22.04 has 3.10)
JAX_SPEC="${JAX_SPEC:-jax[tpu]>=0.10,<0.12}"
LOG="${LOG:-pan_jax_train.log}"
POLL_SECONDS="${POLL_SECONDS:-60}"

REMOTE_SRC="pan_jax"                        # on the workers, relative to the home directory
REMOTE_VENV="pan_jax_venv"
TARBALL="${TMPDIR:-/tmp}/pan_jax_src.tar.gz"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
CREATED=0  # whether this invocation created the queued resource (only then may `all` delete it)

# ----------------------------------------------------------------------------- helpers
die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

# Prints a command as one line that a shell can run again (arguments with spaces or shell
# characters in single quotes).
show() {
  local arg line=""
  for arg in "$@"; do
    if [[ -z "$arg" || "$arg" =~ [^A-Za-z0-9_./:=,@%+-] ]]; then
      arg="'${arg//\'/\'\\\'\'}'"
    fi
    line+="${line:+ }${arg}"
  done
  printf '%s\n' "$line"
}

# Runs a command, or only prints it with --dry-run.
run() {
  if ((DRY_RUN)); then
    show "$@"
  else
    "$@"
  fi
}

# Common gcloud flags.
where() {
  printf '%s\n' "--zone=${ZONE}"
  if [[ -n "$PROJECT" ]]; then
    printf '%s\n' "--project=${PROJECT}"
  fi
}

# Runs a shell command on TPU workers: on_workers WORKERS COMMAND
on_workers() {
  local workers=$1 command=$2 flags
  mapfile -t flags < <(where)
  run gcloud compute tpus tpu-vm ssh "$NAME" "${flags[@]}" --worker="$workers" \
    --command="$command"
}

# ----------------------------------------------------------------------------- commands
cmd_create() {
  local flags provisioning=()
  mapfile -t flags < <(where)
  case "$PROVISIONING" in
    spot) provisioning=(--spot) ;;
    reserved) provisioning=(--reserved) ;;
    on-demand) ;;
    *) die "PROVISIONING=$PROVISIONING: expected spot, reserved or on-demand" ;;
  esac
  local describe=(gcloud compute tpus queued-resources describe "$QR_ID" "${flags[@]}"
    --format='value(state.state)')
  local state=""
  if ((DRY_RUN)); then
    show "${describe[@]}"
  else
    state="$("${describe[@]}" 2> /dev/null)" || state=""  # fails where there is none
  fi
  case "$state" in
    "")
      run gcloud compute tpus queued-resources create "$QR_ID" "${flags[@]}" --node-id="$NAME" \
        --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" "${provisioning[@]}"
      CREATED=1
      ;;
    SUSPENDING | SUSPENDED | FAILED) # a preempted spot slice stays, suspended
      die "queued resource $QR_ID exists and is $state: \`$0 delete\` it, then run again" ;;
    *) echo "queued resource $QR_ID exists ($state): using it" ;;
  esac
  if ((DRY_RUN)); then
    show "${describe[@]}"
    return
  fi
  while true; do
    state="$("${describe[@]}")"
    echo "queued resource $QR_ID: $state"
    case "$state" in
      ACTIVE) return ;;
      FAILED | SUSPENDED) die "queued resource $QR_ID is $state" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

cmd_setup() {
  local flags
  mapfile -t flags < <(where)
  run git -C "$REPO_ROOT" archive --format=tar.gz --output="$TARBALL" HEAD
  run gcloud compute tpus tpu-vm scp "$TARBALL" "${NAME}:pan_jax_src.tar.gz" "${flags[@]}" \
    --worker=all
  # One step a line: under set -e, a command that fails before && does not stop the script.
  on_workers all "set -e
sudo apt-get update -qq
sudo apt-get install -y -qq ${PYTHON} ${PYTHON}-venv
rm -rf ~/${REMOTE_SRC}
mkdir -p ~/${REMOTE_SRC}
tar -xzf ~/pan_jax_src.tar.gz -C ~/${REMOTE_SRC}
${PYTHON} -m venv ~/${REMOTE_VENV}
~/${REMOTE_VENV}/bin/pip install -q -U pip
~/${REMOTE_VENV}/bin/pip install -q '${JAX_SPEC}' -e ~/${REMOTE_SRC}
~/${REMOTE_VENV}/bin/python -c 'import jax; print(jax.process_index(), jax.devices())'"
}

# The main command, quoted for the workers' shell; MAIN_FLAGS come last so they win.
main_command() {
  local command arg
  # PAN_JAX_DISTRIBUTED: a TPU VM's topology is in the metadata server, not the environment,
  # so pan_jax.main would not call jax.distributed.initialize() (which finds it) by itself.
  command="cd ~/${REMOTE_SRC} && TFDS_DATA_DIR=$(printf '%q' "$TFDS_DATA_DIR") PYTHONUNBUFFERED=1"
  command+=" PAN_JAX_DISTRIBUTED=1"
  command+=" setsid nohup ~/${REMOTE_VENV}/bin/python -m pan_jax.main"
  command+=" --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
  command+=" --config.data.data_dir=$(printf '%q' "$TFDS_DATA_DIR")"
  command+=" --config.data.num_workers=$(printf '%q' "$NUM_WORKERS")"
  for arg in "$@"; do
    command+=" $(printf '%q' "$arg")"
  done
  command+=" > ~/${LOG} 2>&1 < /dev/null &"
  printf '%s' "$command"
}

cmd_train() {
  # A second process on a worker could not get its TPU, and would truncate the live run's log.
  on_workers all "if pgrep -f '[p]ython -m pan_jax.main' > /dev/null; then
echo \"\$(hostname): pan_jax.main is still running (the logs command follows worker 0;
stop a run with: pkill -f pan_jax.main)\" >&2; exit 1; fi"
  on_workers all "$(main_command "$@")"
}

cmd_logs() {
  # tail exits with the training process; without one, print what the log has. '[p]ython'
  # keeps pgrep from matching the shell that runs this very command.
  on_workers 0 "pid=\$(pgrep -o -f '[p]ython -m pan_jax.main' || true)
if [ -n \"\$pid\" ]; then tail -n +1 --pid=\"\$pid\" -F ~/${LOG}; else cat ~/${LOG}; fi"
}

cmd_maintenance() {
  local flags
  mapfile -t flags < <(where)
  run gcloud alpha compute tpus tpu-vm simulate-maintenance-event "$NAME" "${flags[@]}" \
    --workers=all
}

cmd_status() {
  local flags
  mapfile -t flags < <(where)
  run gcloud compute tpus queued-resources describe "$QR_ID" "${flags[@]}"
  on_workers all "pgrep -a -f '[p]ython -m pan_jax.main' || echo 'not running'; tail -n 3 ~/${LOG}"
}

cmd_delete() {
  local flags
  mapfile -t flags < <(where)
  run gcloud compute tpus queued-resources delete "$QR_ID" "${flags[@]}" --force --quiet
}

# Whether worker 0's run has stopped and its log says it reached its last step.
finished() {
  on_workers 0 "! pgrep -f '[p]ython -m pan_jax.main' > /dev/null &&
grep -q 'training finished at step' ~/${LOG}"
}

delete_if_created() {
  if ((CREATED)); then
    cmd_delete
  fi
}

cmd_all() {
  # A failed create or setup must not leave a slice running; one that was there before (a run
  # going on it) is not this invocation's to delete.
  trap delete_if_created EXIT
  cmd_create
  cmd_setup
  cmd_train "$@"
  trap - EXIT
  # `logs` also ends on a dropped ssh connection, on Ctrl-C, or when a maintenance event made
  # the run save and exit: the slice is deleted only after the whole run.
  cmd_logs || true
  if finished; then
    cmd_delete
  else
    echo "tpu_pod.sh: the run is still going or stopped before its last step; the slice stays." \
      "Resume with \`$0 train\`, follow with \`$0 logs\`, remove with \`$0 delete\`." >&2
  fi
}

# ----------------------------------------------------------------------------- main
main() {
  # --dry-run anywhere before `--`; MAIN_FLAGS only after it (a stray flag must never be taken
  # for the main program's while the gcloud commands run for real).
  local command="" arg
  while (($#)); do
    arg=$1
    shift
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      --) break ;;
      -h | --help) command=help ;;
      -*) die "unknown option before --: $arg (MAIN_FLAGS go after --, e.g. -- $arg)" ;;
      *)
        [[ -z "$command" ]] || die "one COMMAND expected, got $command and $arg"
        command=$arg
        ;;
    esac
  done
  [[ -n "$command" ]] || {
    usage
    exit 2
  }
  case "$command" in
    create | setup | logs | maintenance | status | delete)
      (($# == 0)) || die "$command takes no MAIN_FLAGS"
      "cmd_${command}"
      ;;
    train | all) "cmd_${command}" "$@" ;;
    -h | --help | help) usage ;;
    *)
      usage >&2
      die "unknown command: $command"
      ;;
  esac
}

main "$@"
