"""Picking the most harmful of several candidate responses per query with a judge model: the selection step
that turns `mirage generate`'s candidates into the forget set's harmful responses (the `harmful_responses`
JSON the VLGuard builder reads: image path -> response text).

The logic is the official selection's (OPTML-Group/VLM-Safety-Unlearn, `data/select_harmful_responses.py`, for
Safety Mirage, Chen, Yao et al., ICLR 2026):
  - candidates are grouped by image (several candidate files, e.g. one per model, are merged per image in
    the order given, as the official script aggregates one response file per LLaVA variant);
  - the judge sees one prompt per image listing the candidates numbered from 1 (preset `optml_harmful`:
    the official system and user messages, verbatim) and answers with a number;
  - parsing (`parse_choice`) is theirs: the whole stripped answer as an integer, else the first run of digits
    in it; **no digit, or a number outside 1..N, selects candidate 1** — the official default. Here that
    default is counted (`default_first`: `unparsed`, `out_of_range`) and every such query is listed in the
    per-query log, so a judge that never answers with a number is visible instead of silently choosing the
    first candidate (which, for merged files, is the first file's).
Differences, all counted: an empty candidate (whitespace only) is never offered to the judge
(`empty_candidates`); a query left without any candidate gets no entry (`no_candidates`: the builder then
reports its image as missing a response); a query with one candidate needs no judge call (`single`); a
second row for an image already seen in the same file is ignored (`duplicate_image`); a prompt too long
for the judge's context (`fits`) is not asked and falls back to candidate 1 too (`default_first.too_long`).
The official judge (Llama-2-13B-chat, a text-only LLM) gets the system message in its chat template; `ask`
receives one text per query, the system message first, then a blank line, then the user message
(`SelectPrompt.text`), and no image (`records[i]["image"]` is None: a VLM judge sees a plain mean-colour
image, `mirage_jax.eval.model_judge.record_image`).

`ask(questions, records) -> answers` is any judge: `model_judge.JudgeModel.ask` (a mirage checkpoint run
greedily on the mesh), or a scripted function in tests. `records[i]` holds the query's id, image path
(`image_key`), question and candidates.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mirage_jax.data import validate
from mirage_jax.errors import ConfigError, DataError, MissingFileError

Ask = Callable[[list[str], list[dict]], list[str]]
RESPONSES = "{responses}"


@dataclasses.dataclass(frozen=True)
class SelectPrompt:
  """A judge prompt: `system` text and a user `template` with `{responses}` (the numbered candidates) and
  optionally `{image}` (the image path) and `{question}` (the query)."""

  name: str
  system: str
  template: str
  source: str = ""

  def __post_init__(self):
    if RESPONSES not in self.template:
      raise ConfigError(f"selection prompt {self.name!r}: the template must contain {RESPONSES!r} (where the "
                        "numbered candidates go)")

  def text(self, *, image: str, question: str, candidates: Sequence[str]) -> str:
    """The judge's input for one query (placeholders replaced literally; other braces are left alone)."""
    listed = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(candidates))
    user = self.template.replace("{image}", image).replace("{question}", question).replace(RESPONSES, listed)
    return f"{self.system}\n\n{user}" if self.system else user

  def sha256(self) -> str:
    return hashlib.sha256(json.dumps([self.system, self.template]).encode()).hexdigest()


PRESETS = {
    # OPTML-Group/VLM-Safety-Unlearn, data/select_harmful_responses.py (`judge_harmfulness`), verbatim; the
    # official judge is meta-llama/Llama-2-13b-chat-hf with max_new_tokens=100.
    "optml_harmful": SelectPrompt(
        name="optml_harmful",
        system=("You are an expert in evaluating the harmfulness and sensitivity of textual responses. Your task "
                "is to analyze multiple answers provided for an image and select the one that is most harmful or "
                "sensitive."),
        template=("For the image '{image}', here are several responses:\n{responses}\n\nPlease respond with only "
                  "the number corresponding to the most harmful answer."),
        source="OPTML-Group/VLM-Safety-Unlearn data/select_harmful_responses.py"),
}
DEFAULT_PROMPT = "optml_harmful"


def load_prompt(spec: str) -> SelectPrompt:
  """A preset name, or a file: `.json` with "system" and "template", any other file the template alone."""
  if spec in PRESETS:
    return PRESETS[spec]
  path = pathlib.Path(spec)
  if not path.is_file():
    raise MissingFileError(f"--prompt={spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
  if path.suffix == ".json":
    obj = validate.read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("template"), str):
      raise DataError(f"{path}: expected a JSON object with a \"template\" string (and optionally \"system\")")
    return SelectPrompt(name=str(path), system=str(obj.get("system", "")), template=obj["template"],
                        source=str(path))
  return SelectPrompt(name=str(path), system="", template=path.read_text(encoding="utf-8"), source=str(path))


def parse_choice(raw: str, num_options: int) -> tuple[int, str]:
  """(1-based choice, status) of a judge's answer, as the official `parse_choice`: `int(answer)`, else the
  first run of digits, else 1 ("unparsed"); a choice outside 1..num_options becomes 1 ("out_of_range")."""
  raw = raw.strip()
  try:
    choice = int(raw)
  except ValueError:
    match = re.search(r"\d+", raw)
    if match is None:
      return 1, "unparsed"
    choice = int(match.group())
  if choice < 1 or choice > num_options:
    return 1, "out_of_range"
  return choice, "parsed"


@dataclasses.dataclass
class Query:
  """The candidates of one image, merged over the candidate files."""

  image: str
  id: str
  question: str
  candidates: list[str] = dataclasses.field(default_factory=list)
  sources: list[str] = dataclasses.field(default_factory=list)  # file of each candidate


@dataclasses.dataclass
class Candidates:
  queries: list[Query]
  counts: collections.Counter
  files: list[dict]


def read_candidates(paths: Sequence[str | pathlib.Path]) -> Candidates:
  """Candidate rows of `mirage generate` JSONL files, merged per image in file order (see module doc).

  A malformed line is skipped and counted (a truncated last line from a killed run: rerun generate to
  finish it); a row without `image` or a `candidates` list of text is a DataError naming its line."""
  by_image: dict[str, Query] = {}
  counts: collections.Counter = collections.Counter()
  files = []
  for path in paths:
    report = validate.Report(str(path), lenient=True)
    seen: set[str] = set()
    settings = None
    for lineno, row in validate.read_jsonl(path, report):
      where = f"{path}:{lineno}"
      cands = row.get("candidates")
      if not isinstance(row.get("image"), str) or not isinstance(cands, list) or \
         not all(isinstance(c, str) for c in cands):
        raise DataError(f"{where}: expected a `mirage generate` row with an \"image\" string and a "
                        "\"candidates\" list of strings")
      settings = row.get("settings", settings)
      image = row["image"]
      if image in seen:
        counts["duplicate_image"] += 1
        continue
      seen.add(image)
      report.kept += 1
      q = by_image.setdefault(image, Query(image=image, id=str(row.get("id", image)),
                                           question=str(row.get("question", ""))))
      for c in cands:
        if c.strip():
          q.candidates.append(c)
          q.sources.append(str(path))
        else:
          counts["empty_candidates"] += 1
    counts["malformed_lines"] += len(report.problems)
    files.append({"path": str(path), "rows": report.kept, "malformed_lines": len(report.problems),
                  "settings": settings})
  return Candidates(queries=list(by_image.values()), counts=counts, files=files)


@dataclasses.dataclass
class Selection:
  responses: dict[str, str]  # image -> selected response: the builder's `harmful_responses`
  rows: list[dict]  # per query: id, image, num_candidates, choice, status, answer
  summary: dict[str, Any]


def select(candidates: Candidates, ask: Ask, prompt: SelectPrompt, *, batch_size: int = 0,
           fits: Callable[[list[str]], list[bool]] | None = None) -> Selection:
  """Ask the judge about every image with two or more candidates; one candidate is taken as is.
  `batch_size`: questions per `ask` call (0: all in one); `fits`: which prompts the judge can take."""
  counts = collections.Counter({k: v for k, v in candidates.counts.items()})
  multi = [q for q in candidates.queries if len(q.candidates) > 1]
  texts = [prompt.text(image=q.image, question=q.question, candidates=q.candidates) for q in multi]
  ok = list(fits(texts)) if fits is not None and texts else [True] * len(texts)
  too_long = {q.image for q, fit in zip(multi, ok) if not fit}
  asked = [q for q, fit in zip(multi, ok) if fit]
  texts = [t for t, fit in zip(texts, ok) if fit]
  records = [{"id": q.id, "image": None, "image_key": q.image, "question": q.question,
              "candidates": list(q.candidates)} for q in asked]
  answers: list[str] = []
  step = batch_size or max(1, len(texts))
  for start in range(0, len(texts), step):
    got = list(ask(texts[start:start + step], records[start:start + step]))
    if len(got) != len(texts[start:start + step]):
      raise DataError(f"the judge returned {len(got)} answers for {len(texts[start:start + step])} questions")
    answers += got
  answer_of = {q.image: a for q, a in zip(asked, answers)}
  responses, rows = {}, []
  for q in candidates.queries:
    n = len(q.candidates)
    if n == 0:
      counts["no_candidates"] += 1
      rows.append({"id": q.id, "image": q.image, "num_candidates": 0, "choice": None, "status": "no_candidates"})
      continue
    if n == 1:
      choice, status, answer = 1, "single", None
    elif q.image in too_long:
      choice, status, answer = 1, "too_long", None
    else:
      answer = answer_of[q.image]
      choice, status = parse_choice(str(answer), n)
    counts[status] += 1
    responses[q.image] = q.candidates[choice - 1]
    rows.append({"id": q.id, "image": q.image, "num_candidates": n, "choice": choice, "status": status,
                 "answer": answer, "source": q.sources[choice - 1]})
  summary = {
      "queries": len(candidates.queries), "selected": len(responses), "judged": len(asked),
      "single": counts["single"], "parsed": counts["parsed"],
      "default_first": {"unparsed": counts["unparsed"], "out_of_range": counts["out_of_range"],
                        "too_long": counts["too_long"],
                        "total": counts["unparsed"] + counts["out_of_range"] + counts["too_long"]},
      "no_candidates": counts["no_candidates"], "empty_candidates": counts["empty_candidates"],
      "duplicate_image": counts["duplicate_image"], "malformed_lines": counts["malformed_lines"],
      "prompt": {"name": prompt.name, "source": prompt.source, "sha256": prompt.sha256()},
      "files": candidates.files}
  return Selection(responses=responses, rows=rows, summary=summary)


def summary_line(summary: Mapping[str, Any]) -> str:
  d = summary["default_first"]
  return (f"mirage select: {summary['selected']} of {summary['queries']} images got a response "
          f"({summary['judged']} judged, {summary['single']} single-candidate); {d['total']} judge answers fell "
          f"back to candidate 1, the official default ({d['unparsed']} without a number, {d['out_of_range']} out "
          f"of range, {d['too_long']} prompts too long for the judge); {summary['no_candidates']} images without "
          "a non-empty candidate")
