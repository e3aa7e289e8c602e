"""Negative Preference Optimization (Zhang et al. 2024) as the paper uses it, with the official code's
variants as named options.

  forget = -(2/beta) * log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x)))

`normalize`:
  sum         (default, the paper/NPO formula) per-sequence summed answer log-probs, averaged over sequences
  mean_token  (official code) the batch-pooled token-mean NLL difference, one sigmoid per batch
`forget_input`: `answer` (official code: query + harmful answer, loss on the answer) or `query` (paper text:
the unsafe query itself is the forgotten sequence). `retain`: `nll` (default) or `kl` (token KL from the
reference to the policy on retain answers). The reference is the frozen initial (base) model, or a
precomputed per-sequence cache over the forget split (`reference_cache`), which removes the reference forward
from every step when the retain term is `nll`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp

from mirage_jax.errors import ConfigError
from mirage_jax.losses import composite, logprob
from mirage_jax.losses.base import ReferenceCache

Array = jax.Array


class Normalize(enum.StrEnum):
  SUM = "sum"
  MEAN_TOKEN = "mean_token"


class ForgetInput(enum.StrEnum):
  ANSWER = "answer"
  QUERY = "query"


class Retain(enum.StrEnum):
  NLL = "nll"
  KL = "kl"


def npo_forget(logp: Array, ref_logp: Array, n_tokens: Array, *, beta: float, normalize: str) -> tuple[Array, Array]:
  """NPO forget term from per-sequence summed log-probs [B] (and token counts [B]); returns (loss, d)."""
  if normalize == "sum":
    d = logp - ref_logp
    return jnp.mean(-(2.0 / beta) * jax.nn.log_sigmoid(-beta * d)), jnp.mean(d)
  d = (jnp.sum(logp) - jnp.sum(ref_logp)) / jnp.maximum(jnp.sum(n_tokens), 1.0)
  return -(2.0 / beta) * jax.nn.log_sigmoid(-beta * d), d


@dataclasses.dataclass(frozen=True, kw_only=True)
class NPO(composite.Unlearning):
  name: ClassVar[str] = "npo"

  beta: float = 0.5
  normalize: Normalize = Normalize.SUM
  forget_input: ForgetInput = ForgetInput.ANSWER
  retain: Retain = Retain.NLL
  reference_cache: bool = False  # precompute the reference's forget log-probs once (see `cache`)

  def __post_init__(self):
    super().__post_init__()
    if self.beta <= 0:
      raise ConfigError(f"loss.beta={self.beta} must be > 0")

  @property
  def needs_reference(self) -> bool:
    return not self.reference_cache or self.retain == Retain.KL

  @property
  def cache(self) -> ReferenceCache | None:
    return ReferenceCache(stream="forget", keys=("ref_logp", "n_tokens")) if self.reference_cache else None

  def precompute(self, reference, batch: Mapping[str, Array]) -> dict[str, Array]:
    """Per-sequence reference values of a forget batch (the `reference_cache`)."""
    logp, n = composite.score(reference, batch, target=self.forget_input, impl=self.logprob_impl).sequence_logprob()
    return {"ref_logp": logp, "n_tokens": n}

  def __call__(self, model, *, batches, reference=None, extras=None):
    forget_batch, retain_batch = batches["forget"], batches["retain"]
    pol = composite.score(model, forget_batch, target=self.forget_input, impl=self.logprob_impl)
    logp, n = pol.sequence_logprob()
    if self.reference_cache:
      ref_logp = extras[self.cache.key("ref_logp")][forget_batch["row"]]
    else:
      ref_logp = jax.lax.stop_gradient(self.precompute(reference, forget_batch)["ref_logp"])
    forget, d = npo_forget(logp, ref_logp, n, beta=self.beta, normalize=self.normalize)

    ret = composite.score(model, retain_batch, impl=self.logprob_impl)
    nll = ret.token_mean_nll()
    if self.retain == Retain.KL:
      ref_hidden = jax.lax.stop_gradient(reference(retain_batch).hidden_btd)
      retain = logprob.token_kl(ret.hidden_btd, model.head_weight(), ref_hidden,
                                jax.lax.stop_gradient(reference.head_weight()), ret.labels_bt)
    else:
      retain = nll
    return self.compose(forget, retain, nll, logratio=d, forget_nll=-jnp.sum(logp) / jnp.maximum(jnp.sum(n), 1.0))
