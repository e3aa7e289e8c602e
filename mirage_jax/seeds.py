"""Every seed derivation of the project, in one place (stable across processes and hosts: no salted `hash`).

Two host-side derivations, each kept bit-stable because built datasets and recorded runs depend on them:
  `rng(seed, stream)`      the synthetic world's draws: a numpy Generator from (seed, sha256(stream))
  `derive(seed, name)`     a 32-bit integer seed from (seed, bytes of name): data order of a split or stream
and the device-side keys of a run (`key(seed, purpose)`: `jax.random.fold_in` of the run seed with a fixed
constant per purpose). This module imports numpy only (jax lazily), so every layer may use it.
"""

from __future__ import annotations

import hashlib

import numpy as np

# jax.random.fold_in constants, one per purpose of a run's seed.
PRNG_STATE = 1  # the TrainState's PRNG key
RMU_CONTROL = 0x524D55  # "RMU": the control vector's direction


def rng(seed: int, stream: str) -> np.random.Generator:
  """A numpy Generator seeded by (seed, stream) through sha256."""
  key = int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "little")
  return np.random.default_rng(np.random.SeedSequence([seed, key]))


def derive(seed: int, name: str, *, bits: int = 32) -> int:
  """A `bits`-bit integer seed from (seed, name); `bits=31` for consumers that take a signed int32."""
  return int(np.random.SeedSequence([seed, *name.encode()]).generate_state(1)[0]) % (2**bits)


def key(seed: int, purpose: int):
  """The JAX PRNG key of one purpose (`PRNG_STATE`, `RMU_CONTROL`) of a run seeded with `seed`."""
  import jax
  return jax.random.fold_in(jax.random.key(seed), purpose)
