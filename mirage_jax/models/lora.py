"""LoRA (Hu et al. 2021) on `layers.Dense`: y = x W + (alpha / r) (x A) B, written once, small.

Flax NNX's `nnx.LoRA` / `nnx.LoRALinear` are 2-D (one input and one output axis) and carry no logical axis
names, and qwix intercepts dot products rather than adding named parameters; neither fits this model's Dense
layers (multi-axis kernels such as [D, H, E], stacked along `layers` by `nnx.vmap`, sharded by the logical rule
table). So the adapters are added here, after the base model is built:

  lora_a  (fan_in, r)    normal init, std 1 / sqrt(fan_in)   logical names ("lora_in", "lora_rank")
  lora_b  (r, fan_out)   zeros (the adapted model equals the base at step 0)   ("lora_rank", "lora_out")

plus the leading `layers` axis on stacked blocks (one adapter per layer slice). fan_in / fan_out are the
products of the kernel's input / output axes (a [D, H, E] query kernel gets lora_b [r, H * E]): PEFT's own 2-D
layout, and one axis long enough to split over a pod's whole fsdp axis (32 heads or 128 head_dim do not split
256 ways; 4,096 does). `sharding.LOGICAL_RULES` puts "lora_in" / "lora_out" over tensor x fsdp (tensor major,
so that after the fsdp all-gather an adapter's output is split over tensor as its kernel's heads / mlp are).

A Dense is targeted when its kernel path (`decoder/layers/attn/q/kernel`, the same strings as
`optim.trainable`) fully matches one of the `lora.targets` regexes; a regex that matches no Dense kernel is a
ConfigError. Adding the adapters last (from keys drawn after every base parameter) leaves the base parameters
exactly those of the same seed without LoRA.

Parameter trees are pure nested dicts (`nnx.to_pure_dict`). With LoRA on, a run's tree splits into
  base       every parameter but the adapters (frozen; the reference / frozen model of NPO and RMU)
  trainable  the adapters, plus the projector with `lora.train_projector`
and `combine(base, trainable)` is the full tree the adapted model is merged from.
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax.errors import ConfigError
from mirage_jax.models import layers
from mirage_jax.models.config import LoRAConfig

Array = jax.Array
ADAPTERS = ("lora_a", "lora_b")
PROJECTOR = "projector"
RANK = "lora_rank"  # logical axis of the rank dimension (no mesh axis: sharding.LOGICAL_RULES)
IN, OUT = "lora_in", "lora_out"  # logical axes of the flattened fan-in / fan-out


def _path(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def dense_layers(model: nnx.Module) -> dict[str, layers.Dense]:
  """Every `layers.Dense` of `model` by its kernel's parameter path (`decoder/layers/mlp/up/kernel`)."""
  return {f"{_path(p)}/kernel": m for p, m in nnx.iter_modules(model) if isinstance(m, layers.Dense)}


def targeted(model: nnx.Module, targets: tuple[str, ...]) -> dict[str, layers.Dense]:
  """The Dense layers whose kernel path fully matches a target regex; an unmatched regex is a ConfigError."""
  dense = dense_layers(model)
  out = {}
  for pattern in targets:
    try:
      rx = re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"lora.targets: bad regex {pattern!r}: {e}") from None
    hits = {p: m for p, m in dense.items() if rx.fullmatch(p)}
    if not hits:
      raise ConfigError(f"lora.targets: {pattern!r} matches no Dense kernel; kernel paths look like "
                        f"{', '.join(sorted(dense)[:4])}, ...")
    out.update(hits)
  return dict(sorted(out.items()))


def add_adapters(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> None:
  """Give every targeted Dense of `model` a `lora_a` / `lora_b` pair (see the module docstring)."""
  for path, dense in targeted(model, cfg.targets).items():
    kernel = dense.kernel
    names = tuple(kernel.get_metadata()["out_sharding"])
    lead = 1 if names[0] == "layers" else 0  # stacked by `layers.stacked`
    n_in = dense.in_ndim
    ins, outs = kernel.shape[lead:lead + n_in], kernel.shape[lead + n_in:]
    head, stack = names[:lead], kernel.shape[:lead]
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    std = 1.0 / math.sqrt(fan_in)
    dtype = kernel.dtype
    dense.lora_a = layers.param(rngs, nnx.initializers.normal(std), (*stack, fan_in, cfg.rank),
                                (*head, IN, RANK), dtype)
    dense.lora_b = layers.param(rngs, nnx.initializers.zeros_init(), (*stack, cfg.rank, fan_out),
                                (*head, RANK, OUT), dtype)
    dense.lora_scale = cfg.scale
    dense.lora_dropout = cfg.dropout  # applied only inside `layers.dropout_key` (the train step)
    dense.lora_id = layers.path_id(path)


def is_adapter(path: str) -> bool:
  return path.rsplit("/", 1)[-1] in ADAPTERS


def _flat(tree: Any) -> dict[str, Any]:
  return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _filter(tree: Any, keep) -> dict:
  def walk(node, prefix):
    if not isinstance(node, dict):
      return node if keep(prefix) else None
    out = {}
    for k, v in node.items():
      sub = walk(v, f"{prefix}/{k}" if prefix else str(k))
      if sub is not None and not (isinstance(sub, dict) and not sub):
        out[k] = sub
    return out

  return walk(tree, "")


def base_part(params: Any) -> dict:
  """Every parameter but the adapters."""
  return _filter(params, lambda p: not is_adapter(p))


def adapter_part(params: Any) -> dict:
  """The adapters only."""
  return _filter(params, is_adapter)


def trainable_part(params: Any, cfg: LoRAConfig) -> dict:
  """The adapters (and the projector with `train_projector`): what trains with LoRA on."""
  return _filter(params, lambda p: is_adapter(p) or (cfg.train_projector and p.startswith(PROJECTOR + "/")))


def combine(base: Any, trainable: Any) -> dict:
  """The full tree: `base` with `trainable`'s leaves added (adapters) or replacing (a trained projector)."""
  if not isinstance(trainable, dict):
    return trainable
  out = dict(base) if isinstance(base, dict) else {}
  for k, v in trainable.items():
    out[k] = combine(out.get(k, {}), v)
  return out


def delta(lora_a: Array, lora_b: Array, kernel_shape: tuple[int, ...], scale: float) -> Array:
  """scale * A @ B ([*stack, fan_in, r] @ [*stack, r, fan_out], float32), reshaped to the kernel's shape."""
  a = jnp.asarray(lora_a).astype(jnp.float32)
  b = jnp.asarray(lora_b).astype(jnp.float32)
  return (scale * jnp.matmul(a, b)).reshape(kernel_shape)


def merge_adapters(params: Any, *, scale: float) -> dict:
  """A full tree (base + adapters) -> the base tree with W + scale * A @ B in every adapted kernel."""
  flat = _flat(params)
  out = {}
  for path, x in flat.items():
    if is_adapter(path):
      continue
    stem = path.rsplit("/", 1)[0]
    if path.endswith("/kernel") and f"{stem}/lora_a" in flat:
      d = delta(flat[f"{stem}/lora_a"], flat[f"{stem}/lora_b"], x.shape, scale)
      x = (x.astype(jnp.float32) + d).astype(x.dtype)
    out[path] = x
  return jax.tree_util.tree_map_with_path(lambda p, _: out[_path(p)], base_part(params))
