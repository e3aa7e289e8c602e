"""Per-token log-probabilities of the next token: the one place every loss gets log p(y_t | y_<t, image).

Losses never see logits: they pass final hidden states and the LM head here, so `config.loss.logprob_impl`
can swap the implementation (the `reference` one materialises float32 logits; fused kernels from
`mirage_kernels` avoid the [tokens x vocab] array) without touching any loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
IMPLEMENTATIONS = ("reference",)


def next_token_labels(tokens_bt: Array, loss_mask_bt: Array) -> Array:
  """labels[t] = tokens[t+1] where position t+1 carries loss, else -1 (ignored)."""
  labels = jnp.where(loss_mask_bt[:, 1:] > 0, tokens_bt[:, 1:], -1)
  return jnp.pad(labels, ((0, 0), (0, 1)), constant_values=-1).astype(jnp.int32)


def reference_token_logprob(hidden_btd: Array, w_dv: Array, labels_bt: Array) -> Array:
  logits = jnp.einsum("btd,dv->btv", hidden_btd, w_dv.astype(hidden_btd.dtype),
                      preferred_element_type=jnp.float32)
  logp_btv = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp_btv, jnp.maximum(labels_bt, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(labels_bt >= 0, picked, 0.0)


def token_logprob(hidden_btd: Array, w_dv: Array, labels_bt: Array, *, impl: str = "reference") -> Array:
  """float32 [B, T]: log-softmax value of each label; 0 where label < 0."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown loss.logprob_impl {impl!r}; valid: {IMPLEMENTATIONS}")
  return reference_token_logprob(hidden_btd, w_dv, labels_bt)


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
