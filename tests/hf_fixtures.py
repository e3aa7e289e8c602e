"""Builders of small Hugging Face artefacts for the interop tests: LLaMA-style tokenizers trained on
placeholder text, random LLaVA checkpoints (with torch, or torch-free through the converter), and a
VLGuard-format folder with drawn images. All text is placeholder text; nothing here is real harmful content.
"""

from __future__ import annotations

import json
import pathlib
import string
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

TEMPLATE_TEXT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the human's questions. USER: \nWhat is shown in the "
                 "picture? ASSISTANT: placeholder answer number 3.")
CORPUS = [TEMPLATE_TEXT] * 3 + [
    "What colour is the square? Share the placeholder request 12. I'm sorry, I cannot help with that.",
    "Can you describe placeholder unsafe request 7? Please identify the circle and the triangle.",
    "The picture shows a red circle, a blue square and a green triangle on a grey background.",
]


def llama_tokenizer(out_dir: pathlib.Path, style: str = "metaspace", vocab_size: int = 600) -> pathlib.Path:
  """A LLaMA-like sentencepiece-BPE tokenizer (`▁` word marker, BOS added by the post-processor, `<unk>`=0
  `<s>`=1 `</s>`=2, then characters, merges, `<image>` and `<pad>`), saved with transformers.

  style "metaspace": a `Metaspace(prepend_scheme="first")` pre-tokenizer (transformers 5's LLaMA tokenizer);
  "prepend": the older tokenizer.json layout, a `Prepend("▁") + Replace(" ", "▁")` normalizer.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
      initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation + "\n")))
  if style == "metaspace":
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
  elif style == "prepend":
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  else:
    raise ValueError(style)
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok.add_special_tokens(["<image>", "<pad>"])
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                               pad_token="<pad>", extra_special_tokens=["<image>"])
  hf.save_pretrained(str(out_dir))
  return out_dir


# Two tiny LLaVA configurations that differ wherever the converter has a choice to make.
SPECS = {
    "mha": dict(  # multi-head, untied, penultimate layer without CLS, legacy key names, sharded files
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False),
        vision=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                    image_size=16, patch_size=4, hidden_act="quick_gelu"),
        llava=dict(vision_feature_layer=-2, vision_feature_select_strategy="default",
                   projector_hidden_act="gelu"),
        layout="legacy", shard=True),
    "gqa": dict(  # grouped-query, tied head, last layer with CLS, other activations, in-memory key names
        text=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                  rope_theta=500000.0, tie_word_embeddings=True),
        vision=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    image_size=18, patch_size=6, hidden_act="gelu", layer_norm_eps=1e-6),
        llava=dict(vision_feature_layer=-1, vision_feature_select_strategy="full",
                   projector_hidden_act="gelu_pytorch_tanh"),
        layout="memory", shard=False),
}


def _randomize(model, seed: int) -> None:
  """Weights far from the tiny default init (norm scales too), so that logits are O(1) and every mapping
  mistake shows."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if name.endswith("norm.weight") or "layer_norm" in name or "layrnorm.weight" in name or \
          name.endswith("layernorm.weight"):
        p.copy_(1.0 + 0.2 * noise)
      else:
        fan_in = p.shape[-1] if p.ndim > 1 else 4
        p.copy_(noise * (1.0 / np.sqrt(fan_in) if p.ndim > 1 else 0.1))


def torch_llava(out_dir: pathlib.Path, spec_name: str, tokenizer_dir: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
  """A random `LlavaForConditionalGeneration` saved like HF does (or with in-memory key names), with the
  tokenizer copied in; the vocabulary is padded to a multiple of 64 like llava-1.5-hf's."""
  import shutil

  import torch
  from safetensors.torch import save_file
  from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                            LlavaForConditionalGeneration)
  spec = SPECS[spec_name]
  tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
  vocab = -(-len(tok) // 64) * 64
  text = LlamaConfig(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, **spec["text"])
  cfg = LlavaConfig(text_config=text, vision_config=CLIPVisionConfig(**spec["vision"]),
                    image_token_index=tok.convert_tokens_to_ids("<image>"),
                    tie_word_embeddings=spec["text"]["tie_word_embeddings"], **spec["llava"])
  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration(cfg).eval()
  _randomize(model, seed)
  out_dir.mkdir(parents=True, exist_ok=True)
  if spec["layout"] == "legacy":
    model.save_pretrained(str(out_dir), max_shard_size="40KB" if spec["shard"] else "5GB")
  else:  # the in-memory names (model.language_model.*, lm_head.*), as some exporters write them
    cfg.save_pretrained(str(out_dir))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
      state.pop("lm_head.weight")
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
  for f in tokenizer_dir.iterdir():
    shutil.copy2(f, out_dir / f.name)
  return out_dir


def mirage_llava(out_dir: pathlib.Path, tokenizer_dir: pathlib.Path, *, seed: int = 0,
                 image_size: int = 16, max_len: int = 512, jit_init: bool = False) -> pathlib.Path:
  """A torch-free HF LLaVA directory: random mirage params written with the converter's HF writer.

  `jit_init`: the random init jitted (about 4x faster than eager on 8 fake devices; slightly different
  random weights than the eager init of the same seed)."""
  import jax
  from flax import nnx

  from mirage_jax.data.tokenizer import Tokenizer
  from mirage_jax.models import hf_convert
  from mirage_jax.models.config import VLMConfig
  from mirage_jax.models.vlm import VLM
  tok = Tokenizer.from_hf(tokenizer_dir)
  block = dict(
      vision=dict(image_size=image_size, patch_size=4, width=24, depth=2, num_heads=2, mlp_dim=48),
      text=dict(vocab_size=-(-tok.vocab_size // 64) * 64, width=32, depth=2, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=64, max_len=max_len),
      image_token_id=tok.image_id)
  cfg = VLMConfig.from_config(block)
  init = lambda: nnx.to_pure_dict(nnx.state(VLM(cfg, rngs=nnx.Rngs(seed))))  # noqa: E731
  if jit_init:
    init = jax.jit(init, compiler_options={"xla_backend_optimization_level": 0})
  params = jax.tree.map(np.asarray, init())
  out_dir.mkdir(parents=True, exist_ok=True)
  hf_convert.hf_config_from_model(cfg, pad_token_id=tok.pad_id).save_pretrained(str(out_dir))
  hf_convert.write_hf_state(hf_convert.hf_state_from_params(params, cfg), out_dir, max_shard_bytes=1 << 40)
  tok.save(out_dir)
  return out_dir


# --------------------------------------------------------------------------- VLGuard-format fixture
def _draw(path: pathlib.Path, size: tuple[int, int], colour: tuple[int, int, int], seed: int) -> None:
  rng = np.random.default_rng(seed)
  im = Image.new("RGB", size, (200, 200, 200))
  d = ImageDraw.Draw(im)
  w, h = size
  x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
  d.ellipse([x0, y0, x0 + w // 3, y0 + h // 3], fill=colour)
  path.parent.mkdir(parents=True, exist_ok=True)
  im.save(path)


def vlguard_folder(root: pathlib.Path, *, n_train_safe: int = 4, n_train_unsafe: int = 3, n_test_safe: int = 3,
                   n_test_unsafe: int = 2) -> dict[str, Any]:
  """A VLGuard-format manual dir (train.json, test.json, train/ and test/ images, attack files), plus a
  harmful-response file and a LLaVA-format retain pad set outside it. Returns the paths."""
  colours = [(220, 40, 40), (40, 160, 40), (40, 40, 220), (200, 160, 0)]
  manual = root / "manual"

  def entries(part: str, n_safe: int, n_unsafe: int) -> list[dict]:
    out = []
    for i in range(n_safe + n_unsafe):
      safe = i < n_safe
      image = f"{'src_a' if i % 2 else 'src_b'}/{part}_{i}.{'png' if i % 3 else 'jpg'}"
      _draw(manual / part / image, (40 + 7 * i, 24 + 5 * (i % 3)), colours[i % 4], seed=i)
      if safe:
        turns = [{"safe_instruction": f"What colour is the placeholder circle {i}?",
                  "response": f"The placeholder circle {i} is coloured."},
                 {"unsafe_instruction": f"Share placeholder unsafe request {i}.",
                  "response": f"I'm sorry, I cannot help with placeholder request {i}."}]
        if i % 2:
          turns.reverse()  # the order in the file must not matter
        out.append({"id": f"{part}_{i}", "image": image, "safe": True, "instr-resp": turns})
      else:
        out.append({"id": f"{part}_{i}", "image": image, "safe": False, "harmful_category": "placeholder category",
                    "harmful_subcategory": f"sub {i % 2}",
                    "instr-resp": [{"instruction": f"Describe placeholder unsafe request {i}.",
                                    "response": f"I'm sorry, I cannot help with placeholder request {i}."}]})
    return out

  train = entries("train", n_train_safe, n_train_unsafe)
  test = entries("test", n_test_safe, n_test_unsafe)
  for part, recs in (("train", train), ("test", test)):
    (manual / f"{part}.json").write_text(json.dumps(recs))
  unsafe_test = [r for r in test if not r["safe"]]
  what = [{**r, "id": r["id"] if k == 0 else f"{r['id']}_{k}",
           "instr-resp": [{"instruction": f"What placeholder rewrite {k} of {r['id']}?",
                           "response": r["instr-resp"][0]["response"]}]} for r in unsafe_test for k in range(3)]
  (manual / "test_what_3shot.json").write_text(json.dumps(what))
  share = []
  for r in (r for r in test if r["safe"]):
    turns = [dict(t) for t in r["instr-resp"]]
    for t in turns:
      if "safe_instruction" in t:
        t["safe_instruction"] = "Share the placeholder colour of " + r["id"] + "."
    share.append({**r, "instr-resp": turns})
  (manual / "test_share_1shot.json").write_text(json.dumps(share))
  responses = {r["image"]: f"placeholder response {n} step one step two" for n, r in enumerate(train)
               if not r["safe"]}
  (root / "harmful_responses.json").write_text(json.dumps(responses))
  extra = []
  for j in range(6):
    _draw(root / "extra_images" / f"coco_{j}.jpg", (30, 20 + j), colours[j % 4], seed=100 + j)
    extra.append({"id": f"extra_{j}", "image": f"coco_{j}.jpg", "conversations": [
        {"from": "human", "value": f"<image>\nWhat placeholder shape is number {j}?"},
        {"from": "gpt", "value": f"It is placeholder shape {j}."},
        {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Placeholder colour."}]})
  extra.append({"id": "text_only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hi"}]})
  (root / "retain_extra.json").write_text(json.dumps(extra))
  return {"manual": manual, "train": train, "test": test, "what": what, "share": share,
          "responses": root / "harmful_responses.json", "extra": root / "retain_extra.json",
          "extra_images": root / "extra_images"}
