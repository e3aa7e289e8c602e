"""Model size table: the LLaVA-1.5 architecture at five sizes.

`tiny` runs on a laptop CPU in minutes (the synthetic benchmark), `small` (~100 M) and `1b` are for GPU/TPU
ablations, `7b` and `13b` carry the real LLaVA-1.5 dimensions (CLIP ViT-L/14 at 336 px -> 576 image tokens,
Vicuna-7B / 13B decoders) so that converted checkpoints load and pod-scale AOT compiles are faithful.

Pure data: this module imports no jax. `mirage_jax.models.config.VLMConfig.from_config` turns the
ConfigDict built here into the frozen dataclass the model code uses.
"""

from __future__ import annotations

import ml_collections

# Vision towers (CLIP-style ViT). `feature_layer` indexes hidden states the HF way: 0 = embeddings after the
# pre-LayerNorm, i = output of block i, so -2 = the penultimate block's output (LLaVA-1.5's choice).
_VIT = {
    "tiny": dict(image_size=32, patch_size=8, width=64, depth=3, num_heads=4, mlp_dim=128),
    "small": dict(image_size=64, patch_size=8, width=384, depth=7, num_heads=6, mlp_dim=1536),
    # CLIP ViT-B/16 at 224 px (196 image tokens).
    "b16": dict(image_size=224, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
    # CLIP ViT-L/14 at 336 px (576 image tokens): LLaVA-1.5's tower.
    "l14_336": dict(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096),
}

# LLaMA-style decoders.
_TEXT = {
    "tiny": dict(vocab_size=512, width=96, depth=4, num_heads=4, num_kv_heads=2, head_dim=24, mlp_dim=256,
                 max_len=128),
    "small": dict(vocab_size=32000, width=768, depth=8, num_heads=12, num_kv_heads=4, head_dim=64,
                  mlp_dim=2048, max_len=2048),
    # TinyLlama-1.1B dimensions.
    "1b": dict(vocab_size=32000, width=2048, depth=22, num_heads=32, num_kv_heads=4, head_dim=64,
               mlp_dim=5632, max_len=2048),
    # Vicuna-7B v1.5 (LLaMA-2 7B).
    "7b": dict(vocab_size=32000, width=4096, depth=32, num_heads=32, num_kv_heads=32, head_dim=128,
               mlp_dim=11008, max_len=2048),
    # Vicuna-13B v1.5 (LLaMA-2 13B).
    "13b": dict(vocab_size=32000, width=5120, depth=40, num_heads=40, num_kv_heads=40, head_dim=128,
                mlp_dim=13824, max_len=2048),
}

# size -> (vision tower, decoder, compute dtype).
SIZES = {
    "tiny": ("tiny", "tiny", "float32"),
    "small": ("small", "small", "bfloat16"),
    "1b": ("b16", "1b", "bfloat16"),
    "7b": ("l14_336", "7b", "bfloat16"),
    "13b": ("l14_336", "13b", "bfloat16"),
}


def model_config(size: str) -> ml_collections.ConfigDict:
  """The `config.model` block for one size of the size table."""
  if size not in SIZES:
    raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(SIZES)}")
  vit, text, dtype = SIZES[size]
  return ml_collections.ConfigDict(dict(
      size=size,
      vision=dict(_VIT[vit], num_channels=3, layer_norm_eps=1e-5, act="quick_gelu", feature_layer=-2,
                  select_strategy="default"),
      projector=dict(act="gelu"),
      text=dict(_TEXT[text], rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False),
      # -1 = the data's tokenizer decides (the synthetic word tokenizer uses 4); converted HF checkpoints set
      # it explicitly (LLaVA-1.5-hf: 32000, with the vocabulary padded to 32064).
      image_token_id=-1,
      dtype=dtype,
      param_dtype="float32",
      remat="none" if size == "tiny" else "full",
      scan_layers=size != "tiny",  # unrolled layers run faster for a 4-layer model on CPU
  ))


# Tiny-family variants for size ablations on CPU (only `tiny` trains in minutes there). They are not rows of
# SIZES (every config's `arg` stays one of SIZES): an ablation builds a `tiny` config and applies
# `variant_overrides(name)`, which also sets `model.size` to the variant's name so reports can tell them apart.
TINY_VARIANTS = {
    "tiny_xs": dict(text=dict(width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=192)),
    "tiny": {},
    "tiny_l": dict(text=dict(width=128, depth=6, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384)),
}


def variant_overrides(name: str) -> list[str]:
  """`--config.model...=v` overrides turning a `tiny` config into the tiny-family variant `name`."""
  if name not in TINY_VARIANTS:
    raise ValueError(f"unknown tiny variant {name!r}; valid: {', '.join(TINY_VARIANTS)}")
  out = [f"--config.model.size={name}"] if name != "tiny" else []
  for group, values in TINY_VARIANTS[name].items():
    out += [f"--config.model.{group}.{k}={v}" for k, v in values.items()]
  return out
