"""Gradient-difference unlearning (ascent on forget, descent on retain), starting from the base model.

  mirage train --config=configs/unlearn/graddiff.py:tiny --workdir=runs/graddiff --config.init_from=runs/base
"""

from mirage_configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, size="tiny")
  c = common.unlearning_config(a.size, dict(name="graddiff"))
  c.optim.lr = 3e-5 if a.size == "tiny" else 5e-7
  c.lock()
  return c
