"""Mixed safety SFT of LLaVA-1.5 (the paper's "Mixed-SFT" baseline, VLGuard's "Mixed").

  mirage train --config=configs/vlguard/mixed_sft.py:7b --workdir=runs/mixed \
      --config.init_from=runs/llava7b_stage1 --config.data.path=DATA/vlguard/...

VLGuard appends its train set to LLaVA-v1.5's 665k instruction data and re-runs LLaVA's stage 2 from the
stage-1 checkpoint (pretrained projector, Vicuna LLM): one epoch of `scripts/v1_5/finetune.sh`. mirage has no
builder for LLaVA-665k itself: the instruction data is the `retain` split padded from a LLaVA-format file
(`--retain_size=N --retain_extra=llava_v1_5_mix665k.json`), N = 665,298 + 977 for the full mixture; the step
count below is for that mixture.
"""

from mirage_configs.vlguard import paper

LLAVA_665K_ROWS = 665_298  # llava_v1_5_mix665k.json
EPOCHS = 1  # LLaVA scripts/v1_5/finetune.sh `--num_train_epochs 1`


def get_config(arg: str | None = None):
  c = paper.paper_config(arg)
  c.data.streams.train = "retain,sft"  # proportional to the split sizes
  paper.llava_stage2(c, rows=paper.SFT_ROWS + LLAVA_665K_ROWS, epochs=EPOCHS)  # 5,221 steps
  c.checkpoint_every = 1_000
  c.lock()
  return c
