"""Process-0 metrics: JSON lines + TensorBoard (tensorboardX), a progress bar with ETA, finiteness checks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping

import tqdm

from mirage_jax.errors import StorageError, UserError


class NonFiniteLoss(UserError, RuntimeError):
  """A loss term or the gradient norm became NaN/inf."""


def check_finite(step: int, metrics: Mapping[str, float]) -> None:
  """Raise on a non-finite value (a step skipped by `skip_nonfinite` reports `skipped` = 1 and passes)."""
  if metrics.get("skipped"):
    return
  bad = {k: v for k, v in metrics.items() if not math.isfinite(float(v))}
  if bad:
    terms = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
    raise NonFiniteLoss(f"non-finite value at step {step}: {terms}; stopping (the last checkpoint is intact)")


class MetricWriter:
  """Writes `metrics.jsonl` (one object per call) and TensorBoard scalars under `workdir/tb`."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._file = self._tb = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    self.workdir = workdir
    workdir.mkdir(parents=True, exist_ok=True)
    self._file = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / "tb"), flush_secs=30)

  def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "split": prefix, "time": round(time.time(), 3)}
    row.update({k: float(v) for k, v in metrics.items()})
    with self._storage("writing"):
      self._file.write(json.dumps(row) + "\n")
      self._file.flush()
      if self._tb is not None:
        for k, v in metrics.items():
          self._tb.add_scalar(f"{prefix}/{k}", float(v), int(step))

  def close(self) -> None:
    with self._storage("closing"):
      if self._file is not None:
        self._file.close()
      if self._tb is not None:
        self._tb.close()

  @contextlib.contextmanager
  def _storage(self, what: str):
    """A refused write (full disk, read-only workdir) is one user-facing `StorageError`."""
    try:
      yield
    except OSError as e:
      raise StorageError(f"{what} metrics in {self.workdir} failed: {e.strerror or e}") from e


def truncate_after(workdir: str | os.PathLike, step: int) -> int:
  """Drop rows logged after `step` (a resumed run replays those steps); returns how many were dropped."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  rows = path.read_text().splitlines(keepends=True)
  keep = [r for r in rows if r.strip() and json.loads(r)["step"] <= step]
  if len(keep) != len(rows):
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    tmp.replace(path)
  return len(rows) - len(keep)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
  """A tqdm bar over steps (stderr; silent when disabled) with steps/s and ETA."""

  def __init__(self, *, total: int, initial: int, desc: str, enabled: bool = True):
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                          disable=not enabled, file=sys.stderr, mininterval=2.0, leave=True)

  def update(self, n: int, postfix: Mapping[str, float] | None = None) -> None:
    if postfix:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
    self._bar.update(n)

  def close(self) -> None:
    self._bar.close()
