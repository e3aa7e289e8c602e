"""SimNPO (Fan et al. 2024): reference-free, length-normalised NPO.

  forget = mean_i -(2/beta) * log sigmoid(-(beta / |y_i|) * log pi_theta(y_i|x_i) - gamma)
  retain = NLL(retain answers)
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mirage_jax.losses import composite, logprob


class SimNPO:
  streams = ("forget", "retain")
  needs_reference = False

  def __init__(self, config: Mapping):
    self.beta = float(config.get("beta", 2.5))
    self.gamma = float(config.get("gamma", 0.0))
    if self.beta <= 0:
      raise ValueError(f"loss.beta={self.beta} must be > 0")
    self.weights = composite.Weights.from_config(config)
    self.impl = config.get("logprob_impl", logprob.DEFAULT_IMPL)

  def __call__(self, model, *, batches, reference=None, extras=None):
    logp, n = composite.score(model, batches["forget"], impl=self.impl).sequence_logprob()
    mean_logp = logp / jnp.maximum(n, 1.0)
    forget = jnp.mean(-(2.0 / self.beta) * jax.nn.log_sigmoid(-self.beta * mean_logp - self.gamma))
    nll = composite.score(model, batches["retain"], impl=self.impl).token_mean_nll()
    return composite.compose(forget, nll, nll, self.weights, forget_mean_logp=jnp.mean(mean_logp))
