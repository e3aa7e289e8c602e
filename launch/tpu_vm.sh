#!/usr/bin/env bash
# Cloud TPU VM slices: create (directly or through a queued resource), set up (code + venv on every worker),
# run `mirage ...` on every worker, read the per-worker logs, stop, delete. Every remote step is
# `gcloud compute tpus tpu-vm ssh <name> --worker=all --command=...`; --dry-run prints them instead.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/lib.sh
source "$REPO/launch/lib.sh"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh COMMAND [options] [-- MIRAGE_ARGS...]

Commands:
  create   create the slice (with --queued: a queued resource, waiting until it is ACTIVE)
  setup    ship the code to every worker (--code=scp: this checkout; --code=git: clone --repo at --ref),
           make <remote_dir>/.venv and pip install -e '.[tpu]'
  run      run `mirage MIRAGE_ARGS` on every worker (launch/run_on_host.sh: jax.distributed from the TPU
           metadata); waits for it unless --detach
  logs     last --lines of every worker's log (<remote_dir>/<log_dir>/<run_name>-worker<N>.log); --follow
  stop     SIGTERM to the run on every worker (mirage saves a checkpoint, then exits)
  delete   delete the slice (and its queued resource)

Options (--name=value; defaults from the environment variable in brackets):
  --name=NAME            TPU name [TPU_NAME]                     (required)
  --zone=ZONE            zone, e.g. us-west4-a [ZONE]             (required)
  --project=PROJECT      project [PROJECT] (default: gcloud's configured project)
  --accelerator=TYPE     accelerator type [ACCELERATOR_TYPE] (default: v5litepod-16)
  --version=VERSION      TPU software version [RUNTIME_VERSION] (default: v2-alpha-tpuv5-lite)
  --queued               create/delete through a queued resource
  --spot                 spot capacity
  --code=scp|git         how setup ships the code (default: scp)
  --repo=URL --ref=REF   the git source for --code=git (default ref: main)
  --python=BIN           python (>= 3.11) for the venv on the workers (default: python3)
  --remote_dir=DIR       code directory on the workers, relative to the home directory (default: mirage_jax)
  --log_dir=DIR          log directory on the workers, relative to --remote_dir (default: logs)
  --run_name=NAME        log file prefix (default: run)
  --worker=all|N         which workers ssh commands go to (default: all)
  --detach               run: start in the background and return (read it with logs)
  --lines=N --follow     logs: how many lines; keep following
  --dry-run              print every command instead of running it

Example:
  launch/tpu_vm.sh create --name=mirage-v5e --zone=us-west4-a --accelerator=v5litepod-16 --queued
  launch/tpu_vm.sh setup  --name=mirage-v5e --zone=us-west4-a
  launch/tpu_vm.sh run    --name=mirage-v5e --zone=us-west4-a --run_name=npo -- \
      train --config=configs/unlearn/npo.py:7b --workdir=/mnt/runs/npo --config.init_from=/mnt/runs/base
USAGE
}

(($#)) || die "no command given"
CMD=$1
shift
case $CMD in
  create | setup | run | logs | stop | delete) ;;
  -h | --help) usage; exit 0 ;;
  *) die "unknown command '$CMD'" ;;
esac

NAME=${TPU_NAME:-}
ZONE=${ZONE:-}
PROJECT=${PROJECT:-}
ACCELERATOR=${ACCELERATOR_TYPE:-v5litepod-16}
VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
QUEUED=0 SPOT=0 DETACH=0 FOLLOW=0 LINES=50
CODE=scp GIT_REPO="" GIT_REF=main PYTHON=python3
REMOTE_DIR=mirage_jax LOG_DIR=logs RUN_NAME=run WORKER=all
while (($#)); do
  case $1 in
    --name=*) NAME=${1#*=} ;;
    --zone=*) ZONE=${1#*=} ;;
    --project=*) PROJECT=${1#*=} ;;
    --accelerator=*) ACCELERATOR=${1#*=} ;;
    --version=*) VERSION=${1#*=} ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --code=*) CODE=${1#*=} ;;
    --repo=*) GIT_REPO=${1#*=} ;;
    --ref=*) GIT_REF=${1#*=} ;;
    --python=*) PYTHON=${1#*=} ;;
    --remote_dir=*) REMOTE_DIR=${1#*=} ;;
    --log_dir=*) LOG_DIR=${1#*=} ;;
    --run_name=*) RUN_NAME=${1#*=} ;;
    --worker=*) WORKER=${1#*=} ;;
    --detach) DETACH=1 ;;
    --lines=*) LINES=${1#*=} ;;
    --follow) FOLLOW=1 ;;
    --dry-run | --dry_run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (options take --name=value; mirage's own arguments go after --)" ;;
  esac
  shift
done
MIRAGE_ARGS=("$@")

[[ -n $NAME ]] || die "--name (or TPU_NAME) is required"
[[ -n $ZONE ]] || die "--zone (or ZONE) is required"
[[ $CODE == scp || $CODE == git ]] || die "--code must be scp or git, not '$CODE'"
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be all or a worker number, not '$WORKER'"
[[ $LINES =~ ^[0-9]+$ ]] || die "--lines must be a number, not '$LINES'"
if [[ $CMD == run ]]; then
  ((${#MIRAGE_ARGS[@]})) || die "run needs mirage's arguments after --, e.g. -- train --config=... --workdir=..."
elif ((${#MIRAGE_ARGS[@]})); then
  die "only run takes arguments after --"
fi

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=(--project="$PROJECT")

# gcloud compute tpus <group> <verb> ARGS --zone=... [--project=...]
tpus() {
  run gcloud compute tpus "$@" "${GCLOUD_FLAGS[@]}"
}

# One shell command line on the workers (--worker=all by default), from the home directory.
on_workers() {
  tpus tpu-vm ssh "$NAME" --worker="$WORKER" --command="$1"
}

create() {
  local spot=()
  ((SPOT)) && spot=(--spot)
  if ((!QUEUED)); then
    tpus tpu-vm create "$NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" "${spot[@]}"
    return
  fi
  tpus queued-resources create "$NAME" --node-id="$NAME" --accelerator-type="$ACCELERATOR" \
    --runtime-version="$VERSION" "${spot[@]}"
  local describe=(queued-resources describe "$NAME" --format='value(state.state)')
  if ((DRY_RUN)); then
    tpus "${describe[@]}"
    echo "# (repeated every 30 s until the state is ACTIVE)"
    return
  fi
  local state
  while state=$(tpus "${describe[@]}"); [[ $state != ACTIVE ]]; do
    case $state in FAILED | SUSPENDED) die "queued resource $NAME is $state" ;; esac
    echo "queued resource $NAME: ${state:-unknown}; waiting" >&2
    sleep 30
  done
}

setup() {
  if [[ $CODE == scp ]]; then
    local tarball="${TMPDIR:-/tmp}/mirage_jax-$NAME.tgz"
    run tar czf "$tarball" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=./runs -C "$REPO" .
    tpus tpu-vm scp "$tarball" "$NAME:mirage_jax.tgz" --worker="$WORKER"
    on_workers "mkdir -p $(quote_cmd "$REMOTE_DIR") && tar xzf mirage_jax.tgz -C $(quote_cmd "$REMOTE_DIR") && rm mirage_jax.tgz"
  else
    [[ -n $GIT_REPO ]] || die "--code=git needs --repo=URL"
    local dir repo ref
    dir=$(quote_cmd "$REMOTE_DIR") repo=$(quote_cmd "$GIT_REPO") ref=$(quote_cmd "$GIT_REF")
    on_workers "if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; else git clone --quiet $repo $dir; fi && git -C $dir checkout --quiet $ref"
  fi
  on_workers "cd $(quote_cmd "$REMOTE_DIR") && $(quote_cmd "$PYTHON") -m venv .venv && .venv/bin/pip install --quiet --upgrade pip && .venv/bin/pip install --quiet -e '.[tpu]' && .venv/bin/python -c 'import jax; print(jax.devices())'"
}

remote_run() {
  local host_cmd
  host_cmd="bash launch/run_on_host.sh --log_dir=$(quote_cmd "$LOG_DIR") --run_name=$(quote_cmd "$RUN_NAME") -- $(quote_cmd "${MIRAGE_ARGS[@]}")"
  if ((DETACH)); then
    host_cmd="nohup $host_cmd >/dev/null 2>&1 </dev/null &"
  fi
  on_workers "cd $(quote_cmd "$REMOTE_DIR") && $host_cmd"
}

logs() {
  local follow=""
  ((FOLLOW)) && follow=" -F"
  on_workers "cd $(quote_cmd "$REMOTE_DIR") && tail -n $LINES$follow $(quote_cmd "$LOG_DIR/$RUN_NAME")-worker*.log"
}

stop() {
  on_workers "cd $(quote_cmd "$REMOTE_DIR") && for f in $(quote_cmd "$LOG_DIR/$RUN_NAME")-worker*.pid; do [ -f \"\$f\" ] && kill -TERM \"\$(cat \"\$f\")\" 2>/dev/null; rm -f \"\$f\"; done; true"
}

delete() {
  if ((QUEUED)); then
    tpus queued-resources delete "$NAME" --force --quiet
  else
    tpus tpu-vm delete "$NAME" --quiet
  fi
}

case $CMD in
  run) remote_run ;;
  *) "$CMD" ;;
esac
