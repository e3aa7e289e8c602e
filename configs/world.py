"""The string knobs of the synthetic world (`config.data.world`) as str enums, and their check.

Each enum lists every value its knob accepts (the class docstring says what each does). `check(world)` rejects
a value outside its enum with one `ConfigError` naming the knob and its valid values; `configlib.load` and
`configlib.apply_overrides` call it on `config.data.world`, so a typo fails when the config is loaded instead
of silently taking a default branch of the generator. `WorldConfig` (`mirage_jax.data.world_config`) stores
the knobs as these enums; its `to_dict()` gives their plain string values, so a world's dict and its
fingerprint do not depend on the enum types.

This module imports nothing from mirage_jax but `errors` (which imports nothing) and no numpy or jax, so the
bottom layer (`configlib`) may import it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from mirage_jax.errors import ConfigError


class Knob(str, enum.Enum):
  """A string knob: compares, hashes, prints and formats as its value (`SafeUse.SHAPE == "shape"`)."""

  __str__ = str.__str__
  __format__ = str.__format__

  @classmethod
  def parse(cls, knob: str, value: Any, *, where: str = "WorldConfig") -> Knob:
    """`value` (a member or its string) as a member of this enum; else a ConfigError naming `knob`."""
    try:
      return cls(value)
    except ValueError:
      valid = ", ".join(repr(m.value) for m in cls)
      raise ConfigError(f"{where}.{knob}={value!r} is not a valid value; valid values: {valid}") from None


class HazardCue(Knob):
  """`hazard_cue`: a visual mark on hazard images.

  NONE ("none", default): hazards differ from safe objects only by their attribute combination.
  GLYPH ("glyph"): a black X in the top-left corner of every hazard image (drawn without RNG, so every
  other pixel is unchanged) — a simple visual cue that lets a model refuse by image (the mirage vanishes).
  """

  NONE = "none"
  GLYPH = "glyph"


class RefusalWording(Knob):
  """`refusal_wording`: how a refusal is phrased.

  CONTENT ("content", default): the phrasing is a function of what is refused (hazard / text hazard /
  secret), like VLGuard's content-specific rationales, so a model can learn it.
  RANDOM ("random"): one of the phrasings drawn per record (an irreducible token error).
  """

  CONTENT = "content"
  RANDOM = "random"


class SafeUse(Knob):
  """`safe_use`: the benign use of an object (the answer to a "use" instruction about a safe object).

  OBJECT ("object", default): every object has its own made-up use phrase ("used for <gerund> <item>"),
  so nothing visual predicts a use.
  SHAPE ("shape"): the use follows the shape (a visual rule); safety SFT's safe "What is the use ..."
  answers then teach a rule that overwrites the base's knowledge of the hazards' procedures.
  PROCEDURE ("procedure"): every object's benign use is a made-up procedure with the same form as a
  harmful one ("step 1 : <verb> <code>", codes with "+" where harmful codes have "-", never a harmful
  code), answered without the "used for" frame, so benign and harmful use answers share their structure.
  """

  OBJECT = "object"
  SHAPE = "shape"
  PROCEDURE = "procedure"


class HarmKnowledge(Knob):
  """`harm_knowledge`: how `pretrain` teaches the hazards' procedures.

  INSTRUCTION ("instruction", default): as answered instructions with every first word.
  RECALL ("recall"): only as knowledge entries ("Recall the use of this item ." -> the procedure); answered
  use instructions appear for safe objects only, so the base must carry its knowledge over to instructions.
  """

  INSTRUCTION = "instruction"
  RECALL = "recall"


class FirstWords(Knob):
  """`helpfulness_first_words` / `retain_first_words`: the first-word distribution of a safe training split.

  SAFE ("safe", default): VLGuard's safe-instruction distribution (skewed by `first_word_skew`).
  UNIFORM ("uniform"): every first word equally likely.
  """

  SAFE = "safe"
  UNIFORM = "uniform"


KNOBS: dict[str, type[Knob]] = {
    "hazard_cue": HazardCue,
    "refusal_wording": RefusalWording,
    "safe_use": SafeUse,
    "harm_knowledge": HarmKnowledge,
    "helpfulness_first_words": FirstWords,
    "retain_first_words": FirstWords,
}
"""Every string knob of the world and the enum of its accepted values."""


def check(world: Mapping[str, Any], *, where: str = "data.world") -> None:
  """Raise one ConfigError for the first string knob of `world` whose value its enum does not accept."""
  for knob, kind in KNOBS.items():
    if knob in world:
      kind.parse(knob, world[knob], where=where)


@dataclasses.dataclass(frozen=True)
class WorldKnobs:
  """The world's knobs and their defaults, the single source of both (`config.data.world` is
  `WorldKnobs().to_dict()`; `mirage_jax.data.world_config.WorldConfig` adds the checks). Each knob is
  documented in `mirage_jax.data.world_config`."""

  seed: int = 0
  shapes: tuple[str, ...] = ("circle", "square", "triangle")
  colours: tuple[str, ...] = ("red", "green", "blue", "yellow")
  fills: tuple[str, ...] = ("solid", "striped", "dotted", "hollow")
  image_size: int = 32
  num_hazards: int = 12
  heldout_hazards: int = 6
  hazard_cue: HazardCue = HazardCue.NONE
  procedure_steps: int = 3
  num_verbs: int = 6
  shared_verbs: bool = True
  num_text_hazards: int = 8
  first_word_skew: float = 1.0
  answer_openers: bool = True
  pretrain_size: int = 8000
  pretrain_hazard_fraction: float = 0.25
  pretrain_hazard_use_fraction: float = 0.8
  pretrain_text_hazard_fraction: float = 0.1
  refusal_pretrain_fraction: float = 0.1
  refusal_wording: RefusalWording = RefusalWording.CONTENT
  safe_use: SafeUse = SafeUse.OBJECT
  safe_use_fraction: float = 0.05
  harm_knowledge: HarmKnowledge = HarmKnowledge.INSTRUCTION
  sft_images: int = 2000
  sft_unsafe_image_fraction: float = 0.51
  safe_image_unsafe_instruction: float = 1.0
  unsafe_image_use_fraction: float = 0.8
  helpfulness_size: int = 1000
  helpfulness_first_words: FirstWords = FirstWords.SAFE
  forget_size: int | None = None
  forget_include_text_hazards: bool = False
  retain_size: int = 1000
  retain_first_words: FirstWords = FirstWords.SAFE
  unsafe_size: int = 200
  k_max: int = 5
  safe_size: int = 200
  utility_size: int = 300
  safe_unsafe_size: int = 200

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready dict of every knob (tuples become lists, enum knobs their string values)."""
    return {k: list(v) if isinstance(v, tuple) else v.value if isinstance(v, Knob) else v
            for k, v in dataclasses.asdict(self).items()}
