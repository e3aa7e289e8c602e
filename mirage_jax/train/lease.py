"""One writer per workdir: an exclusive lease on a run directory, held while a process writes into it.

A scheduler that relaunches a job whose old process is still alive, or two users pointing `mirage train` at
one directory, would otherwise interleave checkpoints and metric rows of one run. The lease is a lock file
`<workdir>/.mirage.lock` holding `{"pid", "host", "started", "command"}` and an `fcntl.flock` on it:

  - a second writer fails at once with `WorkdirBusy` (a user error: one line naming the holder, exit 2);
  - a lock file left by a process that is gone (SIGKILL, OOM, a crashed host) holds no flock, so it is
    taken over, with a warning naming the previous holder;
  - the kernel drops the flock when the holder dies, whatever way it dies: nothing is left to clean up.

Multi-host: process 0 takes the lease; the other processes follow its decision (they fail with the same
message when process 0 could not take it), so one job holds one lease for the shared directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import time
from collections.abc import Iterator

from mirage_jax.errors import UserError

LOCK_FILE = ".mirage.lock"
log = logging.getLogger("mirage")


class WorkdirBusy(UserError):
  """Another live process holds the workdir's lease."""


@dataclasses.dataclass(frozen=True)
class Holder:
  pid: int
  host: str
  started: str
  command: str

  @classmethod
  def read(cls, path: pathlib.Path) -> "Holder | None":
    try:
      d = json.loads(path.read_text() or "{}")
      return cls(pid=int(d["pid"]), host=str(d["host"]), started=str(d["started"]), command=str(d.get("command", "")))
    except (OSError, ValueError, KeyError, TypeError):
      return None

  def describe(self) -> str:
    return f"pid {self.pid} on {self.host} since {self.started}" + (f" ({self.command})" if self.command else "")


class Lease:
  """An exclusive lease on `workdir` for this process (`acquire`, `release`; or use `hold`)."""

  def __init__(self, workdir: str | os.PathLike, *, what: str = ""):
    self.workdir = pathlib.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.what = what or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:3]))
    self._fd: int | None = None

  def acquire(self) -> None:
    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = Holder.read(self.path)
      os.close(fd)
      who = holder.describe() if holder else "another process"
      raise WorkdirBusy(f"{self.workdir} is in use by {who}: one writer per workdir (stop it, or use another "
                        f"--workdir)") from None
    previous = Holder.read(self.path)
    if previous is not None and (previous.pid, previous.host) != (os.getpid(), socket.gethostname()):
      log.warning("taking over the stale lease of %s: %s (that process is gone)", self.workdir,
                  previous.describe())
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "command": self.what}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    """Drop the lease; the lock file stays (the next holder overwrites it) so no other process races on it."""
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, what: str = "") -> Iterator[Lease]:
  """Hold `workdir`'s lease for the block; multi-host, process 0 decides for every process."""
  import jax
  lease = Lease(workdir, what=what)
  error = ""
  if jax.process_index() == 0:
    try:
      lease.acquire()
    except WorkdirBusy as e:
      error = str(e)
  if jax.process_count() > 1:
    error = _broadcast_error(error)
  if error:
    raise WorkdirBusy(error)
  try:
    yield lease
  finally:
    lease.release()


def _broadcast_error(error: str) -> str:
  """Process 0's verdict ("" = lease taken) reaches every process."""
  import numpy as np
  from jax.experimental import multihost_utils
  code = np.frombuffer(error.encode()[:1024].ljust(1024, b"\0"), np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(code))
  return bytes(out.astype(np.uint8)).rstrip(b"\0").decode(errors="replace")
