"""Reading user-supplied JSON / JSONL / image files: every problem is named, counted and never silent.

Strict (default): the first read ends in one `DataError` naming the file, the first offending records (with
line numbers) and the totals per problem kind. Lenient (`--lenient`): offending records are skipped, counted
in the summary and written with their reasons to a rejects file (JSONL), so nothing disappears silently.
Oddities that do not make a record unusable (a reference response evaluation never reads, a duplicated id) are
*notes*: counted and listed in the summary, never fatal, the record kept.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mirage_jax.errors import DataError, MissingFileError  # noqa: F401  (re-exported: validate.DataError)


@dataclasses.dataclass(frozen=True)
class Problem:
  kind: str  # malformed_json, missing_field, wrong_type, empty_text, missing_image, bad_image, ...
  where: str  # "file:line" or "file record 12"
  detail: str


@dataclasses.dataclass
class Report:
  """Problems found while reading one source, and what happened to the records."""

  source: str
  lenient: bool = False
  read: int = 0
  kept: int = 0
  truncated: int = 0
  problems: list[Problem] = dataclasses.field(default_factory=list)
  rejects: list[dict] = dataclasses.field(default_factory=list)
  notes: list[Problem] = dataclasses.field(default_factory=list)  # kept records' oddities (not fatal)

  def add(self, problem: Problem, record: Any = None) -> None:
    self.problems.append(problem)
    self.rejects.append({"where": problem.where, "kind": problem.kind, "detail": problem.detail,
                         "record": record if isinstance(record, (dict, list, str, int, float)) else None})

  def note(self, problem: Problem) -> None:
    """An oddity of a record that is kept: counted and listed in `summary`, never fatal."""
    self.notes.append(problem)

  def counts(self) -> dict[str, int]:
    return dict(collections.Counter(p.kind for p in self.problems))

  def note_counts(self) -> dict[str, int]:
    return dict(collections.Counter(p.kind for p in self.notes))

  def summary(self, examples: int = 3) -> dict:
    """Records read / kept / rejected, problems per kind; with notes, their counts per kind and the first
    `examples` of each kind (`where: detail`)."""
    out = {"source": self.source, "read": self.read, "kept": self.kept, "rejected": self.read - self.kept,
           "truncated": self.truncated, "problems": self.counts()}
    if self.notes:
      out["notes"] = self.note_counts()
      first: dict[str, list[str]] = {}
      for p in self.notes:
        if len(first.setdefault(p.kind, [])) < examples:
          first[p.kind].append(f"{p.where}: {p.detail}")
      out["note_examples"] = first
    return out

  def finish(self, rejects_path: str | os.PathLike | None = None) -> None:
    """Strict: raise if anything was wrong. Lenient: write the rejects file (if any problem)."""
    if not self.problems:
      return
    if not self.lenient:
      first = "; ".join(f"{p.where}: {p.kind} ({p.detail})" for p in self.problems[:5])
      totals = ", ".join(f"{k}={v}" for k, v in sorted(self.counts().items()))
      raise DataError(f"{self.source}: {len(self.problems)} problem(s) [{totals}]; first: {first}. "
                      "Fix the data or pass --lenient to skip (and record) the offending records")
    if rejects_path is not None:
      path = pathlib.Path(rejects_path)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("".join(json.dumps(r, default=str) + "\n" for r in self.rejects))


def read_json(path: str | os.PathLike) -> Any:
  """A whole JSON document; a syntax error names the file, line and column."""
  path = pathlib.Path(path)
  if not path.exists():
    raise MissingFileError(f"{path} not found")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_jsonl(path: str | os.PathLike, report: Report) -> Iterator[tuple[int, dict]]:
  """(line number, object) per non-empty line; malformed lines and non-objects are reported problems."""
  path = pathlib.Path(path)
  if not path.exists():
    raise MissingFileError(f"{path} not found")
  with open(path, encoding="utf-8", errors="replace") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      report.read += 1
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        report.add(Problem("malformed_json", f"{path}:{lineno}", e.msg), line.strip()[:200])
        continue
      if not isinstance(obj, dict):
        report.add(Problem("wrong_type", f"{path}:{lineno}", f"expected an object, got {type(obj).__name__}"), obj)
        continue
      yield lineno, obj


def check_fields(obj: Mapping, fields: Mapping[str, type | tuple[type, ...]], *, where: str, report: Report,
                 nonempty: Sequence[str] = (), record: Any = None) -> bool:
  """Required fields with their types, and text fields that must not be empty; True when the record is ok.
  `record` is what a rejects file gets (default: `obj`; give the whole record when `obj` is a part of it)."""
  ok, record = True, dict(obj) if record is None else record
  for name, kind in fields.items():
    if name not in obj:
      report.add(Problem("missing_field", where, f"no {name!r}"), record)
      ok = False
    elif not isinstance(obj[name], kind):
      expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
      report.add(Problem("wrong_type", where, f"{name!r} is {type(obj[name]).__name__}, expected {expected}"),
                 record)
      ok = False
  for name in nonempty:
    if ok and isinstance(obj.get(name), str) and not obj[name].strip():
      report.add(Problem("empty_text", where, f"{name!r} is empty"), record)
      ok = False
  return ok


def load_image(path: str | os.PathLike, *, where: str, report: Report) -> np.ndarray | None:
  """RGB uint8 pixels, or None with a reported problem (missing, truncated or undecodable file)."""
  path = pathlib.Path(path)
  if not path.exists():
    report.add(Problem("missing_image", where, str(path)))
    return None
  try:
    with Image.open(io.BytesIO(path.read_bytes())) as im:
      im.load()
      return np.asarray(im.convert("RGB"), np.uint8)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    report.add(Problem("bad_image", where, f"{path.name}: {e}"))
    return None


def kept(items: Iterable, report: Report) -> list:
  """Materialise accepted items and count them."""
  out = list(items)
  report.kept += len(out)
  return out
