"""Frozen dataclass view of `config.model` (built by `configs/models.py`)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from mirage_jax.errors import ConfigError


class Remat(str, enum.Enum):
  """Rematerialisation policy applied to each transformer block."""

  NONE = "none"  # keep every activation (fastest, most memory)
  FULL = "full"  # recompute the whole block in the backward pass
  DOTS = "dots"  # save matmul outputs, recompute the rest
  DOTS_NO_BATCH = "dots_no_batch"  # save only matmuls without batch dims (weights-stationary)


class SelectStrategy(str, enum.Enum):
  """Which vision tokens feed the projector (HF `vision_feature_select_strategy`)."""

  DEFAULT = "default"  # drop the class token (LLaVA-1.5)
  FULL = "full"  # keep it


def _build(cls, d: Mapping[str, Any]):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ConfigError(f"{cls.__name__}: unknown keys {unknown}; valid keys: {sorted(names)}")
  return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_channels: int = 3
  layer_norm_eps: float = 1e-5
  act: str = "quick_gelu"
  feature_layer: int = -2
  select_strategy: str = "default"

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ConfigError(f"vision.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
    if self.width % self.num_heads:
      raise ConfigError(f"vision.width={self.width} is not a multiple of num_heads={self.num_heads}")
    if not -(self.depth + 1) <= self.feature_layer <= self.depth:
      raise ConfigError(f"vision.feature_layer={self.feature_layer} out of range for depth {self.depth}")
    SelectStrategy(self.select_strategy)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def layers_used(self) -> int:
    """Blocks that run to produce the selected feature layer (later blocks are skipped)."""
    return self.feature_layer % (self.depth + 1)

  @property
  def num_image_tokens(self) -> int:
    return self.num_patches + (1 if self.select_strategy == SelectStrategy.FULL else 0)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_len: int = 2048
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f"text.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")


# The decoder's attention and MLP kernels (the paper's LoRA baselines adapt the decoder's linear layers).
LORA_TARGETS = "decoder/layers/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """Low-rank adapters (`config.lora`): y = x W + (alpha / rank) x A B on every `layers.Dense` whose kernel
  path fully matches one of `targets`. rank 0 = off (no adapter is created, nothing changes)."""

  rank: int = 0
  alpha: float = 0.0  # 0 = 2 x rank, the paper's ratio (rank 128, alpha 256)
  dropout: float = 0.0  # adapter-input dropout in training (PEFT's lora_dropout); evaluation never drops
  targets: tuple[str, ...] = (LORA_TARGETS,)
  train_projector: bool = False  # the projector trains fully beside the adapters

  def __post_init__(self):
    if self.rank < 0:
      raise ConfigError(f"lora.rank={self.rank} must be >= 0 (0 = off)")
    if self.alpha < 0:
      raise ConfigError(f"lora.alpha={self.alpha} must be >= 0 (0 = 2 x rank)")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"lora.dropout={self.dropout} must be in [0, 1) (the probability of dropping an "
                        "adapter input entry in training; 0 = off)")
    if self.rank and not self.targets:
      raise ConfigError("lora.targets is empty: name the parameter paths to adapt (regexes over kernel paths)")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def resolved_alpha(self) -> float:
    """alpha, with 0 read as 2 x rank."""
    return self.alpha or 2.0 * self.rank

  @property
  def scale(self) -> float:
    """alpha / rank (alpha 0 means 2 x rank, so scale 2)."""
    return self.resolved_alpha / self.rank if self.rank else 0.0

  @classmethod
  def from_config(cls, block: Mapping[str, Any] | None) -> "LoRAConfig":
    """From the `config.lora` block (None or an absent block: off); `targets` is a comma list of regexes."""
    if not block:
      return cls()
    d = dict(block)
    if isinstance(d.get("targets"), str):
      d["targets"] = tuple(t.strip() for t in d["targets"].split(",") if t.strip())
    for key, kind in (("rank", int), ("alpha", float), ("dropout", float)):
      if key in d:
        if isinstance(d[key], bool) or not isinstance(d[key], (int, float)):
          raise ConfigError(f"lora.{key}={d[key]!r}: expected a number")
        d[key] = kind(d[key])
    if "train_projector" in d and not isinstance(d["train_projector"], bool):
      raise ConfigError(f"lora.train_projector={d['train_projector']!r}: expected true or false")
    return _build(cls, d)


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  vision: VisionConfig
  text: TextConfig
  image_token_id: int
  projector_act: str = "gelu"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = True  # False unrolls the layer scans (tiny CPU models run faster)
  lora: LoRAConfig = LoRAConfig()  # off unless `config.lora.rank` > 0

  def __post_init__(self):
    Remat(self.remat)
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ConfigError(f"image_token_id={self.image_token_id} outside the vocabulary [0, {self.text.vocab_size})")

  @classmethod
  def from_config(cls, model: Mapping[str, Any], *, image_token_id: int | None = None,
                  lora: Mapping[str, Any] | None = None) -> "VLMConfig":
    """From the `config.model` ConfigDict (or any mapping of the same shape) and the `config.lora` block.

    `config.model.image_token_id = -1` means "the tokenizer's": pass it as `image_token_id` (shape-only
    uses such as `mirage describe` may leave it out; 0 is used).
    """
    model = dict(model)
    token = int(model["image_token_id"])
    if token < 0:
      token = 0 if image_token_id is None else int(image_token_id)
    elif image_token_id is not None and image_token_id != token:
      raise ConfigError(f"config.model.image_token_id={token} but the tokenizer's <image> token is "
                       f"{image_token_id}; set --config.model.image_token_id=-1 to use the tokenizer's")
    known = {"size", "vision", "projector", "text", "image_token_id", "dtype", "param_dtype", "remat",
             "scan_layers"}
    unknown = sorted(set(model) - known)
    if unknown:
      raise ConfigError(f"config.model: unknown keys {unknown}; valid keys: {sorted(known)}")
    return cls(
        vision=_build(VisionConfig, model["vision"]),
        text=_build(TextConfig, model["text"]),
        image_token_id=token,
        projector_act=dict(model.get("projector", {})).get("act", "gelu"),
        dtype=model.get("dtype", "float32"),
        param_dtype=model.get("param_dtype", "float32"),
        remat=model.get("remat", "none"),
        scan_layers=bool(model.get("scan_layers", True)),
        lora=LoRAConfig.from_config(lora),
    )
