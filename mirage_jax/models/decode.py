"""Batched greedy decoding with a fixed-size KV cache, under `jax.jit`.

Prompts are left-padded to a common length Tp (`mirage_jax.data.preprocess` does this), so every row's next
token goes to the same cache slot Tp + i; RoPE positions come from each row's own token count. One prefill
pass fills the cache [L, B, Tp + max_new, K, E]; a `lax.while_loop` then feeds one token per step and stops
when every row has emitted EOS (or after `max_new_tokens`). Tokens after a row's EOS are `pad_id`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mirage_jax.models.vlm import VLM, causal_mask, positions_from_mask

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  max_new_tokens: int
  eos_id: int
  pad_id: int


def _greedy(model: VLM, logits_bv: Array) -> Array:
  """Argmax over the vocabulary, never the `<image>` token (it would stand for image features)."""
  return jnp.argmax(logits_bv.at[:, model.cfg.image_token_id].set(-jnp.inf), axis=-1)


def generate(model: VLM, *, prompts: Mapping[str, Array], config: GenerateConfig) -> Array:
  """Greedy continuation [B, max_new_tokens] of left-padded `prompts` (tokens, mask, images)."""
  tokens_bt, mask_bt = prompts["tokens"], prompts["mask"].astype(bool)
  b, tp = tokens_bt.shape
  n = config.max_new_tokens
  dec = model.decoder
  pre = dec(model.embed(prompts), mask_bts=causal_mask(mask_bt), positions_bt=positions_from_mask(mask_bt),
            return_cache=True)
  pad = ((0, 0), (0, 0), (0, n), (0, 0), (0, 0))
  cache = jax.tree.map(lambda a: jnp.pad(a, pad), pre.cache)
  first_b = _greedy(model, dec.logits(pre.hidden_btd[:, -1:])[:, 0]).astype(tokens_bt.dtype)
  key_valid_bs = jnp.concatenate([mask_bt, jnp.zeros((b, n), bool)], axis=1)
  lengths_b = mask_bt.sum(-1)

  def cond(carry):
    i, _, _, _, _, done_b = carry
    return (i < n) & ~jnp.all(done_b)

  def body(carry):
    i, tok_b, cache, key_valid_bs, out_bn, done_b = carry
    out_bn = out_bn.at[:, i].set(jnp.where(done_b, config.pad_id, tok_b))
    done_b = done_b | (tok_b == config.eos_id)
    key_valid_bs = key_valid_bs.at[:, tp + i].set(True)
    step = dec(dec.embed_tokens(tok_b[:, None]), mask_bts=key_valid_bs[:, None, :],
               positions_bt=(lengths_b + i)[:, None], cache=cache, cache_index=tp + i)
    next_b = _greedy(model, dec.logits(step.hidden_btd)[:, 0]).astype(tok_b.dtype)
    return i + 1, next_b, step.cache, key_valid_bs, out_bn, done_b

  init = (jnp.int32(0), first_b, cache, key_valid_bs, jnp.full((b, n), config.pad_id, tokens_bt.dtype),
          jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, init)[4]


def generate_by_full_forward(model: VLM, *, prompts: Mapping[str, Array], config: GenerateConfig) -> Array:
  """Reference decoder without a cache: one full forward per new token (tests compare against it)."""
  tokens_bt, mask_bt = prompts["tokens"], prompts["mask"].astype(jnp.int32)
  b = tokens_bt.shape[0]
  out_bn = jnp.full((b, config.max_new_tokens), config.pad_id, tokens_bt.dtype)
  done_b = jnp.zeros((b,), bool)
  for i in range(config.max_new_tokens):
    h = model({"tokens": tokens_bt, "mask": mask_bt, "images": prompts["images"]}).hidden_btd
    tok_b = _greedy(model, model.logits(h[:, -1:])[:, 0]).astype(tokens_bt.dtype)
    out_bn = out_bn.at[:, i].set(jnp.where(done_b, config.pad_id, tok_b))
    done_b = done_b | (tok_b == config.eos_id)
    tokens_bt = jnp.concatenate([tokens_bt, tok_b[:, None]], axis=1)
    mask_bt = jnp.concatenate([mask_bt, jnp.ones((b, 1), jnp.int32)], axis=1)
  return out_bn
