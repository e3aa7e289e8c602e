"""Hugging Face LLaVA weights and configs <-> mirage_jax parameters and model configs (no torch needed).

The pure mapping: a transformers `LlavaForConditionalGeneration` directory's `config.json` <-> the mirage
`config.model` block / `VLMConfig`, and its tensors (`model.safetensors` or a sharded
`model.safetensors.index.json`, read with `safetensors.numpy`) <-> the mirage parameter tree. Writing run
directories, checkpoints, tokenizers and full run configs (`mirage convert hf-to-jax | jax-to-hf`) is the
command's orchestration, in `mirage_jax.commands.convert`.

Key layouts: the saved (legacy) names `language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*` (or `vision_tower.*`), `multi_modal_projector.*`, and the in-memory names of
transformers 5 (`model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`,
`lm_head.*`) are both read; every tensor must be consumed (a few known buffers such as `position_ids` are
skipped) and unknown or missing tensors are reported together in one error. `hf_state_from_params` writes the
legacy names, which transformers 4.x and 5.x both load.

Weight layouts: torch Linear weights are [out, in]; mirage Dense kernels are [in..., out...] (attention q/k/v
[D, H, E], o [H, E, D]); the CLIP patch convolution [W, C, p, p] becomes a Dense over (row, col, channel)
patch pixels. RoPE needs no permutation (both use the rotate_half convention). Stacked layers get a leading
layer axis. HF pads LLaVA's vocabulary (32064 rows for 32002 tokens); shapes are kept exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from mirage_jax.errors import MissingFileError
from mirage_jax.models.config import VLMConfig
from mirage_jax.models.safetensors_io import (SAFETENSORS, SAFETENSORS_INDEX, ConversionError,  # noqa: F401
                                              numpy_dtype, read_hf_state, weight_files, write_hf_state)

# Buffers some checkpoints carry that are not parameters (recomputed by every implementation).
_IGNORED = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq)$")
# transformers 5 in-memory names -> the saved (legacy) names; applied in order.
_CANONICAL = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^vision_tower\.(?!vision_model\.)"), "vision_tower.vision_model."),
)
# HF activation names <-> mirage_jax.models.layers.activation names.
_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "silu": "silu",
              "relu": "relu"}


# --------------------------------------------------------------------------- configs
def read_hf_config(hf_dir: str | pathlib.Path):
  """The directory's `LlavaConfig` (defaults filled in by transformers; works without torch)."""
  hf_dir = pathlib.Path(hf_dir)
  if not (hf_dir / "config.json").exists():
    raise MissingFileError(f"no config.json in {hf_dir}: expected a transformers LLaVA checkpoint directory")
  model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type")
  if model_type != "llava":
    raise ConversionError(f"{hf_dir}/config.json has model_type={model_type!r}; only 'llava' "
                          "(LlavaForConditionalGeneration) converts")
  from transformers import LlavaConfig  # lazy: transformers is slow to import
  return LlavaConfig.from_pretrained(str(hf_dir))


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConversionError(message)


def model_block_from_hf(hf_cfg, *, dtype: str = "float32", param_dtype: str = "float32") -> dict:
  """The mirage `config.model` block (a plain dict) equivalent to an HF `LlavaConfig`."""
  t, v = hf_cfg.text_config, hf_cfg.vision_config
  _require(t.model_type == "llama", f"text_config.model_type={t.model_type!r}: only LLaMA decoders convert")
  _require(v.model_type == "clip_vision_model",
           f"vision_config.model_type={v.model_type!r}: only CLIP vision towers convert")
  rope = dict(getattr(t, "rope_parameters", None) or {})
  rope_type = rope.get("rope_type", "default")
  _require(rope_type == "default", f"text_config rope_type={rope_type!r}: only plain RoPE converts")
  theta = rope.get("rope_theta", getattr(t, "rope_theta", 10000.0))
  _require(t.hidden_act in ("silu", "swish"), f"text_config.hidden_act={t.hidden_act!r}: expected silu")
  _require(not getattr(t, "attention_bias", False), "text_config.attention_bias=True is not supported")
  _require(not getattr(t, "mlp_bias", False), "text_config.mlp_bias=True is not supported")
  layer = hf_cfg.vision_feature_layer
  _require(isinstance(layer, int), f"vision_feature_layer={layer!r}: only a single layer converts")
  for name, act in (("projector_hidden_act", hf_cfg.projector_hidden_act), ("vision_config.hidden_act",
                                                                            v.hidden_act)):
    _require(act in _ACT_FROM_HF, f"{name}={act!r}: supported activations {sorted(_ACT_FROM_HF)}")
  heads = t.num_attention_heads
  head_dim = getattr(t, "head_dim", None) or t.hidden_size // heads
  return dict(
      size="hf",
      vision=dict(image_size=int(v.image_size), patch_size=int(v.patch_size), width=int(v.hidden_size),
                  depth=int(v.num_hidden_layers), num_heads=int(v.num_attention_heads),
                  mlp_dim=int(v.intermediate_size), num_channels=int(v.num_channels),
                  layer_norm_eps=float(v.layer_norm_eps), act=_ACT_FROM_HF[v.hidden_act],
                  feature_layer=int(layer), select_strategy=str(hf_cfg.vision_feature_select_strategy)),
      projector=dict(act=_ACT_FROM_HF[hf_cfg.projector_hidden_act]),
      text=dict(vocab_size=int(t.vocab_size), width=int(t.hidden_size), depth=int(t.num_hidden_layers),
                num_heads=int(heads), num_kv_heads=int(t.num_key_value_heads or heads), head_dim=int(head_dim),
                mlp_dim=int(t.intermediate_size), max_len=int(t.max_position_embeddings),
                rope_theta=float(theta), rms_norm_eps=float(t.rms_norm_eps),
                tie_embeddings=bool(hf_cfg.tie_word_embeddings)),
      image_token_id=int(hf_cfg.image_token_index),
      dtype=dtype, param_dtype=param_dtype, remat="none", scan_layers=True)


def hf_config_from_model(cfg: VLMConfig, *, torch_dtype: str = "float32", pad_token_id: int | None = None):
  """The `LlavaConfig` of a mirage model config (the inverse of `model_block_from_hf`)."""
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
  t, v = cfg.text, cfg.vision
  text = LlamaConfig(
      vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim, num_hidden_layers=t.depth,
      num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, head_dim=t.head_dim,
      max_position_embeddings=t.max_len, rms_norm_eps=t.rms_norm_eps, hidden_act="silu",
      rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta}, tie_word_embeddings=t.tie_embeddings,
      pad_token_id=pad_token_id)
  vision = CLIPVisionConfig(
      hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
      num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
      layer_norm_eps=v.layer_norm_eps, hidden_act=_ACT_TO_HF[v.act])
  out = LlavaConfig(text_config=text, vision_config=vision, image_token_index=cfg.image_token_id,
                    projector_hidden_act=_ACT_TO_HF[cfg.projector_act], vision_feature_layer=v.feature_layer,
                    vision_feature_select_strategy=v.select_strategy, image_seq_length=v.num_image_tokens,
                    tie_word_embeddings=t.tie_embeddings, multimodal_projector_bias=True,
                    pad_token_id=pad_token_id)
  out.architectures = ["LlavaForConditionalGeneration"]
  out.dtype = torch_dtype
  return out


# --------------------------------------------------------------------------- weight layout rules
@dataclasses.dataclass(frozen=True)
class Rule:
  """One mirage parameter <-> one HF tensor (per layer when `theirs` contains `{i}`).

  kind: "linear:N" (torch Linear weight [out, in] <-> kernel with N input axes), "flat" (a 1-D tensor
  <-> any shape, e.g. q bias [H*E] <-> [H, E]), "same" (identical shape), "patch" (conv [W, C, p, p] <->
  Dense [p*p*C, W]).
  """

  ours: str
  theirs: str
  kind: str = "same"


def rules(cfg: VLMConfig) -> list[Rule]:
  """Every parameter of `cfg`'s model and its HF tensor (canonical legacy names)."""
  vt, lm = "vision_tower.vision_model.", "language_model.model."
  out = [
      Rule("vision/patch/kernel", vt + "embeddings.patch_embedding.weight", "patch"),
      Rule("vision/cls", vt + "embeddings.class_embedding"),
      Rule("vision/pos", vt + "embeddings.position_embedding.weight"),
      Rule("vision/pre_norm/scale", vt + "pre_layrnorm.weight"),
      Rule("vision/pre_norm/bias", vt + "pre_layrnorm.bias"),
      Rule("vision/post_norm/scale", vt + "post_layernorm.weight"),
      Rule("vision/post_norm/bias", vt + "post_layernorm.bias"),
  ]
  block = vt + "encoder.layers.{i}."
  for ours, theirs in (("ln1", "layer_norm1"), ("ln2", "layer_norm2")):
    out += [Rule(f"vision/blocks/{ours}/scale", block + theirs + ".weight"),
            Rule(f"vision/blocks/{ours}/bias", block + theirs + ".bias")]
  for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
    out += [Rule(f"vision/blocks/attn/{ours}/kernel", block + f"self_attn.{theirs}.weight",
                 "linear:2" if ours == "o" else "linear:1"),
            Rule(f"vision/blocks/attn/{ours}/bias", block + f"self_attn.{theirs}.bias", "flat")]
  for fc in ("fc1", "fc2"):
    out += [Rule(f"vision/blocks/{fc}/kernel", block + f"mlp.{fc}.weight", "linear:1"),
            Rule(f"vision/blocks/{fc}/bias", block + f"mlp.{fc}.bias")]
  for lin in ("linear_1", "linear_2"):
    out += [Rule(f"projector/{lin}/kernel", f"multi_modal_projector.{lin}.weight", "linear:1"),
            Rule(f"projector/{lin}/bias", f"multi_modal_projector.{lin}.bias")]
  layer = lm + "layers.{i}."
  out += [Rule("decoder/embed", lm + "embed_tokens.weight"), Rule("decoder/norm/scale", lm + "norm.weight"),
          Rule("decoder/layers/attn_norm/scale", layer + "input_layernorm.weight"),
          Rule("decoder/layers/mlp_norm/scale", layer + "post_attention_layernorm.weight")]
  for proj in ("q", "k", "v", "o"):
    out.append(Rule(f"decoder/layers/attn/{proj}/kernel", layer + f"self_attn.{proj}_proj.weight",
                    "linear:2" if proj == "o" else "linear:1"))
  for proj in ("gate", "up", "down"):
    out.append(Rule(f"decoder/layers/mlp/{proj}/kernel", layer + f"mlp.{proj}_proj.weight", "linear:1"))
  if not cfg.text.tie_embeddings:
    out.append(Rule("decoder/lm_head", "language_model.lm_head.weight", "linear:1"))
  return out


def _theirs_shape(rule: Rule, shape: tuple[int, ...], cfg: VLMConfig) -> tuple[int, ...]:
  if rule.kind.startswith("linear:"):
    n = int(rule.kind.split(":")[1])
    return (math.prod(shape[n:]), math.prod(shape[:n]))
  if rule.kind == "flat":
    return (math.prod(shape),)
  if rule.kind == "patch":
    p, c = cfg.vision.patch_size, cfg.vision.num_channels
    return (shape[1], c, p, p)
  return shape


def _to_ours(rule: Rule, w: np.ndarray, shape: tuple[int, ...], cfg: VLMConfig) -> np.ndarray:
  if rule.kind.startswith("linear:"):
    return w.T.reshape(shape)
  if rule.kind == "patch":  # [W, C, p, p] -> [p (row), p (col), C, W] -> [p*p*C, W]
    return w.transpose(2, 3, 1, 0).reshape(shape)
  return w.reshape(shape)


def _to_theirs(rule: Rule, a: np.ndarray, cfg: VLMConfig) -> np.ndarray:
  shape = _theirs_shape(rule, a.shape, cfg)
  if rule.kind.startswith("linear:"):
    return a.reshape(shape[::-1]).T
  if rule.kind == "patch":
    p, c = cfg.vision.patch_size, cfg.vision.num_channels
    return a.reshape(p, p, c, a.shape[1]).transpose(3, 2, 0, 1)
  return a.reshape(shape)


def param_shapes(cfg: VLMConfig) -> dict[str, tuple[int, ...]]:
  """'/'-joined parameter path -> shape of the mirage model (abstract: nothing is allocated)."""
  import jax
  from flax import nnx

  from mirage_jax.models.vlm import VLM
  state = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0)))))
  return {"/".join(str(k.key) for k in path): tuple(a.shape)
          for path, a in jax.tree_util.tree_flatten_with_path(state)[0]}


def _depth(rule: Rule, cfg: VLMConfig) -> int:
  return cfg.vision.depth if rule.ours.startswith("vision/blocks/") else cfg.text.depth


def _expand(rule: Rule, cfg: VLMConfig) -> list[str]:
  return [rule.theirs.format(i=i) for i in range(_depth(rule, cfg))] if "{i}" in rule.theirs else [rule.theirs]


def nest(flat: Mapping[str, np.ndarray]) -> dict:
  """{"a/b/c": x} -> {"a": {"b": {"c": x}}} (the parameter tree of '/'-joined paths)."""
  out: dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """The inverse of `nest`: a nested mapping -> {"a/b/c": leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f"{prefix}{k}/"))
    else:
      out[prefix + str(k)] = v
  return out


# --------------------------------------------------------------------------- tensors <-> params
def canonical_key(key: str) -> str:
  """An HF tensor name in the saved (legacy) layout, whichever layout it was written in."""
  for pattern, repl in _CANONICAL:
    key = pattern.sub(repl, key)
  return key


def _listing(keys: list[str], limit: int = 12) -> str:
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def params_from_hf(state: Mapping[str, np.ndarray], cfg: VLMConfig, *,
                   param_dtype: str = "float32") -> dict:
  """HF tensors (any key layout) -> mirage params (a nested dict of numpy arrays of `param_dtype`)."""
  tensors: dict[str, np.ndarray] = {}
  for key, value in state.items():
    canon = canonical_key(key)
    if canon in tensors:
      raise ConversionError(f"tensor {key!r} appears twice (under two key layouts)")
    tensors[canon] = value
  shapes = param_shapes(cfg)
  table = rules(cfg)
  if cfg.text.tie_embeddings and "language_model.lm_head.weight" in tensors:
    table = table + [Rule("", "language_model.lm_head.weight")]  # a tied head saved anyway: checked below
  expected = {name for rule in table for name in _expand(rule, cfg)}
  missing = sorted(expected - set(tensors))
  unknown = sorted(k for k in set(tensors) - expected if not _IGNORED.search(k))
  if missing or unknown:
    parts = ([f"missing {len(missing)}: {_listing(missing)}"] if missing else []) + (
        [f"unknown {len(unknown)}: {_listing(unknown)}"] if unknown else [])
    raise ConversionError("HF tensors do not match the config: " + "; ".join(parts))
  dtype = np.dtype(numpy_dtype(param_dtype))
  flat, bad = {}, []
  for rule in table:
    if not rule.ours:  # tied head: must equal the embedding
      if not np.array_equal(tensors[rule.theirs], tensors["language_model.model.embed_tokens.weight"]):
        bad.append("language_model.lm_head.weight differs from embed_tokens but the config ties them")
      continue
    full = shapes[rule.ours]
    stacked = "{i}" in rule.theirs
    shape = full[1:] if stacked else full
    want = _theirs_shape(rule, shape, cfg)
    names = _expand(rule, cfg)
    for name in names:
      if tuple(tensors[name].shape) != want:
        bad.append(f"{name} has shape {tuple(tensors[name].shape)}, expected {want}")
    if bad:
      continue
    arrays = [_to_ours(rule, np.asarray(tensors[n]), shape, cfg).astype(dtype) for n in names]
    flat[rule.ours] = np.stack(arrays) if stacked else arrays[0]
  if bad:
    raise ConversionError("HF tensors do not match the config: " + "; ".join(bad[:12]) +
                          (f"; ... ({len(bad) - 12} more)" if len(bad) > 12 else ""))
  return nest(flat)


def hf_state_from_params(params: Mapping, cfg: VLMConfig, *, dtype: str = "float32") -> dict[str, np.ndarray]:
  """mirage params -> HF tensors under the saved (legacy) key names, as `dtype`."""
  flat = {k: np.asarray(v) for k, v in flatten(params).items()}
  table = rules(cfg)
  want = {r.ours for r in table}
  if set(flat) != want:
    raise ConversionError(f"params do not match the model config: missing {sorted(want - set(flat))}, "
                          f"unexpected {sorted(set(flat) - want)}")
  np_dtype = np.dtype(numpy_dtype(dtype))
  out = {}
  for rule in table:
    a = flat[rule.ours]
    names = _expand(rule, cfg)
    layers = [a[i] for i in range(len(names))] if "{i}" in rule.theirs else [a]
    for name, layer in zip(names, layers, strict=True):
      out[name] = np.ascontiguousarray(_to_theirs(rule, layer, cfg).astype(np_dtype))
  return out


# --------------------------------------------------------------------------- one directory, in memory
def model_config(block: Mapping[str, Any], *, where: str | pathlib.Path = "") -> VLMConfig:
  """The `VLMConfig` of a converted `config.model` block (a bad block is a ConversionError naming `where`)."""
  try:
    return VLMConfig.from_config(block)
  except ValueError as e:
    raise ConversionError(f"{where}/config.json: {e}") from None


@dataclasses.dataclass(frozen=True)
class HFModel:
  block: dict  # the mirage `config.model` block
  model: VLMConfig
  params: dict  # nested dict of numpy arrays


def read_hf_model(hf_dir: str | pathlib.Path, *, dtype: str = "float32", param_dtype: str = "float32") -> HFModel:
  """An HF LLaVA directory's model config and weights as mirage ones, in memory (no tokenizer, no run config:
  `mirage_jax.commands.convert.convert_hf` adds those)."""
  hf_dir = pathlib.Path(hf_dir)
  block = model_block_from_hf(read_hf_config(hf_dir), dtype=dtype, param_dtype=param_dtype)
  model = model_config(block, where=hf_dir)
  return HFModel(block=block, model=model, params=params_from_hf(read_hf_state(hf_dir), model,
                                                                 param_dtype=param_dtype))


# --------------------------------------------------------------------------- LoRA adapters
LORA_A, LORA_B = "lora_a", "lora_b"
# The saved (legacy) names -> the module paths of transformers 5's `LlavaForConditionalGeneration` (what
# PEFT names its adapter tensors after: `base_model.model.<module path>.lora_A.weight`).
_MODULE_PATHS = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                 ("vision_tower.vision_model.", "model.vision_tower."),
                 ("multi_modal_projector.", "model.multi_modal_projector."))


@dataclasses.dataclass(frozen=True)
class Adapter:
  """One LoRA adapter beside the Dense kernel at `kernel` (a '/'-joined path): `a` [*lead, fan_in, r] and
  `b` [*lead, r, fan_out], where `lead` are stacked layer axes and fan_in / fan_out the products of the
  kernel's `n_in` input and remaining output axes (the kernel is [*lead, *in, *out])."""

  kernel: str
  a: np.ndarray
  b: np.ndarray
  lead: int  # number of leading (stacked) axes
  n_in: int  # number of the kernel's input axes

  @property
  def rank(self) -> int:
    return int(self.a.shape[-1])


def _adapter(kernel_path: str, w: np.ndarray, a: np.ndarray, b: np.ndarray) -> Adapter:
  lead = np.ndim(a) - 2
  shape = np.shape(w)
  n_in = None
  if lead >= 0 and np.ndim(b) == np.ndim(a) and a.shape[:lead] == b.shape[:lead] == shape[:lead] and \
     a.shape[-1] == b.shape[-2] >= 1:
    n_in = next((k for k in range(1, len(shape) - lead) if math.prod(shape[lead:lead + k]) == a.shape[-2]
                 and math.prod(shape[lead + k:]) == b.shape[-1]), None)
  if n_in is None:
    raise ConversionError(f"LoRA adapter of {kernel_path} {tuple(shape)} has lora_a {tuple(np.shape(a))} and "
                          f"lora_b {tuple(np.shape(b))}: expected lora_a (fan_in, r) and lora_b (r, fan_out) "
                          "over the kernel's input / output axes, plus any leading layer axes")
  return Adapter(kernel=kernel_path, a=np.asarray(a), b=np.asarray(b), lead=lead, n_in=n_in)


def split_lora(params: Mapping) -> tuple[dict, dict[str, Adapter]]:
  """Params without their LoRA leaves (nested) and the adapters by kernel path. A `lora_a` without its
  `lora_b` or its `kernel` (or the other way round) is a ConversionError."""
  flat = flatten(params)
  base = {k: v for k, v in flat.items() if k.rsplit("/", 1)[-1] not in (LORA_A, LORA_B)}
  owners = sorted({k.rsplit("/", 1)[0] for k in flat if k.rsplit("/", 1)[-1] in (LORA_A, LORA_B)})
  adapters, bad = {}, []
  for owner in owners:
    names = {leaf: f"{owner}/{leaf}" for leaf in ("kernel", LORA_A, LORA_B)}
    lacking = [leaf for leaf, path in names.items() if path not in flat]
    if lacking:
      bad.append(f"{owner} lacks {', '.join(lacking)}")
      continue
    adapters[names["kernel"]] = _adapter(names["kernel"], *(np.asarray(flat[names[x]]) for x in
                                                            ("kernel", LORA_A, LORA_B)))
  if bad:
    raise ConversionError("incomplete LoRA adapters: " + "; ".join(bad))
  return nest(base), adapters


def merge_lora(params: Mapping, *, alpha: float) -> dict:
  """Params with every adapter folded into its kernel, W + (alpha / r) * lora_a @ lora_b (`lora.delta`,
  summed in float32, stored in the kernel's dtype), and the LoRA leaves removed; params without adapters come
  back unchanged. The adapters are checked first (`split_lora`)."""
  from mirage_jax.models import lora  # jax only where adapters are merged
  base, adapters = split_lora(params)
  flat = flatten(base)
  for path, ad in adapters.items():
    w = np.asarray(flat[path])
    d = np.asarray(lora.delta(ad.a, ad.b, w.shape, float(alpha) / ad.rank))
    flat[path] = (w.astype(np.float32) + d).astype(w.dtype)
  return nest(flat)


def module_path(theirs: str) -> str:
  """The transformers 5 module path of a saved (legacy) weight name, without `.weight`."""
  name = theirs[:-len(".weight")] if theirs.endswith(".weight") else theirs
  for old, new in _MODULE_PATHS:
    if name.startswith(old):
      return new + name[len(old):]
  return name


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
  config: dict  # adapter_config.json
  tensors: dict[str, np.ndarray]  # adapter_model.safetensors


def _module_regex(templates: list[str]) -> str:
  parts = sorted(re.escape(module_path(t)).replace(re.escape("{i}"), r"\d+") for t in templates)
  return "|".join(parts) if len(parts) == 1 else "(" + "|".join(parts) + ")"


def peft_adapter(params: Mapping, cfg: VLMConfig, *, alpha: float, dropout: float = 0.0,
                 base_model: str = "", dtype: str = "float32") -> PeftAdapter:
  """The PEFT LoRA adapter (config + tensors) of params with LoRA leaves, for the HF model of `cfg`.

  PEFT computes y = x W^T + (lora_alpha / r) x A^T B^T with A = lora_A.weight [r, in] and B = lora_B.weight
  [out, r]; mirage's x . W + (alpha / r) (x . lora_a) . lora_b gives A = lora_a^T and B = lora_b^T (input and
  output axes flattened as the kernel's). `target_modules` are the HF module names (q_proj, ...); where a name
  also belongs to a module without an adapter (CLIP's q_proj beside LLaMA's), `exclude_modules` (a full-match
  regex over module paths) keeps PEFT off it. One rank for all adapters (else a ConversionError).
  """
  _, adapters = split_lora(params)
  if not adapters:
    raise ConversionError("the params have no LoRA adapters (no lora_a / lora_b leaves)")
  ranks = sorted({ad.rank for ad in adapters.values()})
  if len(ranks) > 1:
    raise ConversionError(f"LoRA adapters of several ranks {ranks}: a PEFT adapter is written for one rank")
  linear = {r.ours: r for r in rules(cfg) if r.kind.startswith("linear:") and r.ours.endswith("/kernel")}
  unmapped = sorted(set(adapters) - set(linear))
  if unmapped:
    raise ConversionError(f"LoRA adapters on {unmapped} have no PEFT equivalent (not an HF Linear layer); "
                          "export the merged model without --adapter_out")
  np_dtype = np.dtype(numpy_dtype(dtype))
  tensors = {}
  for path, ad in sorted(adapters.items()):
    rule = linear[path]
    if ad.n_in != int(rule.kind.split(":")[1]):
      raise ConversionError(f"LoRA adapter of {path}: lora_a has {ad.n_in} input axes, the kernel "
                            f"{rule.kind.split(':')[1]}")
    names = _expand(rule, cfg)
    a_layers = [ad.a[i] for i in range(len(names))] if "{i}" in rule.theirs else [ad.a]
    b_layers = [ad.b[i] for i in range(len(names))] if "{i}" in rule.theirs else [ad.b]
    for name, a, b in zip(names, a_layers, b_layers, strict=True):
      prefix = "base_model.model." + module_path(name)
      tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, ad.rank).T.astype(np_dtype))
      tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(
          b.reshape(ad.rank, -1).T.astype(np_dtype))
  short = lambda r: module_path(r.theirs).rsplit(".", 1)[-1]  # noqa: E731
  targets = sorted({short(linear[p]) for p in adapters})
  others = [r.theirs for p, r in linear.items() if p not in adapters and short(r) in targets]
  config = {
      "peft_type": "LORA", "task_type": None, "r": ranks[0], "lora_alpha": float(alpha),
      "lora_dropout": float(dropout), "target_modules": targets,
      "exclude_modules": _module_regex(others) if others else None, "bias": "none", "fan_in_fan_out": False,
      "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
      "modules_to_save": None, "base_model_name_or_path": base_model or None, "revision": None,
      "auto_mapping": {"base_model_class": "LlavaForConditionalGeneration",
                       "parent_library": "transformers.models.llava.modeling_llava"},
  }
  return PeftAdapter(config=config, tensors=tensors)


def write_peft_adapter(adapter: PeftAdapter, out: str | pathlib.Path) -> list[str]:
  """`adapter_config.json` and `adapter_model.safetensors` in `out` (what `PeftModel.from_pretrained` reads)."""
  from safetensors.numpy import save_file
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "adapter_config.json").write_text(json.dumps(adapter.config, indent=1, sort_keys=True))
  save_file(adapter.tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
  return ["adapter_config.json", "adapter_model.safetensors"]
