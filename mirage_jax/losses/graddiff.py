"""Gradient Difference: gradient ascent on the forget answers, descent on retain.

  forget = -NLL(forget answers)   (token mean; unbounded below, so steps and lr matter)
  retain = NLL(retain answers)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mirage_jax.losses import composite


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradDiff(composite.Unlearning):
  name: ClassVar[str] = "graddiff"

  def __call__(self, model, *, batches, reference=None, extras=None):
    forget_nll = composite.score(model, batches["forget"], impl=self.logprob_impl).token_mean_nll()
    nll = composite.score(model, batches["retain"], impl=self.logprob_impl).token_mean_nll()
    return self.compose(-forget_nll, nll, nll, forget_nll=forget_nll)
