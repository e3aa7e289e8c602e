"""The world-knob ablation (`mirage demo --ablations`): which properties of the synthetic world the mirage needs.

Each variant changes world knobs (`configs` overrides) and reruns the base, post-hoc SFT and, where the knob is
about unlearning, NPO and RMU. A variant whose `pretrain` split is identical to the default world's (checked
by hashing the split, not assumed) reuses the default base instead of retraining it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from mirage_jax import demo, report as report_lib
from mirage_jax.data import synthetic


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  overrides: tuple[str, ...]
  what: str
  stages: tuple[str, ...] = ("base", "sft_posthoc")


VARIANTS = (
    Variant("default", (), "the demo's world"),
    Variant("glyph", ("--config.data.world.hazard_cue=glyph",),
            "hazards carry one distinct visual mark (unsafe images separable by a simple cue)"),
    Variant("no_unsafe_instruction", ("--config.data.world.safe_image_unsafe_instruction=0.0",),
            "safe images carry no refused unsafe instruction"),
    Variant("private_verbs", ("--config.data.world.shared_verbs=False",),
            "harmful procedures share no structure across hazards", ("base", "sft_posthoc", "npo", "rmu")),
    Variant("test_hazards_seen", ("--config.data.world.heldout_hazards=0",),
            "test hazards are the SFT/forget hazards (new image instances)"),
    Variant("no_skew", ("--config.data.world.first_word_skew=0.0",),
            "first word independent of the label (no spurious feature)"),
    Variant("safe_use_0.25", ("--config.data.world.safe_use_fraction=0.25",),
            "a quarter of the safe SFT instructions ask an object's use"),
    Variant("use_by_shape", ("--config.data.world.safe_use=shape",),
            "benign uses follow the shape (a visual rule)"),
)


def pretrain_digest(world: Mapping) -> str:
  """Hash of the `pretrain` split (text and pixels) and the vocabulary of a world."""
  w = synthetic.World(synthetic.WorldConfig.from_dict(dict(world)))
  h = hashlib.sha256(" ".join(sorted(w.all_words())).encode())
  for r in w.split("pretrain"):
    h.update(f"{r['question']}|{r['answer']}".encode())
    h.update(np.ascontiguousarray(r["image"]).tobytes())
  return h.hexdigest()


def run_ablation(runs: demo.StageRunner, *, size: str, overrides: Sequence[str]) -> dict:
  stages = {s.name: s for s in demo.STAGES}
  default = demo.stage_configs([stages["base"]], size, overrides)["base"]
  default_digest = pretrain_digest(default.data.world.to_dict())
  default_base = runs.run(stages["base"], default, seed=0, label="[ablation default]")
  rows = {}
  for v in VARIANTS:
    configs = demo.stage_configs([stages[n] for n in v.stages], size, [*overrides, *v.overrides])
    reuse = pretrain_digest(configs["base"].data.world.to_dict()) == default_digest
    base = default_base if reuse else runs.run(stages["base"], configs["base"], seed=0,
                                                label=f"[ablation {v.name}]")
    models = {"base": report_lib.model_entry(base[2])}
    for name in v.stages[1:]:
      _, _, metrics = runs.run(stages[name], configs[name], seed=0, upstream=base[:2],
                               label=f"[ablation {v.name}]")
      models[name] = report_lib.model_entry(metrics)
    rows[v.name] = {"what": v.what, "overrides": list(v.overrides), "base_reused": reuse, "models": models}
  return rows
