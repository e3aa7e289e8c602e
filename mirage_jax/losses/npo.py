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

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mirage_jax.losses import composite, logprob

Array = jax.Array
NORMALIZE = ("sum", "mean_token")
FORGET_INPUT = ("answer", "query")
RETAIN = ("nll", "kl")


def _choice(config: Mapping, key: str, valid: tuple[str, ...], default: str) -> str:
  value = config.get(key, default)
  if value not in valid:
    raise ValueError(f"loss.{key}={value!r}; valid: {valid}")
  return value


def npo_forget(logp: Array, ref_logp: Array, n_tokens: Array, *, beta: float, normalize: str) -> tuple[Array, Array]:
  """NPO forget term from per-sequence summed log-probs [B] (and token counts [B]); returns (loss, d)."""
  if normalize == "sum":
    d = logp - ref_logp
    return jnp.mean(-(2.0 / beta) * jax.nn.log_sigmoid(-beta * d)), jnp.mean(d)
  d = (jnp.sum(logp) - jnp.sum(ref_logp)) / jnp.maximum(jnp.sum(n_tokens), 1.0)
  return -(2.0 / beta) * jax.nn.log_sigmoid(-beta * d), d


class NPO:
  streams = ("forget", "retain")

  def __init__(self, config: Mapping):
    self.beta = float(config.get("beta", 0.5))
    if self.beta <= 0:
      raise ValueError(f"loss.beta={self.beta} must be > 0")
    self.normalize = _choice(config, "normalize", NORMALIZE, "sum")
    self.forget_input = _choice(config, "forget_input", FORGET_INPUT, "answer")
    self.retain = _choice(config, "retain", RETAIN, "nll")
    self.reference_cache = bool(config.get("reference_cache", False))
    self.weights = composite.Weights.from_config(config)
    self.impl = config.get("logprob_impl", logprob.DEFAULT_IMPL)

  @property
  def needs_reference(self) -> bool:
    return not self.reference_cache or self.retain == "kl"

  def precompute(self, reference, batch: Mapping[str, Array]) -> dict[str, Array]:
    """Per-sequence reference values of a forget batch (the `reference_cache`)."""
    logp, n = composite.score(reference, batch, target=self.forget_input, impl=self.impl).sequence_logprob()
    return {"ref_logp": logp, "n_tokens": n}

  def __call__(self, model, *, batches, reference=None, extras=None):
    forget_batch, retain_batch = batches["forget"], batches["retain"]
    pol = composite.score(model, forget_batch, target=self.forget_input, impl=self.impl)
    logp, n = pol.sequence_logprob()
    if self.reference_cache:
      ref_logp = extras["cache/forget/ref_logp"][forget_batch["row"]]
    else:
      ref_logp = jax.lax.stop_gradient(self.precompute(reference, forget_batch)["ref_logp"])
    forget, d = npo_forget(logp, ref_logp, n, beta=self.beta, normalize=self.normalize)

    ret = composite.score(model, retain_batch, impl=self.impl)
    nll = ret.token_mean_nll()
    if self.retain == "kl":
      ref_hidden = jax.lax.stop_gradient(reference(retain_batch).hidden_btd)
      retain = logprob.token_kl(ret.hidden_btd, model.head_weight(), ref_hidden,
                                jax.lax.stop_gradient(reference.head_weight()), ret.labels_bt)
    else:
      retain = nll
    return composite.compose(forget, retain, nll, self.weights, logratio=d, forget_nll=-jnp.sum(logp) /
                             jnp.maximum(jnp.sum(n), 1.0))
