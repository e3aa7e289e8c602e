"""Post-hoc safety SFT of LLaVA-1.5 on VLGuard (the paper's "Posthoc-SFT" baseline, VLGuard's "Posthoc").

  mirage train --config=configs/vlguard/posthoc_sft.py:7b --workdir=runs/posthoc \
      --config.init_from=runs/llava7b --config.data.path=DATA/vlguard/...

VLGuard fine-tunes the released LLaVA-v1.5 with LLaVA's stage-2 script on VLGuard's train set plus about
5,000 randomly sampled LLaVA-665k conversations for helpfulness (VLGuard paper, Sec. 4; the sample is not
released). Here the helpfulness data is the `retain` split padded from a LLaVA-format file (`mirage data
build --name=vlguard --retain_size=N --retain_extra=...`), so its 977 VLGuard safe turns appear twice; build
`retain_size=5977` for the paper's proportion.
"""

from mirage_configs.vlguard import paper

HELPFULNESS_ROWS = 5_000  # VLGuard paper, Sec. 4: ~5,000 LLaVA-665k samples
EPOCHS = 3  # VLGuard paper, Sec. 4 (post-hoc fine-tuning for 3 epochs)


def get_config(arg: str | None = None):
  c = paper.paper_config(arg)
  c.data.streams.train = "sft,retain"  # proportional to the split sizes
  paper.llava_stage2(c, rows=paper.SFT_ROWS + HELPFULNESS_ROWS, epochs=EPOCHS)  # 187 steps
  c.checkpoint_every = 50
  c.lock()
  return c
