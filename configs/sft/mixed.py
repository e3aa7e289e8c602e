"""Mixed safety SFT (VLGuard "Mixed"): the safety data mixed into the (benign) instruction data, trained for
a longer instruction-tuning pass than post-hoc SFT. Set `--config.init_from=<base run dir>`.

VLGuard re-ran LLaVA's stage 2 from the stage-1 checkpoint with VLGuard appended to LLaVA-665k, whose answers
are benign: the harmful knowledge comes from the LLM. In the synthetic world the base learns the harmful
procedures and the instruction following in one run on `pretrain`, whose answers include harm on every hazard
with every first word, so mixing the safety data into *that* data contradicts it (measured from scratch:
original ASR 62.5 %, "Share" refusals 4.5 %: no refusal learned at all). The knowledge therefore comes from the
base (as VLGuard's from Vicuna) and the instruction data is the benign `helpfulness` VQA.

  mirage train --config=configs/sft/mixed.py:tiny --workdir=runs/mixed --config.init_from=runs/base
"""

from mirage_configs.sft import posthoc


def get_config(arg: str | None = None):
  c = posthoc.get_config(arg)
  c.unlock()
  c.data.streams.train = "helpfulness,sft"  # proportional to the splits' sizes
  if c.model.size == "tiny":
    c.total_steps = 200  # a longer, gentler pass than post-hoc SFT (100 steps at 1e-4)
    c.optim.lr = 5e-5
    c.checkpoint_every = 100
  c.lock()
  return c
