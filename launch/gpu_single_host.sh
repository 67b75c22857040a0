#!/usr/bin/env bash
# Trains pan_jax on the GPUs of one machine.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/gpu_single_host.sh [--dry-run] [--processes=N] [MAIN_FLAGS...]

  --processes=1 (default)  one process drives every visible GPU: the mesh spans them all,
                           no jax.distributed needed. The simplest and usual choice.
  --processes=N            one process per GPU (N = number of GPUs), as on a cluster: they
                           meet through jax.distributed on localhost (JAX_COORDINATOR_ADDRESS,
                           JAX_NUM_PROCESSES, JAX_PROCESS_ID, JAX_LOCAL_DEVICE_IDS).
  --dry-run                print the commands instead of running them.

Ctrl-C or SIGTERM to this script makes every process save a checkpoint at the same step and
exit; running the same command again resumes from WORKDIR. Logs, appended to by every attempt:
WORKDIR.process_<i>.log (runs/<last part of WORKDIR>.process_<i>.log when WORKDIR is a bucket,
gs://...). Settings are environment variables: CONFIG [configs/voc.py], WORKDIR
[runs/<config name>, or runs/<name>_<ROW> for file.py:ROW], TFDS_DATA_DIR
[~/tensorflow_datasets], PYTHON [python3 of an activated venv or conda environment, else
.venv/bin/python (the README's install) if there, else python3],
NUM_WORKERS [grain decoding processes per training process], PORT [12355]. The script runs
from the repository's root: relative paths (CONFIG, WORKDIR, TFDS_DATA_DIR) are read from there.
EOF
}

CONFIG="${CONFIG:-configs/voc.py}"
config_name=$(basename "${CONFIG%%:*}" .py)  # configs/voc_ablation.py:ROW -> voc_ablation_ROW
[[ $CONFIG == *:* ]] && config_name+="_${CONFIG#*:}"
WORKDIR="${WORKDIR:-runs/${config_name}}"
TFDS_DATA_DIR="${TFDS_DATA_DIR:-${HOME}/tensorflow_datasets}"
PYTHON="${PYTHON:-}"
PORT="${PORT:-12355}"
PROCESSES=1
DRY_RUN=0

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --processes=*) PROCESSES="${1#--processes=}" ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) break ;;
  esac
  shift
done
[[ "$PROCESSES" =~ ^[1-9][0-9]*$ ]] || {
  echo "--processes=$PROCESSES: expected a positive integer" >&2
  exit 2
}
CORES="$(nproc)"
NUM_WORKERS="${NUM_WORKERS:-$(((CORES / PROCESSES) > 2 ? CORES / PROCESSES - 2 : 1))}"

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# An activated environment (a venv, conda) is the user's choice; else the README's .venv.
if [[ -z "$PYTHON" && -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" && -x .venv/bin/python ]]; then
  PYTHON=.venv/bin/python
fi
PYTHON="${PYTHON:-python3}"
export TFDS_DATA_DIR PYTHONUNBUFFERED=1
main=("$PYTHON" -m pan_jax.main --config="$CONFIG" --workdir="$WORKDIR"
  --config.data.num_workers="$NUM_WORKERS" "$@")

pids=()
stop_requested=0
signals=0  # how many the trap has forwarded
# shellcheck disable=SC2317,SC2329  # called by the trap
forward() { # Ctrl-C or SIGTERM: every process gets SIGTERM, saves at the same step and exits
  stop_requested=1
  signals=$((signals + 1))
  if ((${#pids[@]})); then
    kill -TERM "${pids[@]}" 2>/dev/null || true
  fi
}
trap forward INT TERM
log_prefix="${WORKDIR%/}"
if [[ $log_prefix == *://* ]]; then  # a bucket: the logs stay on this machine
  log_prefix="runs/$(basename "$log_prefix")"
fi
if ((!DRY_RUN)); then
  mkdir -p "$(dirname "$log_prefix")"
fi
for ((i = 0; i < PROCESSES; i++)); do
  env_vars=()
  if ((PROCESSES > 1)); then
    env_vars=(JAX_COORDINATOR_ADDRESS="localhost:${PORT}" JAX_NUM_PROCESSES="$PROCESSES"
      JAX_PROCESS_ID="$i" JAX_LOCAL_DEVICE_IDS="$i")
  fi
  log="${log_prefix}.process_${i}.log"
  if ((DRY_RUN)); then
    # Quoted as the shell needs: a line to paste, even with a flag holding spaces.
    echo "$(printf '%q ' "${env_vars[@]}" "${main[@]}")>> $(printf '%q' "$log") 2>&1 &"
    continue
  fi
  # Its own session: Ctrl-C reaches only this script, which turns it into SIGTERM (a SIGINT
  # would interrupt Python without a checkpoint).
  setsid env "${env_vars[@]}" "${main[@]}" >> "$log" 2>&1 &  # keeps what a resumed attempt said
  pids+=("$!")
done
if ((DRY_RUN)); then
  exit 0
fi
# A signal during the loop above reached only the processes whose pid was recorded by then.
if ((stop_requested)); then
  forward
fi
echo "started ${PROCESSES} process(es); logs: ${log_prefix}.process_*.log (tail -f)"
status=0
for pid in "${pids[@]}"; do
  while true; do
    code=0
    before=$signals
    wait "$pid" || code=$?
    # A trapped signal interrupts `wait` (code > 128, not the process's status): wait again,
    # for a process still saving, or for the status of one that has exited meanwhile.
    if ((code > 128 && signals != before)); then
      continue
    fi
    break
  done
  ((code == 0)) || status=$code
done
exit "$status"
