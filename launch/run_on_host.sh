#!/usr/bin/env bash
# What every host of a multi-host job runs (launch/tpu_vm.sh run and launch/slurm_gpu.sbatch call it): sets
# MIRAGE_DISTRIBUTED=1 (mirage_jax/distributed.py then calls jax.distributed.initialize(), which finds the
# coordinator, process count and id from the TPU VM metadata or the SLURM environment), activates the venv
# and runs `mirage <args>` with its output in <log_dir>/<run_name>-worker<N>.log and its pid beside it (for
# `launch/tpu_vm.sh stop`).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/lib.sh
source "$REPO/launch/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/run_on_host.sh [options] -- MIRAGE_ARGS...

  e.g. launch/run_on_host.sh --log_dir=/tmp/logs -- train --config=configs/unlearn/npo.py:7b --workdir=/mnt/runs/npo

Options:
  --venv=DIR       virtual environment to activate (default: <repo>/.venv; "none" = use the current python)
  --log_dir=DIR    where <run_name>-worker<N>.log and .pid go (default: ~/mirage_logs)
  --run_name=NAME  log file prefix (default: run)
  --single         single process: do not set MIRAGE_DISTRIBUTED=1
  --dry-run        print every command instead of running it
USAGE
}

VENV="$REPO/.venv"
LOG_DIR="$HOME/mirage_logs"
RUN_NAME=run
DISTRIBUTED=1
while (($#)); do
  case $1 in
    --venv=*) VENV=${1#*=} ;;
    --log_dir=*) LOG_DIR=${1#*=} ;;
    --run_name=*) RUN_NAME=${1#*=} ;;
    --single) DISTRIBUTED=0 ;;
    --dry-run | --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (options take --name=value; mirage's own arguments go after --)" ;;
  esac
  shift
done
(($#)) || die "no mirage arguments after --"
[[ $LOG_DIR == /* ]] || LOG_DIR="$PWD/$LOG_DIR"  # absolute: the command below runs in the repo

# This host's index: TPU VM worker number, SLURM task rank, or the host name.
worker_id() {
  if [[ -n ${TPU_WORKER_ID:-} ]]; then
    echo "$TPU_WORKER_ID"
  elif [[ -n ${SLURM_PROCID:-} ]]; then
    echo "$SLURM_PROCID"
  elif ((!DRY_RUN)) && id=$(curl -sf -m 2 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number); then
    echo "$id"
  else
    hostname -s
  fi
}

LOG="$LOG_DIR/$RUN_NAME-worker$(worker_id).log"
run mkdir -p "$LOG_DIR"
run cd "$REPO"
if ((DISTRIBUTED)); then
  run export MIRAGE_DISTRIBUTED=1
fi
if [[ $VENV != none ]]; then
  [[ -f $VENV/bin/activate ]] || ((DRY_RUN)) || die "no virtual environment at $VENV (launch/tpu_vm.sh setup makes one)"
  if ((DRY_RUN)); then
    quote_cmd source "$VENV/bin/activate"
  else
    # shellcheck source=/dev/null
    source "$VENV/bin/activate"
  fi
fi
if ((DRY_RUN)); then
  echo "$(quote_cmd mirage "$@") > >(tee -a $(quote_cmd "$LOG")) 2>&1  # pid in ${LOG%.log}.pid"
  exit 0
fi
echo "$(date -Is) $(hostname): mirage $*" >>"$LOG"
echo $$ >"${LOG%.log}.pid"
exec mirage "$@" > >(tee -a "$LOG") 2>&1
