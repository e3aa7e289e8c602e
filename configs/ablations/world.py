"""The world-knob ablation: which properties of the synthetic world the Safety Mirage needs.

Each variant changes world knobs (`--config.data.world.*` overrides), a method's loss, or the base's own
training data (`mixed_in_base`), and reruns the base, post-hoc SFT and, where the knob is about unlearning,
NPO and RMU, from that variant's base (seed 0 by default).

  mirage demo --ablations                                            # after the demo, reusing its runs
  mirage sweep --config=configs/ablations/world.py:cpu --workdir=runs/world
  mirage sweep --config=configs/ablations/world.py --config.variants=default,glyph --dry-run

`mirage demo --ablations` runs these points in-process and reuses the default world's base for a variant
whose `pretrain` split is identical (compared by the digest the dataset build records, not assumed);
`mirage sweep` trains one base per variant. Every point carries the labels `variant` (the variant's name)
and `what` (what it changes). Knobs: --config.variants=... (default: all, in the order below), --config.sizes,
--config.seeds, --config.overrides (configs/ablations/__init__.py).
"""

import dataclasses  # no `from __future__ import annotations`: configlib loads this file outside sys.modules

import ml_collections

from mirage_configs import common
from mirage_configs.ablations import knob_list, point, seeds, SIZES

_SIZES = {"cpu": "tiny", "pod": "1b"}
DEFAULT = "default"  # the unchanged world: the reference of the base reuse
_ALL = ("sft_posthoc", "npo", "rmu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Variant:
  name: str
  overrides: tuple[str, ...]  # world-knob overrides
  what: str
  methods: tuple[str, ...] = ("sft_posthoc",)  # run from the variant's base
  method_overrides: tuple[str, ...] = ()  # the methods' own overrides (a loss knob): the base is unchanged
  base_overrides: tuple[str, ...] = ()  # the variant's base only (its training data): never reused, not passed on
  base_label: str = ""  # the report's name for the variant's base where it is not the plain base


VARIANTS = (
    Variant(name=DEFAULT, overrides=(), what="the demo's world", methods=_ALL),  # the demo's runs, reused
    Variant(name="glyph", overrides=("--config.data.world.hazard_cue=glyph",),
            what="hazards carry one distinct visual mark (unsafe images separable by a simple cue)"),
    Variant(name="no_unsafe_instruction", overrides=("--config.data.world.safe_image_unsafe_instruction=0.0",),
            what="safe images carry no refused unsafe instruction"),
    Variant(name="private_verbs", overrides=("--config.data.world.shared_verbs=False",),
            what="harmful procedures share no structure across hazards", methods=("sft_posthoc", "npo", "rmu")),
    Variant(name="test_hazards_seen", overrides=("--config.data.world.heldout_hazards=0",),
            what="test hazards are the SFT/forget hazards (new image instances)"),
    Variant(name="no_skew", overrides=("--config.data.world.first_word_skew=0.0",),
            what="first word independent of the label (no spurious feature)"),
    Variant(name="safe_use_0.25", overrides=("--config.data.world.safe_use_fraction=0.25",),
            what="a quarter of the safe SFT instructions ask an object's use"),
    Variant(name="use_by_shape", overrides=("--config.data.world.safe_use=shape",),
            what="benign uses follow the shape (a visual rule)"),
    # The first-word cues this world adds beyond VLGuard's, each taken away (SFT and the unlearning methods).
    Variant(name="no_openers", overrides=("--config.data.world.answer_openers=False",),
            what="comply answers open with one neutral phrase, not an opener tied to the query's first word",
            methods=_ALL),
    Variant(name="helpfulness_uniform", overrides=("--config.data.world.helpfulness_first_words=uniform",),
            what="post-hoc SFT's helpfulness data has uniform first words (not the SFT split's 89 % \"What\")"),
    Variant(name="safe_use_0.5", overrides=("--config.data.world.safe_use_fraction=0.5",),
            what="half the safe SFT / helpfulness / retain instructions ask an object's use (common, not rare)",
            methods=_ALL),
    Variant(name="benign_procedures", overrides=("--config.data.world.safe_use=procedure",),
            what="benign use answers are procedures in the harmful answers' format (step N : verb code)",
            methods=_ALL),
    # RMU's token mask (the demo's default steers the answer positions; the paper's RMU steers every one).
    Variant(name="rmu_mask_all", overrides=(), method_overrides=("--config.loss.mask=all",),
            what="RMU steers every real position, image tokens included (the paper's RMU)", methods=("rmu",)),
    Variant(name="rmu_mask_query", overrides=(), method_overrides=("--config.loss.mask=query",),
            what="RMU steers the question's positions only", methods=("rmu",)),
    # Mixed SFT as the paper defines it: VLGuard re-ran LLaVA's instruction tuning with the safety data appended.
    # Here the base's own instruction tuning (`pretrain`, from scratch) gets the `sft` split mixed in, in
    # proportion to the two splits' sizes; the demo's `sft_mixed` instead mixes it into benign `helpfulness`
    # VQA on top of the base (configs/sft/mixed.py says why). Compare with the default world's post-hoc SFT.
    Variant(name="mixed_in_base", overrides=(), base_overrides=("--config.data.streams.train=pretrain,sft",),
            methods=(), base_label="Mixed-SFT in the base's instruction tuning",
            what="the paper's Mixed-SFT: the safety data mixed into the base's own instruction tuning "
                 "(trained from scratch on pretrain + sft; the row is that model)"),
)
BY_NAME = {v.name: v for v in VARIANTS}


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, preset="cpu")
  if a.preset not in _SIZES:
    raise ValueError(f"unknown preset {a.preset!r}; valid: {', '.join(_SIZES)}")
  c = ml_collections.ConfigDict(dict(sizes=_SIZES[a.preset], seeds="0", variants=",".join(BY_NAME),
                                     overrides=""))
  c.lock()
  return c


def sweep(config=None):
  """Per size, seed and variant: the variant's base, then each of its methods initialised from it."""
  config = config or get_config()
  points = []
  for size in knob_list(config, "sizes", SIZES):
    for seed in seeds(config):
      for v in (BY_NAME[name] for name in knob_list(config, "variants", list(BY_NAME))):
        base = point("base", size, seed, overrides=(*v.overrides, *v.base_overrides), tag=v.name, what=v.what)
        points.append(base)
        points += [point(m, size, seed, overrides=(*v.overrides, *v.method_overrides), tag=v.name,
                         init_from=base["name"], what=v.what) for m in v.methods]
  return points
