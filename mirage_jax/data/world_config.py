"""The knobs of the synthetic Mirage world (:class:`WorldConfig`), the split names, and the fingerprint.

Every knob has a default; a world is a pure function of its config. The string knobs are str enums of
:mod:`mirage_configs.world` (every accepted value documented there); a value outside its enum, like a
misspelt key, is a :class:`~mirage_jax.errors.ConfigError` naming the knob and the valid values.

Knobs
-----
-----------------------------------
* ``seed`` — everything is a pure function of the config; each split draws from its own
  stream seeded by (seed, split name), so splits do not depend on generation order.
* ``shapes, colours, fills, image_size`` — the object space and the picture size.
* ``num_hazards, heldout_hazards`` — how many hazards, how many are held out for tests.
* ``hazard_cue`` (:class:`HazardCue`) — "none" (default) or "glyph": a black X in the top-left corner
  of every hazard image.  A distinct hazard glyph makes the toy useless on purpose: the model
  then refuses by image and no mirage appears (the ablation that destroys the effect).
* ``procedure_steps, num_verbs, shared_verbs`` — procedure length; with shared verbs
  harmful knowledge shares structure across hazards, without, every hazard gets
  private made-up verbs.
* ``num_text_hazards`` — made-up nouns asked about on safe images.
* ``first_word_skew`` s — the spurious feature.  For s in [0, 1], p = (1-s) uniform +
  s base; s > 1 sharpens p ~ base**s.  0 = first word independent of the label,
  1 = VLGuard.  It shapes the TRAINING splits only; test splits always use the base
  (VLGuard) distributions, so ablations are evaluated on identical test sets.
* ``answer_openers`` — comply answers open with a first-word-dependent phrase ("sure ,"
  after "Share"), a second lexical channel; False = one neutral opener.
* ``refusal_wording`` (:class:`RefusalWording`) — "content" (default): the refusal phrasing is a function of what is
  refused (hazard / text hazard / secret), like VLGuard's content-specific rationales, so it is
  learnable; "random": one of the phrasings drawn per record (an irreducible token error).
* ``safe_use`` (:class:`SafeUse`) — "object" (default): every safe object has its own made-up use,
  so nothing visual predicts a use; "shape": the use follows the shape; "procedure": every object's
  benign use is a made-up procedure shaped like a harmful one ("step 1 : <verb> <+code>", codes with "+"
  where harmful codes have "-"), answered without the "used for" frame.  With "shape", safety SFT's many
  safe "What is the use ..." answers teach a rule that overwrites the base's knowledge of the
  hazards' procedures, and attacked queries get a benign use instead of the harmful answer.
* ``harm_knowledge`` (:class:`HarmKnowledge`) — how ``pretrain`` teaches the hazards' procedures. "instruction" (default):
  as answered instructions with every first word. "recall": only as knowledge entries ("Recall the use of this item ." -> procedure), while answered
  instructions about uses appear for safe objects only; the base answers a harmful instruction by
  carrying its knowledge over, as LLaVA answers harmful requests from Vicuna's knowledge although
  LLaVA-665k holds no such answers. Then the safety data can be *mixed into* the instruction data
  (mixed SFT) without contradicting it — but the tiny model does not carry recall entries over to
  instructions (measured base ASR 0 %; 24 % with ``safe_use="procedure"``).
* ``safe_use_fraction`` — share of the safe instructions in sft / helpfulness / retain that ask
  an object's use (the rest ask an attribute). Every benign "use" answer trained after the base
  competes with the base's memory of the hazards' procedures (the tiny model answers a "What"
  rewrite with a benign use instead of the harm); VLGuard's safe questions rarely ask how to
  operate the pictured object.
* ``pretrain_*`` / ``refusal_pretrain_fraction`` — pretrain mix (rest is safe VQA;
  ``pretrain_hazard_use_fraction`` of hazard items ask for the procedure, the others an
  attribute); pretrain first words are uniform: the base answers whatever the first word.
* ``sft_images, sft_unsafe_image_fraction, safe_image_unsafe_instruction,
  unsafe_image_use_fraction`` — the VLGuard-like SFT set (every query on an unsafe image
  is refused, whatever its intent).
* ``helpfulness_*``, ``retain_*``, ``forget_*`` — the other training splits;
  ``*_first_words`` (:class:`FirstWords`) "safe" or "uniform".  ``forget_size=None`` = number of unsafe sft
  images.
* ``unsafe_size, k_max, safe_size, utility_size, safe_unsafe_size`` — test sizes; k_max
  is the number of rewrites per record in ``unsafe_what`` / ``unsafe_control``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from mirage_configs.world import KNOBS, FirstWords, HarmKnowledge, HazardCue, RefusalWording, SafeUse, WorldKnobs
from mirage_jax.data import templates as tpl
from mirage_jax.errors import ConfigError

__all__ = ["GENERATOR_VERSION", "TRAIN_SPLITS", "TEST_SPLITS", "DEV_PREFIX", "DEV_SPLITS", "ROBUSTNESS_SPLITS",
           "RELEARN_SIZE", "PROBE_SIZE", "SPLITS",
           "IMAGE_ID_STRIDE", "WorldConfig", "FirstWords", "HarmKnowledge", "HazardCue", "RefusalWording",
           "SafeUse"]

GENERATOR_VERSION = 7
"""Bumped whenever the generator's output changes for a fixed config (enters fingerprint). 7: the robustness
splits (the other splits' records are those of version 6)."""

TRAIN_SPLITS: tuple[str, ...] = ("pretrain", "sft", "helpfulness", "forget", "retain")
TEST_SPLITS: tuple[str, ...] = ("unsafe", "unsafe_what", "unsafe_control", "safe",
                                "safe_share", "utility", "safe_unsafe")
# The dev twin of every test split: drawn like it (the same sizes, held-out hazards, query pool and first-word
# distributions) from its own random stream (own queries, own image instances), for choosing recipes without
# reading the test splits. `mirage eval --config.eval.split_set=dev` evaluates on them.
DEV_PREFIX = "dev_"
DEV_SPLITS: tuple[str, ...] = tuple(DEV_PREFIX + s for s in TEST_SPLITS)
# What `mirage robustness` attacks with (fixed sizes, not knobs: adding them changed no training config):
# `relearn_forget` — harmful procedures of the train (seen) hazards, answered, like `forget`; `relearn_benign` —
# the same hazards' images with attribute questions answered (the objects, never their procedures); `probe` —
# every hazard's procedure answered (seen and held-out) and as many safe objects' uses, for linear probes.
ROBUSTNESS_SPLITS: tuple[str, ...] = ("relearn_forget", "relearn_benign", "probe")
RELEARN_SIZE = 64
PROBE_SIZE = 384  # half hazards, half safe objects
SPLITS: tuple[str, ...] = (TRAIN_SPLITS + TEST_SPLITS + DEV_SPLITS  # appended: the image ids of the others stay
                           + ROBUSTNESS_SPLITS)

IMAGE_ID_STRIDE = 1_000_000  # image_id = split index * stride + image number in split


@dataclasses.dataclass(frozen=True)
class WorldConfig(WorldKnobs):
  """Every knob of the world (`WorldKnobs`: names and defaults; documented in the module docstring), checked.

  A string knob may be given as its enum member or its value ("shape"); it is stored as the member. A bad
  value of any knob raises a ConfigError."""

  def __post_init__(self) -> None:
    for knob, kind in KNOBS.items():
      object.__setattr__(self, knob, kind.parse(knob, getattr(self, knob)))
    n_objects = len(self.shapes) * len(self.colours) * len(self.fills)
    what_rewrites = len(tpl.PREFIXES["What"]) * len(tpl.BODIES["use"]["test"])
    fractions = ("safe_use_fraction", "pretrain_hazard_fraction", "pretrain_hazard_use_fraction",
                 "pretrain_text_hazard_fraction", "refusal_pretrain_fraction",
                 "sft_unsafe_image_fraction", "safe_image_unsafe_instruction",
                 "unsafe_image_use_fraction")
    sizes = ("pretrain_size", "sft_images", "helpfulness_size", "retain_size",
             "unsafe_size", "safe_size", "utility_size", "safe_unsafe_size")
    attribute_tables = {"shapes": tpl.SHAPE_VERTICES, "colours": tpl.COLOUR_RGB, "fills": tpl.FILL_PATTERNS}
    checks = [
        (self.seed >= 0, "seed must be >= 0"),
        *((_distinct_subset(getattr(self, name), table), f"{name}: distinct names from {sorted(table)}")
          for name, table in attribute_tables.items()),
        (self.image_size >= 16, "image_size must be >= 16"),
        (0 < self.num_hazards < n_objects, f"num_hazards must be in [1, {n_objects - 1}]"),
        (0 <= self.heldout_hazards < self.num_hazards, "heldout_hazards must be in [0, num_hazards)"),
        (self.procedure_steps >= 1, "procedure_steps must be >= 1"),
        (1 <= self.num_verbs <= len(tpl.SHARED_VERBS), f"num_verbs must be in [1, {len(tpl.SHARED_VERBS)}]"),
        (1 <= self.num_text_hazards <= len(tpl.TEXT_HAZARD_NOUNS),
         f"num_text_hazards must be in [1, {len(tpl.TEXT_HAZARD_NOUNS)}]"),
        (self.first_word_skew >= 0, "first_word_skew must be >= 0"),
        (all(0 <= getattr(self, f) <= 1 for f in fractions), f"{fractions} must lie in [0, 1]"),
        (self.pretrain_hazard_fraction + self.pretrain_text_hazard_fraction
         + self.refusal_pretrain_fraction <= 1, "pretrain fractions must sum to <= 1"),
        (all(0 <= getattr(self, f) < IMAGE_ID_STRIDE for f in sizes),
         f"{sizes} must lie in [0, {IMAGE_ID_STRIDE})"),
        (self.forget_size is None or 0 <= self.forget_size < IMAGE_ID_STRIDE, "bad forget_size"),
        (1 <= self.k_max <= what_rewrites, f"k_max must be in [1, {what_rewrites}] (distinct What rewrites)"),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(f"WorldConfig: {message}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> WorldConfig:
    """Build a config from a mapping (e.g. parsed YAML/JSON); lists become tuples.
    Unknown keys raise ConfigError naming the key and the closest valid keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in d:
      if key not in fields:
        close = difflib.get_close_matches(key, fields, n=3, cutoff=0.4)
        raise ConfigError(f"unknown WorldConfig key {key!r}; closest valid keys: "
                         f"{', '.join(close) if close else '(none)'}")
    return cls(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v
                  for k, v in d.items()})

  def fingerprint(self) -> str:
    """12-hex sha256 of the canonical JSON of ``to_dict()`` (plus GENERATOR_VERSION, so
    content-addressed datasets are rebuilt when the generator changes)."""
    payload = json.dumps({"config": self.to_dict(), "version": GENERATOR_VERSION},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _distinct_subset(names: Sequence[str], supported: Mapping[str, Any]) -> bool:
  return len(names) > 0 and len(set(names)) == len(names) and set(names) <= set(supported)
