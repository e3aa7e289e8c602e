"""Pallas Mosaic TPU kernels: fused logits + online logsumexp (forward), and two backward kernels.

Structure after Tokamax's linear softmax cross-entropy kernel (and Levanter's copy of it), reduced to what
per-token log-probs need. One shard's work, as in `chunked_xla`; grid axes are token blocks (t) and
vocabulary blocks (v); every block of `h` is [bt, D] and of `w` [D, bv] (full width, so D <= 8192):

  forward  grid (t, v), v innermost: logits tile in float32 on the MXU, the running logsumexp and the label
           logit accumulate in the resident output blocks (revisited consecutively along v).
  dh       grid (t, v), v innermost: recompute the tile, dlogits, dh += dlogits @ w^T in a float32 VMEM
           accumulator, written once per token block.
  dw       grid (v, t), t innermost: recompute the tile, dw += h^T @ dlogits in a float32 accumulator.

Inputs are bf16 or f32; the matmuls accumulate in float32 and dlogits is cast to the input dtype for the
gradient matmuls (as XLA does). Blocks that do not divide an axis read unspecified values past the end
(NaN in interpret mode): the kernels mask those columns / rows (and zero the matching `w` / `h` entries
before a matmul, since 0 * NaN is NaN); out-of-bounds writes are dropped by Pallas.

Each call is staged with `lax.platform_dependent`: the compiled Mosaic kernel when lowering for TPU, the
Pallas interpreter elsewhere (so CPU tests run the same kernel bodies, and an AOT compile for a TPU
topology from a CPU host gets the real Mosaic lowering).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mirage_kernels.token_logprob import config, reference
from mirage_kernels.token_logprob.config import BlockSizes

Array = jax.Array
_NT = (((1,), (1,)), ((), ()))  # [t, v] x [d, v] -> [t, d]
_TN = (((0,), (0,)), ((), ()))  # [t, d] x [t, v] -> [d, v]


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


class _Tile:
  """Index vectors of one grid step's tile and its masks (None when the axis is not ragged)."""

  def __init__(self, i, j, *, bt: int, bv: int, n: int, v: int):
    self.col_1b = j * bv + jax.lax.broadcasted_iota(jnp.int32, (1, bv), 1)
    self.row_t1 = i * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
    self.col_ok_1b = self.col_1b < v if v % bv else None
    self.row_ok_t1 = self.row_t1 < n if n % bt else None

  def logits(self, h_td: Array, w_db: Array) -> Array:
    logits_tb = reference.logits(h_td, w_db)
    return logits_tb if self.col_ok_1b is None else jnp.where(self.col_ok_1b, logits_tb, -jnp.inf)

  def hit(self, labels_t: Array) -> Array:
    """bool [bt, bv]: where the tile holds a row's label (labels of other vocabulary shards never match)."""
    hit_tb = self.col_1b == labels_t[:, None]
    return hit_tb if self.col_ok_1b is None else hit_tb & self.col_ok_1b

  def dlogits(self, h_td, w_db, labels_t, lse_t, g_t, g_lse_t) -> Array:
    """Masked dlogits of the tile, in the input dtype (for the gradient matmuls)."""
    dl_tb = reference.dlogits(self.logits(h_td, w_db), self.hit(labels_t), lse_t, g_t, g_lse_t)
    for ok in (self.col_ok_1b, self.row_ok_t1):
      if ok is not None:
        dl_tb = jnp.where(ok, dl_tb, 0.0)
    return dl_tb.astype(h_td.dtype)


def _forward_kernel(h_ref, w_ref, labels_ref, lse_ref, ll_ref, *, bt, bv, n, v):
  i, j = pl.program_id(0), pl.program_id(1)
  tile = _Tile(i, j, bt=bt, bv=bv, n=n, v=v)

  @pl.when(j == 0)
  def _init():
    lse_ref[...] = jnp.full(lse_ref.shape, -jnp.inf, jnp.float32)
    ll_ref[...] = jnp.zeros(ll_ref.shape, jnp.float32)

  logits_tb = tile.logits(h_ref[...], w_ref[...])
  lse_ref[...] = reference.merge_logsumexp(lse_ref[...], reference.tile_logsumexp(logits_tb))
  ll_ref[...] += jnp.sum(jnp.where(tile.hit(labels_ref[...]), logits_tb, 0.0), axis=1)


def _dh_kernel(h_ref, w_ref, labels_ref, lse_ref, g_ref, g_lse_ref, dh_ref, acc_ref, *, bt, bv, n, v):
  i, j = pl.program_id(0), pl.program_id(1)
  tile = _Tile(i, j, bt=bt, bv=bv, n=n, v=v)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  w_db = w_ref[...]
  if tile.col_ok_1b is not None:
    w_db = jnp.where(tile.col_ok_1b, w_db, 0)
  dl_tb = tile.dlogits(h_ref[...], w_db, labels_ref[...], lse_ref[...], g_ref[...], g_lse_ref[...])
  acc_ref[...] += jax.lax.dot_general(dl_tb, w_db, _NT, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _store():
    dh_ref[...] = acc_ref[...].astype(dh_ref.dtype)


def _dw_kernel(h_ref, w_ref, labels_ref, lse_ref, g_ref, g_lse_ref, dw_ref, acc_ref, *, bt, bv, n, v):
  j, i = pl.program_id(0), pl.program_id(1)
  tile = _Tile(i, j, bt=bt, bv=bv, n=n, v=v)

  @pl.when(i == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  h_td = h_ref[...]
  if tile.row_ok_t1 is not None:
    h_td = jnp.where(tile.row_ok_t1, h_td, 0)
  dl_tb = tile.dlogits(h_td, w_ref[...], labels_ref[...], lse_ref[...], g_ref[...], g_lse_ref[...])
  acc_ref[...] += jax.lax.dot_general(h_td, dl_tb, _TN, preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(1) - 1)
  def _store():
    dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _specs(*, bt: int, bv: int, d: int, vocab_major: bool):
  """BlockSpecs of h, w and a per-token vector, for a (t, v) grid or a (v, t) one."""
  tv = (lambda f: (lambda j, i: f(i, j))) if vocab_major else (lambda f: f)
  return (pl.BlockSpec((bt, d), tv(lambda i, j: (i, 0))), pl.BlockSpec((d, bv), tv(lambda i, j: (0, j))),
          pl.BlockSpec((bt,), tv(lambda i, j: (i,))))


def _pallas(kernel, args, *, blocks: BlockSizes, out_shape, out_specs, scratch, vocab_major: bool,
            n_vectors: int):
  """Stage one kernel: Mosaic on TPU, the Pallas interpreter on every other platform."""
  h_nd, w_dv = args[0], args[1]
  (n, d), v = h_nd.shape, w_dv.shape[1]
  bt, bv = blocks.block_tokens, blocks.block_vocab
  h_spec, w_spec, vec_spec = _specs(bt=bt, bv=bv, d=d, vocab_major=vocab_major)
  grid = (_cdiv(v, bv), _cdiv(n, bt)) if vocab_major else (_cdiv(n, bt), _cdiv(v, bv))
  need = config.pallas_tpu_vmem_bytes(blocks, width=d, itemsize=h_nd.dtype.itemsize)

  def call(interpret: bool):
    return pl.pallas_call(
        functools.partial(kernel, bt=bt, bv=bv, n=n, v=v), grid=grid,
        in_specs=[h_spec, w_spec, *[vec_spec] * n_vectors], out_specs=out_specs(h_spec, w_spec, vec_spec),
        out_shape=out_shape, scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary"),
            vmem_limit_bytes=min(max(32 * config.MiB, int(need * 1.25)), 64 * config.MiB)),
        interpret=interpret)

  return jax.lax.platform_dependent(*args, tpu=call(False), default=call(True))


def forward(h_nd: Array, w_dv: Array, labels_n: Array, *, block_sizes: BlockSizes) -> tuple[Array, Array]:
  """float32 (lse [N], label logit [N]) of this vocabulary shard (label logit 0 when not in the shard)."""
  vec = jax.ShapeDtypeStruct((h_nd.shape[0],), jnp.float32)
  return tuple(_pallas(_forward_kernel, (h_nd, w_dv, labels_n.astype(jnp.int32)), blocks=block_sizes,
                       out_shape=(vec, vec), out_specs=lambda h, w, t: (t, t), scratch=(), vocab_major=False,
                       n_vectors=1))


def backward(h_nd: Array, w_dv: Array, labels_n: Array, lse_n: Array, g_logp_n: Array, g_lse_n: Array, *,
             block_sizes: BlockSizes) -> tuple[Array, Array]:
  """(dh [N, D], dw [D, V]) from the cotangents of logp (0 where ignored) and lse; see `chunked_xla`."""
  args = (h_nd, w_dv, labels_n.astype(jnp.int32), lse_n, g_logp_n.astype(jnp.float32),
          g_lse_n.astype(jnp.float32))
  bt, bv = block_sizes.block_tokens, block_sizes.block_vocab
  (dh_nd,) = _pallas(_dh_kernel, args, blocks=block_sizes, out_shape=(jax.ShapeDtypeStruct(h_nd.shape, h_nd.dtype),),
                     out_specs=lambda h, w, t: (h,), scratch=(pltpu.VMEM((bt, h_nd.shape[1]), jnp.float32),),
                     vocab_major=False, n_vectors=4)
  (dw_dv,) = _pallas(_dw_kernel, args, blocks=block_sizes, out_shape=(jax.ShapeDtypeStruct(w_dv.shape, w_dv.dtype),),
                     out_specs=lambda h, w, t: (w,), scratch=(pltpu.VMEM((w_dv.shape[0], bv), jnp.float32),),
                     vocab_major=True, n_vectors=4)
  return dh_nd, dw_dv
