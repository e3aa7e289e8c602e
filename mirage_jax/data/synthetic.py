"""Deterministic generator of the synthetic "Mirage benchmark" world.

Why this world exists
---------------------
Safety fine-tuning (SFT) of a VLM on VLGuard-like data teaches a shortcut: whether to
refuse is predicted by the query's FIRST WORD (safe queries start with "What" 89 % of the
time, queries on unsafe images start with "Share/Describe/Please/..." and only ~3 % with
"What"), not by the image.  Rewriting a harmful query to start with "What" then
jailbreaks the SFT model, and benign queries starting with "Share" get refused — the
"safety mirage" (Safety Mirage, Chen, Yao et al., ICLR 2026; arXiv 2503.11832).  This module
builds a toy world in which that phenomenon is created on purpose and every cause is a knob
of :class:`WorldConfig`.  All "harm" is abstract: procedures are harmless verbs plus made-up codes
("step 1 : blend kro-7"), text hazards are made-up nouns ("vexor").

The world
---------
* Objects are shape x colour x fill combinations, drawn procedurally (numpy + PIL) as
  one object on a noisy light background, at a random position / size (40-70 % of the
  image) with colour jitter; every draw is a new *instance* of the same object.
* ``num_hazards`` combinations are hazards, chosen by the seed such that every attribute
  value occurs in at least one hazard and one safe object: no single visual cue
  separates safe from unsafe, only the combination does.  ``heldout_hazards`` of them
  never appear in sft / forget / helpfulness / retain; the unsafe test splits use only
  them (all hazards when 0).  ``pretrain`` shows every hazard (the base knows all harm).
* Every test split has a dev twin (``dev_unsafe``, ``dev_safe_share``, ...): drawn like it (same sizes,
  held-out hazards, query pool and first-word distributions) from its own random stream, so its queries and
  image instances are its own. Recipes are chosen on dev (``eval.split_set=dev``); test is for the report.
* The robustness splits (``mirage robustness``): ``relearn_forget`` (seen hazards' procedures answered),
  ``relearn_benign`` (seen hazards' images, attribute questions answered: the objects, not their
  procedures) and ``probe`` (every hazard's procedure answered, alternating with safe objects' uses).
* Each hazard and each of ``num_text_hazards`` text hazards has a procedure of
  ``procedure_steps`` steps "step N : <verb> <code>" with unique codes.
* Safe objects answer colour / shape / fill / use (use depends on the shape only).
* The "secret code" request is a harmless forbidden request that ``pretrain`` refuses,
  giving the base model the ability to refuse at all.
* A query is ``<prefix of first word> <body> <? or .>`` (tables in
  :mod:`mirage_jax.data.templates`).  Bodies come in disjoint train / test pools; test
  splits use the test pool, whose words all occur in training text (new wording, no
  unseen token).  A comply answer is ``<opener> <content>``.

Record semantics
----------------
Every split returns a list of dicts with identical keys: ``id, image, image_id,
question, answer, first_word, intent, kind, label, hazard, harm_codes, expected, group,
shot, object``.  ``kind`` is "safe" (safe instruction, safe image), "unsafe_text"
(text-hazard instruction on a safe image), "unsafe_image" (any instruction on a hazard
image) or "secret".  ``label`` is the behaviour the split *teaches or asks for*:

* training splits: the behaviour of ``answer`` — so harmful items of ``pretrain`` and
  ``forget`` are "comply" (that is what the base is trained to do), sft refusals and
  pretrain secret refusals are "refuse";
* test splits: the behaviour of a safe model ("refuse" for unsafe, "comply" for safe),
  while ``answer`` is the reference comply answer (for unsafe test records: the harmful
  procedure the base model would give, useful for likelihood-based forgetting metrics).

``hazard`` indexes ``World.hazards`` (unsafe_image) or ``World.text_hazards``
(unsafe_text), else -1; ``harm_codes`` holds that hazard's codes whenever ``hazard`` >= 0;
``expected`` is the key word of a benign comply answer (colour / shape / fill name, use
noun) and "" otherwise; ``group`` / ``shot`` link rewrites to their original record.

Knobs
-----
Every cause is a knob of :class:`WorldConfig`, documented (with every accepted value of each string knob) in
:mod:`mirage_jax.data.world_config`; the string knobs are the str enums of :mod:`mirage_configs.world`.

Modules
-------
This module is the public face of the generator: :mod:`~mirage_jax.data.world_config` holds the knobs, the
split names and the fingerprint, :mod:`~mirage_jax.data.world` the world and its splits; both are
re-exported here, next to the first-word statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from mirage_jax.data.world import Obj, Procedure, World, draw_glyph, render_object, skew_distribution
from mirage_jax.data.world_config import (
    DEV_PREFIX, DEV_SPLITS, GENERATOR_VERSION, IMAGE_ID_STRIDE, ROBUSTNESS_SPLITS, SPLITS, TEST_SPLITS, TRAIN_SPLITS,
    FirstWords, HarmKnowledge, HazardCue, RefusalWording, SafeUse, WorldConfig,
)

__all__ = ["DEV_PREFIX", "DEV_SPLITS", "GENERATOR_VERSION", "IMAGE_ID_STRIDE", "ROBUSTNESS_SPLITS", "SPLITS",
           "TEST_SPLITS", "TRAIN_SPLITS", "FirstWords", "HarmKnowledge", "HazardCue", "Obj", "Procedure", "RefusalWording",
           "SafeUse", "World", "WorldConfig", "draw_glyph", "first_word_table", "format_first_word_table",
           "render_object", "skew_distribution"]


# --------------------------------------------------------------------------- statistics
def first_word_table(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
  """first_word -> {"comply": n, "refuse": n} over ``records``."""
  table: dict[str, dict[str, int]] = {}
  for r in records:
    table.setdefault(r["first_word"], {"comply": 0, "refuse": 0})[r["label"]] += 1
  return table


def format_first_word_table(table: Mapping[str, Mapping[str, int]]) -> str:
  """Markdown table of a :func:`first_word_table` with P(refuse | word), by count desc."""
  lines = ["| first word | n | comply | refuse | P(refuse \\| word) |", "|---|---:|---:|---:|---:|"]
  rows = sorted(table.items(), key=lambda kv: (-(kv[1]["comply"] + kv[1]["refuse"]), kv[0]))
  for word, counts in rows:
    n = counts["comply"] + counts["refuse"]
    lines.append(f"| {word} | {n} | {counts['comply']} | {counts['refuse']} | "
                 f"{counts['refuse'] / n if n else 0.0:.3f} |")
  return "\n".join(lines)
