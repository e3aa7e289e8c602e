"""SimNPO unlearning (reference-free, length-normalised NPO), starting from the base model.

  mirage train --config=configs/unlearn/simnpo.py:tiny --workdir=runs/simnpo --config.init_from=runs/base
"""

from mirage_configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, size="tiny")
  c = common.unlearning_config(a.size, dict(name="simnpo", beta=2.5, gamma=0.0))
  # tiny: set before the dev splits existed; its `mirage recipes` search on dev is incomplete (2026-12-03: of
  # lr {1e-4, 2e-4, 4e-4} x 300 steps only 1e-4 was run, meeting every goal), so it is not re-chosen yet.
  c.optim.lr = 2e-4 if a.size == "tiny" else 5e-7
  if a.size == "tiny":
    c.total_steps = 300  # utility recovers once the forget term saturates
  c.lock()
  return c
