"""Ablation sweeps. Each `configs/ablations/<name>.py` has `get_config(arg)` (the sweep's knobs, overridable
with `--config.x=y` on `mirage sweep`) and `sweep(config)` returning its points, dicts with the keys

  name       the run's name (its directory under the sweep's workdir)
  config     a training config spec, e.g. "configs/unlearn/npo.py:tiny"
  overrides  `--config.x=y` overrides of that config
  init_from  the name of the point whose run initialises this one ("" = none)
  labels     size, method, seed, variant and any hyper-parameter (columns of `mirage report`)

`mirage_jax.commands.sweep` checks them and turns them into commands (`mirage sweep`), or runs them in-process
(`mirage demo --ablations` runs `world.py`). The helpers here build the usual grid: one base run per (size,
seed), every method initialised from it (as `mirage demo` does). Methods come from `mirage_configs.methods`.
Pure data: no jax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ml_collections

from mirage_configs import comma_list, methods, models

SIZES = (*models.TINY_VARIANTS, *(s for s in models.SIZES if s not in models.TINY_VARIANTS))


def sweep_config(**knobs) -> ml_collections.ConfigDict:
  """A sweep's knobs: `sizes`, `methods`, `seeds` (comma lists) and `overrides` (space-separated `key=value`
  applied to every run, e.g. "total_steps=4 eval.max_new_tokens=4"), plus the sweep's own `knobs`."""
  c = ml_collections.ConfigDict(dict(sizes="tiny", methods="sft_posthoc,npo,rmu", seeds="0", overrides=""))
  c.update(knobs)
  c.lock()
  return c


def knob_list(config: ml_collections.ConfigDict, key: str, valid: Sequence[str] = ()) -> list[str]:
  """`config[key]` ("a,b", `mirage_configs.comma_list`) as a list; empty or a value outside `valid` is an error."""
  items = comma_list(config[key])
  if not items:
    raise ValueError(f"sweep config: {key} is empty")
  bad = [x for x in items if valid and x not in valid]
  if bad:
    raise ValueError(f"sweep config: {key} has unknown {bad}; valid: {', '.join(valid)}")
  return items


def seeds(config: ml_collections.ConfigDict) -> list[int]:
  try:
    return [int(s) for s in knob_list(config, "seeds")]
  except ValueError as e:
    raise ValueError(f"sweep config: seeds must be comma-separated integers, got {config.seeds!r}") from e


def point(method: str, size: str, seed: int, *, overrides: Sequence[str] = (), tag: str = "",
          init_from: str = "", **labels) -> dict:
  """One run of `method` at `size` (a row of SIZES or a tiny variant) and `seed`; `tag` names a variant
  (`npo-beta0.1-tiny-s0`) and is its `variant` label."""
  if size in models.TINY_VARIANTS:
    spec, size_overrides = f"{methods.BY_NAME[method].config}:tiny", models.variant_overrides(size)
  else:
    spec, size_overrides = f"{methods.BY_NAME[method].config}:{size}", []
  name = "-".join(p for p in (method, tag, size, f"s{seed}") if p)
  return dict(name=name, config=spec, overrides=[*size_overrides, f"--config.seed={seed}", *overrides],
              init_from=init_from, labels=dict(size=size, method=method, seed=seed, variant=tag, **labels))


def grid(config: ml_collections.ConfigDict, variants: Mapping[str, Sequence[str]] | None = None) -> list[dict]:
  """Base per (size, seed), then every method of `config.methods` from it; with `variants` ({tag:
  overrides}), every method run once per variant (a hyper-parameter sweep)."""
  chosen = knob_list(config, "methods", methods.FROM_BASE)
  points = []
  for size in knob_list(config, "sizes", SIZES):
    for seed in seeds(config):
      base = point(methods.BASE, size, seed)
      points.append(base)
      for method in chosen:
        for tag, overrides in (variants or {"": ()}).items():
          points.append(point(method, size, seed, overrides=overrides, tag=tag, init_from=base["name"]))
  return points
