"""Gradient Difference: gradient ascent on the forget answers, descent on retain.

  forget = -NLL(forget answers)   (token mean; unbounded below, so steps and lr matter)
  retain = NLL(retain answers)
"""

from __future__ import annotations

from collections.abc import Mapping

from mirage_jax.losses import composite, logprob


class GradDiff:
  streams = ("forget", "retain")
  needs_reference = False

  def __init__(self, config: Mapping):
    self.weights = composite.Weights.from_config(config)
    self.impl = config.get("logprob_impl", logprob.DEFAULT_IMPL)

  def __call__(self, model, *, batches, reference=None, extras=None):
    forget_nll = composite.score(model, batches["forget"], impl=self.impl).token_mean_nll()
    nll = composite.score(model, batches["retain"], impl=self.impl).token_mean_nll()
    return composite.compose(-forget_nll, nll, nll, self.weights, forget_nll=forget_nll)
