"""Supervised fine-tuning: token-mean negative log-likelihood of the answer tokens.

Used for the base model, mixed and post-hoc safety SFT, and as the `l_ft` retain term of unlearning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import jax

from mirage_jax.losses import base, composite

Array = jax.Array


def nll(model, batch: Mapping[str, Array], *, impl: str) -> Array:
  """Token-mean NLL of the answer tokens over the whole batch (the HF causal-LM loss)."""
  return composite.score(model, batch, impl=impl).token_mean_nll()


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFT(base.Loss):
  """Cross-entropy on the `train` stream."""

  name: ClassVar[str] = "sft"
  streams: ClassVar[tuple[str, ...]] = ("train",)

  def __call__(self, model, *, batches: Mapping[str, Mapping[str, Array]], reference=None, extras=None):
    del reference, extras
    loss = nll(model, batches["train"], impl=self.logprob_impl)
    return loss, {"nll": loss}
