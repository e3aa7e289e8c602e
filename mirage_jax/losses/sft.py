"""Supervised fine-tuning: token-mean negative log-likelihood of the answer tokens.

Used for the base model, mixed and post-hoc safety SFT, and as the `l_ft` retain term of unlearning.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mirage_jax.losses import logprob

Array = jax.Array


def answer_logprob(model, batch: Mapping[str, Array], *, impl: str) -> tuple[Array, Array]:
  """Token log-probs [B, T] of the answer tokens under `model`, and their labels (-1 = not scored)."""
  labels = logprob.next_token_labels(batch["tokens"], batch["loss_mask"])
  out = model(batch)
  return logprob.token_logprob(out.hidden_btd, model.head_weight(), labels, impl=impl), labels


def nll(model, batch: Mapping[str, Array], *, impl: str) -> Array:
  """Token-mean NLL over the whole batch (the HF causal-LM loss)."""
  logp, labels = answer_logprob(model, batch, impl=impl)
  n = jnp.maximum(jnp.sum(labels >= 0), 1)
  return -jnp.sum(logp) / n


class SFT:
  """Cross-entropy on the `train` stream."""

  streams = ("train",)
  needs_reference = False

  def __init__(self, config: Mapping):
    self.impl = config.get("logprob_impl", logprob.DEFAULT_IMPL)

  def __call__(self, model, *, batches: Mapping[str, Mapping[str, Array]], reference=None, extras=None):
    del reference, extras
    loss = nll(model, batches["train"], impl=self.impl)
    return loss, {"nll": loss}
