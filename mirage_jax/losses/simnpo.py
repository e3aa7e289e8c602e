"""SimNPO (Fan et al. 2024): reference-free, length-normalised NPO.

  forget = mean_i -(2/beta) * log sigmoid(-(beta / |y_i|) * log pi_theta(y_i|x_i) - gamma)
  retain = NLL(retain answers)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mirage_jax.errors import ConfigError
from mirage_jax.losses import composite


@dataclasses.dataclass(frozen=True, kw_only=True)
class SimNPO(composite.Unlearning):
  name: ClassVar[str] = "simnpo"

  beta: float = 2.5
  gamma: float = 0.0

  def __post_init__(self):
    super().__post_init__()
    if self.beta <= 0:
      raise ConfigError(f"loss.beta={self.beta} must be > 0")

  def __call__(self, model, *, batches, reference=None, extras=None):
    logp, n = composite.score(model, batches["forget"], impl=self.logprob_impl).sequence_logprob()
    mean_logp = logp / jnp.maximum(n, 1.0)
    forget = jnp.mean(-(2.0 / self.beta) * jax.nn.log_sigmoid(-self.beta * mean_logp - self.gamma))
    nll = composite.score(model, batches["retain"], impl=self.logprob_impl).token_mean_nll()
    return self.compose(forget, nll, nll, forget_mean_logp=jnp.mean(mean_logp))
