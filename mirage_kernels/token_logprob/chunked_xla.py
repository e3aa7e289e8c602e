"""Chunked XLA: an online logsumexp over vocabulary tiles in `lax.fori_loop`; the backward recomputes tiles.

One shard's work (the vocabulary of `w_dv` may be a shard of a larger one: labels outside [0, V) simply
never match). The loops run over vocabulary tiles (outer) and token blocks (inner), so the largest
temporaries are float32 [block_tokens, block_vocab] tiles, a float32 [N, D] gradient accumulator and the
[D, block_vocab] gradient of one tile of `w`; [N, V] is never held.

Tiles that do not divide an axis are not padded (that would copy `w`): the last tile starts early so it
stays in bounds, and the columns / rows it shares with the previous tile are masked out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from mirage_kernels.token_logprob import reference
from mirage_kernels.token_logprob.config import BlockSizes

Array = jax.Array
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: [t, v] x [d, v] -> [t, d]
_TN = (((0,), (0,)), ((), ()))  # contract the first dims: [t, d] x [t, v] -> [d, v]


def _loop(n: int, body: Callable[[Any, Any], Any], init: Any) -> Any:
  return body(0, init) if n == 1 else jax.lax.fori_loop(0, n, body, init)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


class _Tiling:
  """Tile starts and masks along one axis of length `total` cut in blocks of `block` (<= total)."""

  def __init__(self, total: int, block: int):
    self.total, self.block, self.count = total, block, _cdiv(total, block)
    self.ragged = total % block != 0

  def start(self, k):
    return jnp.minimum(k * self.block, self.total - self.block) if self.ragged else k * self.block

  def fresh(self, k, start) -> Array | None:
    """bool [block]: the positions of tile k not already covered by tile k-1 (None when all are)."""
    if not self.ragged:
      return None
    return start + jnp.arange(self.block) >= k * self.block

  def take(self, x: Array, start, axis: int) -> Array:
    return x if self.block == self.total else jax.lax.dynamic_slice_in_dim(x, start, self.block, axis)

  def put(self, x: Array, update: Array, start, axis: int, *, add: bool) -> Array:
    """Write (or add) `update` at `start`; adding keeps rows of an overlapping last tile exact."""
    if self.block == self.total:
      return x + update if add else update
    if add:
      update = jax.lax.dynamic_slice_in_dim(x, start, self.block, axis) + update
    return jax.lax.dynamic_update_slice_in_dim(x, update, start, axis)


def _and(a: Array | None, b: Array | None) -> Array | None:
  return a if b is None else b if a is None else a & b


def _tile_logits(h_td: Array, w_dv: Array, fresh_col_b: Array | None) -> Array:
  logits_tv = reference.logits(h_td, w_dv)
  return logits_tv if fresh_col_b is None else jnp.where(fresh_col_b[None, :], logits_tv, -jnp.inf)


def forward(h_nd: Array, w_dv: Array, labels_n: Array, *, block_sizes: BlockSizes) -> tuple[Array, Array]:
  """float32 (lse [N], label logit [N]) of this vocabulary shard (label logit 0 when not in the shard)."""
  rows = _Tiling(h_nd.shape[0], block_sizes.block_tokens)
  cols = _Tiling(w_dv.shape[1], block_sizes.block_vocab)

  def vocab_step(j, carry):
    v0 = cols.start(j)
    w_db = cols.take(w_dv, v0, 1)
    col_b = v0 + jnp.arange(cols.block)
    fresh_col_b = cols.fresh(j, v0)

    def token_step(i, carry):
      lse_n, ll_n = carry
      n0 = rows.start(i)
      logits_tb = _tile_logits(rows.take(h_nd, n0, 0), w_db, fresh_col_b)
      hit_tb = _and(col_b[None, :] == rows.take(labels_n, n0, 0)[:, None], fresh_col_b)
      lse_t = reference.merge_logsumexp(rows.take(lse_n, n0, 0), reference.tile_logsumexp(logits_tb))
      ll_t = jnp.sum(jnp.where(hit_tb, logits_tb, 0.0), axis=-1)
      fresh_row_t = rows.fresh(i, n0)
      if fresh_row_t is not None:
        lse_t = jnp.where(fresh_row_t, lse_t, rows.take(lse_n, n0, 0))
        ll_t = jnp.where(fresh_row_t, ll_t, 0.0)
      return rows.put(lse_n, lse_t, n0, 0, add=False), rows.put(ll_n, ll_t, n0, 0, add=True)

    return _loop(rows.count, token_step, carry)

  n = h_nd.shape[0]
  init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32))
  return _loop(cols.count, vocab_step, init)


def backward(h_nd: Array, w_dv: Array, labels_n: Array, lse_n: Array, g_logp_n: Array, g_lse_n: Array, *,
             block_sizes: BlockSizes) -> tuple[Array, Array]:
  """(dh [N, D] in h's dtype, dw [D, V] in w's dtype) from the cotangents of logp and lse.

  `g_logp_n` must already be 0 where the label is ignored; `lse_n` is the logsumexp over the whole
  (unsharded) vocabulary.
  """
  rows = _Tiling(h_nd.shape[0], block_sizes.block_tokens)
  cols = _Tiling(w_dv.shape[1], block_sizes.block_vocab)

  def vocab_step(j, carry):
    dh_nd, dw_dv = carry
    v0 = cols.start(j)
    w_db = cols.take(w_dv, v0, 1)
    col_b = v0 + jnp.arange(cols.block)
    fresh_col_b = cols.fresh(j, v0)

    def token_step(i, carry):
      dh_nd, dw_db = carry
      n0 = rows.start(i)
      h_td = rows.take(h_nd, n0, 0)
      logits_tb = _tile_logits(h_td, w_db, fresh_col_b)
      hit_tb = _and(col_b[None, :] == rows.take(labels_n, n0, 0)[:, None], fresh_col_b)
      dl_tb = reference.dlogits(logits_tb, hit_tb, rows.take(lse_n, n0, 0), rows.take(g_logp_n, n0, 0),
                                rows.take(g_lse_n, n0, 0))
      fresh_row_t = rows.fresh(i, n0)
      if fresh_row_t is not None:
        dl_tb = jnp.where(fresh_row_t[:, None], dl_tb, 0.0)
      dl_tb = dl_tb.astype(h_nd.dtype)
      dh_td = jax.lax.dot_general(dl_tb, w_db, _NT, preferred_element_type=jnp.float32)
      dw_db = dw_db + jax.lax.dot_general(h_td, dl_tb, _TN, preferred_element_type=jnp.float32)
      return rows.put(dh_nd, dh_td, n0, 0, add=True), dw_db

    init = (dh_nd, jnp.zeros((w_dv.shape[0], cols.block), jnp.float32))
    dh_nd, dw_db = _loop(rows.count, token_step, init)
    return dh_nd, cols.put(dw_dv, dw_db.astype(dw_dv.dtype), v0, 1, add=cols.ragged)

  init = (jnp.zeros(h_nd.shape, jnp.float32), jnp.zeros(w_dv.shape, w_dv.dtype))
  dh_nd, dw_dv = _loop(cols.count, vocab_step, init)
  return dh_nd.astype(h_nd.dtype), dw_dv
