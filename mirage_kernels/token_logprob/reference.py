"""The oracle: materialise float32 logits [N, V], then log-softmax and gather. Differentiated by JAX itself.

`label_logprob` is the one log-softmax-at-labels gather (every caller in `mirage_jax` uses it too).

Also the tile math every fused implementation shares (plain jnp, so it runs inside Pallas kernels too):
`tile_logsumexp` / `merge_logsumexp` (the online logsumexp over vocabulary tiles) and `dlogits` (the gradient
of the outputs with respect to the logits of a tile, which the backward passes recompute).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def logits(h_nd: Array, w_dv: Array) -> Array:
  """float32 [N, V] logits (the matmul accumulates in float32 whatever the input dtype)."""
  return jax.lax.dot_general(h_nd, w_dv, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def label_logprob(logits: Array, labels: Array) -> Array:
  """log_softmax(logits)[label] over the last axis (any leading shape); 0 where label < 0, with no gradient
  there. The one per-token gather of the project: the oracle below, `mirage_jax`'s reference loss path and
  its teacher-forced scoring all call it."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  index = jnp.maximum(labels, 0)
  if _vocab_split_explicitly(logp):
    # A gather from a vocabulary split over an explicit mesh axis has no unambiguous output sharding: pick
    # by mask instead (the same value exactly: one term, the rest zeros; the oracle holds [N, V] anyway).
    hit = jnp.arange(logp.shape[-1], dtype=index.dtype) == index[..., None]
    picked = jnp.sum(jnp.where(hit, logp, 0.0), axis=-1)
  else:
    picked = jnp.take_along_axis(logp, index[..., None], axis=-1)[..., 0]
  return jnp.where(labels >= 0, picked, 0.0)


def _vocab_split_explicitly(x: Array) -> bool:
  """Whether `x`'s type carries a sharding of its last axis (a mesh axis in Explicit mode)."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec is not None and len(spec) == x.ndim and spec[-1] is not None


def token_logprob_and_lse(h_nd: Array, w_dv: Array, labels_n: Array) -> tuple[Array, Array]:
  """(logp [N], lse [N]) in float32; logp is 0 where label < 0 (and carries no gradient there)."""
  logits_nv = logits(h_nd, w_dv)
  return label_logprob(logits_nv, labels_n), jax.nn.logsumexp(logits_nv, axis=-1)


def tile_logsumexp(logits_nv: Array) -> Array:
  """logsumexp over the last axis of a tile whose masked columns are -inf (at least one is finite)."""
  m_n = jnp.max(logits_nv, axis=-1)
  return m_n + jnp.log(jnp.sum(jnp.exp(logits_nv - m_n[:, None]), axis=-1))


def merge_logsumexp(a_n: Array, b_n: Array) -> Array:
  """log(exp(a) + exp(b)) where `a` may be -inf (the running value before the first tile)."""
  m_n = jnp.maximum(a_n, b_n)
  return m_n + jnp.log(jnp.exp(a_n - m_n) + jnp.exp(b_n - m_n))


def dlogits(logits_nv: Array, onehot_nv: Array, lse_n: Array, g_logp_n: Array, g_lse_n: Array) -> Array:
  """d(sum g_logp * logp + sum g_lse * lse) / d logits, with g_logp already 0 where the label is ignored.

  d logp / d logits = onehot - softmax and d lse / d logits = softmax, so the gradient is
  g_logp * onehot + (g_lse - g_logp) * softmax. Logits of masked columns are -inf (softmax 0).
  """
  p_nv = jnp.exp(logits_nv - lse_n[:, None])
  return (g_lse_n - g_logp_n)[:, None] * p_nv + jnp.where(onehot_nv, g_logp_n[:, None], 0.0)
