"""Public API: `token_logprob` / `token_logprob_and_lse`, the implementation registry and the sharded wrapper.

  logp = token_logprob(h, w, labels)            # float32 [...]: log softmax(h @ w)[label], 0 where label < 0
  out = token_logprob_and_lse(h, w, labels)     # LogProbs(logp, lse), lse = logsumexp(h @ w) (entropy / KL)

Implementations (`implementation=`):
  reference    materialises float32 logits [N, V]; differentiated by JAX (the oracle)
  chunked_xla  online logsumexp over vocabulary tiles in XLA loops; custom VJP recomputing the tiles
  pallas_tpu   Mosaic TPU kernels (forward, dh, dw); custom VJP; the Pallas interpreter off TPU

`implementation=None` tries the backend's order (`DEFAULT_ORDER`) and warns on each fallback; a sequence is
tried in the order given; a single name fails fast with the reason it cannot run.

Sharding: without `layout=`, the layout is read from the inputs' own shardings (`infer_layout`: concrete
sharded arrays, or explicit-axis traced ones); where it cannot be read under a multi-device mesh, a Pallas
implementation raises an error naming `layout=`. Or pass `layout=Layout(mesh, token_axes=..., vocab_axis=...,
embed_axes=...)` when h / w are sharded
(labels and h over `token_axes` on their first axis, w's vocabulary over `vocab_axis`, w's width over
`embed_axes`). The kernels then run per shard inside `jax.shard_map` (a Pallas call never sees a globally
sharded array): w is all-gathered over `embed_axes`, the per-shard logsumexps are combined with pmax / psum
over `vocab_axis`, dh is summed over `vocab_axis` and dw summed over the token axes (reduce-scattered where a
token axis also shards w's width). The custom VJP sits outside the shard_map: forward and backward are each
one shard_map, so nothing is transposed through it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from mirage_kernels.token_logprob import chunked_xla, config, pallas_tpu, reference
from mirage_kernels.token_logprob.config import BlockSizes

Array = jax.Array
KERNELS: dict[str, ModuleType] = {"chunked_xla": chunked_xla, "pallas_tpu": pallas_tpu}
IMPLEMENTATIONS = ("reference", *KERNELS)
# Best first, per backend (`jax.default_backend()`). TPU: the Mosaic kernel, then XLA loops. GPU / CPU: XLA
# loops (Pallas on GPU would need a Triton / Mosaic GPU kernel; see the README).
DEFAULT_ORDER = {"tpu": ("pallas_tpu", "chunked_xla"), "gpu": ("chunked_xla",), "cpu": ("chunked_xla",)}
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)
_warned: set[str] = set()


class UnsupportedError(ValueError):
  """An implementation cannot run these inputs (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class LogProbs:
  """Per-token outputs, float32 with the leading shape of `labels`."""

  logp: Array  # log softmax(h @ w)[label]; 0 where label < 0
  lse: Array  # logsumexp(h @ w) over the (whole) vocabulary


jax.tree_util.register_dataclass(LogProbs, data_fields=["logp", "lse"], meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Layout:
  """How h [N, D], w [D, V] and labels [N] are split over `mesh` (axes not named are replicated)."""

  mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh
  token_axes: tuple[str, ...] = ()  # shard the first axis of h and labels
  vocab_axis: str | None = None  # shards V of w
  embed_axes: tuple[str, ...] = ()  # shard D of w (FSDP): gathered for the kernel, gradients scattered back

  def __post_init__(self):
    named = (*self.token_axes, *((self.vocab_axis,) if self.vocab_axis else ()), *self.embed_axes)
    unknown = sorted(set(named) - set(self.mesh.axis_names))
    if unknown:
      raise ValueError(f"Layout: axes {unknown} are not mesh axes {self.mesh.axis_names}")
    if self.vocab_axis in (*self.token_axes, *self.embed_axes):
      raise ValueError(f"Layout: vocab_axis {self.vocab_axis!r} also shards tokens or width")

  def size(self, axes: Sequence[str]) -> int:
    return int(np.prod([self.mesh.shape[a] for a in axes], dtype=np.int64))

  @property
  def vocab_shards(self) -> int:
    return self.size((self.vocab_axis,)) if self.vocab_axis else 1

  def check(self, *, tokens: int, width: int, vocab: int) -> None:
    for what, dim, axes in (("tokens", tokens, self.token_axes), ("width", width, self.embed_axes),
                            ("vocabulary", vocab, (self.vocab_axis,) if self.vocab_axis else ())):
      if dim % self.size(axes):
        raise ValueError(f"Layout: {what} {dim} is not divisible by mesh axes {axes} ({self.size(axes)})")


def _tokens_spec(layout: Layout) -> P:
  return P(layout.token_axes or None)


def _reduce_dw(dw_dv: Array, layout: Layout) -> Array:
  """Sum a shard's dw over the token axes and keep this device's slice of the width (embed axes)."""
  scatter = tuple(a for a in layout.embed_axes if a in layout.token_axes)
  summed = tuple(a for a in layout.token_axes if a not in scatter)
  if summed:
    dw_dv = jax.lax.psum(dw_dv, summed)
  if scatter:
    dw_dv = jax.lax.psum_scatter(dw_dv, scatter, scatter_dimension=0, tiled=True)
  rest = tuple(a for a in layout.embed_axes if a not in scatter)
  if rest:
    rows = dw_dv.shape[0] // layout.size(rest)
    dw_dv = jax.lax.dynamic_slice_in_dim(dw_dv, jax.lax.axis_index(rest) * rows, rows, 0)
  return dw_dv


def _fused(kernel: ModuleType, blocks: BlockSizes, layout: Layout | None) -> Callable[[Array, Array, Array], LogProbs]:
  """A custom-VJP function (h [N, D], w [D, V], labels [N]) -> LogProbs running `kernel` per shard."""

  def local(w_dv: Array, labels_n: Array) -> tuple[Array, Array]:
    """This device's w (gathered over the width axes) and labels shifted into its vocabulary shard."""
    if layout is None:
      return w_dv, labels_n
    if layout.embed_axes:
      w_dv = jax.lax.all_gather(w_dv, layout.embed_axes, axis=0, tiled=True)
    if layout.vocab_axis is not None:
      labels_n = labels_n - jax.lax.axis_index(layout.vocab_axis) * w_dv.shape[1]
    return w_dv, labels_n

  def fwd_local(h_nd, w_dv, labels_n):
    w_dv, local_n = local(w_dv, labels_n)
    lse_n, ll_n = kernel.forward(h_nd, w_dv, local_n, block_sizes=blocks)
    if layout is not None and layout.vocab_axis is not None:
      m_n = jax.lax.pmax(lse_n, layout.vocab_axis)
      lse_n = m_n + jnp.log(jax.lax.psum(jnp.exp(lse_n - m_n), layout.vocab_axis))
      ll_n = jax.lax.psum(ll_n, layout.vocab_axis)
    return jnp.where(labels_n >= 0, ll_n - lse_n, 0.0), lse_n

  def bwd_local(h_nd, w_dv, labels_n, lse_n, g_logp_n, g_lse_n):
    w_dv, local_n = local(w_dv, labels_n)
    g_logp_n = jnp.where(labels_n >= 0, g_logp_n, 0.0)
    dh_nd, dw_dv = kernel.backward(h_nd, w_dv, local_n, lse_n, g_logp_n, g_lse_n, block_sizes=blocks)
    if layout is None:
      return dh_nd, dw_dv
    if layout.vocab_axis is not None:
      dh_nd = jax.lax.psum(dh_nd.astype(jnp.float32), layout.vocab_axis).astype(h_nd.dtype)
    return dh_nd, _reduce_dw(dw_dv, layout)

  def sharded(fn: Callable, in_specs: tuple, out_specs: Any) -> Callable:
    if layout is None:
      return fn
    return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

  if layout is not None:
    tok, w_spec = _tokens_spec(layout), P(layout.embed_axes or None, layout.vocab_axis)
    h_spec = P(layout.token_axes or None, None)
  else:
    tok = w_spec = h_spec = None
  fwd_call = sharded(fwd_local, (h_spec, w_spec, tok), (tok, tok))
  bwd_call = sharded(bwd_local, (h_spec, w_spec, tok, tok, tok, tok), (h_spec, w_spec))

  @jax.custom_vjp
  def fused(h_nd, w_dv, labels_n):
    return LogProbs(*fwd_call(h_nd, w_dv, labels_n))

  def fused_fwd(h_nd, w_dv, labels_n):
    out = fused(h_nd, w_dv, labels_n)
    return out, (h_nd, w_dv, labels_n, out.lse)

  def fused_bwd(res, g: LogProbs):
    h_nd, w_dv, labels_n, lse_n = res
    dh_nd, dw_dv = bwd_call(h_nd, w_dv, labels_n, lse_n, g.logp.astype(jnp.float32), g.lse.astype(jnp.float32))
    return dh_nd, dw_dv, None

  fused.defvjp(fused_fwd, fused_bwd)
  return fused


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _sharding_of(x) -> jax.sharding.NamedSharding | None:
  """A concrete array's NamedSharding, or a traced one's (explicit mesh axes only); None if unknown."""
  if not isinstance(x, jax.core.Tracer):
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None
  sharding = getattr(jax.typeof(x), "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh.empty:
    return None
  explicit = all(t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types)
  return sharding if explicit else None  # on auto axes the traced spec says nothing about the real split


def infer_layout(h: Array, w: Array, *, implementation: str | Sequence[str] | None = None) -> Layout | None:
  """The `Layout` that h's and w's own shardings describe (None when neither is split over devices).

  Read from concrete arrays, or from traced ones whose mesh axes are explicit. Under an ambient mesh of
  several devices whose shardings cannot be read (traced arrays on auto axes), the Pallas kernel cannot run
  (Mosaic refuses to be partitioned automatically): that is an error naming `layout=Layout(...)`; the XLA
  implementations are partitioned by XLA and need no layout.
  """
  hs, ws = _sharding_of(h), _sharding_of(w)
  sharded = [sh for sh in (hs, ws) if sh is not None and sh.mesh.size > 1]
  if sharded:
    mesh = sharded[0].mesh
    h_spec = tuple(hs.spec) + (None,) * h.ndim if hs is not None and hs.mesh.size > 1 else (None,) * h.ndim
    w_spec = tuple(ws.spec) + (None,) * 2 if ws is not None and ws.mesh.size > 1 else (None, None)
    vocab = _axes(w_spec[1])
    if len(vocab) > 1 or _axes(h_spec[h.ndim - 1]):
      raise UnsupportedError(f"token_logprob: cannot read a layout from h spec {hs and hs.spec} and w spec "
                             f"{ws and ws.spec} (the vocabulary may be split over one mesh axis, h's width over "
                             "none); pass layout=Layout(mesh, token_axes=..., vocab_axis=..., embed_axes=...)")
    tokens = tuple(a for entry in h_spec[:h.ndim - 1] for a in _axes(entry))
    return Layout(mesh, token_axes=tokens, vocab_axis=vocab[0] if vocab else None, embed_axes=_axes(w_spec[0]))
  ambient = jax.sharding.get_abstract_mesh()
  wants_pallas = implementation == "pallas_tpu" or (not isinstance(implementation, str) and implementation
                                                    is not None and "pallas_tpu" in implementation) or (
      implementation is None and _platform(None) == "tpu")
  if wants_pallas and not ambient.empty and ambient.size > 1 and (hs is None or ws is None):
    names = ", ".join(f"{n}={s}" for n, s in ambient.shape.items())
    raise UnsupportedError(
        f"token_logprob under a mesh of {ambient.size} devices ({names}): the shardings of h and w are not "
        "visible here, and a Pallas kernel cannot be partitioned automatically. Pass how they are split, e.g. "
        "layout=Layout(mesh, token_axes=(\"data\",), vocab_axis=\"tensor\", embed_axes=()) "
        "(mirage_kernels.Layout), or call it on concrete sharded arrays")
  return None


def _platform(layout: Layout | None) -> str:
  """The platform the computation is for: the devices of the layout's mesh, else of the ambient mesh
  (`jax.set_mesh`), when known (AOT for a TPU topology from a CPU host); else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh() if layout is None else layout.mesh.abstract_mesh
  device = None if mesh.empty else mesh.abstract_device
  platform = jax.default_backend() if device is None else device.platform
  return "gpu" if platform in ("cuda", "rocm") else platform


def _candidates(implementation: str | Sequence[str] | None, layout: Layout | None) -> tuple[tuple[str, ...], bool]:
  """(names to try in order, whether a single one was requested explicitly)."""
  if implementation is None:
    return DEFAULT_ORDER.get(_platform(layout), ("chunked_xla",)), False
  names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
  unknown = [n for n in names if n not in IMPLEMENTATIONS]
  if unknown or not names:
    raise ValueError(f"unknown token_logprob implementation {unknown or names!r}; valid: {IMPLEMENTATIONS}")
  return names, isinstance(implementation, str)


def _blocks(name: str, block_sizes: BlockSizes | None, dtype: Any, *, tokens: int, width: int, vocab: int,
            platform: str) -> BlockSizes:
  """Block sizes for one shard; UnsupportedError when `name` cannot run these inputs."""
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _SUPPORTED_DTYPES]:
    raise UnsupportedError(f"{name} supports float32 and bfloat16 inputs, got {jnp.dtype(dtype).name}")
  try:
    blocks = block_sizes or config.default_block_sizes(name, tokens=tokens, width=width, vocab=vocab,
                                                       platform=platform)
    return config.validate(blocks, name, tokens=tokens, width=width, vocab=vocab,
                           itemsize=jnp.dtype(dtype).itemsize)
  except ValueError as e:
    raise UnsupportedError(str(e)) from None


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    logging.warning("%s", message)


def token_logprob_and_lse(h: Array, w: Array, labels: Array, *,
                          implementation: str | Sequence[str] | None = None,
                          block_sizes: BlockSizes | None = None, layout: Layout | None = None) -> LogProbs:
  """Per-token log-softmax of the labels and logsumexp of `h @ w`, without holding [tokens, vocab] logits.

  Args:
    h: [..., D] hidden states (float32 or bfloat16); any leading batch dims.
    w: [D, V] output head; cast to h's dtype (the gradient comes back in w's dtype).
    labels: int [...] (h's leading shape); labels < 0 are ignored: logp 0 and no gradient through logp.
    implementation: None (the backend's order with fallback), one name (fails fast), or names to try in order.
    block_sizes: tile sizes (default: the table in `config`); checked, a bad choice is a ValueError.
    layout: how the arrays are sharded over a mesh (kernels then run per shard in `jax.shard_map`).

  Returns:
    LogProbs(logp, lse), float32 with labels' shape. Differentiable in h and w.
  """
  if h.ndim < 2 or w.ndim != 2 or w.shape[0] != h.shape[-1] or tuple(labels.shape) != tuple(h.shape[:-1]):
    raise ValueError(f"token_logprob: expected h [..., D], w [D, V], labels [...] (h's leading shape); got "
                     f"h {tuple(h.shape)}, w {tuple(w.shape)}, labels {tuple(labels.shape)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"token_logprob: labels must be integers, got {labels.dtype}")
  lead, (width, vocab) = tuple(labels.shape), w.shape
  h_nd, labels_n, w_dv = h.reshape(-1, width), labels.reshape(-1).astype(jnp.int32), w.astype(h.dtype)
  tokens = h_nd.shape[0]
  if layout is None:
    layout = infer_layout(h, w, implementation=implementation)
  if layout is not None:
    layout.check(tokens=tokens, width=width, vocab=vocab)
  local = dict(tokens=tokens // (layout.size(layout.token_axes) if layout else 1), width=width,
               vocab=vocab // (layout.vocab_shards if layout else 1))
  names, explicit = _candidates(implementation, layout)
  errors = []
  for name in names:
    try:
      if name == "reference":
        out = LogProbs(*reference.token_logprob_and_lse(h_nd, w_dv, labels_n))
      else:
        blocks = _blocks(name, block_sizes, h_nd.dtype, platform=_platform(layout), **local)
        out = _fused(KERNELS[name], blocks, layout)(h_nd, w_dv, labels_n)
    except (UnsupportedError, NotImplementedError) as e:
      if explicit:
        raise UnsupportedError(f"token_logprob implementation {name!r} cannot run: {e}") from None
      errors.append(f"{name}: {e}")
      _warn_once(f"token_logprob: {name} unavailable ({e}); trying the next implementation")
      continue
    return jax.tree.map(lambda x: x.reshape(lead), out)
  raise UnsupportedError("token_logprob: no implementation could run: " + "; ".join(errors))


def token_logprob(h: Array, w: Array, labels: Array, *, implementation: str | Sequence[str] | None = None,
                  block_sizes: BlockSizes | None = None, layout: Layout | None = None) -> Array:
  """float32 [...]: log softmax(h @ w)[label], 0 where label < 0. See `token_logprob_and_lse`."""
  return token_logprob_and_lse(h, w, labels, implementation=implementation, block_sizes=block_sizes,
                               layout=layout).logp
