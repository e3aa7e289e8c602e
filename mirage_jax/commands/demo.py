"""`mirage demo`: the whole Safety Mirage experiment on a laptop CPU.

Data -> base -> mixed and post-hoc SFT, NPO, RMU, GradDiff, SimNPO (all from the base; the table
`mirage_configs.methods`) -> evaluation of every model -> `report.md`, `report.json` and plots. Every stage is
a sweep point (`mirage_jax.commands.sweep.Point`: config spec, overrides, upstream point), trained in-process
like `mirage train`; its directory `<method>-s<seed>-<hash>` carries a content hash of its config (and of its
upstream stage), so rerunning reuses finished stages and resumes interrupted ones. `--config.x=y` overrides
apply to every stage that has key x. `mirage demo --ablations` adds the world-knob ablation: the points of
`configs/ablations/world.py`, run by the same stage runner. Unless `audit=False`, the shortcut audit of the
training data and the attack search against seed 0's models (`mirage_jax.audit.summary`) go to `audit/` and
`report.json["audit"]`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Mapping, Sequence

import jax
import ml_collections

from mirage_configs import ablations as ablation_configs, methods
from mirage_configs.ablations import world as world_ablation
from mirage_jax import configlib, report as report_lib
from mirage_jax.commands import sweep, trajectory as trajectory_lib
from mirage_jax.data import pipeline
from mirage_jax.eval import runner
from mirage_jax.report import document
from mirage_jax.train import checkpoint, lease, loop, metrics as metrics_lib, runtime

log = logging.getLogger("mirage")

WORLD_ABLATION = "configs/ablations/world.py"
_WORLD_KNOB = "--config.data.world."


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


def stage_points(names: Sequence[str], *, size: str, seed: int) -> tuple[sweep.Point, ...]:
  """The demo's stages among `names` (in the table's order) at `size` and `seed`: the base, then every other
  method initialised from it."""
  base = ablation_configs.point(methods.BASE, size, seed)["name"]
  return sweep.expand([ablation_configs.point(m.name, size, seed, init_from=base if m.from_base else "")
                       for m in methods.METHODS if m.name in names])


def point_configs(points: Sequence[sweep.Point], overrides: Sequence[str]) -> dict[str, ml_collections.ConfigDict]:
  """Each point's training config: its file, the demo's overrides where they apply (`apply_everywhere`),
  then the point's own overrides (size, seed, world knobs)."""
  configs = apply_everywhere({p.name: configlib.load(p.config) for p in points}, overrides)
  return {p.name: configlib.apply_overrides(configs[p.name], p.overrides) for p in points}


def fingerprint(config: ml_collections.ConfigDict, upstream: str) -> str:
  d = config.to_dict()
  d.pop("init_from", None)
  return configlib.fingerprint({"config": d, "upstream": upstream})


@dataclasses.dataclass(frozen=True)
class StageRun:
  run_dir: pathlib.Path
  fingerprint: str  # of its config and its upstream's fingerprint
  metrics: dict  # its eval.json


class StageRunner:
  """Runs points into `root/<method>-s<seed>-<hash>` (reusing finished ones) and evaluates them once each.

  One `SafetyEvaluator` (one compiled decoder) serves every model that shares the first model's
  architecture and test data.
  """

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.root.mkdir(parents=True, exist_ok=True)
    self.timing: dict[str, float] = {}
    self.first_world: int | None = None  # timing keys name the world seed when it is not the first one's
    self._evaluators: dict[str, runner.SafetyEvaluator] = {}

  def run(self, point: sweep.Point, config: ml_collections.ConfigDict, *, upstream: StageRun | None = None,
          label: str = "", split_set: str = "test") -> StageRun:
    """Train (unless finished) and evaluate one point, `config` being its training config
    (`point_configs`); `upstream` is the finished run of `point.init_from`. `split_set="dev"` evaluates on
    the dev twins instead (`eval.dev.json`; the run directory, which hashes the training config, is the
    same as the test-evaluated run's)."""
    t = time.time()
    method = point.labels.get("method", point.name)
    up_fp = ""
    if point.init_from:
      if upstream is None:
        raise configlib.ConfigError(f"stage {point.name} needs the {point.init_from} stage")
      config = configlib.apply_overrides(config, [f"--config.init_from={upstream.run_dir}"])
      up_fp = upstream.fingerprint
    fp = fingerprint(config, up_fp)
    run_dir = self.root / f"{method}-s{config.seed}-{fp}"
    if checkpoint.latest_step_on_disk(run_dir / checkpoint.CHECKPOINT_DIR) != config.total_steps:
      log.warning("%s %s: training %d steps -> %s", label, method, config.total_steps, run_dir)
      loop.run_to_end(config, run_dir)
    eval_config = configlib.apply_overrides(config, [f"--config.eval.split_set={split_set}"])
    metrics = self.evaluate(eval_config, run_dir, run_dir, what=method)
    world = config.data.world.seed
    self.timing[f"{method}/s{config.seed}" + (f"/w{world}" if world != self.first_world else "")] = time.time() - t
    log.warning("%s %s: done in %.0f s", label, method, time.time() - t)
    return StageRun(run_dir=run_dir, fingerprint=fp, metrics=metrics)

  def evaluate(self, config: ml_collections.ConfigDict, source: pathlib.Path, out_dir: pathlib.Path, *,
               what: str) -> dict:
    """`out_dir/eval.json` (and responses.jsonl) of the model at `source` (a run or one checkpoint step),
    computed once; `config` is its training config. On the dev twins (`eval.split_set=dev`) the files are
    eval.dev.json and responses.dev.jsonl, as `mirage eval` names them."""
    eval_path = out_dir / runner.output_name("eval", config, ".json")
    if not eval_path.exists():
      # A LoRA run is evaluated merged into its base (the same function, the base's architecture): it shares
      # the base's compiled decoder.
      if config.get("lora") and config.lora.rank:
        config = configlib.apply_overrides(config, ["--config.lora.rank=0"])
      setup = runtime.setup(config)
      key = configlib.fingerprint({"model": config.model.to_dict(), "data": config.data.to_dict(),
                                   "eval": config.eval.to_dict()}, drop=())
      if key not in self._evaluators:
        self._evaluators[key] = runner.SafetyEvaluator(setup, config)
      params = runtime.load_params(setup, str(source))
      out_dir.mkdir(parents=True, exist_ok=True)
      with lease.hold(out_dir, what=f"mirage demo (eval of {what})"):
        metrics = self._evaluators[key](params, responses_path=out_dir / runner.output_name("responses", config, ".jsonl"))
        eval_path.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    return json.loads(eval_path.read_text())


def run_world_ablation(runs: StageRunner, *, size: str, overrides: Sequence[str],
                       variants: Sequence[str] = ()) -> dict:
  """`report.json["ablation"]`: the points of `configs/ablations/world.py` at `size`, one row per variant
  (`variants`: those named, in that order, after the default world; empty: all of them).

  A variant whose `pretrain` split is identical to the default world's (the digests the dataset builds
  record) reuses the default base instead of training its own.
  """
  chosen = ablation_variants_of(variants)
  knobs = [f"--config.sizes={size}", *([f"--config.variants={','.join(chosen)}"] if variants else [])]
  points = sweep.load(WORLD_ABLATION, overrides=knobs).points
  configs = point_configs(points, overrides)
  variants: dict[str, list[sweep.Point]] = {}
  for p in points:
    variants.setdefault(p.labels["variant"], []).append(p)
  ref = _base_of(variants[world_ablation.DEFAULT])
  default_digest = pipeline.split_digest(configs[ref.name].data, "pretrain")
  default_base = runs.run(ref, configs[ref.name], label="[ablation default]")
  rows = {}
  for name, group in variants.items():
    base_point, variant = _base_of(group), world_ablation.BY_NAME[name]
    reuse = (not variant.base_overrides and
             pipeline.split_digest(configs[base_point.name].data, "pretrain") == default_digest)
    base = default_base if reuse else runs.run(base_point, configs[base_point.name], label=f"[ablation {name}]")
    models = {"base": report_lib.model_entry(base.metrics)}
    ci = {"base": dict(base.metrics.get("ci", {}))}  # each model's over-queries 95 % intervals (its eval.json)
    method_overrides = sorted({o for p in group if p.init_from for o in p.overrides
                               if o not in base_point.overrides})
    for p in group:
      if p.init_from:
        done = runs.run(p, configs[p.name], upstream=base, label=f"[ablation {name}]")
        models[p.labels["method"]] = report_lib.model_entry(done.metrics)
        ci[p.labels["method"]] = dict(done.metrics.get("ci", {}))
    rows[name] = {"what": base_point.labels["what"], "base_reused": reuse, "models": models, "ci": ci,
                  "overrides": [o for o in base_point.overrides if o.startswith(_WORLD_KNOB)],
                  "method_overrides": method_overrides, "base_overrides": list(variant.base_overrides),
                  **({"labels": {"base": variant.base_label}} if variant.base_label else {})}
  return rows


def ablation_variants_of(variants: Sequence[str]) -> list[str]:
  """The default world, then `variants` (names of `configs/ablations/world.py`; an unknown one is an error)."""
  unknown = sorted(set(variants) - set(world_ablation.BY_NAME))
  if unknown:
    raise configlib.ConfigError(f"--ablation_variants: unknown {unknown}; valid: {', '.join(world_ablation.BY_NAME)}")
  return [world_ablation.DEFAULT, *(v for v in variants if v != world_ablation.DEFAULT)]


def _base_of(group: Sequence[sweep.Point]) -> sweep.Point:
  return next(p for p in group if not p.init_from)


@dataclasses.dataclass
class DemoResult:
  workdir: pathlib.Path
  report: dict
  checks: list

  def summary(self) -> str:
    met = sum(ok for _, _, ok in self.checks)
    return (f"report: {self.workdir / 'report.md'} ({met}/{len(self.checks)} targets met, "
            f"{self.report['timing_s']['total']:.0f} s)")


def _run_seed(runs: StageRunner, points: Sequence[sweep.Point], configs: Mapping[str, ml_collections.ConfigDict],
              *, seed: int, t0: float) -> dict[str, StageRun]:
  """Every stage of one seed, upstream first: {method: its run}."""
  done: dict[str, StageRun] = {}
  for i, p in enumerate(points):
    done[p.name] = runs.run(p, configs[p.name], upstream=done.get(p.init_from),
                            label=f"[seed {seed} · {i + 1}/{len(points)} · {time.time() - t0:.0f} s]")
  return {p.labels["method"]: done[p.name] for p in points}


def world_seeds_of(points: Sequence[sweep.Point], overrides: Sequence[str], world_seeds: int) -> list[int]:
  """`data.world.seed + i` for i < `world_seeds`, the base seed read from the stage configs (after overrides)."""
  if world_seeds < 1:
    raise configlib.ConfigError(f"--world_seeds={world_seeds}: need at least 1 world")
  first = point_configs(points[:1], overrides)[points[0].name].data.world.seed
  return [first + i for i in range(world_seeds)]


# LoRA stages train at 10x the stage's full-parameter learning rate: LLaVA-1.5's own recipes (2e-4 for LoRA
# against 2e-5 full), fixed a priori, not tuned on the toy.
LORA_LR_MULTIPLIER = 10.0


def with_lora(config: ml_collections.ConfigDict, rank: int) -> ml_collections.ConfigDict:
  """A stage's config trained with LoRA of `rank` (at `LORA_LR_MULTIPLIER` x its learning rate)."""
  return configlib.apply_overrides(config, [f"--config.lora.rank={rank}",
                                            f"--config.optim.lr={config.optim.lr * LORA_LR_MULTIPLIER!r}"])


def _kept_robustness(workdir: pathlib.Path, per_seed: Sequence[Mapping]) -> dict | None:
  """The earlier report's `mirage robustness` result when it measured exactly these runs (a rerun of the demo
  that reuses every stage keeps it; any retrained stage drops it)."""
  path = workdir / "report.json"
  if not path.is_file():
    return None
  old = json.loads(path.read_text())
  same = [r.get("runs") for r in old.get("per_seed", [])] == [r["runs"] for r in per_seed]
  return old.get("robustness") if same else None


def run_demo(*, workdir: str | pathlib.Path, seeds: int = 1, size: str = "tiny", overrides: Sequence[str] = (),
             stages: Sequence[str] = (), ablations: bool = False, ablation_variants: Sequence[str] = (),
             audit: bool = True,
             world_seeds: int = 1, lora_rank: int = 0, trajectory: int = 0,
             trajectory_points: int = 8) -> DemoResult:
  """The grid: every world seed (`data.world.seed + i`, i < `world_seeds`: objects, hazards, held-out split,
  templates) x every training seed (0..`seeds`-1). `report.json["per_seed"]` keeps each run's entries;
  `models` aggregates them (means, stds and `ci95`, `report.aggregate`). The audit reads the first run's
  models. `ablations` runs the world-knob ablation (`ablation_variants`: only those, with the default
  world). `lora_rank` > 0 trains every stage that starts from the base with LoRA of that rank (the base
  itself is trained fully: adapters need a base to adapt). `trajectory` > 0 adds the SFT trajectory
  (`mirage_jax.commands.trajectory`): a post-hoc SFT run of that many steps from the first run's base,
  evaluated at `trajectory_points` checkpoints."""
  t0 = time.time()
  workdir = pathlib.Path(workdir)
  if ablation_variants and not ablations:
    raise configlib.ConfigError("--ablation_variants needs --ablations")
  ablation_variants_of(ablation_variants)  # a misspelt variant fails now, not after the demo's stages
  unknown = sorted(set(stages) - set(methods.NAMES))
  if unknown:
    raise configlib.ConfigError(f"--stages: unknown {unknown}; valid: {', '.join(methods.NAMES)}")
  if stages and methods.BASE not in stages:
    raise configlib.ConfigError(f"--stages={','.join(stages)}: every other stage starts from the base; add "
                                f"{methods.BASE}")
  names = [n for n in methods.NAMES if not stages or n in stages]
  runs = StageRunner(workdir / "runs")
  worlds = world_seeds_of(stage_points(names, size=size, seed=0), overrides, world_seeds)
  runs.first_world = worlds[0]
  per_seed, run_dirs, seed0, configs, first = [], {}, {}, {}, {}
  for world in worlds:
    # The first world is the overrides' own (no extra override: its stage hashes stay those of a 1-world demo).
    world_overrides = [*overrides, *([] if world == worlds[0] else [f"--config.data.world.seed={world}"])]
    for seed in range(seeds):
      points = stage_points(names, size=size, seed=seed)
      point_cfgs = point_configs(points, world_overrides)
      if lora_rank:
        point_cfgs = {p.name: with_lora(point_cfgs[p.name], lora_rank) if p.init_from else point_cfgs[p.name]
                      for p in points}
      done = _run_seed(runs, points, point_cfgs, seed=seed, t0=t0)
      if not seed0:
        first = done
        seed0 = {m: r.run_dir for m, r in done.items()}
        configs = {p.labels["method"]: point_cfgs[p.name] for p in points}
      suffix = "" if world == worlds[0] else f"/w{world}"
      run_dirs.update({f"{m}{suffix}": r.run_dir for m, r in done.items()})
      per_seed.append({"world_seed": world, "seed": seed,
                       "models": {m: report_lib.model_entry(r.metrics) for m, r in done.items()},
                       "runs": {m: str(r.run_dir) for m, r in done.items()}})
  models = report_lib.aggregate([r["models"] for r in per_seed])
  rep = {"models": models, "per_seed": per_seed, "lora_rank": lora_rank, "timing_s": dict(runs.timing),
         "seeds": list(range(seeds)),
         "world_seeds": worlds, "size": size, "overrides": list(overrides),
         "runs": {k: str(v) for k, v in run_dirs.items()}, "devices": jax.device_count()}
  rep["timing_s"]["total"] = time.time() - t0
  if trajectory:
    if methods.BASE not in first or "sft_posthoc" not in configs:
      raise configlib.ConfigError("--trajectory needs the base and sft_posthoc stages")
    rep["trajectory"] = trajectory_lib.run_trajectory(runs, first[methods.BASE], configs["sft_posthoc"],
                                                      steps=trajectory, points=trajectory_points)
    rep["timing_s"]["trajectory"] = rep["trajectory"]["wall_s"]
  if ablations:
    rep["ablation"] = run_world_ablation(runs, size=size, overrides=overrides, variants=ablation_variants)
    rep["timing_s"]["total_with_ablation"] = time.time() - t0
  if audit:
    from mirage_jax.audit import summary as audit_summary
    rep["audit"] = audit_summary.run_cached(seed0, configs={k: configs[k] for k in seed0},
                                            out_dir=workdir / "audit")
    rep["timing_s"]["audit"] = rep["audit"]["timing_s"]
  kept = _kept_robustness(workdir, per_seed)
  if kept:
    rep["robustness"] = kept
  checks = report_lib.target_checks(models)
  loss_rows = {name: metrics_lib.read_metrics(d) for name, d in seed0.items()}  # the first run's curves
  document.write(workdir, rep, checks=checks, loss_rows=loss_rows, config=next(iter(configs.values())))
  return DemoResult(workdir=workdir, report=rep, checks=checks)
