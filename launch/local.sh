#!/usr/bin/env bash
# One process on this machine (a workstation, one GPU node, or CPU with fake devices to try a mesh):
# launch/run_on_host.sh --single, so no jax.distributed; logs in <log_dir>/<run_name>-worker<host>.log.
#
#   launch/local.sh -- train --config=configs/sft/posthoc.py:tiny --workdir=runs/posthoc
#   launch/local.sh --devices=8 -- train --config=configs/unlearn/npo.py:tiny --workdir=runs/npo8
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/lib.sh
source "$REPO/launch/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/local.sh [options] -- MIRAGE_ARGS...

Options:
  --devices=N      N fake CPU devices (XLA --xla_force_host_platform_device_count, JAX_PLATFORMS=cpu)
  --venv=DIR       virtual environment (default: <repo>/.venv if it exists, else the current python)
  --log_dir=DIR    log directory (default: ~/mirage_logs)
  --run_name=NAME  log file prefix (default: local)
  --dry-run        print every command instead of running it
USAGE
}

DEVICES=0
HOST_ARGS=(--single --run_name=local)
[[ -d $REPO/.venv ]] || HOST_ARGS+=(--venv=none)  # no repo venv: the current python
while (($#)); do
  case $1 in
    --devices=*) DEVICES=${1#*=} ;;
    --venv=* | --log_dir=* | --run_name=*) HOST_ARGS+=("$1") ;;
    --dry-run | --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (options take --name=value; mirage's own arguments go after --)" ;;
  esac
  shift
done
(($#)) || die "no mirage arguments after --"
[[ $DEVICES =~ ^[0-9]+$ ]] || die "--devices must be a number, not '$DEVICES'"

if ((DEVICES)); then
  run export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES"
fi
((DRY_RUN)) && HOST_ARGS+=(--dry-run)
exec bash "$REPO/launch/run_on_host.sh" "${HOST_ARGS[@]}" -- "$@"
