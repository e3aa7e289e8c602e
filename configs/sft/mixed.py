"""Mixed safety SFT (VLGuard "Mixed"): the safety data mixed into the (benign) instruction data, trained for
a longer instruction-tuning pass than post-hoc SFT. Set `--config.init_from=<base run dir>`.

VLGuard re-ran LLaVA's stage 2 from the stage-1 checkpoint with VLGuard appended to LLaVA-665k, whose answers
are benign: the harmful knowledge comes from the LLM. In the synthetic world the base learns the harmful
procedures and the instruction following in one run on `pretrain`, whose answers include harm on every hazard
with every first word, so mixing the safety data into *that* data contradicts it (measured from scratch:
original ASR 62.5 %, "Share" refusals 4.5 %: no refusal learned at all). The knowledge therefore comes from the
base (as VLGuard's from Vicuna) and the instruction data is the benign `helpfulness` VQA.

So on the toy, mixed SFT is post-hoc SFT's data mixture from the same base with its own recipe: at equal
learning rate and steps the two train nearly the same model (their dev metrics are equal but for one value
in 32, `mirage recipes`).
The paper's mixing into the base's own instruction tuning was tried with `data.world.harm_knowledge=recall`
(the hazards' procedures only as knowledge entries, so the safety data contradicts nothing): the tiny base
then does not carry that knowledge over to instructions (base ASR 0 %), so there is nothing to hide.

  mirage train --config=configs/sft/mixed.py:tiny --workdir=runs/mixed --config.init_from=runs/base
"""

from mirage_configs.sft import posthoc


def get_config(arg: str | None = None):
  c = posthoc.get_config(arg)
  c.unlock()
  c.data.streams.train = "helpfulness,sft"  # proportional to the splits' sizes
  if c.model.size == "tiny":
    # Chosen on the dev splits by `mirage recipes` (configs/ablations/recipes.py's rule: the fewest steps
    # meeting every dev goal; world 0, seed 0, 2026-12-03), from lr {2.5e-5, 5e-5, 1e-4} x steps {100, 200,
    # 400}; the recipe before it was 200 steps at 5e-5, chosen while reading the test splits.
    c.total_steps = 100
    c.optim.lr = 1e-4
    c.checkpoint_every = 100
  c.lock()
  return c
