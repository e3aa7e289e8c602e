"""Optimizer from config: AdamW with linear warmup + cosine (or constant) schedule, global-norm clipping,
and trainable subsets chosen by regexes over parameter paths (`decoder/layers/mlp/down/kernel`).

Frozen parameters go through `optax.set_to_zero` inside `optax.multi_transform`, so they get no optimizer
state and no update (weight decay included).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import optax

FROZEN, TRAIN = "frozen", "train"


def path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def compile_patterns(spec: str, *, what: str) -> list[re.Pattern]:
  """Comma-separated regexes (full match against parameter paths)."""
  out = []
  for p in (p.strip() for p in spec.split(",")):
    if not p:
      continue
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"{what}: bad regex {p!r}: {e}") from None
  return out


def label_tree(params: Any, frozen: str) -> Any:
  """"frozen"/"train" per leaf; every frozen regex must match at least one parameter."""
  patterns = compile_patterns(frozen, what="optim.frozen")
  hits = {p.pattern: 0 for p in patterns}

  def label(path, _):
    name = path_str(path)
    for p in patterns:
      if p.fullmatch(name):
        hits[p.pattern] += 1
        return FROZEN
    return TRAIN

  labels = jax.tree_util.tree_map_with_path(label, params)
  unused = [p for p, n in hits.items() if not n]
  if unused:
    names = sorted(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    raise ValueError(f"optim.frozen regex {unused} matches no parameter; parameter paths look like "
                     f"{', '.join(names[:6])}, ...")
  return labels


def schedule(optim: Mapping, total_steps: int) -> optax.Schedule:
  lr, warmup = float(optim["lr"]), int(optim["warmup_steps"])
  kind = optim.get("schedule", "cosine")
  if kind == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                [warmup])
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                              end_value=lr * float(optim.get("end_lr_ratio", 0.0)))
  raise ValueError(f"unknown optim.schedule {kind!r}; valid: cosine, constant")


def make_optimizer(optim: Mapping, total_steps: int, params: Any) -> tuple[optax.GradientTransformation,
                                                                              optax.Schedule]:
  sched = schedule(optim, total_steps)
  inner = optax.chain(
      optax.clip_by_global_norm(float(optim["clip_norm"])) if optim.get("clip_norm") else optax.identity(),
      optax.adamw(sched, b1=float(optim["b1"]), b2=float(optim["b2"]), eps=float(optim["eps"]),
                  weight_decay=float(optim["weight_decay"])),
  )
  labels = label_tree(params, optim.get("frozen", ""))
  tx = optax.multi_transform({TRAIN: inner, FROZEN: optax.set_to_zero()}, labels)
  return tx, sched


def trainable_count(params: Any, optim: Mapping) -> int:
  labels = label_tree(params, optim.get("frozen", ""))
  return int(sum(p.size for p, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if l == TRAIN))


def state_shardings(opt_abstract: Any, param_shardings: Any, replicated: Any) -> Any:
  """Shardings of an optimizer state: a leaf whose key path ends with a parameter's path (Adam's mu/nu of
  that parameter) gets the parameter's sharding; counters and other leaves are replicated."""
  by_path = {tuple(k.key for k in path): s
             for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def pick(path, _):
    keys = tuple(getattr(k, "key", None) for k in path)
    for i in range(len(keys)):
      if keys[i:] in by_path:
        return by_path[keys[i:]]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, opt_abstract)
