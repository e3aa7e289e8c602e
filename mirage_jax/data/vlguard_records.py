"""Reading VLGuard-format JSON files record by record: each record located, its schema checked, problems and
notes reported to a `validate.Report` (see `mirage_jax.data.vlguard` for the format and what the builder makes
of it).

A record's location reads `test.json record 17 (id X)`: its 0-based position in the file's list (`jq '.[17]'`)
and its id; for files spread over several lines the line it starts on too (`train.json record 3 (line 9, id
X)`). The official files are single-line JSON, where a line number says nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mirage_jax.data import validate

IMAGE_TOKEN = "<image>"
_TURN_KEYS = ("instruction", "safe_instruction", "unsafe_instruction")
# A placeholder where an instruction belongs: the official train.json has 15 unsafe images whose instruction is
# "N/A" or "NA" (test.json one). Kept (the image carries the request; the reference is a refusal) and noted.
PLACEHOLDER = re.compile(r"\s*(n/?a|none|null)\.?\s*", re.IGNORECASE)


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


def locate(name: str, index: int, rec: Any, line: int | None = None) -> str:
  """`name record INDEX (line L, id X)`; the line only when given, the id only for an object that has one."""
  extra = [f"line {line}"] if line is not None else []
  if isinstance(rec, dict) and "id" in rec:
    extra.append(f"id {rec['id']}")
  return f"{name} record {index}" + (f" ({', '.join(extra)})" if extra else "")


def read_records(path: str | pathlib.Path, report: validate.Report) -> list[tuple[str, Any]]:
  """(location, record) for each element of a JSON list file (locations: module docstring). Malformed JSON or
  a document that is not a list cannot be split into records: that is one `DataError` (file, line and column)
  even when lenient."""
  path = pathlib.Path(path)
  records = validate.read_json(path)
  if not isinstance(records, list):
    raise validate.DataError(f"{path}: expected a JSON list of records, got a {type(records).__name__}")
  report.read += len(records)
  lines = record_lines(path.read_text(encoding="utf-8"), len(records))
  multiline = len(set(lines)) > 1
  return [(locate(path.name, i, rec, line if multiline else None), rec)
          for i, (line, rec) in enumerate(zip(lines, records))]


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
  where: str = ""  # its location (module docstring), for problems found later (image, group, response)
  raw: Any = dataclasses.field(default=None, compare=False, repr=False)
  index: int = -1  # position in its file
  file_turns: tuple[int, ...] = (0,)  # the index into `turns` of each 'instr-resp' element, in file order
  notes: tuple[validate.Problem, ...] = ()  # oddities of a usable record (added to the report when kept)


def _turn_problem(turns: list, safe: bool) -> str:
  if not all(isinstance(t, dict) for t in turns):
    return "'instr-resp' must be a list of objects"
  keys = sorted(k for t in turns for k in _TURN_KEYS if k in t)
  if safe and (keys != ["safe_instruction", "unsafe_instruction"] or len(turns) != 2):
    return f"a safe image needs one 'safe_instruction' and one 'unsafe_instruction' turn, got {keys}"
  if not safe and (keys != ["instruction"] or len(turns) != 1):
    return f"an unsafe image needs exactly one 'instruction' turn, got {keys}"
  return ""


def parse_entry(rec: Any, where: str, report: validate.Report, *, index: int = -1,
                references: bool = False) -> Entry | None:
  """One VLGuard record -> an `Entry`, or None with its problems added to `report` (with the whole record).

  `references`: the responses are test references that evaluation never reads, so an empty one is a note
  (`empty_reference`), not a problem; in training files (`references=False`) it is `empty_text`. A placeholder
  instruction ("N/A") is a note either way."""
  if not isinstance(rec, dict):
    report.add(validate.Problem("wrong_type", where, f"expected an object, got {type(rec).__name__}"), rec)
    return None
  if not validate.check_fields(rec, {"image": str, "safe": bool, "instr-resp": list}, where=where, report=report,
                               nonempty=("image",)):
    return None
  problem = _turn_problem(rec["instr-resp"], rec["safe"])
  if problem:
    report.add(validate.Problem("bad_turns", where, problem), rec)
    return None
  kinds = ({"safe_instruction": "safe", "unsafe_instruction": "unsafe_text"} if rec["safe"]
           else {"instruction": "unsafe_image"})
  turns, notes = [], []
  for key, kind in kinds.items():
    t = next(t for t in rec["instr-resp"] if key in t)
    if not validate.check_fields(t, {key: str, "response": str}, where=where, report=report,
                                 nonempty=(key,) if references else (key, "response"), record=rec):
      return None
    if IMAGE_TOKEN in t[key]:  # the template places the image; a literal token would add a second one
      report.add(validate.Problem("image_token_in_text", where, f"{key!r} contains {IMAGE_TOKEN!r}"), rec)
      return None
    if not t["response"].strip():
      notes.append(validate.Problem("empty_reference", where, f"the {key!r} turn's reference response is "
                                    "empty (kept: evaluation does not read it)"))
    if PLACEHOLDER.fullmatch(t[key]):
      notes.append(validate.Problem("placeholder_instruction", where, f"{key!r} is {t[key]!r} (kept)"))
    turns.append(Turn(t[key], t["response"], kind))
  file_turns = tuple(next(i for i, key in enumerate(kinds) if key in t) for t in rec["instr-resp"])
  category = "/".join(str(rec[k]) for k in ("harmful_category", "harmful_subcategory") if rec.get(k))
  return Entry(id=str(rec.get("id", where)), image=rec["image"], safe=rec["safe"], category=category,
               turns=tuple(turns), where=where, raw=rec, index=index, file_turns=file_turns, notes=tuple(notes))


def conversion_orders(records: Sequence[Any], seed: int) -> list[tuple[int, ...]]:
  """The turn order VLGuard's LLaVA conversion (ys-zong/VLGuard `convert_to_llava_format.py`, copied into
  OPTML-Group/VLM-Safety-Unlearn) gives each record of a file: `random.seed(seed)` (0 there), then, in file
  order, `random.shuffle` of every record's 'instr-resp' list that has more than one element. Returns per
  record the positions into that list, first turn first. Every record of the file draws (a rejected one too),
  so the stream stays aligned with the official conversion."""
  rng = random.Random(seed)
  out = []
  for rec in records:
    turns = rec.get("instr-resp") if isinstance(rec, dict) else None
    order = list(range(len(turns))) if isinstance(turns, list) else [0]
    if len(order) > 1:
      rng.shuffle(order)
    out.append(tuple(order))
  return out


def unique_ids(ids: Sequence[str], wheres: Sequence[str], report: validate.Report) -> list[str]:
  """`ids` with every repeat made unique (`X`, `X#2`, `X#3`, ...), each repeat a `duplicate_id` note."""
  seen: dict[str, str] = {}
  count: collections.Counter = collections.Counter()
  out = []
  for id_, where in zip(ids, wheres):
    count[id_] += 1
    new = id_ if count[id_] == 1 else f"{id_}#{count[id_]}"
    while new in seen:  # an id that already looks like a renamed one
      count[id_] += 1
      new = f"{id_}#{count[id_]}"
    if new != id_:
      report.note(validate.Problem("duplicate_id", where, f"id {id_!r} already used by {seen[id_]}; this "
                                   f"record's id is {new!r}"))
    seen[new] = where
    out.append(new)
  return out


def first_word(question: str) -> str:
  m = re.match(r"\s*([\w'’-]+)", question)
  return m.group(1) if m else ""


# --------------------------------------------------------------------------- LLaVA-format padding sets
@dataclasses.dataclass(frozen=True)
class Candidate:
  """A usable conversation of a LLaVA-format instruction file (its image not checked yet)."""

  key: str
  image: str
  turn: Turn
  where: str
  raw: Any


def llava_candidates(path: str, report: validate.Report) -> tuple[list[Candidate], int]:
  """The first human/gpt turn of every LLaVA-format conversation with an image, and the number of text-only
  conversations (not usable, not an error)."""
  out, text_only = [], 0
  for where, rec in read_records(path, report):
    if isinstance(rec, dict) and "image" not in rec:
      text_only += 1
      continue
    if not validate.check_fields(rec if isinstance(rec, dict) else {"record": rec},
                                 {"image": str, "conversations": list}, where=where, report=report,
                                 nonempty=("image",), record=rec):
      continue
    conv = rec["conversations"]
    if (len(conv) < 2 or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv[:2])
        or [t.get("from") for t in conv[:2]] != ["human", "gpt"]):
      report.add(validate.Problem("bad_turns", where, "the first turns must be human then gpt, with text "
                                  "'value's"), rec)
      continue
    question, answer = conv[0]["value"], conv[1]["value"]
    if IMAGE_TOKEN not in question:
      report.add(validate.Problem("missing_image_token", where, f"the human turn has no {IMAGE_TOKEN!r}"), rec)
      continue
    question = question.replace(IMAGE_TOKEN, "").strip()
    if not question or not answer.strip():
      report.add(validate.Problem("empty_text", where, "empty question or answer"), rec)
      continue
    out.append(Candidate(str(rec.get("id", where)), rec["image"], Turn(question, answer, "safe"), where, rec))
  return out, text_only


class PathLookup:
  """Image path -> value, matching exactly or by a unique path suffix (`a/b.jpg` finds `train/a/b.jpg`)."""

  def __init__(self, table: Mapping[str, str]):
    self.table = dict(table)

  def get(self, image: str) -> str | None:
    if image in self.table:
      return self.table[image]
    hits = [k for k in self.table if k.endswith("/" + image) or image.endswith("/" + k)]
    return self.table[hits[0]] if len(hits) == 1 else None
