"""Gradient-difference unlearning (ascent on forget, descent on retain), starting from the base model.

  mirage train --config=configs/unlearn/graddiff.py:tiny --workdir=runs/graddiff --config.init_from=runs/base
"""

from mirage_configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, size="tiny")
  c = common.unlearning_config(a.size, dict(name="graddiff"))
  # tiny: kept by `mirage recipes` on the dev splits (configs/ablations/recipes.py's rule; world 0, seed 0,
  # 2026-12-03): of lr {1.5e-5, 3e-5, 6e-5} x 150 steps none keeps dev utility within 3 points of the base, and
  # the rule's fallback (fewest goals missed, then lowest ASR) ties 3e-5 with 6e-5; the config's comes first.
  c.optim.lr = 3e-5 if a.size == "tiny" else 5e-7
  c.lock()
  return c
