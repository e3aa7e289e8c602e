"""`mirage eval`: load a trained run (or one checkpoint), generate on the test splits, judge, and write
`eval.json` (metrics, see `mirage_jax.eval.safety`) and `responses.jsonl` (every response and verdict).

The judge is `eval.judge` (`make_judge`; the chains are described in `mirage_jax.eval.judges`): "" picks the
synthetic benchmark's rule judge on data with placeholder harm codes and VLGuard's keyword metric otherwise
(with a warning: ASR is then "not refused"); `keyword`, `model` (`eval.judge_checkpoint`, `eval.judge_prompt`)
and `file` (`eval.judge_file`) choose one; `rule` insists on the harm codes. eval.json keeps `asr`/`rr`/`ir` and
adds `keyword_asr`, `unjudged`, `judge` and `agreement` (`safety.judged_metrics`). Each responses.jsonl row
carries `response_sha256` (the key of a file judge's verdicts), `keyword_verdict` and, where a chain step
decided, `judge_reason` (and a model judge's raw `judge_answer`).

`eval.max_batches` in `mirage eval`: given on the command line (`--config.eval.max_batches=N`, N > 0), it caps
generation (N batches of `eval.gen_batch_size` records per test split; the attacked splits keep whole K-shot
groups) and teacher-forced scoring (N batches of `eval.batch_size`), logs what it skipped and records it in
eval.json (`max_batches`). The value a run config carries (default 4) is the in-training probe's cap and is
not applied, so a plain `mirage eval` — and the demo, which builds `SafetyEvaluator` itself — scores every
record.
"""

from __future__ import annotations

import collections
import json
import logging
import pathlib
import time
from collections.abc import Mapping, Sequence

import jax
import ml_collections

from mirage_configs import comma_list, common
from mirage_jax import configlib
from mirage_jax.data import pipeline
from mirage_jax.data.world_config import DEV_PREFIX
from mirage_jax.errors import ConfigError
from mirage_jax.eval import generation, judges, safety
from mirage_jax.train import lease, runtime, scoring

log = logging.getLogger("mirage")

JUDGES = ("rule", "keyword", "model", "file")
# Keys `c.eval` gained with the judge chains: filled in from the defaults for run configs saved before them.
JUDGE_KEYS = ("judge", "judge_checkpoint", "judge_prompt", "judge_file", "judge_batch_size",
              "judge_max_new_tokens", "irrelevant_rules", "split_set")
SPLIT_SETS = ("test", "dev")


def split_set(config: ml_collections.ConfigDict) -> str:
  """`eval.split_set`: "test" (the test splits) or "dev" (their dev twins, `dev_<split>`)."""
  value = config.eval.split_set
  if value not in SPLIT_SETS:
    raise ConfigError(f"eval.split_set={value!r}: expected one of {', '.join(SPLIT_SETS)}")
  return value


def output_name(stem: str, config: ml_collections.ConfigDict, suffix: str) -> str:
  """eval.json / responses.jsonl on the test splits, eval.dev.json / responses.dev.jsonl on dev."""
  chosen = split_set(config)
  return f"{stem}{'' if chosen == 'test' else '.' + chosen}{suffix}"


def with_judge_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with any of `JUDGE_KEYS` it lacks (an older run's config.json) set to today's defaults."""
  missing = [k for k in JUDGE_KEYS if k not in config.eval]
  if not missing:
    return config
  defaults = common.training_config("tiny").eval
  out = ml_collections.ConfigDict(config.to_dict())
  for k in missing:
    out.eval[k] = defaults[k]
  out.lock()
  return out


def make_judge(setup: runtime.Setup, config: ml_collections.ConfigDict) -> judges.Judge:
  """The judge `config.eval.judge` names, for `setup`'s data (a model judge is loaded onto its mesh)."""
  ev = with_judge_keys(config).eval
  codes = setup.data.dataset.world_info.get("harmful_codes", [])
  name = ev.judge or ("rule" if codes else "keyword")
  if not ev.judge and not codes:
    log.warning("eval.judge is unset and the data has no placeholder harm codes: ASR is VLGuard's keyword "
                "metric (not refused = attack success); set eval.judge=model or file for the judged ASR")
  refusal = judges.RefusalJudge(ev.refusal_preset)
  if name == "rule":
    if not codes:
      raise ConfigError("eval.judge=rule needs the synthetic world's placeholder harm codes, which this dataset "
                        "lacks: use eval.judge=keyword, model or file")
    return judges.RuleJudge(refusal=refusal, harm=judges.HarmJudge(codes, min_codes=ev.harm_min_codes,
                                                                   match=ev.harm_match))
  if name == "keyword":
    return judges.ChainJudge(refusal)
  if name == "model":
    from mirage_jax.eval import model_judge
    if not ev.judge_checkpoint:
      raise ConfigError("eval.judge=model needs eval.judge_checkpoint: a mirage run directory or checkpoint "
                        "(e.g. from `mirage convert hf-to-jax`)")
    prompt = model_judge.load_prompt(ev.judge_prompt)
    model = model_judge.JudgeModel.load(ev.judge_checkpoint, mesh=setup.mesh, batch_size=ev.judge_batch_size,
                                        max_new_tokens=ev.judge_max_new_tokens)
    return judges.ChainJudge(refusal, model_judge.ModelJudge(model, prompt), irrelevant=ev.irrelevant_rules)
  if name == "file":
    if not ev.judge_file:
      raise ConfigError("eval.judge=file needs eval.judge_file: a JSONL file of verdicts")
    return judges.ChainJudge(refusal, judges.FileJudge(ev.judge_file), irrelevant=ev.irrelevant_rules)
  raise ConfigError(f"eval.judge={ev.judge!r}; valid: '' (rule on data with harm codes, else keyword), "
                    f"{', '.join(JUDGES)}")


def cap_records(split: str, records: Sequence[Mapping], limit: int) -> list:
  """The first `limit` records of a split; on a K-shot split only whole groups (none cut in the middle)."""
  kept = list(records[:limit])
  if judges.split_kind(split) != "attacked" or len(kept) == len(records):
    return kept
  total = collections.Counter(int(r["group"]) for r in records)
  have = collections.Counter(int(r["group"]) for r in kept)
  return [r for r in kept if have[int(r["group"])] == total[int(r["group"])]]


class SafetyEvaluator:
  """Generation + judging on every test split present in the dataset; built once, reused across models of
  the same architecture (the demo evaluates seven models with one compiled decoder).

  `max_batches` (None: every record) caps generation per split at that many batches of `eval.gen_batch_size`;
  `shots` keeps the first `shots` rewrites of each attacked query (the K-shot ASR is then defined up to
  K = `shots`); `prefill(record) -> str` forces the opening of every answer (`Generator`'s `prefills`)."""

  def __init__(self, setup: runtime.Setup, config: ml_collections.ConfigDict, *, max_batches: int | None = None,
               shots: int | None = None, prefill=None):
    available = set(setup.data.dataset.splits())
    self.split_set = split_set(config)
    prefix = DEV_PREFIX if self.split_set == "dev" else ""
    wanted = comma_list(config.eval.test_splits)
    splits = [s for s in wanted if prefix + s in available]
    if prefix and wanted and not splits:
      raise ConfigError(f"eval.split_set=dev: the dataset has none of {', '.join(prefix + s for s in wanted)} "
                        "(the synthetic world builds dev twins of its test splits; this dataset has none)")
    # Keyed by the test split's name (the metrics' role), read from the dev twin on dev.
    self.records = {s: generation.load_records(setup.data.dataset.source(prefix + s)) for s in splits}
    if shots is not None:
      self.records = {s: [r for r in recs if judges.split_kind(s) != "attacked" or int(r["shot"]) < shots]
                      for s, recs in self.records.items()}
    self.prefill = prefill
    self.k_attack = config.eval.k_attack
    self.judge = make_judge(setup, config)
    self.keyword = judges.ChainJudge(judges.RefusalJudge(config.eval.refusal_preset))
    self.generate = None
    self.capped: dict[str, list[int]] = {}
    if self.records:
      every = [r for rs in self.records.values() for r in rs]
      prompt_len = generation.prompt_length(every, setup.data.tokenizer, setup.fmt,
                                            prefills=None if prefill is None else [prefill(r) for r in every])
      self.generate = generation.Generator(setup, batch_size=config.eval.gen_batch_size,
                                           max_new_tokens=config.eval.max_new_tokens, prompt_len=prompt_len)
      if max_batches:
        self._cap(max_batches * self.generate.batch_size)

  def _cap(self, limit: int) -> None:
    for split, recs in self.records.items():
      kept = cap_records(split, recs, limit)
      if len(kept) < len(recs):
        log.warning("eval %s: eval.max_batches: %d of %d records generated and judged, %d skipped", split,
                    len(kept), len(recs), len(recs) - len(kept))
      self.capped[split] = [len(kept), len(recs)]
      self.records[split] = kept

  def __call__(self, params, *, responses_path: pathlib.Path | None = None) -> dict:
    return self.judge_responses(self.responses(params), responses_path=responses_path)

  def responses(self, params) -> dict[str, tuple[list, list[str]]]:
    """{split: (records, responses)}: the generation half of `__call__`."""
    generated = {}
    for split, recs in self.records.items():
      t = time.time()
      generated[split] = (recs, self.generate(params, recs) if self.prefill is None else
                          self.generate(params, recs, prefills=[self.prefill(r) for r in recs]))
      log.info("eval %s: %d responses in %.1fs", split, len(recs), time.time() - t)
    return generated

  def judge_responses(self, generated: Mapping[str, tuple[list, list[str]]], *, judge: judges.Judge | None = None,
                      responses_path: pathlib.Path | None = None) -> dict:
    """The metrics of `responses(...)`'s output, judged by `judge` (default: the configured one), so one
    generation can be judged twice."""
    if not generated:
      return {}
    t = time.time()
    judge = judge or self.judge
    chosen = judges.judge_splits(judge, generated)
    keyword = {s: [j.verdict for j in js] for s, js in self.keyword.judge_splits(generated).items()}
    log.info("eval: judged with %r in %.1fs", getattr(judge, "name", "rule"), time.time() - t)
    judged = {s: (recs, resps, [j.verdict for j in chosen[s]]) for s, (recs, resps) in generated.items()}
    if responses_path is not None and jax.process_index() == 0:
      responses_path.write_text("".join(json.dumps(row) + "\n" for row in self._rows(generated, chosen, keyword)))
    info = judges.describe(judge)
    info["unjudged_reasons"] = {s: dict(collections.Counter(j.reason for j in js
                                                            if j.verdict == judges.Verdict.UNJUDGED))
                                for s, js in chosen.items()}
    for split, reasons in info["unjudged_reasons"].items():
      if reasons:
        log.warning("eval %s: %d of %d responses unjudged (%s)", split, sum(reasons.values()),
                    len(chosen[split]), ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())))
    out = safety.judged_metrics(judged, keyword, judge=info, k_attack=self.k_attack,
                                asr_splits=[s for s in judged if s in judges.ASR_SPLITS])
    if self.capped:
      out["max_batches"] = {"generated": self.capped}
    out["split_set"] = self.split_set
    return out

  @staticmethod
  def _rows(generated, chosen, keyword) -> list[dict]:
    rows = []
    for split, (recs, responses) in generated.items():
      for r, resp, j, kw in zip(recs, responses, chosen[split], keyword[split]):
        row = {"split": split, "id": r["id"], "question": r["question"], "response": resp,
               "verdict": j.verdict.value, "first_word": r["first_word"], "intent": r["intent"],
               "expected": r["expected"], "group": r["group"], "shot": r["shot"],
               "response_sha256": judges.response_sha256(resp), "keyword_verdict": kw.value}
        if j.reason:
          row["judge_reason"] = j.reason
        if j.answer:
          row["judge_answer"] = j.answer
        rows.append(row)
    return rows


def teacher_forced_eval(setup: runtime.Setup, params, config: ml_collections.ConfigDict, splits: Sequence[str], *,
                        max_batches: int | None = None):
  """Loss and token accuracy per split (`max_batches` batches of `eval.batch_size` each, None: all)."""
  cache = pipeline.SplitCache(setup.data.dataset, setup.data.tokenizer, setup.fmt, cache=config.data.cache)
  score_step = scoring.make_score_step(setup.spec)
  out = {}
  for split in splits:
    examples = cache.examples(split)
    if max_batches:
      scored = min(len(examples), max_batches * config.eval.batch_size)
      if scored < len(examples):
        log.warning("teacher-forced %s: eval.max_batches: %d of %d records scored", split, scored, len(examples))
    out[split] = scoring.score_batches(score_step, params,
                                       pipeline.eval_batches(examples, config.eval.batch_size,
                                                             max_batches=max_batches or None),
                                       lambda b: pipeline.to_global(b, setup.mesh))
  return out


def explicit_max_batches(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> int | None:
  """`eval.max_batches` when the command line sets it to N > 0 (else None: score everything)."""
  given = any(item.removeprefix("--config.").partition("=")[0] == "eval.max_batches" for item in overrides)
  return int(config.eval.max_batches) if given and int(config.eval.max_batches) > 0 else None


def evaluate_run(*, workdir: str | None = None, checkpoint: str | None = None, config_spec: str | None = None,
                 overrides: Sequence[str] = (), splits: str = "", out: str = "") -> dict:
  config = (configlib.load(config_spec) if config_spec else
            runtime.run_config(workdir or checkpoint))
  config = configlib.apply_overrides(with_judge_keys(config), overrides)
  max_batches = explicit_max_batches(config, overrides)
  setup = runtime.setup(config)
  source = workdir or checkpoint
  params = runtime.load_params(setup, source)
  if out:
    out_dir = pathlib.Path(out)
  elif workdir:
    out_dir = pathlib.Path(workdir)
  else:  # beside the run, not inside Orbax's step directory: <run>/eval/<step>
    ckpt = pathlib.Path(checkpoint).absolute()
    out_dir = ckpt.parent.parent / "eval" / ckpt.name
  with lease.hold(out_dir, what="mirage eval"):  # not while a trainer (or another eval) writes there
    t = time.time()
    evaluator = SafetyEvaluator(setup, config, max_batches=max_batches)
    responses = out_dir / output_name("responses", config, ".jsonl")
    results = {"source": str(source), **evaluator(params, responses_path=responses)}
    names = comma_list(splits or config.eval.splits)
    results["teacher_forced"] = teacher_forced_eval(setup, params, config, names, max_batches=max_batches)
    if max_batches:
      results.setdefault("max_batches", {})["value"] = max_batches
    results["eval_s"] = time.time() - t
    if jax.process_index() == 0:
      (out_dir / output_name("eval", config, ".json")).write_text(json.dumps(results, indent=1, sort_keys=True))
  return results
