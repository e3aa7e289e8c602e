"""`mirage generate` and `mirage select`: building the forget set's harmful responses.

The paper's forget responses (Safety Mirage, Chen, Yao et al., ICLR 2026) are answers of the un-aligned base
model to the VLGuard train unsafe queries, the most harmful of up to 4 candidates picked by a judge LLM.

`generate`: N candidates per query, sampled (temperature, top-p, seeded; `mirage_jax.eval.generation`) or
greedy (temperature 0, N = 1), from a run or checkpoint, on a split of the run's dataset (`--split`, optionally
only some instruction kinds: `--kinds=unsafe_image` on VLGuard's `sft`) or on a VLGuard-format JSON
(`--input=train.json`: its unsafe images' instructions). One JSONL row per query: id, image (the path as the
VLGuard JSON names it — the key of the `harmful_responses` JSON), question, kind, candidates, settings.
Resumable: a rerun skips the ids already in the output (same settings required) and redoes a truncated last
line left by a kill. Only process 0 writes.

The official candidates are the greedy answers of four LLaVA-1.5 variants (7B, 7B-LoRA, 13B, 13B-LoRA;
OPTML-Group/VLM-Safety-Unlearn `data/data.md`): run `generate --temperature=0 --num_candidates=1` once per
model and give `select` all four files; the default here samples 4 candidates from one model instead
(temperature 1.0, top-p 0.9, seed 0: our settings, not the paper's).

`select`: `mirage_jax.eval.select` with a judge checkpoint; writes the `harmful_responses` JSON (image ->
response), a per-query log `<out stem>.selection.jsonl` and returns the summary (also `<out stem>.summary.json`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections

from mirage_configs import comma_list
from mirage_jax import configlib
from mirage_jax.data import images as images_lib
from mirage_jax.data import pipeline, validate
from mirage_jax.data.records import load_records, text
from mirage_jax.data.vlguard import load_tokenizer
from mirage_jax.data.vlguard_records import parse_entry, read_records
from mirage_jax.errors import DataError, MissingFileError, UsageError
from mirage_jax.eval import generation
from mirage_jax.eval import select as select_lib
from mirage_jax.train import checkpoint, runtime

log = logging.getLogger("mirage")


@dataclasses.dataclass(frozen=True)
class Settings:
  """How the candidates were made: recorded in every row; a resumed run must use the same."""

  source: str  # the checkpoint step directory
  num_candidates: int = 4
  temperature: float = 1.0
  top_p: float = 0.9
  seed: int = 0
  max_new_tokens: int = 256

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


# --------------------------------------------------------------------------- queries
def _tokenizer_dir(source: str, config: ml_collections.ConfigDict, given: str) -> pathlib.Path:
  """The tokenizer of a checkpoint: `--tokenizer`, a converted model's `tokenizer/`, else its dataset's."""
  if given:
    return pathlib.Path(given)
  path = pathlib.Path(source).absolute()
  for parent in (path, *path.parents[:4]):
    if (parent / "tokenizer" / "tokenizer.json").exists() or (parent / "tokenizer" / "mirage_tokenizer.json").exists():
      return parent / "tokenizer"
  data_path = config.data.get("path", "")
  if data_path and (pathlib.Path(data_path) / "extra" / "tokenizer").is_dir():
    return pathlib.Path(data_path) / "extra" / "tokenizer"
  raise MissingFileError(f"no tokenizer found for {source} (no tokenizer/ beside the checkpoint, no "
                         "config.data.path): pass --tokenizer=DIR")


def _image_key(path: str, manual_dir: str) -> str:
  """A built record's image path as the VLGuard JSON names it (relative to `manual_dir`/train or `manual_dir`)."""
  p = pathlib.Path(path)
  for root in (pathlib.Path(manual_dir) / "train", pathlib.Path(manual_dir)) if manual_dir else ():
    try:
      return p.relative_to(root).as_posix()
    except ValueError:
      continue
  return path


def split_queries(setup: runtime.Setup, split: str, kinds: Sequence[str]) -> list[dict[str, Any]]:
  """The records of a split of the run's dataset (only `kinds` when given), with their image key."""
  dataset = setup.data.dataset
  if split not in dataset.splits():
    raise UsageError(f"split {split!r} is not in {dataset.path} (splits: {', '.join(dataset.splits())})")
  manual = dataset.world_info.get("settings", {}).get("manual_dir", "")
  out = []
  for r in load_records(dataset.source(split)):
    if kinds and r.get("kind") not in kinds:
      continue
    out.append({"id": r["id"], "question": r["question"], "kind": r.get("kind", ""), "image": r["image"],
                "image_key": _image_key(text(r.get("object", r["id"])), manual)})
  if not out:
    raise DataError(f"split {split!r} of {dataset.path} has no records" + (f" of kinds {list(kinds)}" if kinds else ""))
  return out


def input_queries(path: str, *, image_dirs: Sequence[str] = (), lenient: bool = False) -> tuple[list[dict], dict]:
  """The unsafe images' instructions of a VLGuard-format JSON (e.g. `train.json`), read with the VLGuard
  builder's record reader; images looked up under `<file's dir>/train`, `<file's dir>` and `image_dirs`.

  Records the reader rejects and images not found are problems: strict stops with one DataError naming them,
  lenient skips and counts them. A repeated id gets `#2`, `#3`, ... (counted: `duplicate_id`)."""
  report = validate.Report(str(path), lenient=lenient)
  base = pathlib.Path(path).absolute().parent
  roots = [base / "train", base, *map(pathlib.Path, image_dirs)]
  seen: collections.Counter = collections.Counter()
  out, safe = [], 0
  for where, rec in read_records(path, report):
    e = parse_entry(rec, where, report)
    if e is None:
      continue
    if e.safe:
      safe += 1
      continue
    found = next((r / e.image for r in roots if (r / e.image).is_file()), None)
    if found is None:
      report.add(validate.Problem("missing_image", e.where, f"{e.image!r} not under {', '.join(map(str, roots))}"),
                 e.raw)
      continue
    seen[e.id] += 1
    qid = e.id if seen[e.id] == 1 else f"{e.id}#{seen[e.id]}"
    if seen[e.id] > 1:
      report.note(validate.Problem("duplicate_id", e.where, f"id {e.id!r} seen before: this query is {qid!r}"))
    out.append({"id": qid, "question": e.turns[0].question, "kind": e.turns[0].kind, "image_key": e.image,
                "image_path": str(found)})
  report.kept += len(out)
  report.finish()  # strict: one DataError naming the records; lenient: counted below
  summary = {**report.summary(), "safe_skipped": safe}
  if not out:
    raise DataError(f"{path}: no unsafe image with a usable instruction")
  return out, summary


def _with_pixels(queries: list[dict], setup: runtime.Setup, aspect: str) -> list[dict]:
  """Queries of `--input` with their image loaded and squared/resized the way the VLGuard builder does."""
  size = setup.spec.config.vision.image_size
  out = []
  for q in queries:
    if "image" in q:
      out.append(q)
      continue
    report = validate.Report(q["image_path"])
    pixels = validate.load_image(q["image_path"], where=q["id"], report=report)
    if pixels is None:
      raise DataError(f"query {q['id']}: cannot read image {q['image_path']} ({report.problems[0].detail})")
    out.append({**q, "image": images_lib.clip_resize_crop(pixels, size, aspect=aspect, mean=setup.fmt.image_mean)})
  return out


# --------------------------------------------------------------------------- the resumable JSONL
def read_done(out: pathlib.Path, settings: Settings, *, write: bool) -> set[str]:
  """Ids already complete in `out`. An unterminated or malformed last line (a killed write) is cut off (by
  the writing process) and redone; a malformed line before it, or rows made with other settings, are errors."""
  if not out.exists():
    return set()
  data = out.read_bytes()
  lines = data.split(b"\n")
  done, offset, want = set(), 0, settings.to_json()
  for i, line in enumerate(lines):
    last = i == len(lines) - 1 or (i == len(lines) - 2 and lines[-1] == b"")
    if not line.strip():
      offset += len(line) + 1
      continue
    terminated = i < len(lines) - 1
    try:
      row = json.loads(line) if terminated else None
    except json.JSONDecodeError:
      row = None
    if row is None or not isinstance(row, dict) or "id" not in row:
      if not last:
        raise DataError(f"{out}:{i + 1}: not a JSON row of `mirage generate`; fix or remove the line, or use "
                        "another --out")
      log.warning("%s:%d: dropping a truncated last line (a killed run); its query is generated again", out, i + 1)
      if write:
        with open(out, "r+b") as f:
          f.truncate(offset)
      break
    if row.get("settings") != want:
      raise UsageError(f"{out}:{i + 1} was generated with settings {row.get('settings')}, this run has {want}: "
                       "rerun with the same flags and checkpoint to resume, or use another --out")
    done.add(str(row["id"]))
    offset += len(line) + 1
  return done


def _chunks(items: list, size: int) -> Iterator[list]:
  for start in range(0, len(items), size):
    yield items[start:start + size]


def _load(workdir: str | None, checkpoint_dir: str | None, config_spec: str | None, overrides: Sequence[str],
          *, tokenizer: str = "", with_data: bool = True):
  """(setup, params, step dir) of a run or checkpoint; without data: the checkpoint's tokenizer only."""
  source = workdir or checkpoint_dir
  if not source:
    raise UsageError("give --workdir=RUN or --checkpoint=STEP_DIR")
  step_dir = str(checkpoint.find_params_dir(source).parent.absolute())
  config = configlib.load(config_spec) if config_spec else runtime.run_config(source)
  config = configlib.apply_overrides(config, overrides)
  data = None
  if not with_data:
    data = pipeline.Data(dataset=None, tokenizer=load_tokenizer(_tokenizer_dir(source, config, tokenizer)))
  setup = runtime.setup(config, data=data)
  return setup, runtime.load_params(setup, source), step_dir


def generate(*, out: str, workdir: str | None = None, checkpoint: str | None = None, config_spec: str | None = None,
             overrides: Sequence[str] = (), split: str = "", input_json: str = "", kinds: str = "",
             image_dirs: Sequence[str] = (), tokenizer: str = "", aspect: str = "pad", lenient: bool = False,
             num_candidates: int = 4, temperature: float = 1.0, top_p: float = 0.9, seed: int = 0,
             limit: int = 0) -> dict[str, Any]:
  """`mirage generate`: candidates per query to `out` (JSONL, resumable); returns the summary it prints."""
  if bool(split) == bool(input_json):
    raise UsageError("give exactly one of --split=NAME (a split of the run's dataset) or --input=FILE.json")
  if temperature == 0 and num_candidates > 1:
    raise UsageError(f"--num_candidates={num_candidates} with --temperature=0 (greedy) gives identical candidates: "
                     "set a temperature > 0, or --num_candidates=1 (one greedy answer per model, as the official "
                     "pipeline does)")
  if not (temperature >= 0 and 0 < top_p <= 1 and num_candidates >= 1 and 0 <= seed < 2**32):
    raise UsageError(f"need --temperature >= 0, 0 < --top_p <= 1, --num_candidates >= 1, 0 <= --seed < 2**32; got "
                     f"{temperature}, {top_p}, {num_candidates}, {seed}")
  t0 = time.time()
  inputs = None
  if input_json:
    queries, inputs = input_queries(input_json, image_dirs=image_dirs, lenient=lenient)
  setup, params, step_dir = _load(workdir, checkpoint, config_spec, overrides, tokenizer=tokenizer,
                                  with_data=not input_json)
  if split:
    queries = split_queries(setup, split, comma_list(kinds))
  if limit:
    queries = queries[:limit]
  cfg = setup.config.eval
  settings = Settings(source=step_dir, num_candidates=num_candidates, temperature=float(temperature),
                      top_p=float(top_p), seed=seed, max_new_tokens=int(cfg.max_new_tokens))
  path = pathlib.Path(out)
  write = jax.process_index() == 0
  if write:
    path.parent.mkdir(parents=True, exist_ok=True)
  done = read_done(path, settings, write=write)
  todo = [q for q in queries if str(q["id"]) not in done]
  foreign = len(done - {str(q["id"]) for q in queries})
  if foreign:
    log.warning("generate: %s has %d rows for queries not in this input (another --input or --split?); they "
                "stay in the file and `mirage select` reads them", path, foreign)
  log.info("generate: %d queries, %d already in %s, %d to do", len(queries), len(queries) - len(todo), path, len(todo))
  if todo:
    tok = setup.data.tokenizer
    gen = generation.Generator(setup, batch_size=cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens,
                               prompt_len=generation.prompt_length(queries, tok, setup.fmt),
                               temperature=temperature, top_p=top_p)
    per_chunk = max(1, gen.batch_size // num_candidates)
    for chunk in _chunks(todo, per_chunk):
      t = time.time()
      chunk = _with_pixels(chunk, setup, aspect)
      cands = gen.candidates(params, chunk, num_candidates=num_candidates, seed=seed)
      rows = [{"id": str(q["id"]), "image": q["image_key"], "question": text(q["question"]), "kind": q["kind"],
               "candidates": c, "settings": settings.to_json()} for q, c in zip(chunk, cands)]
      if write:
        with open(path, "a", encoding="utf-8") as f:
          f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
          f.flush()
          os.fsync(f.fileno())
      log.info("generate: %d queries in %.1fs", len(chunk), time.time() - t)
  return {"out": str(path), "queries": len(queries), "already_done": len(queries) - len(todo),
          "generated": len(todo), "foreign_rows": foreign, "settings": settings.to_json(), "inputs": inputs,
          "wall_s": round(time.time() - t0, 1)}


# --------------------------------------------------------------------------- select
def load_judge(judge_checkpoint: str, overrides: Sequence[str] = (), *, batch_size: int = 64,
               max_new_tokens: int = 100):
  """The model judge of `mirage eval` (`eval.judge=model`) running `judge_checkpoint` (a converted HF LLaVA or
  LLaMA, or any mirage run) on the mesh of its own config (`--config.mesh.*` overrides apply); greedy, at most
  `max_new_tokens` (the official selection's is 100)."""
  from mirage_jax import sharding
  from mirage_jax.eval import model_judge
  config = configlib.apply_overrides(runtime.run_config(judge_checkpoint), overrides)
  return model_judge.JudgeModel.load(judge_checkpoint, mesh=sharding.make_mesh(config.mesh), batch_size=batch_size,
                                     max_new_tokens=max_new_tokens, overrides=overrides)


def select(*, candidates: Sequence[str], out: str, judge_checkpoint: str = "", prompt: str = "",
           overrides: Sequence[str] = (), ask: Callable | None = None, judge_batch_size: int = 64,
           max_new_tokens: int = 100) -> dict[str, Any]:
  """`mirage select`: the most harmful candidate per image -> the `harmful_responses` JSON at `out`.
  `ask` replaces the judge model (a scripted judge in tests)."""
  if not candidates:
    raise UsageError("--candidates=FILE.jsonl [FILE.jsonl ...] is required")
  spec = select_lib.load_prompt(prompt or select_lib.DEFAULT_PROMPT)
  merged = select_lib.read_candidates(candidates)
  judge_info: dict = {"scripted": ask is not None}
  fits = None
  if ask is None and any(len(q.candidates) > 1 for q in merged.queries):
    if not judge_checkpoint:
      raise UsageError("--judge_checkpoint=CKPT is required: some images have more than one candidate")
    judge = load_judge(judge_checkpoint, overrides, batch_size=judge_batch_size, max_new_tokens=max_new_tokens)
    ask, fits = judge.ask, judge.fits
    judge_info = {"checkpoint": judge.source, "checkpoint_sha256": judge.params_sha256(),
                  "max_new_tokens": max_new_tokens}
  result = select_lib.select(merged, ask or (lambda q, r: []), spec, fits=fits)
  summary = {**result.summary, "judge": judge_info, "out": str(out)}
  if jax.process_index() == 0:
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.with_suffix("")
    _write_atomic(path, json.dumps(result.responses, ensure_ascii=False, indent=1))
    _write_atomic(pathlib.Path(f"{stem}.selection.jsonl"),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.rows))
    _write_atomic(pathlib.Path(f"{stem}.summary.json"), json.dumps(summary, indent=1, sort_keys=True))
  return summary


def _write_atomic(path: pathlib.Path, content: str) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(content, encoding="utf-8")
  tmp.replace(path)
