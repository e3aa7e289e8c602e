"""Fault injection for reliability tests: die at a named point of a run, deterministically.

The environment variable `MIRAGE_FAULT` names what to do and where, as `ACTION@POINT[:STEP]`, several
separated by commas:

  MIRAGE_FAULT="kill@step_done:3"   SIGKILL this process when `trigger("step_done", step=3)` is reached
  MIRAGE_FAULT="kill@save_started:8"  SIGKILL it while the asynchronous save of step 8 is being written

Actions: `kill` — the process sends itself SIGKILL (no handler runs, nothing is flushed or saved, exactly like
the OOM killer or a lost host); `stop` — it sends itself SIGSTOP, so a test can change the world under a paused
run (fill its disk, remount it read-only, remove its checkpoints) and SIGCONT it; `term` — it sends itself
SIGTERM (what a scheduler's preemption does: the loop saves and stops). Without `:STEP` the first
call at POINT fires. Points: the training loop calls `trigger("step_done", step=step)` after each optimizer
step (the step counter already incremented); `train.checkpoint.Checkpointer.save` calls
`trigger("save_started", step=step)` once an asynchronous save is in flight (its temporary directory exists).
So a test kills a run between two known steps, or inside a save, instead of after a guessed sleep.

The variable is read and parsed once per process; unset (the normal case), `trigger` is one dict lookup.
A malformed value is a `UsageError` at the first `trigger` call.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import sys

from mirage_configs import comma_list
from mirage_jax import errors

ENV = "MIRAGE_FAULT"
ACTIONS = ("kill", "stop", "term")


@dataclasses.dataclass(frozen=True)
class Fault:
  action: str
  point: str
  step: int | None = None  # None: the first call at `point`

  def matches(self, point: str, info: dict) -> bool:
    return point == self.point and (self.step is None or info.get("step") == self.step)


def parse(spec: str) -> tuple[Fault, ...]:
  """`"kill@step_done:3,kill@other"` -> the faults it names (empty for an empty spec)."""
  faults = []
  for item in comma_list(spec):
    action, at, where = item.partition("@")
    point, colon, step = where.partition(":")
    if not at or action not in ACTIONS or not point or (colon and not step.lstrip("-").isdigit()):
      raise errors.UsageError(f"{ENV}={spec!r}: expected ACTION@POINT[:STEP] with ACTION in {list(ACTIONS)}, "
                              "e.g. kill@step_done:3")
    faults.append(Fault(action=action, point=point, step=int(step) if colon else None))
  return tuple(faults)


@functools.cache
def _planned() -> tuple[Fault, ...]:
  return parse(os.environ.get(ENV, ""))


def trigger(point: str, **info) -> None:
  """Fire the fault planned for `point` (and `info["step"]`, when the plan names a step); else nothing."""
  faults = _planned()
  if not faults:
    return
  for fault in faults:
    if fault.matches(point, info):
      _fire(fault, info)


def _fire(fault: Fault, info: dict) -> None:
  sys.stdout.flush()
  sys.stderr.write(f"{ENV}: {fault.action} at {fault.point} {info}\n")
  sys.stderr.flush()
  os.kill(os.getpid(), {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}[fault.action])
