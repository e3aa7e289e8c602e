"""Per-token log-probabilities of the next token: the one place every loss gets log p(y_t | y_<t, image).

Losses never see logits: they pass final hidden states and the LM head here, so `config.loss.logprob_impl`
can swap the implementation without touching any loss:

  reference    materialises float32 logits [B, T, V] (the oracle; XLA differentiates it)
  chunked_xla  `mirage_kernels` online logsumexp over vocabulary tiles (never holds [tokens x vocab])
  pallas_tpu   `mirage_kernels` Mosaic TPU kernels (the Pallas interpreter off TPU: tests only, slow)
  auto         (default) `reference` while one device's float32 logits are small (< AUTO_MIN_LOGITS_BYTES,
               where the fused loops only add overhead), else the kernel's best for the platform:
               pallas_tpu then chunked_xla on TPU, chunked_xla on CPU / GPU.

Under a mesh (`jax.set_mesh`), the kernels run per shard inside `jax.shard_map` with the layout the rule
table gives the activations and the LM head (tokens over the batch axes, vocabulary over `tensor`, width
over `fsdp`), so a Pallas call never sees a globally sharded array.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import mirage_kernels
from mirage_jax import sharding
from mirage_jax.errors import ConfigError
from mirage_kernels.token_logprob.reference import label_logprob

Array = jax.Array
# The kernel package's registry (reference + its kernels) is the source; this module only adds `auto`.
IMPLEMENTATIONS = ("auto", *mirage_kernels.token_logprob.IMPLEMENTATIONS)
DEFAULT_IMPL = "auto"
AUTO_MIN_LOGITS_BYTES = 64 * 2**20


def next_token_labels(tokens_bt: Array, loss_mask_bt: Array) -> Array:
  """labels[t] = tokens[t+1] where position t+1 carries loss, else -1 (ignored)."""
  labels = jnp.where(loss_mask_bt[:, 1:] > 0, tokens_bt[:, 1:], -1)
  return jnp.pad(labels, ((0, 0), (0, 1)), constant_values=-1).astype(jnp.int32)


def check_impl(impl: str) -> None:
  """A ConfigError unless `impl` names an implementation (`auto` or one of `mirage_kernels`')."""
  if impl not in IMPLEMENTATIONS:
    raise ConfigError(f"unknown loss.logprob_impl {impl!r}; valid: {IMPLEMENTATIONS}")


def reference_token_logprob(hidden_btd: Array, w_dv: Array, labels_bt: Array) -> Array:
  """The oracle path: float32 logits [B, T, V] (XLA differentiates them), then the one gather."""
  logits = jnp.einsum("btd,dv->btv", hidden_btd, w_dv.astype(hidden_btd.dtype),
                      preferred_element_type=jnp.float32)
  return label_logprob(logits, labels_bt)


def kernel_layout(hidden_btd: Array, w_dv: Array) -> mirage_kernels.Layout | None:
  """How the ambient mesh shards the kernel's inputs (None without a mesh of more than one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return None

  def axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)

  (tokens,) = sharding.logical_to_spec(("batch",), hidden_btd.shape[:1], mesh, what="token_logprob tokens")
  embed, vocab = sharding.logical_to_spec(("embed", "vocab"), w_dv.shape, mesh, what="token_logprob head")
  if len(axes(vocab)) > 1:
    vocab = None  # the kernel reduces over one vocabulary axis; leave others to XLA
  return mirage_kernels.Layout(mesh, token_axes=axes(tokens), vocab_axis=(axes(vocab) or (None,))[0],
                               embed_axes=axes(embed))


def _logits_bytes_per_device(hidden_btd: Array, w_dv: Array, layout: mirage_kernels.Layout | None) -> int:
  n = math.prod(hidden_btd.shape[:-1]) * w_dv.shape[1] * 4
  return n if layout is None else n // (layout.size(layout.token_axes) * layout.vocab_shards)


def token_logprob(hidden_btd: Array, w_dv: Array, labels_bt: Array, *, impl: str = "reference") -> Array:
  """float32 [B, T]: log-softmax value of each label; 0 where label < 0."""
  check_impl(impl)
  layout = None if impl == "reference" else kernel_layout(hidden_btd, w_dv)
  if impl == "auto" and _logits_bytes_per_device(hidden_btd, w_dv, layout) < AUTO_MIN_LOGITS_BYTES:
    impl = "reference"
  if impl == "reference":
    return reference_token_logprob(hidden_btd, w_dv, labels_bt)
  try:
    return mirage_kernels.token_logprob(hidden_btd, w_dv, labels_bt,
                                        implementation=None if impl == "auto" else impl, layout=layout)
  except mirage_kernels.UnsupportedError as e:
    if impl == "auto":
      raise
    raise ConfigError(f"loss.logprob_impl={impl!r} cannot run here: {e}") from None


def sequence_logprob(logp_bt: Array, labels_bt: Array) -> tuple[Array, Array]:
  """Per-sequence summed log-prob [B] and the number of scored tokens [B]."""
  valid = (labels_bt >= 0).astype(jnp.float32)
  return jnp.sum(logp_bt * valid, axis=-1), jnp.sum(valid, axis=-1)


def token_kl(hidden_btd: Array, w_dv: Array, ref_hidden_btd: Array, ref_w_dv: Array, labels_bt: Array) -> Array:
  """Mean over scored positions of KL(pi_ref || pi_theta) of the next-token distributions (full logits)."""
  logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden_btd, w_dv.astype(hidden_btd.dtype),
                                       preferred_element_type=jnp.float32), axis=-1)
  ref = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", ref_hidden_btd, ref_w_dv.astype(ref_hidden_btd.dtype),
                                      preferred_element_type=jnp.float32), axis=-1)
  kl_bt = jnp.sum(jnp.exp(ref) * (ref - logp), axis=-1)
  valid = labels_bt >= 0
  return jnp.sum(jnp.where(valid, kl_bt, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
