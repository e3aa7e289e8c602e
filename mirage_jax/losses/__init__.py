"""Training objectives, by name (`config.loss.name`).

Every loss is a frozen, keyword-only dataclass built from its config block (`make_loss(config.loss)`); its
fields are its keys and their defaults. The protocol the training loop relies on (`Loss`, in
`mirage_jax.losses.base`):

  streams          data streams it consumes (`config.data.streams` names)
  needs_reference  whether the frozen reference model runs in every step
  cache            `ReferenceCache` (stream and keys of per-row reference values computed once) or None
  decoder_layers   the decoder layers it trains (RMU: from `loss.layer`) or None
  init_extras(spec, seed)  non-trained state saved in checkpoints (RMU's control vector)
  validate(model_config)   checks before compiling
  precompute(reference, batch)  the cached values of one batch (losses with a cache)

Calling a loss returns `(loss, metrics)` where metrics is a dict of scalars logged per term. The unlearning
losses share the composite weights `alpha` and `ft_weight` (`composite.Unlearning`); every loss has
`logprob_impl` (`Loss`).
"""

from __future__ import annotations

from collections.abc import Mapping

from mirage_jax.errors import ConfigError
from mirage_jax.losses.base import Loss, ReferenceCache
from mirage_jax.losses.graddiff import GradDiff
from mirage_jax.losses.npo import NPO
from mirage_jax.losses.rmu import RMU
from mirage_jax.losses.sft import SFT
from mirage_jax.losses.simnpo import SimNPO

LOSSES: dict[str, type[Loss]] = {cls.name: cls for cls in (SFT, NPO, RMU, GradDiff, SimNPO)}

__all__ = ["LOSSES", "Loss", "ReferenceCache", "make_loss"]


def make_loss(config: Mapping) -> Loss:
  """The loss a `config.loss` block names; unknown names and keys are ConfigErrors."""
  name = config["name"]
  if name not in LOSSES:
    raise ConfigError(f"unknown loss.name {name!r}; valid: {sorted(LOSSES)}")
  return LOSSES[name].from_config(config)
