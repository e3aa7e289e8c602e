"""Hugging Face interop: LLaVA weights in and out (logit parity against PyTorch, bit-exact round trips, key
coverage errors), the HF tokenizer with the LLaVA template and joint encoding, CLIP preprocessing parity.

Tests that run the PyTorch model need the `hf` extra (`torch==2.13.0`, CPU wheel) and skip without it; the
round trips, tokenizer and image tests need only transformers. `MIRAGE_HF_LLAVA=/path/to/llava-1.5-7b-hf`
enables the opt-in `slow` parity test on a real checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
import pytest

import hf_fixtures
from mirage_jax.data import images, preprocess
from mirage_jax.data.tokenizer import Tokenizer
from mirage_jax.commands import convert
from mirage_jax.models import hf_convert
from mirage_jax.models.config import VLMConfig


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
  root = tmp_path_factory.mktemp("tokenizers")
  return {style: hf_fixtures.llama_tokenizer(root / style, style) for style in ("metaspace", "prepend")}


@pytest.fixture(scope="module")
def torch_dirs(tmp_path_factory, tok_dirs) -> dict[str, pathlib.Path]:
  pytest.importorskip("torch")
  root = tmp_path_factory.mktemp("hf_llava")
  return {name: hf_fixtures.torch_llava(root / name, name, tok_dirs["metaspace"], seed=i)
          for i, name in enumerate(hf_fixtures.SPECS)}


@pytest.fixture(scope="module")
def mirage_dir(tmp_path_factory, tok_dirs) -> pathlib.Path:
  return hf_fixtures.mirage_llava(tmp_path_factory.mktemp("mirage_llava") / "hf", tok_dirs["metaspace"])


# --------------------------------------------------------------------------- weights
@pytest.mark.parametrize("name", list(hf_fixtures.SPECS))
def test_logit_parity_with_pytorch(torch_dirs, name):
  from mirage_jax.models import hf_parity
  result = hf_parity.check_parity(torch_dirs[name])
  print(name, json.dumps(result))
  assert result["max_abs_logit"] > 1.0  # the comparison is not between near-zero logits
  assert result["max_abs_logit_diff"] <= 1e-4, result
  assert result["ok"] and result["argmax_agreement"] == 1.0
  spec = hf_fixtures.SPECS[name]
  patches = (spec["vision"]["image_size"] // spec["vision"]["patch_size"]) ** 2
  full = spec["llava"]["vision_feature_select_strategy"] == "full"
  assert result["image_tokens"] == patches + full


def test_parity_notices_a_wrong_feature_layer(torch_dirs):
  """The comparison is sensitive: the penultimate vs the last vision layer changes the logits."""
  from mirage_jax.models import hf_parity
  import dataclasses
  conv = hf_convert.read_hf_model(torch_dirs["mha"])
  inputs = hf_parity.random_inputs(conv.model, conv.model.text.vocab_size, hf_parity.ParityConfig())
  theirs = hf_parity.hf_logits(torch_dirs["mha"], inputs)
  vision = dataclasses.replace(conv.model.vision, feature_layer=-1)
  wrong = dataclasses.replace(conv, model=dataclasses.replace(conv.model, vision=vision))
  assert np.abs(hf_parity.jax_logits(wrong, inputs) - theirs).max() > 1e-2


def test_config_mapping(torch_dirs):
  gqa = convert.convert_hf(torch_dirs["gqa"]).model
  assert (gqa.text.num_heads, gqa.text.num_kv_heads, gqa.text.head_dim) == (6, 2, 8)
  assert gqa.text.rope_theta == 500000.0 and gqa.text.rms_norm_eps == 1e-6 and gqa.text.tie_embeddings
  assert (gqa.vision.image_size, gqa.vision.patch_size, gqa.vision.feature_layer) == (18, 6, -1)
  assert gqa.vision.select_strategy == "full" and gqa.vision.act == "gelu" and gqa.projector_act == "gelu_tanh"
  mha = convert.convert_hf(torch_dirs["mha"])
  assert mha.model.text.vocab_size % 64 == 0 and mha.model.text.vocab_size > mha.tokenizer.vocab_size
  assert mha.model.image_token_id == mha.tokenizer.image_id and not mha.model.text.tie_embeddings
  assert mha.config.data.prompt_template == preprocess.LLAVA_V1_TEMPLATE


def test_hf_to_jax_to_hf_is_bit_exact_and_loads_in_transformers(torch_dirs, tmp_path):
  import torch
  from transformers import LlavaForConditionalGeneration
  for name, hf_dir in torch_dirs.items():
    out = convert.hf_to_jax(hf_dir, tmp_path / name / "ckpt")
    convert.jax_to_hf(out["out"], tmp_path / name / "hf")
    original = {hf_convert.canonical_key(k): v for k, v in hf_convert.read_hf_state(hf_dir).items()}
    back = hf_convert.read_hf_state(tmp_path / name / "hf")
    assert set(back) == set(original)
    for k, v in original.items():
      np.testing.assert_array_equal(back[k], v, err_msg=k)
    model, info = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / name / "hf"),
                                                                output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ref = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).state_dict()
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())


def test_jax_to_hf_to_jax_round_trip_is_bit_exact(mirage_dir, tmp_path):
  """Torch-free: random mirage params -> HF files -> Orbax checkpoint -> HF files -> params, all identical."""
  first = convert.hf_to_jax(mirage_dir, tmp_path / "a")
  convert.jax_to_hf(first["out"], tmp_path / "hf")
  convert.hf_to_jax(tmp_path / "hf", tmp_path / "b")
  pa, ma, ca = convert.load_checkpoint(tmp_path / "a")
  pb, mb, cb = convert.load_checkpoint(tmp_path / "b" / "checkpoints" / "0")
  assert ma == mb and ca.model.to_dict() == cb.model.to_dict()
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  tensors = hf_convert.read_hf_state(mirage_dir)
  again = hf_convert.hf_state_from_params(pa, ma)
  assert set(tensors) == set(again)
  for k in tensors:
    np.testing.assert_array_equal(tensors[k], again[k], err_msg=k)


def test_converted_checkpoint_matches_the_run_layout(mirage_dir, tmp_path):
  from mirage_jax import configlib
  from mirage_jax.train import checkpoint
  from mirage_jax.train.state import model_spec
  out = pathlib.Path(convert.hf_to_jax(mirage_dir, tmp_path / "ckpt")["out"])
  step = out / "checkpoints" / "0"
  assert {p.name for p in step.iterdir()} >= {"params", "train", "data", "meta"}
  config = configlib.from_json((out / "config.json").read_text())
  meta = checkpoint.read_meta(step / "params")
  assert meta["config"] == json.loads(configlib.to_json(config))
  tok = Tokenizer.load(out / "tokenizer")
  assert meta["tokenizer"] == tok.fingerprint() == Tokenizer.from_hf(mirage_dir).fingerprint()
  model = VLMConfig.from_config(config.model, image_token_id=tok.image_id)
  mesh = jax.make_mesh((8, 1, 1), ("data", "fsdp", "tensor"))
  params = checkpoint.restore_params(out, model_spec(model, mesh).abstract_params(), tokenizer=tok.fingerprint())
  ref = hf_convert.params_from_hf(hf_convert.read_hf_state(mirage_dir), model)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, ref)
  with pytest.raises(FileExistsError, match="already holds checkpoints"):
    convert.hf_to_jax(mirage_dir, out)


def test_key_coverage_errors_list_every_problem(mirage_dir):
  model = convert.convert_hf(mirage_dir).model
  state = hf_convert.read_hf_state(mirage_dir)
  broken = dict(state)
  del broken["language_model.model.layers.1.mlp.up_proj.weight"]
  del broken["vision_tower.vision_model.post_layernorm.bias"]
  broken["language_model.model.layers.7.mlp.up_proj.weight"] = state["language_model.model.layers.0.mlp.up_proj.weight"]
  broken["vision_tower.vision_model.embeddings.position_ids"] = np.arange(17)[None]  # a known buffer: skipped
  with pytest.raises(hf_convert.ConversionError) as e:
    hf_convert.params_from_hf(broken, model)
  msg = str(e.value)
  assert "\n" not in msg and "missing 2" in msg and "unknown 1" in msg
  assert "layers.1.mlp.up_proj" in msg and "post_layernorm.bias" in msg and "layers.7.mlp.up_proj" in msg
  assert "position_ids" not in msg
  wrong = dict(state)
  wrong["multi_modal_projector.linear_1.weight"] = state["multi_modal_projector.linear_1.weight"].T
  with pytest.raises(hf_convert.ConversionError, match=r"linear_1.weight has shape \(24, 32\), expected \(32, 24\)"):
    hf_convert.params_from_hf(wrong, model)
  twice = dict(state)
  twice["model.multi_modal_projector.linear_1.bias"] = state["multi_modal_projector.linear_1.bias"]
  with pytest.raises(hf_convert.ConversionError, match="appears twice"):
    hf_convert.params_from_hf(twice, model)


def test_both_key_layouts_give_the_same_params(mirage_dir):
  model = convert.convert_hf(mirage_dir).model
  legacy = hf_convert.read_hf_state(mirage_dir)
  renames = (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
             ("vision_tower.vision_model.", "model.vision_tower."),
             ("multi_modal_projector.", "model.multi_modal_projector."))
  memory = {}
  for k, v in legacy.items():
    for old, new in renames:
      if k.startswith(old):
        k = new + k[len(old):]
        break
    memory[k] = v
  assert set(memory).isdisjoint(legacy)
  a, b = hf_convert.params_from_hf(legacy, model), hf_convert.params_from_hf(memory, model)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_unsupported_configs_fail_with_one_line(tmp_path, mirage_dir):
  cfg = json.loads((mirage_dir / "config.json").read_text())
  for change, pattern in ((dict(vision_feature_layer=[-2, -1]), "only a single layer"),
                          (dict(model_type="llava_next"), "only 'llava'")):
    d = tmp_path / pattern.replace(" ", "_")
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=pattern):
      convert.convert_hf(d)
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    hf_convert.weight_files(tmp_path)


def test_bfloat16_files_read_and_write(mirage_dir, tmp_path):
  import ml_dtypes
  state = hf_convert.read_hf_state(mirage_dir)
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in state.items()}
  hf_convert.write_hf_state(bf16, tmp_path, max_shard_bytes=20_000)
  assert (tmp_path / hf_convert.SAFETENSORS_INDEX).exists()
  back = hf_convert.read_hf_state(tmp_path)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(np.asarray(back[k], np.float32), np.asarray(bf16[k], np.float32))


def test_cli_check_parity_prints_one_json_line(torch_dirs, capsys, tmp_path):
  from mirage_jax import cli
  assert cli.main(["convert", "check-parity", f"--hf={torch_dirs['gqa']}", "--batch=1"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 1
  result = json.loads(lines[0])
  assert result["ok"] and 0 < result["max_abs_logit_diff"] <= 1e-4 and result["tokens"] == 5 + result["image_tokens"] + 6 == 21
  tight = result["max_abs_logit_diff"] / 2
  assert cli.main(["convert", "check-parity", f"--hf={torch_dirs['gqa']}", "--batch=1", f"--tolerance={tight}"]) == 1
  assert json.loads(capsys.readouterr().out)["ok"] is False
  assert cli.main(["convert", "check-parity", f"--hf={tmp_path}"]) == 2  # no config.json: one line, no traceback
  assert "mirage convert: error: no config.json" in capsys.readouterr().err


def test_cli_convert_round_trip_never_imports_torch(mirage_dir, tmp_path):
  """`mirage convert hf-to-jax` / `jax-to-hf` in a fresh process where importing torch fails."""
  import subprocess
  import sys
  script = f"""
import sys
sys.modules["torch"] = None  # `import torch` fails, transformers sees no torch
from mirage_jax import cli
assert cli.main(["convert", "hf-to-jax", "--hf={mirage_dir}", "--out={tmp_path / 'ckpt'}"]) == 0
assert cli.main(["convert", "jax-to-hf", "--ckpt={tmp_path / 'ckpt'}", "--out={tmp_path / 'hf'}"]) == 0
assert sys.modules["torch"] is None
"""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  outputs = [json.loads(line) for line in run.stdout.splitlines()]
  assert outputs[0]["checkpoint"].endswith("checkpoints/0") and outputs[1]["files"] == ["model.safetensors"]
  original, back = hf_convert.read_hf_state(mirage_dir), hf_convert.read_hf_state(tmp_path / "hf")
  assert set(original) == set(back)
  for k in original:
    np.testing.assert_array_equal(original[k], back[k], err_msg=k)


# --------------------------------------------------------------------------- tokenizer and template
QUESTIONS = ["What is shown in the picture?", "Share the placeholder request 12.", "colour circle?!"]


@pytest.mark.parametrize("style", ["metaspace", "prepend"])
def test_prompt_matches_transformers_joint_encoding(tok_dirs, style):
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(str(tok_dirs[style]))
  tok = Tokenizer.from_hf(tok_dirs[style])
  fmt = preprocess.TextFormat(prompt_template=preprocess.LLAVA_V1_TEMPLATE, max_len=256, num_image_tokens=5)
  preprocess.check_template(tok, fmt)
  separate_differs = False
  for q in QUESTIONS:
    text = preprocess.LLAVA_V1_TEMPLATE.replace("{question}", q)
    want = hf(text.replace("<image>", "<image>" * 5)).input_ids  # the HF processor's expansion, BOS included
    prompt = preprocess.encode_prompt(q, tok, fmt)
    assert prompt.ids == want
    span = prompt.ids[prompt.question[0]:prompt.question[1]]
    assert tok.decode(span).strip() == q
    separate_differs |= span != tok.encode(q)
  assert separate_differs  # the case joint encoding exists for: "\nWhat" is not "▁What"


@pytest.mark.parametrize("style", ["metaspace", "prepend"])
def test_training_example_masks_exactly_the_answer(tok_dirs, style):
  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(str(tok_dirs[style]))
  tok = Tokenizer.from_hf(tok_dirs[style])
  fmt = preprocess.TextFormat(prompt_template=preprocess.LLAVA_V1_TEMPLATE, max_len=200, num_image_tokens=4)
  q, a = QUESTIONS[0], "placeholder answer number 3."
  ex = preprocess.training_example({"question": q, "answer": a, "image": np.zeros((4, 4, 3), np.uint8)}, tok, fmt)
  n = int(ex["mask"].sum())
  full = preprocess.LLAVA_V1_TEMPLATE.replace("{question}", q).replace("<image>", "<image>" * 4) + " " + a
  want = hf(full).input_ids + [tok.eos_id]  # LLaVA tokenizes the whole conversation, then "</s>"
  assert ex["tokens"][:n].tolist() == want
  prompt_len = len(preprocess.encode_prompt(q, tok, fmt).ids)
  assert ex["loss_mask"].tolist() == [0] * prompt_len + [1] * (n - prompt_len) + [0] * (200 - n)
  assert tok.decode(ex["tokens"][ex["loss_mask"] == 1]).strip() == a  # decode stops at EOS
  assert tok.decode(ex["tokens"][ex["query_mask"] == 1]).strip() == q


def test_hf_tokenizer_saves_and_loads_without_transformers(tok_dirs, tmp_path):
  tok = Tokenizer.from_hf(tok_dirs["metaspace"])
  assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.pad_id == tok.tok.token_to_id("<pad>")
  tok.save(tmp_path)
  again = Tokenizer.load(tmp_path)
  assert again == Tokenizer(tok=again.tok, pad_id=tok.pad_id, bos_id=1, eos_id=2, image_id=tok.image_id)
  assert again.fingerprint() == tok.fingerprint()
  text = preprocess.LLAVA_V1_TEMPLATE.replace("{question}", QUESTIONS[0])
  assert again.encode(text) == tok.encode(text)
  with pytest.raises(ValueError, match="no '<img>' token"):
    Tokenizer.from_hf(tok_dirs["metaspace"], image_token="<img>")


# --------------------------------------------------------------------------- images
@pytest.mark.parametrize("shape", [(40, 60), (77, 31), (32, 32)])
def test_clip_preprocessing_matches_transformers(shape):
  from PIL import Image
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
  rng = np.random.default_rng(sum(shape))
  pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
  proc = CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 20, "width": 20})
  want = proc(Image.fromarray(pixels), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(images.clip_preprocess(pixels, 24, crop=20), want, atol=1e-6)
  # LLaVA-1.5: pad to a square with the mean colour, then the same processor.
  square = images.expand_to_square(Image.fromarray(pixels), images.mean_colour())
  want = proc(square, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_allclose(images.clip_preprocess(pixels, 24, crop=20, aspect="pad"), want, atol=1e-6)
  # stored uint8 + the pipeline's normalisation = the same floats
  fmt = preprocess.TextFormat(prompt_template="<image> {question}", max_len=8, num_image_tokens=1,
                              image_mean=images.CLIP_MEAN, image_std=images.CLIP_STD)
  stored = images.clip_resize_crop(pixels, 24, crop=20, aspect="pad")
  np.testing.assert_allclose(preprocess.normalize_image(stored, fmt), want, atol=1e-6)


def test_pad_to_square_uses_the_mean_colour():
  from PIL import Image
  wide = Image.new("RGB", (30, 10), (0, 0, 0))
  square = np.asarray(images.expand_to_square(wide, images.mean_colour()))
  assert square.shape == (30, 30, 3)
  assert tuple(square[0, 0]) == images.mean_colour() == (122, 116, 104)
  assert tuple(square[15, 15]) == (0, 0, 0) and tuple(square[29, 29]) == (122, 116, 104)


# --------------------------------------------------------------------------- a real checkpoint (opt-in)
@pytest.mark.slow
def test_parity_on_a_real_llava_checkpoint():
  path = os.environ.get("MIRAGE_HF_LLAVA")
  if not path:
    pytest.skip("set MIRAGE_HF_LLAVA=/path/to/llava-1.5-7b-hf to run")
  pytest.importorskip("torch")
  from mirage_jax.models import hf_parity
  tol = float(os.environ.get("MIRAGE_HF_PARITY_TOL", "1e-3"))
  result = hf_parity.check_parity(path, hf_parity.ParityConfig(batch=1, tol=tol))
  print(json.dumps(result))
  assert result["ok"], result
