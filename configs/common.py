"""Shared pieces of every experiment config: argument parsing, the training defaults, mesh presets.

A config file's `get_config(arg)` starts from `training_config(size)` and changes only what makes its
experiment different (big_vision style: two experiments differ by config keys, not code paths). `arg` is
`"tiny"` or a comma list `"size=7b,mode=..."` (see `parse_arg`).

Every training config has the keys `total_steps`, `batch_size`, `seed`, `checkpoint_every`, `log_every`,
`mesh` (axis sizes, -1 = fill) and `init_from`, so scripts can drive runs with `--config.total_steps=...`.
Configs import no jax.
"""

from __future__ import annotations

import ml_collections

from mirage_configs import comma_list, models, world

# Mesh presets per accelerator (device kind regex -> axis sizes); `mesh.preset` picks one by name.
MESH_PRESETS = {
    "cpu": dict(data=-1, fsdp=1, tensor=1),
    "gpu": dict(data=1, fsdp=-1, tensor=1),  # FSDP over the GPUs of a node
    "tpu": dict(data=1, fsdp=-1, tensor=1),  # FSDP over the slice (ICI)
    "tpu_tp": dict(data=1, fsdp=-1, tensor=4),  # 13B-class: FSDP x 4-way tensor parallel
}

# Per-size training defaults: (batch_size, learning rate, mesh preset, max sequence length). The 7b / 13b
# batches split over the batch axes of the pods the README names with each size's preset: v5e:16x16 (7b: fsdp
# 256; 13b: fsdp 64 x tensor 4) and v5p:4x4x4 (7b: fsdp 64; 13b: fsdp 16 x tensor 4).
_TRAIN = {
    "tiny": (64, 1e-3, "cpu", 64),
    "small": (64, 3e-4, "gpu", 512),
    "1b": (128, 1e-4, "tpu", 1024),
    "7b": (256, 2e-5, "tpu", 2048),
    "13b": (128, 2e-5, "tpu_tp", 2048),
}

# LoRA's default targets: the decoder's attention and MLP kernels (as `mirage_jax.models.config.LORA_TARGETS`).
LORA_TARGETS = "decoder/layers/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"

# CLIP image statistics (LLaVA-1.5), the one definition (`mirage_jax.data.images` imports them); the synthetic
# world uses 0.5 / 0.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"tiny"` or `"size=tiny,steps=10"` -> ConfigDict over `defaults` (typed like the defaults).

  The first entry may omit its name; it then sets the first default (usually `size`).
  """
  out = dict(defaults)
  names = list(defaults)
  for i, part in enumerate(comma_list(arg or "")):
    key, sep, value = part.partition("=")
    if not sep:
      if i or not names:
        raise ValueError(f"config argument {part!r} needs a name (key=value)")
      key, value = names[0], part
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {', '.join(names)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} must be true or false")
      out[key] = value.lower() in ("true", "1")
    else:
      out[key] = kind(value)
  return ml_collections.ConfigDict(out)


def world_config() -> dict:
  """The synthetic world's knobs with their defaults (single source: `mirage_configs.world.WorldKnobs`)."""
  return world.WorldKnobs().to_dict()


def training_config(size: str) -> ml_collections.ConfigDict:
  """Defaults shared by every training run of one model size (SFT on the synthetic `pretrain` split)."""
  if size not in _TRAIN:
    raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(_TRAIN)}")
  batch, lr, preset, max_len = _TRAIN[size]
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = batch
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.log_every = 50
  c.init_from = ""  # a run directory (its latest checkpoint) or a checkpoint step directory
  # Comma list of config paths ("model", "data.prompt_template") copied from `init_from`'s own config when
  # training starts, e.g. the architecture of a converted HF checkpoint (the run's config.json keeps them).
  c.init_inherit = ""
  c.skip_nonfinite = False  # True: skip (and count) steps with a non-finite loss/grad instead of stopping
  c.mesh = ml_collections.ConfigDict(dict(MESH_PRESETS[preset], preset=preset))
  c.model = models.model_config(size)

  c.optim = ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=50, schedule="cosine", end_lr_ratio=0.1, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0, clip_norm=1.0,
      # Comma-separated regexes over parameter paths ("vision/.*"): matching parameters are frozen; if
      # `trainable` is set, only matching parameters train; `decoder_layers` ("a:b" or "i,j") restricts
      # updates of the stacked decoder-layer parameters to those layers.
      frozen="",
      trainable="",
      decoder_layers="",
      # Gradient accumulation: each global batch runs as `accum_steps` micro-batches of batch_size /
      # accum_steps rows, gradients summed in float32 inside the step (mirage_jax/train/accum.py); 1 = off.
      accum_steps=1,
  ))
  c.data = ml_collections.ConfigDict(dict(
      name="mirage_synth",
      data_dir="",  # "" = $MIRAGE_DATA_DIR or ~/.cache/mirage_jax/data
      path="",  # an already built dataset directory (overrides name/world)
      world=world_config(),
      # Streams of training batches: name -> mixture spec ("pretrain", "sft,helpfulness", "a:0.7,b:0.3").
      streams=ml_collections.ConfigDict(dict(train="pretrain")),
      prompt_template="USER: <image> {question} ASSISTANT:",
      max_len=max_len,
      overflow="error",  # or "truncate" (the answer's tail; counted)
      image_mean=(0.5, 0.5, 0.5) if size == "tiny" else CLIP_MEAN,
      image_std=(0.5, 0.5, 0.5) if size == "tiny" else CLIP_STD,
      cache=True,  # preprocess each split once and keep it in memory
      # Training batches assembled ahead of the step by `read_threads` threads (grain's prefetch); 0 = none.
      # Bounded: grain's default (500 batches, 16 threads) holds 500 batches of images in host memory.
      prefetch_batches=4,
      read_threads=2,
  ))
  # LoRA (mirage_jax.models.lora): rank 0 = off. Adapters on every Dense whose kernel path fully matches one
  # of `targets` (comma-separated regexes; default: the decoder's attention and MLP kernels); alpha 0 means
  # 2 x rank (the paper's rank 128, alpha 256); `train_projector` trains the projector fully beside them.
  # With LoRA on, only adapters (+ projector) train and are checkpointed; the base stays frozen, once in memory.
  c.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=0.0, dropout=0.0, targets=LORA_TARGETS, train_projector=False))
  c.loss = ml_collections.ConfigDict(dict(name="sft", logprob_impl="auto"))  # see losses/logprob.py
  c.eval = ml_collections.ConfigDict(dict(
      every=500, splits="sft", batch_size=batch, max_batches=4,  # teacher-forced loss / token accuracy
      # `mirage eval`: greedy generation on the test splits, judged (mirage_jax.eval.judges)
      test_splits="unsafe,unsafe_what,unsafe_control,safe,safe_share,utility,safe_unsafe",
      # "test", or "dev": the test splits' dev twins (dev_unsafe, ...; the synthetic world has them), on which
      # recipes are chosen; `mirage eval` then writes eval.dev.json / responses.dev.jsonl
      split_set="test",
      gen_batch_size=256, max_new_tokens=24 if size == "tiny" else 256, k_attack=3,
      refusal_preset="mirage", harm_min_codes=2, harm_match="any",
      # The ASR judge (mirage_jax.eval.judges): "" = the rule judge on data with placeholder harm codes (the
      # toy), else VLGuard's keyword metric (with a warning); or "keyword" | "model" | "file" | "rule".
      judge="",
      judge_checkpoint="",  # judge=model: a mirage run dir or checkpoint (e.g. from `mirage convert hf-to-jax`)
      judge_prompt="optml",  # judge=model: a preset of mirage_jax.eval.model_judge.PROMPTS or a prompt file
      judge_file="",  # judge=file: JSONL verdicts keyed by split, id, shot and response_sha256
      judge_batch_size=64,  # judge=model: rows per batch (its prompts hold the question and the answer)
      judge_max_new_tokens=200,  # judge=model: the official judge's; the verdict is read from the first line
      irrelevant_rules="official",  # judge=model|file: the official rule "irrelevant" list first, or "none"
  ))
  return c


def unlearning_config(size: str, loss: dict) -> ml_collections.ConfigDict:
  """An unlearning run: starts from the base (`init_from`, required), forget + retain streams, and the
  paper's composite objective `forget + alpha * retain + ft_weight * CE(retain)` set by `loss`."""
  c = training_config(size)
  c.data.streams = ml_collections.ConfigDict(dict(forget="forget", retain="retain"))
  c.loss = ml_collections.ConfigDict(dict(logprob_impl="auto", alpha=1.0, ft_weight=1.0, **loss))
  c.optim.frozen = "vision/.*"
  c.optim.schedule = "constant"
  c.eval.splits = "forget,retain"
  if size == "tiny":
    c.total_steps = 150
    c.optim.warmup_steps = 10
    c.checkpoint_every = 75
    c.log_every = 10
    c.eval.every = 0
  else:
    c.total_steps = 250  # the official NPO run: 2,000 retain samples / 8 GPUs, one epoch
    if size in ("small", "1b"):
      c.batch_size = 8  # the official batch; 7b / 13b keep the size table's, which splits over a pod
  return c
