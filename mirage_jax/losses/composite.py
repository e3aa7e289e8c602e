"""The paper's composite unlearning objective (Eq. 4) and pieces every unlearning method shares.

  loss = forget_term + alpha * method_retain_term + ft_weight * CE(retain)

The `forget` and `retain` streams cycle independently and never run dry (`mirage_jax.data.pipeline`); one
retain batch feeds both retain terms (the official code draws two). `ft_weight = 0` is allowed (the
ablation the paper reports as unstable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp

from mirage_jax.errors import ConfigError
from mirage_jax.losses import logprob
from mirage_jax.losses.base import Loss

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unlearning(Loss):
  """Base of the unlearning losses: the composite's weights (defined here only) and its two streams."""

  streams: ClassVar[tuple[str, ...]] = ("forget", "retain")

  alpha: float = 1.0  # method retain term
  ft_weight: float = 1.0  # CE on retain (l_ft)

  def __post_init__(self):
    super().__post_init__()
    if self.alpha < 0 or self.ft_weight < 0:
      raise ConfigError(f"loss.alpha={self.alpha} and loss.ft_weight={self.ft_weight} must be >= 0")

  def compose(self, forget: Array, retain: Array, ft: Array, **extra: Array) -> tuple[Array, dict]:
    """(forget + alpha * retain + ft_weight * ft, the terms and `extra` as metrics)."""
    loss = forget + self.alpha * retain + self.ft_weight * ft
    return loss, {"forget": forget, "retain": retain, "ft": ft, **extra}


@dataclasses.dataclass
class Scored:
  """A forward pass scored on one batch: per-token log-probs of its labels, and the layers collected."""

  logp_bt: Array
  labels_bt: Array
  layers: dict[int, Array]
  hidden_btd: Array

  def token_mean_nll(self) -> Array:
    return -jnp.sum(self.logp_bt) / jnp.maximum(jnp.sum(self.labels_bt >= 0), 1)

  def sequence_logprob(self) -> tuple[Array, Array]:
    return logprob.sequence_logprob(self.logp_bt, self.labels_bt)


def score(model, batch: Mapping[str, Array], *, target: str = "answer", impl: str = "reference",
          collect: tuple[int, ...] = ()) -> Scored:
  """Log-probs of the `answer` tokens (loss_mask) or of the `query` tokens (query_mask) under `model`."""
  masks = {"answer": "loss_mask", "query": "query_mask"}
  if target not in masks:
    raise ValueError(f"unknown scoring target {target!r}; valid: {sorted(masks)}")
  labels = logprob.next_token_labels(batch["tokens"], batch[masks[target]])
  out = model(batch, collect=collect)
  return Scored(logprob.token_logprob(out.hidden_btd, model.head_weight(), labels, impl=impl), labels,
                out.layers, out.hidden_btd)
