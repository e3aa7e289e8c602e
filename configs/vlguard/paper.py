"""What every paper config on real weights shares: LLaVA-1.5 on the built VLGuard dataset.

The paper is Safety Mirage (Chen, Yao et al., ICLR 2026); its official code is OPTML-Group/VLM-Safety-Unlearn
(`scripts/finetune_unlearn*.sh`, `llava/train/train_unlearn*.py`). The SFT baselines are VLGuard's (Zong et al.,
ICML 2024; ys-zong/VLGuard), which fine-tunes with LLaVA's own stage-2 recipe (haotian-liu/LLaVA,
`scripts/v1_5/finetune.sh`). Every value below names its source; where the source is silent the comment says
what was chosen and why.

Run them from a converted HF LLaVA (`mirage convert hf-to-jax`): `init_inherit` copies its architecture and
chat template into the run (the converted LLaVA-1.5-hf block: its vocabulary padded to 32,064 and `<image>` =
32000; the size table's `7b` / `13b`, 32,000 tokens, is what `mirage compile` lowers without the checkpoint),
and `data.path` is the `mirage data build --name=vlguard` output.
"""

from __future__ import annotations

import math

import ml_collections

from mirage_configs import common

# A converted checkpoint's architecture and chat template (`mirage convert hf-to-jax` writes them).
INHERIT = "model,data.prompt_template,data.image_mean,data.image_std"

# VLGuard train as `mirage data build --name=vlguard` flattens it: 977 safe images x 2 turns + 1,023 unsafe.
SFT_ROWS = 2_977
# Safety Mirage `data/mix_retain_data.py` pads the 977 safe instructions to 2,000 with LLaVA-665k samples
# (`mirage data build --name=vlguard --retain_size=2000 --retain_extra=...`); `train_unlearn*.py` then samples
# 2,000 of them.
RETAIN_ROWS = 2_000
# Warm-up ratio of every official script (LLaVA and Safety Mirage): `--warmup_ratio 0.03`, as HF computes it.
WARMUP_RATIO = 0.03


def warmup(steps: int) -> int:
  return math.ceil(steps * WARMUP_RATIO)  # transformers' TrainingArguments.get_warmup_steps


def size_of(arg: str | None) -> str:
  return common.parse_arg(arg, size="7b").size


def paper_config(arg: str | None, *, unlearning: dict | None = None) -> ml_collections.ConfigDict:
  """The shared block: model, data, schedule, judge; unlearning configs pass their `loss` block."""
  size = size_of(arg)
  c = common.unlearning_config(size, unlearning) if unlearning else common.training_config(size)
  c.init_inherit = INHERIT
  c.data.name = "vlguard"
  c.data.path = ""  # required: the built VLGuard dataset directory
  c.data.max_len = min(2_048, c.data.max_len)  # every official script: `--model_max_length 2048`
  # Every official script: cosine decay to 0 after the warm-up ratio, no weight decay (HF AdamW defaults
  # b1 0.9, b2 0.999, eps 1e-8 are mirage's defaults), gradient clipping 1.0 (HF `max_grad_norm` default).
  c.optim.schedule = "cosine"
  c.optim.end_lr_ratio = 0.0
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 1.0
  # Judging: VLGuard's keyword metric is always reported; the paper's ASR adds a VLM relevance judge
  # (Qwen2.5-VL-7B in the official evaluation, which mirage cannot run: import its verdicts with
  # `--config.eval.judge=file`, or judge with a converted LLaVA/LLaMA via `eval.judge=model`).
  c.eval.refusal_preset = "vlguard"
  c.eval.test_splits = "unsafe,unsafe_what,safe,safe_share,safe_unsafe"
  c.eval.max_new_tokens = 256
  c.eval.every = 0
  return c


def llava_stage2(c: ml_collections.ConfigDict, *, rows: int, epochs: int) -> None:
  """VLGuard's SFT: LLaVA's stage-2 recipe (haotian-liu/LLaVA `scripts/v1_5/finetune.sh`) over `rows` rows."""
  c.batch_size = 128  # 16 per device x 8 GPUs
  c.optim.lr = 2e-5  # `--learning_rate 2e-5`
  c.optim.frozen = "vision/.*"  # stage 2 trains the projector and the LLM, not the vision tower
  c.total_steps = -(-epochs * rows // c.batch_size)
  c.optim.warmup_steps = warmup(c.total_steps)
  c.eval.splits = "sft"
