"""Training objectives, by name (`config.loss.name`).

A loss object declares the data `streams` it consumes and whether it `needs_reference` (a frozen copy of the
initial parameters); calling it returns `(loss, metrics)` where metrics is a dict of scalars logged per term.
"""

from __future__ import annotations

from collections.abc import Mapping

from mirage_jax.losses.sft import SFT

LOSSES = {"sft": SFT}


def make_loss(config: Mapping):
  name = config["name"]
  if name not in LOSSES:
    raise ValueError(f"unknown loss.name {name!r}; valid: {sorted(LOSSES)}")
  return LOSSES[name](config)
