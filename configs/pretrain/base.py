"""The base VLM (the LLaVA-1.5 analogue): instruction-tuned on `pretrain`, it answers every query —
harmful placeholders included — and refuses only the harmless "secret code" requests.

  mirage train --config=configs/pretrain/base.py:tiny --workdir=runs/base
"""

from mirage_configs import common


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, size="tiny")
  c = common.training_config(a.size)
  c.data.streams.train = "pretrain"
  if a.size == "tiny":
    c.total_steps = 1500
    c.optim.warmup_steps = 100
    c.checkpoint_every = 500
    c.eval.splits = "pretrain,utility"
  c.lock()
  return c
