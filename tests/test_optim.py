"""Optimizer: trainable/frozen regexes, decoder-layer slice masks (frozen slices stay bit-identical under AdamW
with weight decay), trainable counts, and optimizer-state shardings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mirage_configs import models as model_configs
from mirage_jax import sharding
from mirage_jax.models import VLM, VLMConfig
from mirage_jax.train import optim
from mirage_jax.train.state import model_spec

DEPTH, WIDTH, MLP = 4, 32, 64
DOWN = "decoder/layers/mlp/down/kernel"


def tiny_config() -> VLMConfig:
  mc = model_configs.model_config("tiny")
  mc.vision.update(dict(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64))
  mc.text.update(dict(vocab_size=64, width=WIDTH, depth=DEPTH, num_heads=2, num_kv_heads=1, head_dim=16,
                      mlp_dim=MLP, max_len=32))
  return VLMConfig.from_config(mc, image_token_id=4)


@pytest.fixture(scope="module")
def params():
  """The tiny VLM's real parameter tree (paths and shapes), values drawn with numpy."""
  abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: VLM(tiny_config(), rngs=nnx.Rngs(0)))))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), abstract)


def flat(tree) -> dict:
  return {optim.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def optim_config(**kw) -> dict:
  base = dict(lr=1e-2, warmup_steps=0, schedule="constant", end_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
              weight_decay=0.1, clip_norm=1.0, frozen="", trainable="", decoder_layers="")
  return {**base, **kw}


# --------------------------------------------------------------------------- labels
def test_label_tree_frozen(params):
  labels = flat(optim.label_tree(params, {"frozen": "vision/.*"}))
  assert any(k.startswith("vision/") for k in labels)
  for k, v in labels.items():
    assert v == (optim.FROZEN if k.startswith("vision/") else optim.TRAIN), k


def test_label_tree_trainable(params):
  labels = flat(optim.label_tree(params, {"trainable": f"projector/.*, {DOWN}"}))
  train = sorted(k for k, v in labels.items() if v == optim.TRAIN)
  assert train == sorted([DOWN] + [k for k in labels if k.startswith("projector/")])
  assert len(train) == 5  # down kernel + projector's 2 kernels and 2 biases


def test_label_tree_frozen_overrides_trainable(params):
  labels = flat(optim.label_tree(params, {"trainable": "projector/.*", "frozen": "projector/linear_1/bias"}))
  assert labels["projector/linear_1/bias"] == optim.FROZEN
  assert labels["projector/linear_1/kernel"] == optim.TRAIN
  assert labels["decoder/embed"] == optim.FROZEN


def test_label_tree_everything_trains_by_default(params):
  assert set(flat(optim.label_tree(params, {})).values()) == {optim.TRAIN}


@pytest.mark.parametrize("key,pattern", [
    ("frozen", "vision/.*,nothing/here"),
    ("trainable", "decoder/layers/mlp/down"),  # full match: the path continues with /kernel
    ("trainable", "layers/mlp/down/kernel"),  # full match from the start
])
def test_label_tree_unmatched_regex_is_an_error(params, key, pattern):
  with pytest.raises(ValueError, match=f"optim.{key}.*matches no parameter") as e:
    optim.label_tree(params, {key: pattern})
  assert "decoder/embed" in str(e.value)  # the message shows what paths look like


def test_label_tree_bad_regex(params):
  with pytest.raises(ValueError, match="bad regex"):
    optim.label_tree(params, {"frozen": "vision/(.*"})


# --------------------------------------------------------------------------- decoder_layers
@pytest.mark.parametrize("spec,expected", [
    ("", (0, 1, 2, 3)), ("  ", (0, 1, 2, 3)), ("1:3", (1, 2)), ("0:4", (0, 1, 2, 3)), ("3", (3,)),
    ("0,2", (0, 2)), (" 1 , 3 ", (1, 3)), ("2,", (2,)),
])
def test_parse_layers(spec, expected):
  assert optim.parse_layers(spec, 4) == expected


@pytest.mark.parametrize("spec,match", [
    ("3:5", r"layers \[4\] outside"), ("4", "outside"), ("-1", "outside"), ("2:2", r"\(none\)"),
    ("a:b", "use 'a:b' or 'i,j,k'"), ("1:2:3", "use 'a:b'"), ("x", "use 'a:b'"), ("1.5", "use 'a:b'"),
])
def test_parse_layers_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    optim.parse_layers(spec, 4)


def test_layer_masks(params):
  assert optim.layer_masks(params, "") is None
  masks = flat(optim.layer_masks(params, "1:3"))
  np.testing.assert_array_equal(np.ravel(masks[DOWN]), [0, 1, 1, 0])
  assert np.shape(masks[DOWN]) == (DEPTH, 1, 1)
  assert np.shape(masks["decoder/layers/attn_norm/scale"]) == (DEPTH, 1)
  assert float(masks["decoder/embed"]) == 1.0 and float(masks["vision/blocks/fc1/kernel"]) == 1.0
  with pytest.raises(ValueError, match="outside"):
    optim.layer_masks(params, "2:9")


def _train(tx, params, grads_list):
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for grads in grads_list:
    params, state = step(params, state, grads)
  return jax.tree.map(np.asarray, params)


def _grads(params, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (scale * rng.normal(size=x.shape)).astype(np.float32), params)


def test_decoder_layer_slices_frozen_bit_identical(params):
  """RMU's subset: only slices 1..2 of the stacked down-projection train; AdamW with weight decay > 0 and
  random gradients on every leaf leaves everything else bit-identical."""
  config = optim_config(decoder_layers="1:3", trainable=DOWN, weight_decay=0.1)
  tx, _ = optim.make_optimizer(config, 10, params)
  grads = [_grads(params, s) for s in range(3)]
  out = flat(_train(tx, params, grads))
  start = flat(params)
  for k, x in out.items():
    if k != DOWN:
      assert np.array_equal(x, start[k]), f"{k} changed"
  down0, down = start[DOWN], out[DOWN]
  for layer in (0, 3):
    assert np.array_equal(down[layer], down0[layer]), f"frozen slice {layer} changed"
  for layer in (1, 2):
    assert np.mean(down[layer] != down0[layer]) > 0.99, f"slice {layer} did not train"

  # Gradients of frozen slices and frozen leaves are masked before clipping and AdamW: making them huge
  # changes nothing at all, in the trained slices included.
  loud = []
  for g in grads:
    g = jax.tree.map(lambda x: 1e4 * x, g)
    g["decoder"]["layers"]["mlp"]["down"]["kernel"] = np.asarray(g["decoder"]["layers"]["mlp"]["down"]["kernel"])
    g["decoder"]["layers"]["mlp"]["down"]["kernel"][1:3] /= 1e4
    loud.append(g)
  loud_out = flat(_train(tx, params, loud))
  np.testing.assert_allclose(loud_out[DOWN], down, rtol=1e-6, atol=1e-7)


def test_decoder_layers_without_trainable_regex(params):
  """decoder_layers alone: every stacked decoder leaf updates only in those layers; other leaves all train."""
  config = optim_config(decoder_layers="2", frozen="vision/.*", weight_decay=0.0)
  tx, _ = optim.make_optimizer(config, 10, params)
  out, start = flat(_train(tx, params, [_grads(params, 5)])), flat(params)
  for k, x in out.items():
    if k.startswith("vision/"):
      assert np.array_equal(x, start[k]), k
    elif k.startswith(optim.DECODER_LAYERS):
      for layer in (0, 1, 3):
        assert np.array_equal(x[layer], start[k][layer]), (k, layer)
      assert not np.array_equal(x[2], start[k][2]), k
    else:
      assert not np.array_equal(x, start[k]), k


def test_trainable_count(params):
  sizes = {k: int(np.size(v)) for k, v in flat(params).items()}
  total = sum(sizes.values())
  assert optim.trainable_count(params, optim_config()) == total
  assert optim.trainable_count(params, optim_config(trainable=DOWN, decoder_layers="1:3")) == 2 * MLP * WIDTH
  projector = sum(v for k, v in sizes.items() if k.startswith("projector/"))
  rmu_like = optim_config(trainable=f"projector/.*,{DOWN}", decoder_layers="1:3")
  assert optim.trainable_count(params, rmu_like) == projector + 2 * MLP * WIDTH
  layers = sum(v for k, v in sizes.items() if k.startswith(optim.DECODER_LAYERS))
  vision = sum(v for k, v in sizes.items() if k.startswith("vision/"))
  assert optim.trainable_count(params, optim_config(frozen="vision/.*", decoder_layers="0,3")) == (
      total - vision - layers // 2)


def test_schedule():
  constant = optim.schedule(optim_config(schedule="constant", warmup_steps=4), 100)
  assert float(constant(0)) == 0.0
  np.testing.assert_allclose(float(constant(2)), 0.5e-2, rtol=1e-6)
  np.testing.assert_allclose([float(constant(s)) for s in (4, 50, 99)], [1e-2] * 3, rtol=1e-6)
  cosine = optim.schedule(optim_config(schedule="cosine", warmup_steps=4, end_lr_ratio=0.1), 100)
  np.testing.assert_allclose(float(cosine(4)), 1e-2, rtol=1e-6)
  np.testing.assert_allclose(float(cosine(100)), 1e-3, rtol=1e-5)
  with pytest.raises(ValueError, match="optim.schedule"):
    optim.schedule(optim_config(schedule="linear"), 10)


# --------------------------------------------------------------------------- shardings
def test_state_shardings_follow_params():
  cfg = tiny_config()
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  spec = model_spec(cfg, mesh)
  abstract = spec.abstract_params()
  tx, _ = optim.make_optimizer(optim_config(frozen="vision/.*", decoder_layers="1:3"), 10, abstract)
  opt_abstract = jax.eval_shape(tx.init, abstract)
  repl = sharding.replicated(mesh)
  shardings = optim.state_shardings(opt_abstract, spec.shardings, repl)
  by_param = flat(spec.shardings)
  assert by_param[DOWN].spec != repl.spec  # a sharded parameter, so the check below means something

  seen = {"mu": set(), "nu": set()}
  leaves = jax.tree_util.tree_flatten_with_path(shardings)[0]
  shapes = jax.tree_util.tree_flatten_with_path(opt_abstract)[0]
  assert len(leaves) == len(shapes)
  for (path, sh), (_, shape) in zip(leaves, shapes):
    names = [getattr(k, "name", None) for k in path]
    moment = next((m for m in ("mu", "nu") if m in names), None)
    if moment is None:
      assert sh == repl, jax.tree_util.keystr(path)  # counters etc.
      continue
    i = names.index(moment)
    param_path = "/".join(str(k.key) for k in path[i + 1:])
    assert sh == by_param[param_path], param_path
    assert shape.shape == flat(abstract)[param_path].shape
    seen[moment].add(param_path)
  trained = {k for k in by_param if not k.startswith("vision/")}
  assert seen["mu"] == trained and seen["nu"] == trained
  # The state can actually be created with these shardings.
  state = jax.jit(tx.init, out_shardings=shardings)(
      jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), abstract))
  assert jax.tree.leaves(state)


# --------------------------------------------------------------------------- `mirage describe`: what trains
def configlib_load(spec: str):
  from mirage_jax import configlib
  return configlib.load(spec)


def _describe(spec: str, *overrides: str) -> dict:
  from mirage_jax import configlib, describe
  return describe.describe(configlib.apply_overrides(configlib.load(spec), overrides), num_devices=1)


def test_describe_trainable_rmu_tiny():
  info = _describe("configs/unlearn/rmu.py:tiny")
  assert info["trainable_decoder_layers"] == [0, 1]  # loss.layer = 1 -> layers max(1-2, 0)..1
  # projector + the MLP down-projections of layers 0 and 1 (of 4)
  mc = configlib_load("configs/unlearn/rmu.py:tiny").model
  assert info["trainable_params"] == info["params_by_module"]["projector"] + 2 * mc.text.mlp_dim * mc.text.width
  full = _describe("configs/unlearn/rmu.py:tiny", "--config.optim.decoder_layers=0:2")
  assert full["trainable_params"] == info["trainable_params"] > 0
  assert info["trainable_params"] < info["params_total"]
  deeper = _describe("configs/unlearn/rmu.py:tiny", "--config.loss.layer=3")
  assert deeper["trainable_decoder_layers"] == [1, 2, 3]
  assert deeper["trainable_params"] > info["trainable_params"]


def test_describe_trainable_sft_counts_every_unfrozen_parameter():
  info = _describe("configs/sft/posthoc.py:tiny")
  assert info["trainable_params"] == info["params_total"] - info["params_by_module"]["vision"]  # vision frozen
  assert info["trainable_decoder_layers"] == list(range(4))  # every layer when none is frozen
  two = _describe("configs/sft/posthoc.py:tiny", "--config.optim.decoder_layers=1,3")
  assert two["trainable_decoder_layers"] == [1, 3]
  assert two["trainable_params"] < info["trainable_params"]
  none = _describe("configs/sft/posthoc.py:tiny", "--config.optim.trainable=projector/.*")
  assert none["trainable_decoder_layers"] == []


def test_rmu_decoder_layers_come_from_loss_layer_and_disagreement_is_an_error():
  from mirage_jax import configlib
  from mirage_jax.errors import ConfigError
  from mirage_jax.losses import make_loss
  from mirage_jax.train import runtime
  config = configlib.load("configs/unlearn/rmu.py:tiny")
  assert config.optim.decoder_layers == ""  # the config no longer derives it
  model = VLMConfig.from_config(config.model, image_token_id=4)
  assert runtime.optim_config(config, make_loss(config.loss), model).decoder_layers == "0,1"
  agree = configlib.apply_overrides(config, ["--config.optim.decoder_layers=0:2"])
  assert runtime.optim_config(agree, make_loss(agree.loss), model).decoder_layers == "0,1"
  moved = configlib.apply_overrides(config, ["--config.loss.layer=3"])
  assert runtime.optim_config(moved, make_loss(moved.loss), model).decoder_layers == "1,2,3"
  bad = configlib.apply_overrides(config, ["--config.loss.layer=3", "--config.optim.decoder_layers=0:2"])
  with pytest.raises(ConfigError, match=r"optim.decoder_layers='0:2' \(layers \[0, 1\]\) disagrees with loss "
                                        r"'rmu', which trains layers \[1, 2, 3\]"):
    runtime.optim_config(bad, make_loss(bad.loss), model)
  with pytest.raises(ConfigError, match="disagrees"):
    _describe("configs/unlearn/rmu.py:tiny", "--config.loss.layer=3", "--config.optim.decoder_layers=0:2")
  sft = configlib.load("configs/sft/posthoc.py:tiny")
  assert runtime.optim_config(sft, make_loss(sft.loss), model) is sft.optim  # no loss layers: untouched
