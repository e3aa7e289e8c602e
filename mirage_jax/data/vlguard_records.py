"""Reading VLGuard-format JSON files record by record: each record's line, its schema checked, problems reported
to a `validate.Report` (see `mirage_jax.data.vlguard` for the format and what the builder makes of it).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

from mirage_jax.data import validate

IMAGE_TOKEN = "<image>"
_TURN_KEYS = ("instruction", "safe_instruction", "unsafe_instruction")


def record_lines(text: str, n: int) -> list[int]:
  """The 1-based line on which each of the `n` elements of a (valid) top-level JSON list starts."""
  decoder, skip = json.JSONDecoder(), re.compile(r"[\s,]*")
  i = text.index("[") + 1
  line, out = 1 + text.count("\n", 0, i), []
  for _ in range(n):
    j = skip.match(text, i).end()
    line += text.count("\n", i, j)
    out.append(line)
    _, i = decoder.raw_decode(text, j)
    line += text.count("\n", j, i)
  return out


def read_records(path: str | pathlib.Path, report: validate.Report) -> list[tuple[str, Any]]:
  """(`file:line`, record) for each element of a JSON list file. Malformed JSON or a document that is not a
  list cannot be split into records: that is one `DataError` (file, line and column) even when lenient."""
  path = pathlib.Path(path)
  records = validate.read_json(path)
  if not isinstance(records, list):
    raise validate.DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
  report.read += len(records)
  lines = record_lines(path.read_text(encoding="utf-8"), len(records))
  return [(f"{path.name}:{line}", rec) for line, rec in zip(lines, records)]


@dataclasses.dataclass(frozen=True)
class Turn:
  question: str
  answer: str
  kind: str  # "safe" | "unsafe_text" | "unsafe_image"


@dataclasses.dataclass(frozen=True)
class Entry:
  """One VLGuard record: an image and its turns (1 for unsafe images, safe then unsafe for safe images)."""

  id: str
  image: str
  safe: bool
  category: str
  turns: tuple[Turn, ...]
  where: str = ""  # file:line (id ...), for problems found later (image, group, response)
  raw: Any = dataclasses.field(default=None, compare=False, repr=False)


def _turn_problem(turns: list, safe: bool) -> str:
  if not all(isinstance(t, dict) for t in turns):
    return "'instr-resp' must be a list of objects"
  keys = sorted(k for t in turns for k in _TURN_KEYS if k in t)
  if safe and (keys != ["safe_instruction", "unsafe_instruction"] or len(turns) != 2):
    return f"a safe image needs one 'safe_instruction' and one 'unsafe_instruction' turn, got {keys}"
  if not safe and (keys != ["instruction"] or len(turns) != 1):
    return f"an unsafe image needs exactly one 'instruction' turn, got {keys}"
  return ""


def parse_entry(rec: Any, where: str, report: validate.Report) -> Entry | None:
  """One VLGuard record -> an `Entry`, or None with its problems added to `report`."""
  if not isinstance(rec, dict):
    report.add(validate.Problem("wrong_type", where, f"expected an object, got {type(rec).__name__}"), rec)
    return None
  where = f"{where} (id {rec.get('id', '?')})"
  if not validate.check_fields(rec, {"image": str, "safe": bool, "instr-resp": list}, where=where, report=report,
                               nonempty=("image",)):
    return None
  problem = _turn_problem(rec["instr-resp"], rec["safe"])
  if problem:
    report.add(validate.Problem("bad_turns", where, problem), rec)
    return None
  by_key = {k: t for t in rec["instr-resp"] for k in _TURN_KEYS if k in t}
  kinds = ({"safe_instruction": "safe", "unsafe_instruction": "unsafe_text"} if rec["safe"]
           else {"instruction": "unsafe_image"})
  turns = []
  for key, kind in kinds.items():
    t = by_key[key]
    if not validate.check_fields(t, {key: str, "response": str}, where=where, report=report,
                                 nonempty=(key, "response")):
      return None
    if IMAGE_TOKEN in t[key]:  # the template places the image; a literal token would add a second one
      report.add(validate.Problem("image_token_in_text", where, f"{key!r} contains {IMAGE_TOKEN!r}"), rec)
      return None
    turns.append(Turn(t[key], t["response"], kind))
  category = "/".join(str(rec[k]) for k in ("harmful_category", "harmful_subcategory") if rec.get(k))
  return Entry(id=str(rec.get("id", where)), image=rec["image"], safe=rec["safe"], category=category,
               turns=tuple(turns), where=where, raw=rec)


def first_word(question: str) -> str:
  m = re.match(r"\s*([\w'’-]+)", question)
  return m.group(1) if m else ""
