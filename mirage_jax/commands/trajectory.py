"""The SFT trajectory (`mirage demo --trajectory=N`): where the mirage appears during safety fine-tuning and
whether it fades.

One long post-hoc SFT run from the demo's first base, `N` steps at the recipe's learning rate held constant
after its warm-up (so the model at step s is "s steps of the recipe's SFT", not a point on a cosine schedule
stretched over N), checkpointed `points` times; every checkpoint is evaluated on the test splits like a demo
stage (its `eval.json` under `<run>/eval/<step>/`). Step 0 is the base itself. `report.json["trajectory"]`
holds one model entry per step; report.md shows the table and `trajectory.png` (`report.document`).
"""

from __future__ import annotations

import logging
import time

import ml_collections

from mirage_jax import configlib, report as report_lib
from mirage_jax.errors import ConfigError
from mirage_jax.train import checkpoint, loop

log = logging.getLogger("mirage")

METHOD = "sft_posthoc"


def trajectory_config(config: ml_collections.ConfigDict, *, steps: int, points: int) -> ml_collections.ConfigDict:
  """The post-hoc stage's `config` run `steps` long at a constant learning rate, checkpointed `points` times."""
  if steps < 1 or points < 1 or steps % points:
    raise ConfigError(f"--trajectory={steps} with --trajectory_points={points}: the steps must be a positive "
                      "multiple of the points")
  return configlib.apply_overrides(config, [
      f"--config.total_steps={steps}", f"--config.checkpoint_every={steps // points}",
      f"--config.keep_checkpoints={points + 1}", "--config.optim.schedule=constant"])


def run_trajectory(runs, base, config: ml_collections.ConfigDict, *, steps: int, points: int) -> dict:
  """`runs`: the demo's `StageRunner`; `base`: its finished base `StageRun`; `config`: the post-hoc stage's
  training config. Returns {"method", "steps", "lr", "warmup_steps", "wall_s", "points": {step: entry}}."""
  t = time.time()
  train = trajectory_config(configlib.apply_overrides(config, [f"--config.init_from={base.run_dir}"]),
                            steps=steps, points=points)
  d = train.to_dict()
  d.pop("init_from")
  run_dir = runs.root / f"trajectory-{METHOD}-s{train.seed}-{configlib.fingerprint({'c': d, 'up': base.fingerprint})}"
  if checkpoint.latest_step_on_disk(run_dir / checkpoint.CHECKPOINT_DIR) != steps:
    log.warning("trajectory: %s for %d steps -> %s", METHOD, steps, run_dir)
    loop.run_to_end(train, run_dir)
  every = steps // points
  entries = {"0": report_lib.model_entry(base.metrics)}
  for step in range(every, steps + 1, every):
    source = run_dir / checkpoint.CHECKPOINT_DIR / str(step)
    entries[str(step)] = report_lib.model_entry(
        runs.evaluate(train, source, run_dir / "eval" / str(step), what=f"trajectory step {step}"))
  return {"method": METHOD, "steps": [int(s) for s in entries], "lr": float(train.optim.lr),
          "warmup_steps": int(train.optim.warmup_steps), "run": str(run_dir), "wall_s": time.time() - t,
          "points": entries}
