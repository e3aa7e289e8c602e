"""Mixed safety SFT (VLGuard "Mixed"): the safety data mixed into the instruction data, trained like the
base from scratch (LLaVA stage 2 re-run with VLGuard appended to LLaVA-665k).

  mirage train --config=configs/sft/mixed.py:tiny --workdir=runs/mixed
"""

from mirage_configs.pretrain import base


def get_config(arg: str | None = None):
  c = base.get_config(arg)
  c.unlock()
  c.data.streams.train = "pretrain,sft"  # proportional to the splits' sizes: VLGuard appended
  c.eval.splits = "sft,utility"
  c.lock()
  return c
