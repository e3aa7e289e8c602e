"""Logit parity between transformers' PyTorch `LlavaForConditionalGeneration` and the converted Flax model.

Needs torch (the `hf` extra: `torch==2.13.0`, the CPU wheel); nothing else in mirage_jax does. Both models
get the same random image (already normalised, so no preprocessing differences enter) and the same prompt:
a few random text tokens, one `<image>` token per image feature, more random text tokens. The result
is one JSON-able dict; `ok` is False when the largest absolute logit difference exceeds `tol`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from mirage_jax.models import hf_convert


@dataclasses.dataclass(frozen=True)
class ParityConfig:
  seed: int = 0
  text_before: int = 5  # random text tokens before the image tokens
  text_after: int = 6  # and after them
  batch: int = 2  # rows, each with its own image and tokens
  tol: float = 1e-4


def random_inputs(model_cfg, vocab_size: int, cfg: ParityConfig) -> dict[str, np.ndarray]:
  """tokens [B, T] (random text, image tokens expanded), images [B, H, W, C] standard normal, mask of ones."""
  rng = np.random.default_rng(cfg.seed)
  image_id = model_cfg.image_token_id
  special = {0, 1, 2, image_id}  # pad/unk, BOS, EOS in LLaMA vocabularies
  pool = np.array([t for t in range(min(vocab_size, 1 << 16)) if t not in special])
  n_img = model_cfg.vision.num_image_tokens
  rows = []
  for _ in range(cfg.batch):
    before = rng.choice(pool, cfg.text_before)
    after = rng.choice(pool, cfg.text_after)
    rows.append(np.concatenate([before, np.full(n_img, image_id), after]))
  tokens = np.stack(rows).astype(np.int32)
  v = model_cfg.vision
  images = rng.standard_normal((cfg.batch, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
  return {"tokens": tokens, "mask": np.ones_like(tokens), "images": images}


def hf_logits(hf_dir: str | pathlib.Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
  """Logits [B, T, V] of the PyTorch model in float32."""
  try:
    import torch
    from transformers import LlavaForConditionalGeneration
  except ImportError as e:
    raise hf_convert.ConversionError(f"check-parity needs PyTorch: pip install -e '.[hf]' (torch==2.13.0, the CPU "
                                     f"wheel) ({e})") from None
  model = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(inputs["tokens"].astype(np.int64)),
                attention_mask=torch.from_numpy(inputs["mask"].astype(np.int64)),
                pixel_values=torch.from_numpy(inputs["images"].transpose(0, 3, 1, 2).copy()))
  return out.logits.float().numpy()


def jax_logits(conv: hf_convert.HFModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
  """Logits [B, T, V] of the converted mirage model (compute dtype as converted)."""
  import jax
  from flax import nnx

  from mirage_jax.models.vlm import VLM

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: VLM(conv.model, rngs=nnx.Rngs(0))))

  @jax.jit
  def forward(params, batch):
    model = nnx.merge(graphdef, params)
    return model.logits(model(batch).hidden_btd)

  return np.asarray(forward(conv.params, inputs), np.float32)


def check_parity(hf_dir: str | pathlib.Path, cfg: ParityConfig = ParityConfig()) -> dict[str, Any]:
  """Run both models on the same random inputs; `{"max_abs_logit_diff", "tokens", "ok", ...}`."""
  conv = hf_convert.read_hf_model(hf_dir, dtype="float32", param_dtype="float32")
  inputs = random_inputs(conv.model, conv.model.text.vocab_size, cfg)
  theirs = hf_logits(hf_dir, inputs)
  ours = jax_logits(conv, inputs)
  if theirs.shape != ours.shape:
    raise hf_convert.ConversionError(f"logit shapes differ: HF {theirs.shape}, mirage {ours.shape}")
  diff = np.abs(theirs - ours)
  return {
      "max_abs_logit_diff": float(diff.max()),
      "mean_abs_logit_diff": float(diff.mean()),
      "max_abs_logit": float(np.abs(theirs).max()),
      "argmax_agreement": float((theirs.argmax(-1) == ours.argmax(-1)).mean()),
      "tokens": int(inputs["tokens"].size),
      "image_tokens": int(conv.model.vision.num_image_tokens),
      "batch": int(cfg.batch),
      "tol": cfg.tol,
      "ok": bool(diff.max() <= cfg.tol),
      "hf_dir": str(hf_dir),
  }
