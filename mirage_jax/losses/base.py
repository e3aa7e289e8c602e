"""The loss protocol: every training objective is a frozen, keyword-only dataclass built from its config block.

A loss's fields are its config keys and their defaults (the one place they are defined); `from_config`
refuses a key the loss does not define, naming the loss and its valid keys. What the training loop needs to
know about a loss is declared here, never probed:

  streams          the data streams (`config.data.streams` names) it consumes
  needs_reference  whether the frozen reference (the `init_from` parameters) runs in every step
  cache            a `ReferenceCache` (per-row reference values computed once over one stream's split), or None
  decoder_layers   the decoder layers it trains (RMU), or None (the optimizer config decides)
  init_extras      non-trained state saved in checkpoints (e.g. RMU's control vector)
  validate         checks against the model config, before anything compiles

Calling a loss, `loss(model, batches=..., reference=..., extras=...)`, returns `(loss, metrics)`: metrics is a
dict of scalars logged per term.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import jax

from mirage_jax.errors import ConfigError
from mirage_jax.losses import logprob

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ReferenceCache:
  """Per-row values of the reference model over the (single) split of stream `stream`, computed once before
  training by `loss.precompute(reference_model, batch)` (which returns `keys`), stored in the extras."""

  stream: str
  keys: tuple[str, ...]

  def key(self, name: str) -> str:
    """The extras (and checkpoint) key of one cached value."""
    return f"cache/{self.stream}/{name}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Loss:
  """Base of every loss (see the module docstring for the protocol)."""

  name: ClassVar[str]
  streams: ClassVar[tuple[str, ...]]

  logprob_impl: str = logprob.DEFAULT_IMPL  # see `mirage_jax.losses.logprob`

  def __post_init__(self):
    hints = typing.get_type_hints(type(self))
    for f in dataclasses.fields(self):
      kind = hints[f.name]
      if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
          object.__setattr__(self, f.name, kind(getattr(self, f.name)))
        except ValueError:
          raise ConfigError(f"loss.{f.name}={getattr(self, f.name)!r}; valid: {tuple(e.value for e in kind)}"
                            ) from None
    logprob.check_impl(self.logprob_impl)

  @classmethod
  def keys(cls) -> tuple[str, ...]:
    """The config keys this loss defines (besides `name`)."""
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_config(cls, block: Mapping) -> "Loss":
    """The loss of a `config.loss` block; every key must be one of this loss's fields."""
    values = {k: v for k, v in block.items() if k != "name"}
    valid = cls.keys()
    unknown = sorted(set(values) - set(valid))
    if unknown:
      raise ConfigError(f"loss {cls.name!r} does not define {', '.join(unknown)}; its keys are: name, "
                        f"{', '.join(valid)}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
      raise ConfigError(f"loss {cls.name!r} needs loss.{', loss.'.join(missing)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

  @property
  def needs_reference(self) -> bool:
    return False

  @property
  def cache(self) -> ReferenceCache | None:
    return None

  @property
  def decoder_layers(self) -> tuple[int, ...] | None:
    return None

  def init_extras(self, spec, seed: int) -> dict[str, Array]:
    del spec, seed
    return {}

  def validate(self, model_config) -> None:
    del model_config

  def precompute(self, reference, batch: Mapping[str, Array]) -> dict[str, Array]:
    """The `cache` values of one batch of its stream under the reference model (losses with a cache)."""
    raise NotImplementedError(f"loss {self.name!r} has no reference cache")

  def __call__(self, model, *, batches: Mapping[str, Mapping[str, Array]], reference=None,
               extras=None) -> tuple[Array, dict[str, Array]]:
    raise NotImplementedError


def _coerce(key: str, value: Any, kind: Any) -> Any:
  """A config value as the field's type (ints given for floats, e.g. `--config.loss.beta=1`)."""
  if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if kind is int and isinstance(value, int) and not isinstance(value, bool):
    return int(value)
  if kind is bool and not isinstance(value, bool):
    raise ConfigError(f"loss.{key}={value!r}: expected true or false")
  if kind in (float, int) and not isinstance(value, (int, float)) or isinstance(value, bool) and kind in (float, int):
    raise ConfigError(f"loss.{key}={value!r}: expected a {kind.__name__}")
  return value
