"""`mirage demo`: the whole Safety Mirage experiment on a laptop CPU.

Data -> base -> mixed and post-hoc SFT, NPO, RMU, GradDiff, SimNPO (all from the base) -> evaluation of every
model -> `report.md`, `report.json` and plots. Every stage is an ordinary config + `mirage train` run; its
directory name carries a content hash of its config (and of its upstream stage), so rerunning reuses finished
stages and resumes interrupted ones. `--config.x=y` overrides apply to every stage that has key x.
`mirage demo --ablations` adds the world-knob ablation (`mirage_jax.ablation`). Unless `audit=False`, the
shortcut audit of the training data and the attack search against seed 0's models (`mirage_jax.audit.summary`)
go to `audit/` and `report.json["audit"]`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Sequence

import jax
import ml_collections

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
    Stage("sft_mixed", "configs/sft/mixed.py", init_from="base"),
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


def stage_configs(stages: Sequence[Stage], size: str, overrides: Sequence[str]) -> dict:
  return apply_everywhere({s.name: configlib.load(f"{s.config}:{size}") for s in stages}, overrides)


def fingerprint(config: ml_collections.ConfigDict, upstream: str) -> str:
  d = config.to_dict()
  d.pop("init_from", None)
  return configlib.fingerprint({"config": d, "upstream": upstream})


class StageRunner:
  """Runs stages into `root/<name>-s<seed>-<hash>` (reusing finished ones) and evaluates them once each.

  One `SafetyEvaluator` (one compiled decoder) serves every model that shares the first model's
  architecture and test data.
  """

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.root.mkdir(parents=True, exist_ok=True)
    self.timing: dict[str, float] = {}
    self._evaluators: dict[str, runner.SafetyEvaluator] = {}

  def run(self, stage: Stage, config: ml_collections.ConfigDict, *, seed: int,
          upstream: tuple[pathlib.Path, str] | None = None, label: str = "") -> tuple[pathlib.Path, str, dict]:
    """Train (unless finished) and evaluate one stage; returns (run dir, fingerprint, eval metrics)."""
    t = time.time()
    config = configlib.apply_overrides(config, [f"--config.seed={seed}"])
    up_fp = ""
    if stage.init_from:
      if upstream is None:
        raise configlib.ConfigError(f"stage {stage.name} needs the {stage.init_from} stage")
      config = configlib.apply_overrides(config, [f"--config.init_from={upstream[0]}"])
      up_fp = upstream[1]
    fp = fingerprint(config, up_fp)
    run_dir = self.root / f"{stage.name}-s{seed}-{fp}"
    if checkpoint.latest_step_on_disk(run_dir / checkpoint.CHECKPOINT_DIR) != config.total_steps:
      log.warning("%s %s: training %d steps -> %s", label, stage.name, config.total_steps, run_dir)
      loop.run(config, run_dir)
    eval_path = run_dir / "eval.json"
    if not eval_path.exists():
      setup = loop.setup(config)
      key = configlib.fingerprint({"model": config.model.to_dict(), "data": config.data.to_dict(),
                                   "eval": config.eval.to_dict()}, drop=())
      if key not in self._evaluators:
        self._evaluators[key] = runner.SafetyEvaluator(setup, config)
      params = runner.checkpoint_params(setup, str(run_dir))
      metrics = self._evaluators[key](params, responses_path=run_dir / "responses.jsonl")
      eval_path.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    self.timing[f"{stage.name}/s{seed}"] = time.time() - t
    log.warning("%s %s: done in %.0f s", label, stage.name, time.time() - t)
    return run_dir, fp, json.loads(eval_path.read_text())


@dataclasses.dataclass
class DemoResult:
  workdir: pathlib.Path
  report: dict
  checks: list

  def summary(self) -> str:
    met = sum(ok for _, _, ok in self.checks)
    return (f"report: {self.workdir / 'report.md'} ({met}/{len(self.checks)} targets met, "
            f"{self.report['timing_s']['total']:.0f} s)")


def run_demo(*, workdir: str | pathlib.Path, seeds: int = 1, size: str = "tiny", overrides: Sequence[str] = (),
             stages: Sequence[str] = (), ablations: bool = False, audit: bool = True) -> DemoResult:
  t0 = time.time()
  workdir = pathlib.Path(workdir)
  chosen = [s for s in STAGES if not stages or s.name in stages]
  configs = stage_configs(chosen, size, overrides)
  runs = StageRunner(workdir / "runs")
  per_seed, run_dirs, seed0_dirs = [], {}, {}
  for seed in range(seeds):
    results, done = {}, {}
    for i, stage in enumerate(chosen):
      run_dir, fp, metrics = runs.run(stage, configs[stage.name], seed=seed,
                                      upstream=done.get(stage.init_from),
                                      label=f"[seed {seed} · {i + 1}/{len(chosen)} · {time.time() - t0:.0f} s]")
      done[stage.name] = (run_dir, fp)
      run_dirs[stage.name] = run_dir
      if seed == 0:
        seed0_dirs[stage.name] = run_dir
      results[stage.name] = report_lib.model_entry(metrics)
    per_seed.append(results)
  models = report_lib.aggregate(per_seed)
  rep = {"models": models, "timing_s": dict(runs.timing), "seeds": list(range(seeds)), "size": size,
         "overrides": list(overrides), "runs": {k: str(v) for k, v in run_dirs.items()},
         "devices": jax.device_count()}
  rep["timing_s"]["total"] = time.time() - t0
  if ablations:
    from mirage_jax import ablation
    rep["ablation"] = ablation.run_ablation(runs, size=size, overrides=overrides)
    rep["timing_s"]["total_with_ablation"] = time.time() - t0
  if audit:
    from mirage_jax.audit import summary as audit_summary
    rep["audit"] = audit_summary.run_cached(seed0_dirs, configs={k: configs[k] for k in seed0_dirs},
                                            out_dir=workdir / "audit")
    rep["timing_s"]["audit"] = rep["audit"]["timing_s"]
  checks = report_lib.target_checks(models)
  loss_rows = {name: metrics_lib.read_metrics(d) for name, d in run_dirs.items()}
  document.write(workdir, rep, checks=checks, loss_rows=loss_rows, config=next(iter(configs.values())))
  return DemoResult(workdir=workdir, report=rep, checks=checks)
