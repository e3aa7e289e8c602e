# Helpers shared by the launch scripts (sourced, never run). The sourcing script defines `usage` and sets
# DRY_RUN=1 on --dry-run.
# shellcheck shell=bash

DRY_RUN=${DRY_RUN:-0}

# One-line error plus the usage text, exit status 2.
die() {
  echo "$(basename "$0"): error: $*" >&2
  echo >&2
  usage >&2
  exit 2
}

# A command as one re-runnable line: plain words as they are, anything else in single quotes.
quote_cmd() {
  local out="" a
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+=" $a"
    elif [[ $a =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then  # --flag='value with spaces'
      local v=${BASH_REMATCH[2]}
      out+=" ${BASH_REMATCH[1]}'${v//\'/\'\\\'\'}'"
    else
      out+=" '${a//\'/\'\\\'\'}'"
    fi
  done
  printf '%s\n' "${out# }"
}

# Run a command, or print it under --dry-run.
run() {
  if ((DRY_RUN)); then
    quote_cmd "$@"
  else
    "$@"
  fi
}
