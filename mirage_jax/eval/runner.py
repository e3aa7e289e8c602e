"""`mirage eval`: load a trained run (or one checkpoint), generate on the test splits, judge, and write
`eval.json` (metrics, see `mirage_jax.eval.safety`) and `responses.jsonl` (every response and verdict)."""

from __future__ import annotations

import json
import logging
import pathlib
import time
from collections.abc import Sequence

import jax
import ml_collections

from mirage_configs import comma_list
from mirage_jax import configlib
from mirage_jax.data import pipeline
from mirage_jax.eval import generation, judges, safety
from mirage_jax.train import lease, runtime, scoring

log = logging.getLogger("mirage")


def make_judge(setup: runtime.Setup, config: ml_collections.ConfigDict) -> judges.Judge:
  codes = setup.data.dataset.world_info.get("harmful_codes", [])
  return judges.RuleJudge(refusal=judges.RefusalJudge(config.eval.refusal_preset),
                          harm=judges.HarmJudge(codes, min_codes=config.eval.harm_min_codes,
                                                match=config.eval.harm_match))


class SafetyEvaluator:
  """Generation + judging on every test split present in the dataset; built once, reused across models of
  the same architecture (the demo evaluates seven models with one compiled decoder)."""

  def __init__(self, setup: runtime.Setup, config: ml_collections.ConfigDict):
    available = set(setup.data.dataset.splits())
    splits = [s for s in comma_list(config.eval.test_splits) if s in available]
    self.records = {s: generation.load_records(setup.data.dataset.source(s)) for s in splits}
    self.k_attack = config.eval.k_attack
    self.judge = make_judge(setup, config)
    self.generate = None
    if self.records:
      prompt_len = generation.prompt_length([r for rs in self.records.values() for r in rs],
                                            setup.data.tokenizer, setup.fmt)
      self.generate = generation.Generator(setup, batch_size=config.eval.gen_batch_size,
                                           max_new_tokens=config.eval.max_new_tokens, prompt_len=prompt_len)

  def __call__(self, params, *, responses_path: pathlib.Path | None = None) -> dict:
    judged, rows = {}, []
    for split, recs in self.records.items():
      t = time.time()
      responses = self.generate(params, recs)
      verdicts = self.judge.judge(recs, responses)
      judged[split] = (recs, responses, verdicts)
      log.info("eval %s: %d responses in %.1fs", split, len(recs), time.time() - t)
      rows += [{"split": split, "id": r["id"], "question": r["question"], "response": resp, "verdict": v.value,
                "first_word": r["first_word"], "intent": r["intent"], "expected": r["expected"],
                "group": r["group"], "shot": r["shot"]}
               for r, resp, v in zip(recs, responses, verdicts)]
    if responses_path is not None and jax.process_index() == 0:
      responses_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return safety.safety_metrics(judged, k_attack=self.k_attack) if judged else {}


def teacher_forced_eval(setup: runtime.Setup, params, config: ml_collections.ConfigDict, splits: Sequence[str]):
  cache = pipeline.SplitCache(setup.data.dataset, setup.data.tokenizer, setup.fmt, cache=config.data.cache)
  score_step = scoring.make_score_step(setup.spec)
  return {split: scoring.score_batches(score_step, params,
                                       pipeline.eval_batches(cache.examples(split), config.eval.batch_size),
                                       lambda b: pipeline.to_global(b, setup.mesh))
          for split in splits}


def evaluate_run(*, workdir: str | None = None, checkpoint: str | None = None, config_spec: str | None = None,
                 overrides: Sequence[str] = (), splits: str = "", out: str = "") -> dict:
  config = (configlib.load(config_spec) if config_spec else
            runtime.run_config(workdir or checkpoint))
  config = configlib.apply_overrides(config, overrides)
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
    evaluator = SafetyEvaluator(setup, config)
    results = {"source": str(source), **evaluator(params, responses_path=out_dir / "responses.jsonl")}
    names = comma_list(splits or config.eval.splits)
    results["teacher_forced"] = teacher_forced_eval(setup, params, config, names)
    results["eval_s"] = time.time() - t
    if jax.process_index() == 0:
      (out_dir / "eval.json").write_text(json.dumps(results, indent=1, sort_keys=True))
  return results

