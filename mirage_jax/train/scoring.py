"""Teacher-forced scoring of answers: loss and token accuracy per split (the training loop's eval hook).

This path materialises logits (for the argmax), which is fine at eval batch sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mirage_jax.losses import logprob

Array = jax.Array


def make_score_step(spec):
  """jitted (params, batch) -> summed NLL, correct tokens and scored tokens (rows weighted by `weight`)."""

  def score(params, batch):
    model = spec.merge(params)
    labels = logprob.next_token_labels(batch["tokens"], batch["loss_mask"])
    logits = model.logits(model(batch).hidden_btd)
    picked = logprob.label_logprob(logits, labels)  # 0 where label < 0 (those rows weigh 0 anyway)
    valid = (labels >= 0) * batch["weight"][:, None]
    correct = (jnp.argmax(logits, axis=-1) == labels) * valid
    return {"nll": -jnp.sum(picked * valid), "correct": jnp.sum(correct), "tokens": jnp.sum(valid)}

  return jax.jit(score)


def score_batches(score_step, params, batches: Iterable[Mapping[str, np.ndarray]], put) -> dict[str, float]:
  """Aggregate `score_step` over batches (`put` moves a host batch to devices)."""
  total = {"nll": 0.0, "correct": 0.0, "tokens": 0.0}
  for batch in batches:
    out = jax.device_get(score_step(params, put(batch)))
    for k in total:
      total[k] += float(out[k])
  n = max(total["tokens"], 1.0)
  return {"loss": total["nll"] / n, "token_accuracy": total["correct"] / n}
