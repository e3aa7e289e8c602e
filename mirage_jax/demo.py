"""`mirage demo`: the whole Safety Mirage experiment on a laptop CPU.

Data -> base -> mixed SFT, post-hoc SFT -> NPO, RMU, GradDiff, SimNPO (all from the base) -> evaluation of
every model -> `report.md`, `report.json` and plots. Every stage is an ordinary config + `mirage train` run;
its directory name carries a content hash of its config (and of its upstream stage), so rerunning reuses
finished stages and resumes interrupted ones. `--config.x=y` overrides apply to every stage that has key x.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Sequence

import jax

from mirage_jax import configlib, report as report_lib
from mirage_jax.eval import runner
from mirage_jax.report import document
from mirage_jax.train import checkpoint, loop, metrics as metrics_lib

log = logging.getLogger("mirage")


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  config: str  # config file (size appended at run time)
  init_from: str | None = None  # upstream stage whose final params initialise this one


STAGES = (
    Stage("base", "configs/pretrain/base.py"),
    Stage("sft_mixed", "configs/sft/mixed.py"),
    Stage("sft_posthoc", "configs/sft/posthoc.py", init_from="base"),
    Stage("npo", "configs/unlearn/npo.py", init_from="base"),
    Stage("rmu", "configs/unlearn/rmu.py", init_from="base"),
    Stage("graddiff", "configs/unlearn/graddiff.py", init_from="base"),
    Stage("simnpo", "configs/unlearn/simnpo.py", init_from="base"),
)


def apply_everywhere(configs: dict, overrides: Sequence[str]) -> dict:
  """Apply each override to every stage config that has its key; a key no stage has is an error."""
  out = dict(configs)
  for item in overrides:
    hits = 0
    for name, config in out.items():
      try:
        out[name] = configlib.apply_overrides(config, [item])
        hits += 1
      except configlib.ConfigError as e:
        if "unknown config key" not in str(e):
          raise
    if not hits:
      raise configlib.ConfigError(f"override {item!r} matches no stage's config")
  return out


@dataclasses.dataclass
class DemoResult:
  workdir: pathlib.Path
  report: dict
  checks: list

  def summary(self) -> str:
    met = sum(ok for _, _, ok in self.checks)
    return (f"report: {self.workdir / 'report.md'} ({met}/{len(self.checks)} targets met, "
            f"{self.report['timing_s']['total']:.0f} s)")


def _finished(run_dir: pathlib.Path, total_steps: int) -> bool:
  return checkpoint.latest_step_on_disk(run_dir / checkpoint.CHECKPOINT_DIR) == total_steps


def run_demo(*, workdir: str | pathlib.Path, seeds: int = 1, size: str = "tiny", overrides: Sequence[str] = (),
             stages: Sequence[str] = ()) -> DemoResult:
  t0 = time.time()
  workdir = pathlib.Path(workdir)
  (workdir / "runs").mkdir(parents=True, exist_ok=True)
  chosen = [s for s in STAGES if not stages or s.name in stages]
  base = {s.name: configlib.load(f"{s.config}:{size}") for s in chosen}
  base = apply_everywhere(base, overrides)
  timing: dict[str, float] = {}
  per_seed, run_dirs = [], {}
  evaluator = None
  for seed in range(seeds):
    results = {}
    fingerprints: dict[str, str] = {}
    for i, stage in enumerate(chosen):
      config = configlib.apply_overrides(base[stage.name], [f"--config.seed={seed}"])
      upstream = ""
      if stage.init_from:
        if stage.init_from not in run_dirs:
          raise configlib.ConfigError(f"stage {stage.name} needs stage {stage.init_from}")
        config = configlib.apply_overrides(config, [f"--config.init_from={run_dirs[stage.init_from]}"])
        upstream = fingerprints[stage.init_from]
      fingerprints[stage.name] = _fingerprint(config, upstream)
      run_dir = workdir / "runs" / f"{stage.name}-s{seed}-{fingerprints[stage.name]}"
      run_dirs[stage.name] = run_dir
      t = time.time()
      label = f"[seed {seed} · {i + 1}/{len(chosen)}] {stage.name}"
      if not _finished(run_dir, config.total_steps):
        log.warning("%s: training %d steps -> %s", label, config.total_steps, run_dir)
        loop.run(config, run_dir)
      if evaluator is None:
        evaluator = runner.SafetyEvaluator(loop.setup(config), config)
      eval_path = run_dir / "eval.json"
      if not eval_path.exists():
        setup = loop.setup(config)
        params = runner.checkpoint_params(setup, str(run_dir))
        metrics = evaluator(params, responses_path=run_dir / "responses.jsonl")
        eval_path.write_text(json.dumps(metrics, indent=1, sort_keys=True))
      results[stage.name] = report_lib.model_entry(json.loads(eval_path.read_text()))
      timing[f"{stage.name}/s{seed}"] = time.time() - t
      log.warning("%s: done in %.0f s (elapsed %.0f s)", label, time.time() - t, time.time() - t0)
    per_seed.append(results)
  models = report_lib.aggregate(per_seed)
  timing["total"] = time.time() - t0
  loss_rows = {name: metrics_lib.read_metrics(d) for name, d in run_dirs.items()}
  rep = {"models": models, "timing_s": timing, "seeds": list(range(seeds)), "size": size,
         "overrides": list(overrides), "runs": {k: str(v) for k, v in run_dirs.items()},
         "devices": jax.device_count()}
  checks = report_lib.target_checks(models)
  document.write(workdir, rep, checks=checks, loss_rows=loss_rows, config=next(iter(base.values())))
  return DemoResult(workdir=workdir, report=rep, checks=checks)


def _fingerprint(config, upstream: str) -> str:
  d = config.to_dict()
  d.pop("init_from", None)
  return configlib.fingerprint({"config": d, "upstream": upstream})
