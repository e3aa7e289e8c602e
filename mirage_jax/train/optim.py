"""Optimizer from config: AdamW with linear warmup + cosine (or constant) schedule, global-norm clipping,
and trainable subsets.

Which parameters train is config, never code:
  optim.frozen          comma-separated regexes (full match on paths like `decoder/layers/mlp/down/kernel`)
  optim.trainable       if set, only matching parameters train (everything else is frozen)
  optim.decoder_layers  "" (all), "5:8" or "5,6,7": stacked decoder-layer parameters update only in these
                        layers (RMU's "MLPs of layers l-2..l")
With LoRA (`config.lora`), `params` is the trainable tree (adapters, projector) and the same rules select
within it: an adapter answers to its own path and to its kernel's, RMU's layers restrict the adapters of those
layers, and a regex may name base parameters only.
Frozen leaves go through `optax.set_to_zero` inside `optax.multi_transform` (no optimizer state, no update,
weight decay included). Layers are stacked along a leading axis, so a layer restriction selects slices of a
leaf: gradients are masked before AdamW and updates after it, so frozen slices stay bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mirage_configs import comma_list
from mirage_jax.errors import ConfigError

FROZEN, TRAIN = "frozen", "train"
DECODER_LAYERS = "decoder/layers/"


def path_str(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def compile_patterns(spec: str, *, what: str) -> list[re.Pattern]:
  """Comma-separated regexes (full match against parameter paths)."""
  out = []
  for p in comma_list(spec):
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ConfigError(f"{what}: bad regex {p!r}: {e}") from None
  return out


def _paths(params: Any) -> list[str]:
  return sorted(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def _names(name: str) -> tuple[str, ...]:
  """The paths a leaf answers to: its own, and for a LoRA adapter (`.../q/lora_a`) its kernel's
  (`.../q/kernel`), so `optim.trainable=decoder/layers/mlp/down/kernel` trains those kernels' adapters."""
  stem, _, leaf = name.rpartition("/")
  return (name, f"{stem}/kernel") if leaf in ("lora_a", "lora_b") else (name,)


def label_tree(params: Any, optim: Mapping, *, universe: Any = None) -> Any:
  """"frozen"/"train" per leaf from `optim.frozen` / `optim.trainable`; every regex must match something in
  `params`, or in `universe` when given (LoRA: the whole model, of which `params` is the trainable part)."""
  frozen = compile_patterns(optim.get("frozen", ""), what="optim.frozen")
  trainable = compile_patterns(optim.get("trainable", ""), what="optim.trainable")
  hits = {("optim.frozen", p.pattern): 0 for p in frozen} | {("optim.trainable", p.pattern): 0 for p in trainable}

  def label(path, _):
    names = _names(path_str(path))
    matched = [p for p in trainable if any(p.fullmatch(n) for n in names)]
    for p in matched:
      hits[("optim.trainable", p.pattern)] += 1
    out = FROZEN if trainable and not matched else TRAIN
    for p in frozen:
      if any(p.fullmatch(n) for n in names):
        hits[("optim.frozen", p.pattern)] += 1
        out = FROZEN
    return out

  labels = jax.tree_util.tree_map_with_path(label, params)
  if universe is not None:  # a pattern naming only frozen (base) parameters is fine
    names = _paths(universe)
    for (key, pat) in hits:
      rx = re.compile(pat)
      hits[(key, pat)] += sum(1 for n in names if rx.fullmatch(n))
  unused = [f"{key}: {pat!r}" for (key, pat), n in hits.items() if not n]
  if unused:
    raise ConfigError(f"{'; '.join(unused)} matches no parameter; parameter paths look like "
                     f"{', '.join(_paths(params if universe is None else universe)[:6])}, ...")
  return labels


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
  """"" -> every layer; "a:b" -> range(a, b); "i,j,k" -> those; all checked against `num_layers`."""
  spec = spec.strip()
  if not spec:
    return tuple(range(num_layers))
  try:
    if ":" in spec:
      a, b = spec.split(":")
      layers = tuple(range(int(a), int(b)))
    else:
      layers = tuple(int(x) for x in comma_list(spec))
  except ValueError:
    raise ConfigError(f"optim.decoder_layers={spec!r}: use 'a:b' or 'i,j,k'") from None
  bad = [l for l in layers if not 0 <= l < num_layers]
  if bad or not layers:
    raise ConfigError(f"optim.decoder_layers={spec!r}: layers {bad or '(none)'} outside the decoder's "
                     f"{num_layers} layers")
  return layers


def layer_masks(params: Any, spec: str) -> Any | None:
  """Per-leaf 0/1 masks broadcastable to the leaf (None when every layer trains)."""
  stacked = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if path_str(p).startswith(DECODER_LAYERS)]
  if not spec.strip() or not stacked:
    return None
  num_layers = stacked[0][1].shape[0]
  keep = np.zeros((num_layers,), np.float32)
  keep[list(parse_layers(spec, num_layers))] = 1.0

  def mask(path, leaf):
    if not path_str(path).startswith(DECODER_LAYERS):
      return np.ones((), np.float32)
    return keep.reshape((num_layers,) + (1,) * (len(leaf.shape) - 1))

  return jax.tree_util.tree_map_with_path(mask, params)


class _Empty(NamedTuple):
  pass


def masked_updates(masks: Any) -> optax.GradientTransformation:
  """Multiply updates (or gradients) by constant per-leaf masks."""

  def update(updates, state, params=None):
    del params
    # Inside multi_transform the other group's leaves are MaskedNodes: pass them through.
    apply = lambda u, m: u if isinstance(u, optax.MaskedNode) else u * jnp.asarray(m, u.dtype)  # noqa: E731
    return jax.tree.map(apply, updates, masks, is_leaf=lambda x: isinstance(x, optax.MaskedNode)), state

  return optax.GradientTransformation(lambda _: _Empty(), update)


def schedule(optim: Mapping, total_steps: int) -> optax.Schedule:
  lr, warmup = float(optim["lr"]), int(optim["warmup_steps"])
  kind = optim.get("schedule", "cosine")
  if kind == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
                                [warmup])
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1),
                                              end_value=lr * float(optim.get("end_lr_ratio", 0.0)))
  raise ConfigError(f"unknown optim.schedule {kind!r}; valid: cosine, constant")


def make_optimizer(optim: Mapping, total_steps: int, params: Any, *,
                   universe: Any = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  sched = schedule(optim, total_steps)
  inner = [
      optax.clip_by_global_norm(float(optim["clip_norm"])) if optim.get("clip_norm") else optax.identity(),
      optax.adamw(sched, b1=float(optim["b1"]), b2=float(optim["b2"]), eps=float(optim["eps"]),
                  weight_decay=float(optim["weight_decay"])),
  ]
  masks = layer_masks(params, optim.get("decoder_layers", ""))
  if masks is not None:
    inner = [masked_updates(masks), *inner, masked_updates(masks)]
  tx = optax.multi_transform({TRAIN: optax.chain(*inner), FROZEN: optax.set_to_zero()},
                             label_tree(params, optim, universe=universe))
  return tx, sched


def trainable_count(params: Any, optim: Mapping, *, universe: Any = None) -> int:
  """Parameters that receive updates (layer restrictions counted by slice)."""
  labels = jax.tree.leaves(label_tree(params, optim, universe=universe))
  masks = layer_masks(params, optim.get("decoder_layers", ""))
  masks = jax.tree.leaves(masks) if masks is not None else [np.ones(())] * len(labels)

  def count(shape, mask) -> int:  # a mask varies along the leading (layer) axis only
    size = int(np.prod(shape, dtype=np.int64))
    return size if mask.ndim == 0 else size // mask.shape[0] * int(np.sum(mask))

  return sum(count(p.shape, np.asarray(m)) for p, l, m in zip(jax.tree.leaves(params), labels, masks) if l == TRAIN)


def trainable_layers(params: Any, optim: Mapping, *, universe: Any = None) -> list[int]:
  """Sorted 0-based decoder layers in which some stacked decoder parameter updates (all when none is frozen)."""
  labels = label_tree(params, optim, universe=universe)
  stacked = [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
             if path_str(p).startswith(DECODER_LAYERS)]
  if not stacked:
    return []
  trains = {path_str(p) for p, l in jax.tree_util.tree_flatten_with_path(labels)[0] if l == TRAIN}
  if not any(name in trains for name, _ in stacked):
    return []
  return sorted(parse_layers(optim.get("decoder_layers", ""), stacked[0][1].shape[0]))


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
