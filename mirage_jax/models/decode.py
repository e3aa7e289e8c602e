"""Batched decoding with a fixed-size KV cache, under `jax.jit`: greedy, or sampled (temperature, top-p).

Prompts are left-padded to a common length Tp (`mirage_jax.data.preprocess` does this), so every row's next
token goes to the same cache slot Tp + i; RoPE positions come from each row's own token count. One prefill
pass fills the cache [L, B, Tp + max_new, K, E]; a `lax.while_loop` then feeds one token per step and stops
when every row has emitted EOS (or after `max_new_tokens`). Tokens after a row's EOS are `pad_id`.

`temperature` 0 (the default) is greedy argmax and needs no key. `temperature` > 0 samples each row from
softmax(logits / temperature) restricted to the nucleus (`top_p`: the smallest set of most likely tokens whose
probability reaches top_p; top_p = 1 is the whole vocabulary) with the row's own PRNG key `keys_b[r]`, folded
with the step index, so a row's tokens depend only on its key and prompt, not on the other rows of the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mirage_jax.errors import ConfigError
from mirage_jax.models.vlm import VLM, causal_mask, positions_from_mask

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  max_new_tokens: int
  eos_id: int
  pad_id: int
  temperature: float = 0.0  # 0: greedy; > 0: sample (needs `keys_b`)
  top_p: float = 1.0  # nucleus sampling mass (1: the whole vocabulary); only when sampling
  # Slice the decoder's stacked weights into per-layer arrays once, before the token loop
  # (`Decoder.unstacked_blocks`): XLA:CPU otherwise copies every layer's weights out of the stack on every
  # token (37 % of a `small` decode's op time). It costs one extra copy of the decoder's weights, which TPU
  # and GPU, whose matmuls read the stack's slice in place, do not need. None: only when jax's default
  # backend is the CPU.
  unstack_layers: bool | None = None

  def __post_init__(self):
    if not self.temperature >= 0.0:
      raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")

  @property
  def sampling(self) -> bool:
    return self.temperature > 0.0

  @property
  def unstack(self) -> bool:
    return jax.default_backend() == "cpu" if self.unstack_layers is None else self.unstack_layers


def _greedy(model: VLM, logits_bv: Array) -> Array:
  """Argmax over the vocabulary, never the `<image>` token (it would stand for image features)."""
  return jnp.argmax(logits_bv.at[:, model.cfg.image_token_id].set(-jnp.inf), axis=-1)


def nucleus_logits(logits_bv: Array, top_p: float) -> Array:
  """`logits_bv` with every token outside the nucleus set to -inf: the most likely tokens whose probability
  mass before them is below `top_p` (the most likely token is always kept; ties at the cut are kept)."""
  if top_p >= 1.0:
    return logits_bv
  sorted_bv = jnp.flip(jnp.sort(logits_bv, axis=-1), axis=-1)
  probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
  before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
  cutoff_b = jnp.min(jnp.where(before_bv < top_p, sorted_bv, jnp.inf), axis=-1)
  return jnp.where(logits_bv >= cutoff_b[:, None], logits_bv, -jnp.inf)


def _sample(model: VLM, logits_bv: Array, keys_b: Array, step, config: GenerateConfig) -> Array:
  """One token per row from softmax(logits / temperature) within the top-p nucleus, never `<image>`."""
  logits_bv = logits_bv.astype(jnp.float32).at[:, model.cfg.image_token_id].set(-jnp.inf) / config.temperature
  logits_bv = nucleus_logits(logits_bv, config.top_p)
  step_keys_b = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_b, step)
  return jax.vmap(jax.random.categorical)(step_keys_b, logits_bv)


def row_keys(seed: Array | int, ids_b2: Array) -> Array:
  """A PRNG key per row from one seed and two integers per row (e.g. query hash, candidate index)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda a, b: jax.random.fold_in(jax.random.fold_in(base, a), b))(ids_b2[:, 0], ids_b2[:, 1])


def generate(model: VLM, *, prompts: Mapping[str, Array], config: GenerateConfig,
             keys_b: Array | None = None) -> Array:
  """Continuation [B, max_new_tokens] of left-padded `prompts` (tokens, mask, images): greedy, or sampled
  with one PRNG key per row (`keys_b` [B], typed keys) when `config.temperature` > 0."""
  if config.sampling:
    if keys_b is None:
      raise ConfigError(f"temperature={config.temperature} samples: generate needs keys_b (one key per row)")
    pick = lambda logits_bv, step: _sample(model, logits_bv, keys_b, step, config)  # noqa: E731
  else:  # greedy: exactly the argmax program (no key, no step)
    pick = lambda logits_bv, step: _greedy(model, logits_bv)  # noqa: E731
  tokens_bt, mask_bt = prompts["tokens"], prompts["mask"].astype(bool)
  b, tp = tokens_bt.shape
  n = config.max_new_tokens
  dec = model.decoder
  pre, cache = _prefill(model, prompts, room=n)
  first_b = pick(dec.logits(pre.hidden_btd[:, -1:])[:, 0], n).astype(tokens_bt.dtype)  # step n: the first token
  key_valid_bs = jnp.concatenate([mask_bt, jnp.zeros((b, n), bool)], axis=1)
  lengths_b = mask_bt.sum(-1)
  blocks = dec.unstacked_blocks() if config.unstack else None

  def cond(carry):
    i, _, _, _, _, done_b = carry
    return (i < n) & ~jnp.all(done_b)

  def body(carry):
    i, tok_b, cache, key_valid_bs, out_bn, done_b = carry
    out_bn = out_bn.at[:, i].set(jnp.where(done_b, config.pad_id, tok_b))
    done_b = done_b | (tok_b == config.eos_id)
    key_valid_bs = key_valid_bs.at[:, tp + i].set(True)
    step = dec(dec.embed_tokens(tok_b[:, None]), mask_bts=key_valid_bs[:, None, :],
               positions_bt=(lengths_b + i)[:, None], cache=cache, cache_index=tp + i, blocks=blocks)
    next_b = pick(dec.logits(step.hidden_btd)[:, 0], i).astype(tok_b.dtype)  # step i: token i + 1
    return i + 1, next_b, step.cache, key_valid_bs, out_bn, done_b

  init = (jnp.int32(0), first_b, cache, key_valid_bs, jnp.full((b, n), config.pad_id, tokens_bt.dtype),
          jnp.zeros((b,), bool))
  return jax.lax.while_loop(cond, body, init)[4]


def _prefill(model: VLM, prompts: Mapping[str, Array], *, room: int):
  """One pass over the left-padded prompts: the decoder's output and its KV cache [L, B, Tp + room, K, E]
  with `room` empty slots after the prompt."""
  mask_bt = prompts["mask"].astype(bool)
  pre = model.decoder(model.embed(prompts), mask_bts=causal_mask(mask_bt),
                      positions_bt=positions_from_mask(mask_bt), return_cache=True)
  pad = ((0, 0), (0, 0), (0, room), (0, 0), (0, 0))
  return pre, jax.tree.map(lambda a: jnp.pad(a, pad), pre.cache)


def continuation_hidden(model: VLM, *, prompts: Mapping[str, Array], continuations_rm: Array) -> Array:
  """The decoder states [B, R, M, D] that predict each token of R continuations (M tokens each) after each of
  B left-padded prompts: [b, r, j] predicts continuation token j (j = 0 is the prompt's last state).

  The same numbers as a full forward over every prompt + continuation pair, but each prompt (image included)
  runs once: its KV cache is shared by the R continuations, whose first M - 1 tokens are one decode step of
  M - 1 positions."""
  mask_bt = prompts["mask"].astype(bool)
  b, tp = mask_bt.shape
  r, m = continuations_rm.shape
  pre, cache = _prefill(model, prompts, room=m - 1)
  last_b11d = pre.hidden_btd[:, None, -1:]
  if m == 1:
    return jnp.broadcast_to(last_b11d, (b, r, 1, last_b11d.shape[-1]))
  t = m - 1
  cache = jax.tree.map(lambda a: jnp.repeat(a, r, axis=1), cache)  # [L, B * R, Tp + t, K, E]
  keys_valid = jnp.repeat(mask_bt, r, axis=0)
  mask_bts = jnp.concatenate([jnp.broadcast_to(keys_valid[:, None], (b * r, t, tp)),
                              jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None], (b * r, t, t))], axis=2)
  positions_bt = jnp.repeat(mask_bt.sum(-1), r)[:, None] + jnp.arange(t)[None]
  tokens_bt = jnp.broadcast_to(continuations_rm[None, :, :t], (b, r, t)).reshape(b * r, t)
  step = model.decoder(model.decoder.embed_tokens(tokens_bt), mask_bts=mask_bts, positions_bt=positions_bt,
                       cache=cache, cache_index=tp)
  rest_brtd = step.hidden_btd.reshape(b, r, t, -1)
  return jnp.concatenate([jnp.broadcast_to(last_b11d, (b, r, 1, rest_brtd.shape[-1])), rest_brtd], axis=2)


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
