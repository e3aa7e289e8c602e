"""LLaMA-style decoder: token embedding, RMSNorm, RoPE, SwiGLU MLP, grouped-query attention, untied LM head.

Blocks are created stacked and applied with `lax.scan` (`layers.run_stack`). The scan can be split at any
layer: `collect` returns the residual stream after the requested blocks (RMU's hidden state after layer l)
and `stop_after` ends the forward there (RMU's forget batch needs nothing later). The training path returns
final hidden states, never logits: log-probs are computed by `mirage_jax.losses.logprob` from `hidden` and
`head_weight()`, so a fused kernel can avoid materialising [tokens x vocab]. `logits()` is for eval/decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax import sharding
from mirage_jax.models import layers
from mirage_jax.models.config import TextConfig

Array = jax.Array
_ACT = ("batch", "length", "act_embed")


class DecoderBlock(nnx.Module):
  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.rope_theta = cfg.rope_theta
    self.attn_norm = layers.RMSNorm(cfg.width, eps=cfg.rms_norm_eps, name="norm", **kw)
    self.attn = layers.Attention(
        width=cfg.width, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        use_bias=False, names=("embed", "heads", "kv_heads", "head_dim"), **kw)
    self.mlp_norm = layers.RMSNorm(cfg.width, eps=cfg.rms_norm_eps, name="norm", **kw)
    self.mlp = SwiGLU(cfg.width, cfg.mlp_dim, **kw)

  def __call__(self, x_btd: Array, *, mask_bts: Array, positions_bt: Array) -> tuple[Array, layers.KV]:
    """The block over the whole sequence, and its keys/values [B, T, K, E] (a prefill fills a cache)."""
    h, kv = self.attn(self.attn_norm(x_btd), mask_bts=mask_bts, positions_bt=positions_bt,
                      rope_theta=self.rope_theta)
    return self._mlp(x_btd + h), kv

  def decode(self, x_btd: Array, *, mask_bts: Array, positions_bt: Array, cache: layers.KV, layer: Array,
             cache_index: Array) -> tuple[Array, layers.KV]:
    """A decode step of layer `layer`: its new keys/values are written into the stacked cache
    [L, B, S, K, E] at (layer, :, cache_index) with one `dynamic_update_slice` (in place, under a loop that
    carries the cache), then the queries attend over that layer of the cache. Returns the updated cache."""
    y_btd = self.attn_norm(x_btd)
    new = self.attn.keys_values(y_btd, positions_bt, self.rope_theta)
    cache = jax.tree.map(lambda c, n: jax.lax.dynamic_update_slice(c, n[None].astype(c.dtype),
                                                                   (layer, 0, cache_index, 0, 0)), cache, new)
    mine = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, layer, keepdims=False), cache)
    h = self.attn.attend(self.attn.queries(y_btd, positions_bt, self.rope_theta), mine, mask_bts)
    return self._mlp(x_btd + h), cache

  def _mlp(self, x_btd: Array) -> Array:
    x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
    return sharding.constrain(x_btd, _ACT)


class SwiGLU(nnx.Module):
  def __init__(self, width: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(use_bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate = layers.Dense((width,), (mlp_dim,), ("embed", "mlp"), **kw)
    self.up = layers.Dense((width,), (mlp_dim,), ("embed", "mlp"), **kw)
    self.down = layers.Dense((mlp_dim,), (width,), ("mlp", "embed"), **kw)

  def __call__(self, x_btd: Array) -> Array:
    return self.down(jax.nn.silu(self.gate(x_btd)) * self.up(x_btd))


@dataclasses.dataclass
class DecoderOutput:
  hidden_btd: Array | None  # after the final norm; None when the forward stopped early
  layers: dict[int, Array]  # residual stream after each requested block (0-based)
  cache: layers.KV | None = None  # keys/values [L, B, S, K, E] (prefill) or the updated cache (decode)


jax.tree_util.register_dataclass(DecoderOutput, data_fields=["hidden_btd", "layers", "cache"], meta_fields=[])


class Decoder(nnx.Module):
  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any, remat: str = "none",
               scan_layers: bool = True):
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.scan_layers = scan_layers
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embed = layers.param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, cfg.width),
                              ("vocab", "embed"), param_dtype)
    self.layers = layers.stacked(lambda r: DecoderBlock(cfg, rngs=r, **kw), cfg.depth, rngs)
    self.norm = layers.RMSNorm(cfg.width, eps=cfg.rms_norm_eps, name="norm", rngs=rngs, **kw)
    self.lm_head = (None if cfg.tie_embeddings else
                    layers.param(rngs, nnx.initializers.normal(0.02), (cfg.width, cfg.vocab_size),
                                 ("embed", "vocab"), param_dtype))

  def embed_tokens(self, tokens_bt: Array) -> Array:
    # All-gather the (compute-dtype) table before the lookup, as FSDP does for every weight: a gather from a
    # sharded table into a batch-sharded output makes XLA fall back to full rematerialisation and warn.
    table_vd = sharding.constrain(self.embed[...].astype(self.dtype), (None, None))
    x_btd = jnp.take(table_vd, tokens_bt, axis=0)
    return sharding.constrain(x_btd, _ACT)

  def head_weight(self) -> Array:
    """The LM head as [D, V] (the embedding transposed when tied)."""
    return self.embed[...].T if self.lm_head is None else self.lm_head[...]

  def logits(self, hidden_btd: Array) -> Array:
    """Full logits in float32 — for evaluation and decoding only."""
    return jnp.einsum("btd,dv->btv", hidden_btd, self.head_weight().astype(hidden_btd.dtype),
                      preferred_element_type=jnp.float32)

  def unstacked_blocks(self) -> list[DecoderBlock]:
    """The blocks as separate modules (`layers.unstack`): made once before a decode loop and passed to each
    step as `blocks`, so that XLA:CPU does not copy every layer's weights out of the stack on every token."""
    return layers.unstack(self.layers)

  def __call__(self, x_btd: Array, *, mask_bts: Array, positions_bt: Array, collect: tuple[int, ...] = (),
               stop_after: int | None = None, cache: layers.KV | None = None,
               cache_index: Array | None = None, return_cache: bool = False,
               blocks: list[DecoderBlock] | None = None) -> DecoderOutput:
    """Run the blocks. `return_cache` returns every layer's keys/values [L, B, T, K, E] (prefill); with
    `cache` [L, B, S, K, E] given (a decode step), the new keys/values are written at `cache_index` and the
    updated cache is returned.

    A decode step carries the cache through the layer scan (`DecoderBlock.decode`): each layer writes its
    T new positions into its slot in place and attends over its layer of the cache. (Scanned in as `xs`
    and out as `ys`, the whole cache was rewritten for every token.) With `blocks` (`unstacked_blocks`,
    a decode step only) the layers run one after the other from those modules instead of the stack."""
    depth = self.cfg.depth
    if blocks is not None and (cache is None or len(blocks) != depth):
      raise ValueError(f"blocks ({len(blocks)} given) are for a decode step (cache given) and must be the "
                       f"decoder's {depth} unstacked blocks")
    for l in (*collect, *(() if stop_after is None else (stop_after,))):
      if not 0 <= l < depth:
        raise ValueError(f"decoder layer {l} out of range: the decoder has {depth} layers (0-based)")
    if stop_after is not None and cache is not None:
      raise ValueError("stop_after and cache cannot be combined")
    end = depth if stop_after is None else stop_after + 1
    cuts = sorted({l + 1 for l in (*collect, end - 1) if l + 1 <= end} | {end})

    def body(block, x, _):
      x, kv = block(x, mask_bts=mask_bts, positions_bt=positions_bt)
      return x, (kv if return_cache else None)

    def decode_body(block, carry, _):
      x, kv, l = carry
      x, kv = block.decode(x, mask_bts=mask_bts, positions_bt=positions_bt, cache=kv, layer=l,
                           cache_index=cache_index)
      return (x, kv, l + 1), None

    collected, kvs, start = {}, [], 0
    for stop in cuts:
      if cache is None:
        x_btd, kv = layers.run_stack(self.layers, body, x_btd, start=start, stop=stop, remat=self.remat,
                                    unroll=not self.scan_layers)
        kvs.append(kv)
      elif blocks is not None:
        for l in range(start, stop):
          (x_btd, cache, _), _ = decode_body(blocks[l], (x_btd, cache, l), None)
      else:
        (x_btd, cache, _), _ = layers.run_stack(self.layers, decode_body, (x_btd, cache, jnp.int32(start)),
                                                start=start, stop=stop, remat=self.remat,
                                                unroll=not self.scan_layers)
      if stop - 1 in collect or stop - 1 == stop_after:
        collected[stop - 1] = x_btd
      start = stop
    hidden = None if stop_after is not None else self.norm(x_btd)
    if return_cache and cache is None:
      cache = jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *kvs)
    return DecoderOutput(hidden_btd=hidden, layers=collected, cache=cache)
