"""The one base class of every error a user can cause, and the kinds the library raises.

A `UserError` is a mistake in what the user gave: a config key or value, a data file, a checkpoint, a command
line flag. The CLI prints its message as one line and exits 2; every other exception keeps its traceback
(an internal shape error is a bug, not a user mistake). The kinds also derive from the builtin they refine
(`ValueError`, `FileNotFoundError`), so code that catches those keeps working.

This module imports nothing: every layer may raise these.
"""

from __future__ import annotations


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
