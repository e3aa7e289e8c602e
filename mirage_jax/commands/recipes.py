"""`mirage recipes`: each method's recipe (learning rate x training steps) chosen on the dev splits.

The candidates and the rule are `configs/ablations/recipes.py`'s (read its docstring): every candidate is
trained from the base of the first world like a `mirage demo` stage (the same `StageRunner`, so the config's
own recipe reuses the demo's run) and evaluated on the dev twins of the test splits (`eval.dev.json`); the test
splits are never read here. `choose` applies the rule. Writes `<workdir>/recipes.json` and `recipes.md` and
returns {"methods": {method: {"config": recipe, "chosen": recipe, "config_is_chosen", "candidates": [...]}},
"base": dev entry, "rule", "wall_s"}.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from collections.abc import Mapping, Sequence

import ml_collections

from mirage_configs import ablations as ablation_configs, methods
from mirage_configs.ablations import knob_list, recipes as recipes_config
from mirage_jax import configlib, report as report_lib
from mirage_jax.commands import demo, sweep

# (goal, the model entry's path to the value it bounds): the rule's four goals, in its docstring's order.
GOALS = (("ASR original ≤ {max_asr:g}", ("asr", "original")),
         ("RR safe ≤ {max_safe_rr:g}", ("rr", "safe")),
         ("utility ≥ base − {max_utility_drop:g}", ("utility",)),
         ("utility on safe answers ≥ base − {max_safe_quality_drop:g}", ("utility_safe",)))


def goals(entry: Mapping, base: Mapping, rule: Mapping) -> list[bool]:
  """Whether `entry` (a `report.model_entry`, dev) meets each of `GOALS` against the base's dev entry
  (a NaN never meets a goal)."""
  (asr, rr, utility, quality) = (report_lib.value(entry, *path) for _, path in GOALS)
  checks = (asr <= rule["max_asr"], rr <= rule["max_safe_rr"],
            utility >= report_lib.value(base, *GOALS[2][1]) - rule["max_utility_drop"],
            quality >= report_lib.value(base, *GOALS[3][1]) - rule["max_safe_quality_drop"])
  return [bool(c) for c in checks]


def choose(rows: Sequence[Mapping], rule: Mapping) -> int:
  """The index of the chosen candidate among `rows` ({"steps", "entry", "goals": [bool]}): among those meeting
  every goal the fewest steps, then the highest utility (never NaN there: a NaN misses its goal); if none
  does, the fewest goals missed, then the lowest original ASR (NaN last), then the fewest steps."""
  if not rows:
    raise configlib.ConfigError("no recipe candidates to choose from")
  met = [i for i, r in enumerate(rows) if all(r["goals"])]
  if met:
    return min(met, key=lambda i: (rows[i]["steps"], -_num(rows[i]["entry"], "utility")))
  return min(range(len(rows)), key=lambda i: (sum(not g for g in rows[i]["goals"]),
                                              _num(rows[i]["entry"], "asr", "original"), rows[i]["steps"]))


def _num(entry: Mapping, *path: str) -> float:
  x = report_lib.value(entry, *path)
  return math.inf if math.isnan(x) else x


def rule_of(config: ml_collections.ConfigDict) -> dict:
  return {k: float(config[k]) for k in recipes_config.RULE_KEYS}


def run(*, workdir: str | pathlib.Path, overrides: Sequence[str] = (), methods_: str | None = None,
        lr_scales: str | None = None, step_scales: str | None = None, seed: int | None = None) -> dict:
  """Train and dev-evaluate every candidate (the flags override the recipes config's knobs of the same
  names), choose one per method, write recipes.json / recipes.md under `workdir`."""
  t0 = time.time()
  workdir = pathlib.Path(workdir)
  knobs = [f"--config.{k}={v}" for k, v in (("methods", methods_), ("lr_scales", lr_scales),
                                             ("step_scales", step_scales), ("seed", seed)) if v is not None]
  config = configlib.apply_overrides(recipes_config.get_config("cpu"), knobs)
  rule = rule_of(config)
  try:
    chosen_methods = knob_list(config, "methods", methods.FROM_BASE)
    recipes_config.scales(config, "lr_scales"), recipes_config.scales(config, "step_scales")
  except ValueError as e:
    raise configlib.ConfigError(str(e)) from None
  # The demo's own stages: the base, and each method's recipe as its config (and the overrides) set it.
  stages = demo.stage_points([methods.BASE, *chosen_methods], size=config.size, seed=config.seed)
  stage_cfgs = demo.point_configs(stages, overrides)
  base_point = stages[0]
  own = {p.labels["method"]: {"lr": float(stage_cfgs[p.name].optim.lr), "steps": int(stage_cfgs[p.name].total_steps)}
         for p in stages[1:]}
  cands = {m: recipes_config.candidates(config, own[m]["lr"], own[m]["steps"]) for m in chosen_methods}
  points = sweep.expand([dict(name=base_point.name, config=base_point.config, overrides=base_point.overrides,
                              labels=base_point.labels)] +
                        [ablation_configs.point(m, config.size, config.seed, overrides=recipes_config.overrides(c),
                                                tag=c["tag"], init_from=base_point.name)
                         for m in chosen_methods for c in cands[m]])
  cfgs = demo.point_configs(points, overrides)
  runs = demo.StageRunner(workdir / "runs")
  runs.first_world = stage_cfgs[base_point.name].data.world.seed
  base = runs.run(points[0], cfgs[points[0].name], label="[recipes]", split_set="dev")
  base_entry = report_lib.model_entry(base.metrics)
  out = {"methods": {}, "base": base_entry, "rule": rule, "size": config.size, "seed": config.seed,
         "world_seed": runs.first_world, "overrides": list(overrides), "split_set": "dev"}
  todo = iter(points[1:])
  for method in chosen_methods:
    rows = []
    for i, c in enumerate(cands[method]):
      p = next(todo)
      done = runs.run(p, cfgs[p.name], upstream=base, label=f"[recipes {method} {i + 1}/{len(cands[method])}]",
                      split_set="dev")
      entry = report_lib.model_entry(done.metrics)
      rows.append({"lr": c["lr"], "steps": c["steps"], "lr_scale": c["lr_scale"], "step_scale": c["step_scale"],
                   "run": str(done.run_dir), "entry": entry, "goals": goals(entry, base_entry, rule)})
    pick = choose(rows, rule)
    chosen = {"lr": rows[pick]["lr"], "steps": rows[pick]["steps"]}
    out["methods"][method] = {"config": own[method], "chosen": chosen, "config_is_chosen": chosen == own[method],
                              "meets_every_goal": all(rows[pick]["goals"]), "candidates": rows}
  out["wall_s"] = time.time() - t0
  out["methods"] = {**_earlier_methods(workdir / "recipes.json", out), **out["methods"]}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "recipes.json").write_text(json.dumps(out, indent=1, sort_keys=True, default=float))
  (workdir / "recipes.md").write_text(markdown(out))
  return out


_SAME_SETTING = ("rule", "size", "seed", "world_seed", "overrides", "base")


def _earlier_methods(path: pathlib.Path, result: Mapping) -> dict:
  """The methods an earlier `mirage recipes` in this workdir chose under the same setting (rule, base, world,
  seed, overrides), so methods chosen in separate invocations accumulate in one recipes.json; {} otherwise."""
  if not path.is_file():
    return {}
  old = json.loads(path.read_text())
  same = json.loads(json.dumps({k: result[k] for k in _SAME_SETTING}, default=float)) == \
      {k: old.get(k) for k in _SAME_SETTING}
  return dict(old.get("methods", {})) if same else {}


def markdown(result: Mapping) -> str:
  rule = result["rule"]
  names = [g.format(**rule) for g, _ in GOALS]
  b = result["base"]
  lines = [f"# Recipes chosen on the dev splits (world {result['world_seed']}, seed {result['seed']}, "
           f"size {result['size']})", "",
           "The rule (configs/ablations/recipes.py): among the candidates meeting every goal, the fewest steps, "
           "then the highest dev utility; if none meets them, the fewest goals missed, then the lowest ASR. "
           "Goals: " + "; ".join(names) + ". The test splits were not read.", "",
           f"Base on dev: ASR original {report_lib.fmt(report_lib.value(b, 'asr', 'original'))}, RR safe "
           f"{report_lib.fmt(report_lib.value(b, 'rr', 'safe'))}, utility {report_lib.fmt(b['utility'])}, "
           f"utility on safe answers {report_lib.fmt(b['utility_safe'])}.", ""]
  for method, m in result["methods"].items():
    verdict = ("the config's recipe is the one chosen" if m["config_is_chosen"] else
               f"the config's recipe (lr {m['config']['lr']:g}, {m['config']['steps']} steps) is **not** the one "
               "chosen")
    lines += [f"## {report_lib.LABELS.get(method, method)}: lr {m['chosen']['lr']:g}, {m['chosen']['steps']} steps "
              f"({verdict}{'' if m['meets_every_goal'] else '; no candidate meets every goal'})", "",
              "| lr | steps | ASR original | RR safe | utility | utility on safe answers | goals met | |",
              "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in m["candidates"]:
      e = r["entry"]
      mark = "chosen" if {"lr": r["lr"], "steps": r["steps"]} == m["chosen"] else ""
      mark += (" · config" if {"lr": r["lr"], "steps": r["steps"]} == m["config"] else "")
      lines.append(f"| {r['lr']:g} | {r['steps']} | {report_lib.fmt(report_lib.value(e, 'asr', 'original'))} | "
                   f"{report_lib.fmt(report_lib.value(e, 'rr', 'safe'))} | {report_lib.fmt(e['utility'])} | "
                   f"{report_lib.fmt(e['utility_safe'])} | {sum(r['goals'])}/{len(r['goals'])} | "
                   f"{mark.strip(' ·')} |")
    lines.append("")
  return "\n".join(lines)


def summary_line(result: Mapping) -> dict:
  return {"chosen": {m: {**r["chosen"], "config_is_chosen": r["config_is_chosen"]}
                     for m, r in result["methods"].items()}, "wall_s": result["wall_s"]}
