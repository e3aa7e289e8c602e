"""Training objectives, by name (`config.loss.name`).

A loss object declares the data `streams` it consumes and whether it `needs_reference` (a frozen copy of the
initial parameters); calling it returns `(loss, metrics)` where metrics is a dict of scalars logged per term.
Optional hooks: `init_extras(spec, seed)` (non-trained state saved in checkpoints, e.g. RMU's control
vector), `validate(model_config)` (config checks before compiling), `precompute(reference, batch)` with a
`reference_cache` flag (per-row reference values computed once over the forget split).
"""

from __future__ import annotations

from collections.abc import Mapping

from mirage_jax.losses.graddiff import GradDiff
from mirage_jax.losses.npo import NPO
from mirage_jax.losses.rmu import RMU
from mirage_jax.losses.sft import SFT
from mirage_jax.losses.simnpo import SimNPO

LOSSES = {"sft": SFT, "npo": NPO, "rmu": RMU, "graddiff": GradDiff, "simnpo": SimNPO}


def make_loss(config: Mapping):
  name = config["name"]
  if name not in LOSSES:
    raise ValueError(f"unknown loss.name {name!r}; valid: {sorted(LOSSES)}")
  return LOSSES[name](config)
