"""`mirage eval`: load a trained run (or one checkpoint) and evaluate it on the dataset's splits."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import jax
import ml_collections

from mirage_jax import configlib
from mirage_jax.data import pipeline
from mirage_jax.eval import scoring
from mirage_jax.train import checkpoint, loop


def run_config(*, workdir: str | None, checkpoint_dir: str | None) -> ml_collections.ConfigDict:
  """The config a run was trained with (`config.json` of the workdir, or the checkpoint's `meta`)."""
  if workdir:
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
      raise FileNotFoundError(f"{path} not found: is {workdir} a training run directory?")
    return configlib.from_json(path.read_text())
  meta = pathlib.Path(checkpoint_dir) / "meta" / "metadata"
  if not meta.exists():
    raise FileNotFoundError(f"no meta/metadata in checkpoint {checkpoint_dir}")
  return configlib.from_json(json.dumps(json.loads(meta.read_text())["config"]))


def evaluate_run(*, workdir: str | None = None, checkpoint: str | None = None, config_spec: str | None = None,
                 overrides: Sequence[str] = (), splits: str = "", out: str = "") -> dict:
  config = (configlib.load(config_spec) if config_spec else
            run_config(workdir=workdir, checkpoint_dir=checkpoint))
  config = configlib.apply_overrides(config, overrides)
  setup = loop.setup(config)
  params = checkpoint_params(setup, workdir or checkpoint)
  names = [s.strip() for s in (splits or config.eval.splits).split(",") if s.strip()]
  cache = pipeline.SplitCache(setup.data.dataset, setup.data.tokenizer, setup.fmt, cache=config.data.cache)
  score_step = scoring.make_score_step(setup.spec)
  results = {"teacher_forced": {}}
  for split in names:
    batches = pipeline.eval_batches(cache.examples(split), config.eval.batch_size)
    results["teacher_forced"][split] = scoring.score_batches(
        score_step, params, batches, lambda b: pipeline.to_global(b, setup.mesh))
  if out and jax.process_index() == 0:
    pathlib.Path(out).write_text(json.dumps(results, indent=1, sort_keys=True))
  return results


def checkpoint_params(setup: loop.Setup, path: str):
  return checkpoint.restore_params(path, setup.spec.abstract_params())
