"""The one base class of every error a user can cause, and the kinds the library raises.

A `UserError` is a mistake in what the user gave: a config key or value, a data file, a checkpoint, a command
line flag. The CLI prints its message as one line and exits 2; every other exception keeps its traceback
(an internal shape error is a bug, not a user mistake). The kinds also derive from the builtin they refine
(`ValueError`, `FileNotFoundError`), so code that catches those keeps working.

This module imports only the standard library: every layer may raise these.
"""

from __future__ import annotations

import os
import types

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
  """A mistake in the user's input (config, data, checkpoint, command line): reported as one line.

  `abandon_process`: set on an error raised while background writers have failed (a checkpoint save cut by a
  full or removed disk); the command-line program then exits right after the line, without the interpreter's
  teardown, where those writers would print their leftovers below the line (or wait for them)."""

  abandon_process: bool = False


class ConfigError(UserError, ValueError):
  """A config spec, an override, or a setting that cannot be used."""


class DataError(UserError, ValueError):
  """Input data that cannot be used (malformed files, missing images, records over the length limit)."""


class CheckpointError(UserError, ValueError):
  """A checkpoint or run directory that is missing, incomplete, or does not match the config."""


class StorageError(UserError, OSError):
  """The filesystem refused a write the run needs (full disk, read-only or removed directory)."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or directory the user named does not exist."""


class UsageError(UserError, ValueError):
  """A command-line flag combination that cannot be used."""


class Stopped(UserError):
  """Not a mistake: a command that goes on after training (`mirage demo`'s stages, relearning, the trajectory)
  was stopped by SIGTERM or a preemption notice after its running stage saved. Reported as one line (exit
  2) instead of going on with a half-trained stage; rerunning the same command resumes it."""


def drop_package_frames(e: BaseException | None) -> None:
  """Remove this package's frames from the tracebacks of `e` and of what caused it, wherever they sit.

  Libraries with background writers (Orbax) keep their writers' exceptions and re-raise the same objects in
  other threads, so one object's traceback collects the frames of every place it passed through, and such a
  library may log it again later (asyncio's "exception was never retrieved" at garbage collection). Once a
  failure is reported as a `UserError`, those logs would show this package's frames as if it had crashed;
  the library's own frames stay."""
  seen: set[int] = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    kept, tb = [], e.__traceback__
    while tb is not None:
      if not tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR):
        kept.append(tb)
      tb = tb.tb_next
    rebuilt = None
    for t in reversed(kept):
      rebuilt = types.TracebackType(rebuilt, t.tb_frame, t.tb_lasti, t.tb_lineno)
    e.__traceback__ = rebuilt
    e = e.__cause__ or e.__context__
