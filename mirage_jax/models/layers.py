"""Building blocks shared by the vision tower and the decoder: dense, norms, attention, RoPE, stacked scans.

Every parameter is created through `param`, which attaches logical axis names; `mirage_jax.sharding` maps
those names to mesh axes. Parameters are stored in `param_dtype` and cast to the compute `dtype` at use.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax import sharding
from mirage_jax.errors import ConfigError
from mirage_jax.models.config import Remat

# Variables are created unsharded; placement comes from `jax.jit(init, out_shardings=...)` driven by the
# logical rule table (mirage_jax.sharding). Eager sharding would demand a mesh context at creation.
nnx.use_eager_sharding(False)

Array = jax.Array
_INIT_STD = 0.02
# Finite, so that fully-masked rows (left padding) give uniform attention instead of NaN.
_MASK_VALUE = -1e30


def dtype_of(name: str) -> jnp.dtype:
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ConfigError(f"unknown dtype {name!r} (use float32 or bfloat16)") from e


class _Dropout:
  """The PRNG key adapter dropout draws from while a train step is traced (`dropout_key`); `stacks` counts
  the layer stacks entered, so two forwards of one step (NPO's forget and retain streams, RMU's split scan)
  draw different masks."""

  def __init__(self, key: Array):
    self.key = key
    self.stacks = 0

  def next_stack(self) -> Array:
    self.stacks += 1
    return jax.random.fold_in(self.key, self.stacks)


_DROPOUT: contextvars.ContextVar[_Dropout | None] = contextvars.ContextVar("mirage_dropout", default=None)


@contextlib.contextmanager
def _scoped(ctx: _Dropout | None) -> Iterator[None]:
  token = _DROPOUT.set(ctx)
  try:
    yield
  finally:
    _DROPOUT.reset(token)


def dropout_key(key: Array | None) -> contextlib.AbstractContextManager:
  """Trace the enclosed forwards in training mode: every `Dense` with `lora_dropout` > 0 drops its adapter
  input with a mask drawn from `key`, folded with the micro-batch (`dropout_fold`), the stack call and layer
  index (`run_stack`) and the kernel's path. Outside this context (evaluation, decoding, scoring) and with
  `key=None` nothing is dropped."""
  return _scoped(None if key is None else _Dropout(key))


def dropout_fold(data: Array | int) -> contextlib.AbstractContextManager:
  """Inside `dropout_key`: draw from the key folded with `data` (a micro-batch index); else a no-op."""
  ctx = _DROPOUT.get()
  return _scoped(None if ctx is None else _Dropout(jax.random.fold_in(ctx.key, data)))


def path_id(path: str) -> int:
  """A stable 31-bit id of a parameter path (folded into dropout keys)."""
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], names: Sequence[str | None],
          param_dtype: Any) -> nnx.Param:
  """A parameter carrying logical axis names (one per dimension)."""
  if len(shape) != len(names):
    raise ValueError(f"shape {tuple(shape)} and logical names {tuple(names)} differ in rank")
  return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), param_dtype))


class Dense(nnx.Module):
  """y = x . W (+ b), contracting the last `len(in_shape)` axes of x with the first axes of W; with LoRA
  adapters (`mirage_jax.models.lora`), plus scale * (x . A) . B."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], names: Sequence[str], *,
               use_bias: bool, rngs: nnx.Rngs, dtype: Any, param_dtype: Any, std: float = _INIT_STD):
    self.in_ndim = len(in_shape)
    self.dtype = dtype
    self.kernel = param(rngs, nnx.initializers.normal(std), (*in_shape, *out_shape), names, param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros_init(), tuple(out_shape), names[self.in_ndim:],
                       param_dtype) if use_bias else None)

  def __call__(self, x: Array) -> Array:
    w = self.kernel[...].astype(self.dtype)
    lead, ins, outs = x.shape[:x.ndim - self.in_ndim], w.shape[:self.in_ndim], w.shape[self.in_ndim:]
    # One 2-D GEMM: XLA:CPU runs the backward of rank-3 dot_generals several times slower than the
    # same matmul on flattened operands; on TPU/GPU the reshapes are free.
    x_nk = x.astype(self.dtype).reshape(-1, math.prod(ins))
    y = x_nk @ w.reshape(math.prod(ins), math.prod(outs))
    lora_a = getattr(self, "lora_a", None)  # set by `mirage_jax.models.lora.add_adapters` (LoRA on)
    if lora_a is not None:
      a_kr = lora_a[...].astype(self.dtype)  # [fan_in, r]
      b_ro = self.lora_b[...].astype(self.dtype)  # [r, fan_out]
      y = y + jnp.asarray(self.lora_scale, self.dtype) * ((self._adapter_input(x_nk) @ a_kr) @ b_ro)
    y = y.reshape(*lead, *outs)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def _adapter_input(self, x_nk: Array) -> Array:
    """x, or (training, `lora_dropout` = p > 0) x with each entry zeroed with probability p and the rest
    scaled by 1 / (1 - p): PEFT's `lora_B(lora_A(dropout(x)))`. The base path always sees the whole x."""
    p, ctx = getattr(self, "lora_dropout", 0.0), _DROPOUT.get()
    if not p or ctx is None:
      return x_nk
    keep = jax.random.bernoulli(jax.random.fold_in(ctx.key, self.lora_id), 1.0 - p, x_nk.shape)
    return jnp.where(keep, x_nk / jnp.asarray(1.0 - p, x_nk.dtype), jnp.zeros((), x_nk.dtype))


class RMSNorm(nnx.Module):
  """LLaMA RMSNorm: computed in float32, scale applied after casting back (HF semantics)."""

  def __init__(self, width: int, *, eps: float, name: str, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones_init(), (width,), (name,), param_dtype)

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nnx.Module):
  """Standard LayerNorm with bias (CLIP), computed in float32."""

  def __init__(self, width: int, *, eps: float, name: str, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(rngs, nnx.initializers.ones_init(), (width,), (name,), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros_init(), (width,), (name,), param_dtype)

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def activation(name: str) -> Callable[[Array], Array]:
  acts = {
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
      "silu": jax.nn.silu,
      "relu": jax.nn.relu,
  }
  if name not in acts:
    raise ConfigError(f"unknown activation {name!r}; valid: {sorted(acts)}")
  return acts[name]


def rope(x_bthe: Array, positions_bt: Array, theta: float) -> Array:
  """Rotary embedding, LLaMA/HF `rotate_half` convention (first half pairs with second half)."""
  e = x_bthe.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  angles_bte = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [B, T, E/2]
  angles_bte = jnp.concatenate([angles_bte, angles_bte], axis=-1)[:, :, None, :]
  x32 = x_bthe.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles_bte) + rotated * jnp.sin(angles_bte)).astype(x_bthe.dtype)


def attend(q_bthe: Array, k_bske: Array, v_bske: Array, mask_bts: Array) -> Array:
  """Grouped-query attention; softmax in float32. `mask_bts` is True where a query may see a key."""
  b, t, h, e = q_bthe.shape
  k = k_bske.shape[2]
  q_btkge = q_bthe.reshape(b, t, k, h // k, e)
  logits_bkgts = jnp.einsum("btkge,bske->bkgts", q_btkge, k_bske,
                            preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(e))
  logits_bkgts = jnp.where(mask_bts[:, None, None], logits_bkgts, _MASK_VALUE)
  probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bske.dtype)
  out_btkge = jnp.einsum("bkgts,bske->btkge", probs_bkgts, v_bske)
  return out_btkge.reshape(b, t, h, e)


class KV(NamedTuple):
  """Keys and values of one attention layer: [B, S, K, E] each."""

  k: Array
  v: Array


class Attention(nnx.Module):
  """Multi-head attention with optional GQA, RoPE, biases and a fixed-size KV cache."""

  def __init__(self, *, width: int, num_heads: int, num_kv_heads: int, head_dim: int, use_bias: bool,
               names: tuple[str, str, str, str], rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    embed, heads, kv_heads, head = names
    kw = dict(use_bias=use_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q = Dense((width,), (num_heads, head_dim), (embed, heads, head), **kw)
    self.k = Dense((width,), (num_kv_heads, head_dim), (embed, kv_heads, head), **kw)
    self.v = Dense((width,), (num_kv_heads, head_dim), (embed, kv_heads, head), **kw)
    self.o = Dense((num_heads, head_dim), (width,), (heads, head, embed), **kw)

  def __call__(self, x_btd: Array, *, mask_bts: Array, positions_bt: Array | None = None,
               rope_theta: float = 10000.0) -> tuple[Array, KV]:
    """Self-attention: the output and this call's keys/values [B, T, K, E] (after RoPE)."""
    kv = self.keys_values(x_btd, positions_bt, rope_theta)
    return self.attend(self.queries(x_btd, positions_bt, rope_theta), kv, mask_bts), kv

  def queries(self, x_btd: Array, positions_bt: Array | None, rope_theta: float) -> Array:
    q = self.q(x_btd)
    return q if positions_bt is None else rope(q, positions_bt, rope_theta)

  def keys_values(self, x_btd: Array, positions_bt: Array | None, rope_theta: float) -> KV:
    k, v = self.k(x_btd), self.v(x_btd)
    return KV(k if positions_bt is None else rope(k, positions_bt, rope_theta), v)

  def attend(self, q_bthe: Array, kv: KV, mask_bts: Array) -> Array:
    """The output of queries over keys/values `kv` [B, S, K, E] (a decode step: its layer of the cache)."""
    return self.o(attend(q_bthe, kv.k.astype(q_bthe.dtype), kv.v.astype(q_bthe.dtype), mask_bts))


def remat_policy(remat: Remat | str) -> Callable | None:
  remat = Remat(remat)
  cp = jax.checkpoint_policies
  return {
      Remat.FULL: cp.nothing_saveable,
      Remat.DOTS: cp.checkpoint_dots,
      Remat.DOTS_NO_BATCH: cp.checkpoint_dots_with_no_batch_dims,
  }.get(remat)


def run_stack(stack: nnx.Module, fn: Callable, carry: Any, *, start: int = 0, stop: int | None = None,
              xs: Any = None, remat: Remat | str = Remat.NONE, unroll: bool = False) -> tuple[Any, Any]:
  """Apply blocks `start..stop-1` of a stacked (`nnx.vmap`-created) module with `lax.scan`.

  `fn(block, carry, x_l) -> (carry, y_l)` runs one block; `xs` (already sliced to the same layers, or None)
  is scanned alongside; `unroll` unrolls the scan (faster for a few layers on CPU, slow to compile for
  many). Slicing the stacked state lets callers split the scan at any layer (RMU reads the
  hidden state after layer l) and skip unused trailing layers (the ViT's last block under LLaVA).
  """
  graphdef, state = nnx.split(stack)
  n = _depth(state)
  stop = n if stop is None else stop
  if not 0 <= start <= stop <= n:
    raise ValueError(f"layer range [{start}, {stop}) outside a stack of {n} layers")
  if start == stop:
    return carry, None
  if (start, stop) != (0, n):
    state = _slice_layers(state, start, stop)
  # Training with adapter dropout (`dropout_key`): each layer draws from its own key.
  dropout = _DROPOUT.get()
  stack_key = None if dropout is None else dropout.next_stack()
  layer_ids = None if dropout is None else jnp.arange(start, stop, dtype=jnp.int32)

  def body(c, inputs):
    layer_state, x_l, layer = inputs
    with _scoped(None if stack_key is None else _Dropout(jax.random.fold_in(stack_key, layer))):
      return fn(nnx.merge(graphdef, layer_state), c, x_l)

  if Remat(remat) != Remat.NONE:
    body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
  return jax.lax.scan(body, carry, (state, xs, layer_ids), unroll=bool(unroll))


def unstack(stack: nnx.Module) -> list[nnx.Module]:
  """The blocks of a stacked (`stacked`-created) module as separate modules, each holding its own slice of
  the weights: static slices, one copy of the stack's weights.

  For a loop that runs the stack many times (a decode loop): XLA:CPU copies the layer's slice of every
  weight out of the stack each time a scanned (or unrolled) block reads it, a second full read and write of
  the weights per step. Sliced once before the loop, the blocks read their weights in place."""
  graphdef, state = nnx.split(stack)
  return [nnx.merge(graphdef, jax.tree.map(lambda a, l=l: a[l], state)) for l in range(_depth(state))]


def _depth(state: nnx.State) -> int:
  """The number of blocks of a stacked state (its leaves' leading `layers` axis)."""
  return jax.tree.leaves(state)[0].shape[0]


def _slice_layers(state: nnx.State, start: int, stop: int) -> nnx.State:
  """Layers `start..stop-1` of a stacked state, each slice pinned to its parameter's sharding.

  Without the pin, XLA:TPU does not propagate the FSDP sharding to the slice's cotangent: the backward scan
  then stacks every layer's gradient unsharded in float32 (RMU's split scan: 26 GiB of temporaries for the
  7b step at batch 256 on v5e:16x16). A no-op where the mesh leaves the parameter replicated."""
  flat = []
  for path, var in nnx.to_flat_state(state):
    x = var.get_value()[start:stop]
    names = var.get_metadata().get("out_sharding")
    mesh = jax.sharding.get_abstract_mesh()
    if names is not None and not mesh.empty:
      spec = sharding.logical_to_spec(names, x.shape, mesh, what="/".join(map(str, path)))
      if any(axes is not None for axes in spec):
        x = jax.lax.with_sharding_constraint(x, spec)
    flat.append((path, var.replace(x)))
  return nnx.from_flat_state(flat)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
  """Create `n` blocks as one module whose parameters have a leading `layers` axis."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(r):
    return make(r)

  return create(rngs)
