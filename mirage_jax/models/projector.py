"""LLaVA-1.5 `mlp2x_gelu` projector: Linear(vision width -> D) -> GELU -> Linear(D -> D)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from mirage_jax.models import layers


class Projector(nnx.Module):
  def __init__(self, vision_width: int, width: int, *, act: str, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    # Column- then row-parallel over the `mlp` (tensor) axis.
    self.linear_1 = layers.Dense((vision_width,), (width,), ("vit_embed", "mlp"), **kw)
    self.linear_2 = layers.Dense((width,), (width,), ("mlp", "embed"), **kw)
    self.act = layers.activation(act)

  def __call__(self, x_bpw: jax.Array) -> jax.Array:
    return self.linear_2(self.act(self.linear_1(x_bpw)))
