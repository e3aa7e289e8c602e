"""Export (issue 17): `mirage convert jax-to-hf` of runs trained on the synthetic data (the data's tokenizer goes
into the HF directory), LoRA runs written merged (W + alpha/r · A B) and as a PEFT adapter that `peft` loads onto
the exported base; logit parity of HF base + PEFT adapter vs the merged HF model vs mirage's own LoRA forward.

The PyTorch comparisons need the test extra (torch, peft) and skip without it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest

from mirage_jax import configlib
from mirage_jax.commands import convert
from mirage_jax.data.tokenizer import Tokenizer
from mirage_jax.models import hf_convert, hf_parity, safetensors_io
from mirage_jax.models.config import LoRAConfig, VLMConfig
from mirage_jax.models.vlm import VLM
from mirage_jax.train import checkpoint
from test_reliability import mirage, train_args

DECODER = "decoder/layers/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"
# The decoder plus every vision-tower and projector Linear (CLIP's out_proj has two input axes, like o).
EVERYWHERE = DECODER + ",vision/blocks/(attn/(q|k|v|o)|fc1|fc2)/kernel,projector/linear_(1|2)/kernel"
BLOCK = dict(vision=dict(image_size=16, patch_size=4, width=24, depth=2, num_heads=2, mlp_dim=48),
             text=dict(vocab_size=128, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                       max_len=64),
             image_token_id=5)
RANK, ALPHA = 4, 6.0


@functools.lru_cache(maxsize=None)
def _lora_params(targets: str, seed: int) -> tuple[VLMConfig, dict]:
  cfg = VLMConfig.from_config(BLOCK, lora=dict(rank=RANK, alpha=ALPHA, targets=targets))
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in hf_convert.param_shapes(cfg).items():  # abstract: no (slow) eager init
    noise = rng.standard_normal(shape)
    if path.endswith("/scale"):
      flat[path] = 1.0 + 0.2 * noise
    elif path.endswith(("/bias", "/cls", "/pos")):
      flat[path] = 0.1 * noise
    elif path.endswith("/lora_b"):
      flat[path] = 0.1 * noise
    else:  # kernels, embeddings, lora_a: unit-variance outputs
      fan_in = math.prod(shape[1 if "layers/" in path or "blocks/" in path else 0:-1]) or shape[-1]
      flat[path] = noise / math.sqrt(fan_in)
  return cfg, hf_convert.nest({k: v.astype(np.float32) for k, v in flat.items()})


def lora_params(targets: str, *, seed: int = 0) -> tuple[VLMConfig, dict]:
  """A tiny random mirage model with LoRA adapters on `targets`, every parameter random (norm scales near 1),
  lora_b non-zero as after training, so that logits are O(1) and the adapters move them by O(1)."""
  cfg, params = _lora_params(targets, seed)
  return cfg, jax.tree.map(np.copy, params)


def base_config(cfg: VLMConfig) -> VLMConfig:
  return dataclasses.replace(cfg, lora=LoRAConfig())


def write_hf(params: dict, cfg: VLMConfig, out: pathlib.Path) -> pathlib.Path:
  out.mkdir(parents=True, exist_ok=True)
  hf_convert.hf_config_from_model(cfg).save_pretrained(str(out))
  hf_convert.write_hf_state(hf_convert.hf_state_from_params(params, cfg), out, max_shard_bytes=1 << 40)
  return out


# --------------------------------------------------------------------------- pure functions
def test_merge_is_w_plus_scaled_a_b_per_layer_slice():
  cfg, params = lora_params(DECODER)
  merged = hf_convert.merge_lora(params, alpha=ALPHA)
  base, adapters = hf_convert.split_lora(params)
  assert sorted(adapters) == sorted(f"decoder/layers/{p}/kernel" for p in
                                    ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"))
  assert hf_convert.flatten(merged).keys() == hf_convert.flatten(base).keys() == hf_convert.param_shapes(
      base_config(cfg)).keys()
  o = params["decoder"]["layers"]["attn"]["o"]  # [L, H, E, D], lora_a [L, H * E, r], lora_b [L, r, D]
  h, e, d = o["kernel"].shape[1:]
  for layer in range(cfg.text.depth):
    a = o["lora_a"][layer].reshape(h, e, RANK)
    want = o["kernel"][layer] + ALPHA / RANK * np.einsum("her,rd->hed", a, o["lora_b"][layer])
    np.testing.assert_allclose(merged["decoder"]["layers"]["attn"]["o"]["kernel"][layer], want, atol=1e-6)
  assert not np.allclose(merged["decoder"]["layers"]["attn"]["o"]["kernel"], o["kernel"])
  # untouched parameters pass through bit-identically
  np.testing.assert_array_equal(merged["decoder"]["embed"], params["decoder"]["embed"])
  assert hf_convert.merge_lora(base, alpha=ALPHA).keys() == base.keys()  # no adapters: unchanged


def test_incomplete_or_misshapen_adapters_are_errors():
  _, params = lora_params(DECODER)
  broken = hf_convert.flatten(params)
  del broken["decoder/layers/mlp/up/lora_b"]
  with pytest.raises(hf_convert.ConversionError, match="decoder/layers/mlp/up lacks lora_b"):
    hf_convert.split_lora(hf_convert.nest(broken))
  wrong = hf_convert.flatten(params)
  wrong["decoder/layers/mlp/up/lora_a"] = wrong["decoder/layers/mlp/up/lora_a"][..., :2]
  with pytest.raises(hf_convert.ConversionError, match="LoRA adapter of decoder/layers/mlp/up/kernel"):
    hf_convert.split_lora(hf_convert.nest(wrong))


def test_peft_adapter_names_shapes_and_targets():
  cfg, params = lora_params(DECODER)
  peft = hf_convert.peft_adapter(params, base_config(cfg), alpha=ALPHA, base_model="/some/base")
  c = peft.config
  assert c["peft_type"] == "LORA" and c["r"] == RANK and c["lora_alpha"] == ALPHA
  assert c["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
  assert c["base_model_name_or_path"] == "/some/base"
  # CLIP's q/k/v_proj share the names: excluded by a full-match regex over module paths
  import re
  rx = re.compile(c["exclude_modules"])
  assert rx.fullmatch("model.vision_tower.encoder.layers.1.self_attn.q_proj")
  assert not rx.fullmatch("model.language_model.layers.1.self_attn.q_proj")
  t = peft.tensors
  assert len(t) == 2 * 7 * cfg.text.depth
  q = "base_model.model.model.language_model.layers.1.self_attn.q_proj"
  o = "base_model.model.model.language_model.layers.0.self_attn.o_proj"
  assert t[q + ".lora_A.weight"].shape == (RANK, 32) and t[q + ".lora_B.weight"].shape == (4 * 8, RANK)
  assert t[o + ".lora_A.weight"].shape == (RANK, 4 * 8) and t[o + ".lora_B.weight"].shape == (32, RANK)
  a = params["decoder"]["layers"]["attn"]["q"]["lora_a"][1]  # [D, r]
  np.testing.assert_array_equal(t[q + ".lora_A.weight"], a.T)
  everywhere = hf_convert.peft_adapter(lora_params(EVERYWHERE)[1], base_config(cfg), alpha=ALPHA).config
  assert everywhere["exclude_modules"] is None
  assert everywhere["target_modules"] == sorted(["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                 "v_proj", "out_proj", "fc1", "fc2", "linear_1", "linear_2"])
  with pytest.raises(hf_convert.ConversionError, match="no LoRA adapters"):
    hf_convert.peft_adapter(hf_convert.split_lora(params)[0], base_config(cfg), alpha=ALPHA)


# --------------------------------------------------------------------------- parity with transformers + peft
def peft_logits(base_dir: pathlib.Path, adapter_dir: pathlib.Path, inputs, tensors) -> tuple[np.ndarray, dict]:
  """Logits of HF base + PEFT adapter, after checking that peft put exactly our tensors on exactly our modules;
  also PEFT's own merge of the adapter into the base (`merge_and_unload`)."""
  import torch
  from peft import PeftModel
  from transformers import LlavaForConditionalGeneration
  model = LlavaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32).eval()
  model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
  loaded = {k.replace(".default.", "."): v.detach().numpy() for k, v in model.state_dict().items()
            if ".lora_A." in k or ".lora_B." in k}
  assert set(loaded) == set(tensors)  # no module without an adapter got one, none is missing
  for k, v in tensors.items():
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(inputs["tokens"].astype(np.int64)),
                attention_mask=torch.from_numpy(inputs["mask"].astype(np.int64)),
                pixel_values=torch.from_numpy(inputs["images"].transpose(0, 3, 1, 2).copy()))
  merged = {k: v.numpy() for k, v in model.merge_and_unload().state_dict().items()}
  return out.logits.float().numpy(), merged


@pytest.mark.parametrize("targets", [DECODER, pytest.param(EVERYWHERE, marks=pytest.mark.slow)],
                         ids=["decoder", "everywhere"])
def test_peft_adapter_on_the_base_matches_merged_and_mirage(targets, tmp_path):
  pytest.importorskip("torch")
  pytest.importorskip("peft")
  cfg, params = lora_params(targets)
  base_cfg = base_config(cfg)
  base, _ = hf_convert.split_lora(params)
  merged = hf_convert.merge_lora(params, alpha=ALPHA)
  base_dir = write_hf(base, base_cfg, tmp_path / "base")
  merged_dir = write_hf(merged, base_cfg, tmp_path / "merged")
  peft = hf_convert.peft_adapter(params, base_cfg, alpha=ALPHA, base_model=str(base_dir))
  hf_convert.write_peft_adapter(peft, tmp_path / "adapter")
  inputs = hf_parity.random_inputs(cfg, cfg.text.vocab_size, hf_parity.ParityConfig(batch=2))
  ours = hf_parity.jax_logits(hf_convert.HFModel(block=BLOCK, model=cfg, params=params), inputs)  # LoRA forward
  ours_base = hf_parity.jax_logits(hf_convert.HFModel(block=BLOCK, model=base_cfg, params=base), inputs)
  hf_merged = hf_parity.hf_logits(merged_dir, inputs)
  hf_peft, peft_merged = peft_logits(base_dir, tmp_path / "adapter", inputs, peft.tensors)
  numbers = {"peft_vs_merged": float(np.abs(hf_peft - hf_merged).max()),
             "peft_vs_mirage": float(np.abs(hf_peft - ours).max()),
             "merged_vs_mirage": float(np.abs(hf_merged - ours).max()),
             "adapter_effect": float(np.abs(ours - ours_base).max()), "max_abs_logit": float(np.abs(ours).max())}
  state = hf_convert.read_hf_state(merged_dir)
  numbers["peft_merge_vs_ours"] = max(float(np.abs(peft_merged[hf_convert.module_path(k) + ".weight"] - v).max())
                                      for k, v in state.items() if k.endswith(".weight") and ("proj" in k or
                                                                                              "fc" in k or
                                                                                              "linear_" in k))
  print(targets, json.dumps(numbers))
  assert numbers["max_abs_logit"] > 1.0 and numbers["adapter_effect"] > 0.5  # a wrong mapping would show
  for key in ("peft_vs_merged", "peft_vs_mirage", "merged_vs_mirage"):
    assert numbers[key] <= 1e-4, numbers
  assert numbers["peft_merge_vs_ours"] <= 1e-6, numbers


# --------------------------------------------------------------------------- runs on the synthetic data
@pytest.fixture(scope="module")
def synth_run(tmp_path_factory, data_dir) -> pathlib.Path:
  """A 4-step pretraining run on the small synthetic world (image_token_id -1: the data's tokenizer), the same
  command as test_reliability's base run, so the persistent compilation cache serves both."""
  workdir = tmp_path_factory.mktemp("synth_run")
  mirage(*train_args("configs/pretrain/base.py:tiny", workdir, "--config.total_steps=4", "--config.checkpoint_every=4"))
  assert int(convert.runtime.checkpoint_config(workdir).model.image_token_id) == -1
  return workdir


def test_export_of_a_synthetic_run_carries_the_data_tokenizer(synth_run, tmp_path):
  from mirage_jax import cli
  out = tmp_path / "hf"
  assert cli.main(["convert", "jax-to-hf", f"--ckpt={synth_run}", f"--out={out}"]) == 0
  params, model, config = convert.load_checkpoint(synth_run)
  found = convert.checkpoint_tokenizer(synth_run, config)
  assert found is not None and found.directory.parts[-2:] == ("extra", "tokenizer")
  tok = Tokenizer.load(out)
  assert tok.fingerprint() == found.tokenizer.fingerprint() == checkpoint.read_meta(
      checkpoint.find_params_dir(synth_run))["tokenizer"]
  assert json.loads((out / "config.json").read_text())["image_token_index"] == tok.image_id == model.image_token_id
  from transformers import AutoTokenizer
  hf_tok = AutoTokenizer.from_pretrained(str(out))
  assert hf_tok.convert_tokens_to_ids("<image>") == tok.image_id and hf_tok.pad_token_id == tok.pad_id
  back = convert.convert_hf(out)  # the export reads back: tokenizer and weights, bit-exact
  assert back.tokenizer.fingerprint() == tok.fingerprint()
  jax.tree.map(np.testing.assert_array_equal, back.params, params)
  # a tokenizer other than the one the run trained with is refused, by name
  meta = synth_run / "checkpoints" / "4" / "meta" / "metadata"
  other = tmp_path / "other_run"
  shutil.copytree(synth_run, other)
  saved = json.loads(meta.read_text())
  (other / "checkpoints" / "4" / "meta" / "metadata").write_text(json.dumps({**saved, "tokenizer": "0" * 16}))
  with pytest.raises(hf_convert.ConversionError, match="trained with tokenizer 0000000000000000"):
    convert.jax_to_hf(other, tmp_path / "hf_other")


@pytest.fixture(scope="module")
def lora_run(synth_run, tmp_path_factory) -> pathlib.Path:
  """A LoRA run (adapter-only checkpoint naming its base) trained from `synth_run` for a few steps at a high
  learning rate, so that its adapters are trained and non-zero."""
  workdir = tmp_path_factory.mktemp("lora_run")
  mirage(*train_args("configs/pretrain/base.py:tiny", workdir, "--config.total_steps=4", "--config.checkpoint_every=4",
                     f"--config.init_from={synth_run}", f"--config.lora.rank={RANK}", f"--config.lora.alpha={ALPHA}",
                     "--config.optim.lr=1e-2", "--config.optim.warmup_steps=1"))
  return workdir


@pytest.mark.slow  # two short training runs (~3 min on 2 shared cores)
def test_cli_exports_a_lora_run_merged_and_as_a_peft_adapter(lora_run, synth_run, tmp_path):
  from mirage_jax import cli
  from mirage_jax.train import runtime
  assert checkpoint.read_meta(checkpoint.find_params_dir(lora_run))["lora"]["rank"] == RANK  # adapter-only
  merged, adapter = tmp_path / "merged", tmp_path / "adapter"
  assert cli.main(["convert", "jax-to-hf", f"--ckpt={lora_run}", f"--out={merged}", f"--adapter_out={adapter}"]) == 0
  params, model, _ = convert.load_checkpoint(lora_run)  # one device: the base restored, adapters beside it
  loaded = runtime.load_run(lora_run)  # the run's own restore, on the 8-device mesh
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded.params, params)
  base, adapters = hf_convert.split_lora(params)
  assert len(adapters) == 7 and all(np.abs(a.b).max() > 0 for a in adapters.values())  # trained
  want = hf_convert.hf_state_from_params(hf_convert.merge_lora(params, alpha=ALPHA), model)
  got = hf_convert.read_hf_state(merged)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  original = hf_convert.hf_state_from_params(convert.load_checkpoint(synth_run)[0], model)
  for k, v in hf_convert.read_hf_state(adapter / "base").items():
    np.testing.assert_array_equal(v, original[k], err_msg=k)  # the base is the run it was trained from
  config = json.loads((adapter / "adapter_config.json").read_text())
  assert config["base_model_name_or_path"] == str((adapter / "base").absolute()) and config["r"] == RANK
  assert (merged / "tokenizer.json").exists() and (adapter / "base" / "tokenizer.json").exists()
  with pytest.raises(Exception, match="has no LoRA adapters"):
    convert.jax_to_hf(synth_run, tmp_path / "x", adapter_out=tmp_path / "y")
  try:
    import peft  # noqa: F401
    import torch  # noqa: F401
  except ImportError:
    return
  inputs = hf_parity.random_inputs(model, model.text.vocab_size, hf_parity.ParityConfig(batch=2))
  hf_peft, _ = peft_logits(adapter / "base", adapter, inputs,
                           safetensors_io.read_safetensors(adapter / "adapter_model.safetensors"))
  lora_model = loaded.setup.spec.config
  ours = hf_parity.jax_logits(hf_convert.HFModel(block={}, model=lora_model, params=params), inputs)
  ours_base = hf_parity.jax_logits(hf_convert.HFModel(block={}, model=model, params=base), inputs)
  numbers = {"peft_vs_merged": float(np.abs(hf_peft - hf_parity.hf_logits(merged, inputs)).max()),
             "peft_vs_mirage": float(np.abs(hf_peft - ours).max()),
             "adapter_effect": float(np.abs(ours - ours_base).max()), "max_abs_logit": float(np.abs(ours).max())}
  print("trained lora run", json.dumps(numbers))
  assert numbers["adapter_effect"] > 1e-2
  assert numbers["peft_vs_merged"] <= 1e-4 and numbers["peft_vs_mirage"] <= 1e-4, numbers


# --------------------------------------------------------------------------- a checkpoint written by 2 processes
@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_export_of_a_two_process_run(lora, tmp_path, data_dir):
  """2 processes x 4 fake devices save collectively; `mirage convert` (one process) reads and exports it
  (no multi-process serialization is involved: the exporter restores onto one device and writes numpy)."""
  from test_multihost import train
  base = "configs/pretrain/base.py:tiny"
  extra = ["--config.total_steps=2"]
  if lora:
    if "lora" not in configlib.load(base):
      pytest.skip("no lora config block")
    extra += [f"--config.lora.rank={RANK}", f"--config.lora.alpha={ALPHA}"]
  run = tmp_path / "two"
  train(run, base, processes=2, devices=4, extra=extra)
  out, adapter = tmp_path / "hf", tmp_path / "adapter"
  args = ["convert", "jax-to-hf", f"--ckpt={run}", f"--out={out}"] + ([f"--adapter_out={adapter}"] if lora else [])
  result = json.loads(mirage(*args).stdout)  # a fresh single process
  assert result["tokenizer"] and (out / "tokenizer.json").exists()
  params, model, _ = convert.load_checkpoint(run)
  want = hf_convert.hf_state_from_params(hf_convert.merge_lora(params, alpha=ALPHA) if lora else params, model)
  got = hf_convert.read_hf_state(out)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  if lora:
    assert result["lora"]["adapters"] >= 1 and (adapter / "adapter_model.safetensors").exists()
