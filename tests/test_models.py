"""The LLaVA-style VLM (mirage_jax.models): shapes, sharded == single-device forward, KV-cache decoding,
layer collection, GQA, the ViT feature layer / select strategy, `<image>` splicing, scan and remat.

Models here are smaller than `tiny` (a few compiles each) and run on the 8 fake CPU devices of conftest.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mirage_configs import models as model_table
from mirage_jax import sharding
from mirage_jax.losses import sft
from mirage_jax.models import VLM, TextConfig, VisionConfig, VLMConfig, layers
from mirage_jax.models.decode import GenerateConfig, generate, generate_by_full_forward
from mirage_jax.models.vlm import causal_mask, positions_from_mask
from mirage_jax.train.state import init_params, model_spec

IMAGE_ID, PAD_ID, BOS_ID = 4, 0, 1
# LLVM -O0: these tiny programs compile ~3x faster and run in milliseconds either way.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def make_cfg(*, vision: dict | None = None, text: dict | None = None, **kw) -> VLMConfig:
  v = dict(image_size=16, patch_size=8, width=32, depth=3, num_heads=2, mlp_dim=64)
  t = dict(vocab_size=64, width=32, depth=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64, max_len=64)
  v.update(vision or {})
  t.update(text or {})
  kw.setdefault("scan_layers", True)
  return VLMConfig(vision=VisionConfig(**v), text=TextConfig(**t), image_token_id=IMAGE_ID, **kw)


def build(cfg: VLMConfig) -> VLM:
  """An abstract model (no allocation); `init` gives concrete parameters."""
  return nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0)))


def split(model):
  graphdef, state = nnx.split(model)
  return graphdef, nnx.to_pure_dict(state)


def init(cfg: VLMConfig, seed: int = 0):
  """(graphdef, params): random parameters made under one (fast-compiled) jit instead of op by op."""
  graphdef = nnx.graphdef(build(cfg))
  params = jit(lambda: nnx.to_pure_dict(nnx.state(VLM(cfg, rngs=nnx.Rngs(seed)))))()
  return graphdef, params


def merge(graphdef, params):
  return nnx.merge(graphdef, params)


def make_batch(cfg: VLMConfig, *, lengths, total: int, seed: int = 0, left_pad: bool = False) -> dict:
  """Rows of `lengths[i]` real tokens: BOS, the image tokens, then random text (never a special id)."""
  rng = np.random.default_rng(seed)
  b, n_img = len(lengths), cfg.vision.num_image_tokens
  tokens = np.full((b, total), PAD_ID, np.int32)
  mask = np.zeros((b, total), np.int32)
  loss_mask = np.zeros((b, total), np.int32)
  for i, n in enumerate(lengths):
    assert n >= n_img + 2
    row = [BOS_ID] + [IMAGE_ID] * n_img + list(rng.integers(5, cfg.text.vocab_size, n - n_img - 1))
    sl = slice(total - n, total) if left_pad else slice(0, n)
    tokens[i, sl], mask[i, sl] = row, 1
    if not left_pad:
      loss_mask[i, n_img + 1:n] = 1
  images = rng.normal(size=(b, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask),
          "images": jnp.asarray(images)}


@pytest.fixture(scope="module")
def base():
  """(cfg, graphdef, params, batch) of a small GQA model."""
  cfg = make_cfg()
  graphdef, params = init(cfg)
  batch = make_batch(cfg, lengths=(12, 9, 7, 12), total=12)
  return cfg, graphdef, params, batch


_FORWARDS: dict = {}


def forward_fn(graphdef, **kw):
  """A jitted forward (cached per graphdef and keyword arguments)."""
  key = (graphdef, tuple(sorted(kw.items())))
  if key not in _FORWARDS:
    _FORWARDS[key] = jit(lambda params, batch: merge(graphdef, params)(batch, **kw))
  return _FORWARDS[key]


# --------------------------------------------------------------------------- shapes
def test_output_shapes(base):
  cfg, graphdef, params, batch = base
  model = merge(graphdef, params)
  b, t = batch["tokens"].shape
  out = forward_fn(graphdef, collect=(0, 2))(params, batch)
  assert out.hidden_btd.shape == (b, t, cfg.text.width)
  assert sorted(out.layers) == [0, 2]
  assert all(v.shape == (b, t, cfg.text.width) for v in out.layers.values())
  assert model.logits(out.hidden_btd).shape == (b, t, cfg.text.vocab_size)
  assert model.logits(out.hidden_btd).dtype == jnp.float32
  assert model.head_weight().shape == (cfg.text.width, cfg.text.vocab_size)
  assert model.image_features(batch["images"]).shape == (b, cfg.vision.num_patches, cfg.text.width)
  assert cfg.vision.num_patches == 4
  assert np.isfinite(np.asarray(out.hidden_btd)).all()
  # Parameters of the stacked layers carry a leading layer axis.
  assert params["decoder"]["layers"]["attn"]["q"]["kernel"].shape == (3, 32, 4, 8)
  assert params["decoder"]["layers"]["attn"]["k"]["kernel"].shape == (3, 32, 2, 8)
  assert params["vision"]["blocks"]["fc1"]["kernel"].shape == (3, 32, 64)


def test_tiny_size_table_model_shapes():
  cfg = VLMConfig.from_config(model_table.model_config("tiny"), image_token_id=IMAGE_ID)
  assert cfg.vision.num_image_tokens == 16
  assert cfg.scan_layers is False and cfg.remat == "none"
  batch = make_batch(cfg, lengths=(30, 20), total=30)
  out = jax.eval_shape(lambda x: VLM(cfg, rngs=nnx.Rngs(0))(x), batch)
  assert out.hidden_btd.shape == (2, 30, cfg.text.width) and out.hidden_btd.dtype == jnp.float32


def test_config_validation():
  with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
    make_cfg(text=dict(num_heads=4, num_kv_heads=3))
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    make_cfg(vision=dict(image_size=20))
  with pytest.raises(ValueError, match="feature_layer"):
    make_cfg(vision=dict(feature_layer=-5))
  with pytest.raises(ValueError):
    make_cfg(remat="sometimes")
  with pytest.raises(ValueError, match="image_token_id"):
    dataclasses.replace(make_cfg(), image_token_id=64)
  with pytest.raises(ValueError, match="unknown keys"):
    VLMConfig.from_config({**model_table.model_config("tiny").to_dict(), "colour": 1})
  with pytest.raises(ValueError, match="tokenizer's <image> token"):
    VLMConfig.from_config({**model_table.model_config("tiny").to_dict(), "image_token_id": 7}, image_token_id=4)


def test_images_of_wrong_size_are_rejected(base):
  cfg, graphdef, params, batch = base
  with pytest.raises(ValueError, match="do not match the vision config"):
    merge(graphdef, params)({**batch, "images": jnp.zeros((4, 8, 8, 3))})


# --------------------------------------------------------------------------- sharded forward
def test_sharded_forward_equals_single_device(base):
  cfg, graphdef, params, batch = base
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  spec = model_spec(cfg, mesh)
  sharded = init_params(spec, seed=3)
  # Parameters really are split: e.g. the LM head [embed, vocab] over fsdp x tensor.
  head = sharded["decoder"]["lm_head"]
  assert head.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert head.addressable_shards[0].data.shape == (cfg.text.width // 2, cfg.text.vocab_size // 2)
  q = sharded["decoder"]["layers"]["attn"]["q"]["kernel"]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)

  # The same seed gives the same values on one device (partitionable threefry).
  one = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  single = init_params(model_spec(cfg, one), seed=3)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  fwd = lambda p, x: spec.merge(p)(x, collect=(1,))  # noqa: E731
  ref = jit(fwd)(single, batch)
  batch_sh = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
  with jax.set_mesh(mesh):
    out = jit(fwd)(sharded, batch_sh)
  assert len(out.hidden_btd.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out.hidden_btd), np.asarray(ref.hidden_btd), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out.layers[1]), np.asarray(ref.layers[1]), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- decoding
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def decoders():
  """Jitted KV-cache and full-forward greedy decoders of a random (sharpened) model; eos is an argument."""
  cfg = make_cfg(text=dict(depth=2), vision=dict(depth=2))
  graphdef, params = init(cfg, seed=1)
  # Sharpen the random model so that greedy choices are far from ties and attention is peaked (near-uniform
  # attention would hide position and cache-mask mistakes).
  params["decoder"]["lm_head"] = params["decoder"]["lm_head"] * 20.0
  for name in ("q", "k"):
    params["decoder"]["layers"]["attn"][name]["kernel"] = params["decoder"]["layers"]["attn"][name]["kernel"] * 6.0
  # Never emit <image>: generated tokens are text to the cache decoder, while a full forward would splice
  # image features into every <image> token (a real model never produces one; a zero logit never wins).
  params["decoder"]["lm_head"] = params["decoder"]["lm_head"].at[:, IMAGE_ID].set(0.0)

  def make(fn, **gen_kw):
    @jit
    def run(prompts, eos):
      gen = GenerateConfig(max_new_tokens=NEW_TOKENS, eos_id=eos, pad_id=PAD_ID, **gen_kw)
      return fn(merge(graphdef, params), prompts=prompts, config=gen)
    return lambda prompts, eos: np.asarray(run(prompts, jnp.int32(eos)))

  # `generate` on the CPU runs each step from the unstacked blocks; the stacked scan is what TPU / GPU run.
  return cfg, make(generate), make(generate_by_full_forward), make(generate, unstack_layers=False)


@pytest.fixture(scope="module")
def prompts(decoders):
  cfg = decoders[0]
  batch = make_batch(cfg, lengths=(11, 7, 9, 6), total=11, seed=2, left_pad=True)
  return {k: batch[k] for k in ("tokens", "mask", "images")}


def test_kv_cache_decoding_equals_full_forward(decoders, prompts):
  _, cached_fn, full_fn, _ = decoders
  cached, full = cached_fn(prompts, -1), full_fn(prompts, -1)
  assert cached.shape == (4, NEW_TOKENS)
  np.testing.assert_array_equal(cached, full)
  assert IMAGE_ID not in cached  # (a generated <image> token would be spliced by the full forward)
  assert len(np.unique(cached)) > 2  # not a degenerate constant output


@pytest.mark.parametrize("m", [1, 3])
def test_continuation_states_equal_a_full_forward_per_pair(prompts, m):
  """`continuation_hidden` (each prompt once, its cache shared by the continuations) gives the states a full
  forward over every prompt + continuation pair gives, at the positions that predict each continuation token."""
  from mirage_jax.models.decode import continuation_hidden
  cfg = make_cfg(text=dict(depth=2), vision=dict(depth=2))
  graphdef, params = init(cfg, seed=3)
  model = merge(graphdef, params)
  rows = np.array([[5, 6, 7], [5, 9, PAD_ID], [11, 12, 13], [8, PAD_ID, PAD_ID]], np.int32)[:, :m]
  got = np.asarray(jit(lambda p: continuation_hidden(merge(graphdef, p), prompts=prompts,
                                                     continuations_rm=jnp.asarray(rows)))(params))
  b, tp = prompts["tokens"].shape
  assert got.shape == (b, len(rows), m, cfg.text.width)
  for r, row in enumerate(rows):
    inputs = {"tokens": jnp.concatenate([prompts["tokens"], jnp.broadcast_to(jnp.asarray(row), (b, m))], 1),
              "mask": jnp.concatenate([prompts["mask"], jnp.ones((b, m), prompts["mask"].dtype)], 1),
              "images": prompts["images"]}
    want = np.asarray(model(inputs).hidden_btd[:, tp - 1:tp - 1 + m])
    np.testing.assert_allclose(got[:, r], want, rtol=2e-5, atol=2e-5)


def test_decode_steps_from_the_stack_and_from_unstacked_blocks_agree(decoders, prompts):
  """The scanned stack (TPU / GPU) and the blocks sliced once before the loop (CPU) decode the same tokens,
  and one decode step gives the same states and cache both ways."""
  _, cached_fn, full_fn, stacked_fn = decoders
  assert GenerateConfig(max_new_tokens=1, eos_id=0, pad_id=0).unstack  # the CPU default
  np.testing.assert_array_equal(stacked_fn(prompts, -1), cached_fn(prompts, -1))
  np.testing.assert_array_equal(stacked_fn(prompts, -1), full_fn(prompts, -1))
  cfg = make_cfg(text=dict(depth=3), vision=dict(depth=2))
  graphdef, params = init(cfg, seed=4)
  b, s = 2, 7
  x_btd = jax.random.normal(jax.random.key(0), (b, 1, cfg.text.width))
  e = cfg.text.head_dim
  cache = layers.KV(*(jax.random.normal(jax.random.key(i), (3, b, s, cfg.text.num_kv_heads, e)) for i in (1, 2)))
  step = dict(mask_bts=jnp.ones((b, 1, s), bool), positions_bt=jnp.full((b, 1), 5), cache=cache, cache_index=5)

  def run(unstack):
    dec = merge(graphdef, params).decoder
    return dec(x_btd, **step, blocks=dec.unstacked_blocks() if unstack else None)
  stacked, unstacked = jax.jit(lambda: run(False))(), jax.jit(lambda: run(True))()
  np.testing.assert_allclose(unstacked.hidden_btd, stacked.hidden_btd, rtol=1e-6, atol=1e-6)
  for got, want in zip(unstacked.cache, stacked.cache):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(stacked.cache.k[:, :, 5], cache.k[:, :, 5])  # the step wrote its slot
  dec = merge(graphdef, params).decoder
  with pytest.raises(ValueError, match="decoder's 3 unstacked blocks"):
    dec(x_btd, **step, blocks=dec.unstacked_blocks()[:2])


def test_kv_cache_decoding_stops_at_eos(decoders, prompts):
  _, cached_fn, full_fn, _ = decoders
  n = NEW_TOKENS
  free = cached_fn(prompts, -1)
  # EOS := a token emitted mid-way by some row (not at its first step), preferring one that rows emit at
  # different steps, so that rows stop at different times and the others keep going.
  first = {int(t): [int(np.argmax(r == t)) if (r == t).any() else n for r in free] for t in np.unique(free)}
  candidates = [t for t, hits in first.items() if 0 < min(hits) < n - 1]
  assert candidates, free
  eos = max(candidates, key=lambda t: len(set(first[t])))
  hits = first[eos]
  cached, full = cached_fn(prompts, eos), full_fn(prompts, eos)
  np.testing.assert_array_equal(cached, full)
  for r, h in enumerate(hits):
    if h < n:
      np.testing.assert_array_equal(cached[r, :h + 1], free[r, :h + 1])  # EOS itself is emitted
      assert (cached[r, h + 1:] == PAD_ID).all()  # then padding
    else:
      np.testing.assert_array_equal(cached[r], free[r])
  assert (cached == PAD_ID).any()


def test_left_padding_does_not_change_decoding_and_early_exit(decoders, prompts):
  """A row decoded alone (no padding) continues identically; with EOS = its first token the loop ends
  after one step and the rest is padding."""
  _, cached_fn, full_fn, _ = decoders
  batch = cached_fn(prompts, -1)
  row = 3
  alone = {k: v[row:row + 1, -6:] if k != "images" else v[row:row + 1] for k, v in prompts.items()}
  assert int(alone["mask"].sum()) == 6 and int(prompts["mask"][row].sum()) == 6
  solo = cached_fn(alone, -1)
  np.testing.assert_array_equal(solo[0], batch[row])
  eos = int(solo[0, 0])
  stopped = cached_fn(alone, eos)
  np.testing.assert_array_equal(stopped, [[eos] + [PAD_ID] * (NEW_TOKENS - 1)])
  np.testing.assert_array_equal(full_fn(alone, eos), stopped)


# --------------------------------------------------------------------------- collect / stop_after
def test_collect_and_stop_after(base):
  cfg, graphdef, params, batch = base
  model = merge(graphdef, params)
  full = forward_fn(graphdef)(params, batch)
  out = forward_fn(graphdef, collect=(0, 1, 2))(params, batch)
  np.testing.assert_allclose(out.hidden_btd, full.hidden_btd, rtol=1e-6, atol=1e-6)
  assert sorted(out.layers) == [0, 1, 2] and not np.allclose(out.layers[0], out.layers[1])
  # After the last block, the final norm gives the hidden states.
  np.testing.assert_allclose(model.decoder.norm(out.layers[2]), full.hidden_btd, rtol=1e-5, atol=1e-5)
  for l in (0, 1):
    stopped = forward_fn(graphdef, stop_after=l)(params, batch)
    assert stopped.hidden_btd is None
    assert sorted(stopped.layers) == [l]
    np.testing.assert_allclose(stopped.layers[l], out.layers[l], rtol=1e-6, atol=1e-6)
  # "After block 1" = the hidden state of the same model cut to 2 layers, before its final norm.
  short_cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, depth=2))
  short_graphdef, short_params = split(build(short_cfg))
  cut = jax.tree.map(lambda x: x, params)
  cut["decoder"]["layers"] = jax.tree.map(lambda a: a[:2], params["decoder"]["layers"])
  assert jax.tree.structure(cut) == jax.tree.structure(short_params)
  short = forward_fn(short_graphdef)(cut, batch)
  np.testing.assert_allclose(model.decoder.norm(out.layers[1]), short.hidden_btd, rtol=1e-5, atol=1e-5)


def test_collect_out_of_range(base):
  cfg, graphdef, params, batch = base
  model = merge(graphdef, params)
  with pytest.raises(ValueError, match="out of range"):
    jax.eval_shape(lambda: model(batch, collect=(3,)))
  with pytest.raises(ValueError, match="out of range"):
    jax.eval_shape(lambda: model(batch, stop_after=-1))


# --------------------------------------------------------------------------- attention
def test_gqa_equals_mha_with_repeated_kv_heads():
  rng = np.random.default_rng(0)
  b, t, h, k, e = 2, 5, 6, 2, 4
  q = jnp.asarray(rng.normal(size=(b, t, h, e)), jnp.float32)
  kk = jnp.asarray(rng.normal(size=(b, t, k, e)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, k, e)), jnp.float32)
  mask = causal_mask(jnp.asarray([[1] * t, [0, 0] + [1] * (t - 2)]))
  gqa = layers.attend(q, kk, v, mask)
  mha = layers.attend(q, jnp.repeat(kk, h // k, axis=2), jnp.repeat(v, h // k, axis=2), mask)
  np.testing.assert_allclose(gqa, mha, rtol=1e-6, atol=1e-6)
  # Query heads 0..2 share kv head 0: changing kv head 1 leaves them unchanged.
  out2 = layers.attend(q, kk.at[:, :, 1].add(1.0), v.at[:, :, 1].add(1.0), mask)
  np.testing.assert_allclose(out2[:, :, :3], gqa[:, :, :3], rtol=1e-6)
  assert not np.allclose(out2[:, :, 3:], gqa[:, :, 3:])
  # A fully masked row (left padding) gives finite outputs.
  assert np.isfinite(np.asarray(gqa)).all()


@pytest.mark.parametrize("kv_heads", [1])
def test_gqa_models_run(kv_heads):
  cfg = make_cfg(text=dict(num_kv_heads=kv_heads))
  graphdef, params = init(cfg)
  assert params["decoder"]["layers"]["attn"]["k"]["kernel"].shape == (3, 32, kv_heads, 8)
  batch = make_batch(cfg, lengths=(8, 8), total=8)
  hidden = forward_fn(graphdef)(params, batch).hidden_btd
  assert hidden.shape == (2, 8, 32) and np.isfinite(np.asarray(hidden)).all()


def test_causality_and_padding_invariance(base):
  """Changing a later token leaves earlier hidden states alone; right padding content is ignored."""
  cfg, graphdef, params, batch = base
  fwd = forward_fn(graphdef)
  ref = fwd(params, batch).hidden_btd
  changed = batch["tokens"].at[0, 10].set(9 if int(batch["tokens"][0, 10]) != 9 else 10)
  out = fwd(params, {**batch, "tokens": changed}).hidden_btd
  np.testing.assert_allclose(out[0, :10], ref[0, :10], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out[0, 10:], ref[0, 10:])
  # Row 2 has 7 real tokens: its padding tokens may be anything.
  padded = batch["tokens"].at[2, 7:].set(33)
  out = fwd(params, {**batch, "tokens": padded}).hidden_btd
  np.testing.assert_allclose(out[2, :7], ref[2, :7], rtol=1e-5, atol=1e-6)


def test_positions_from_mask():
  mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])


# --------------------------------------------------------------------------- vision tower
def _vision_out(cfg, params, images):
  graphdef, _ = split(build(cfg))
  return np.asarray(jit(lambda p, x: merge(graphdef, p).vision(x))(params, images))


def test_feature_layer_semantics():
  cfg = make_cfg(vision=dict(feature_layer=-2))
  assert cfg.vision.layers_used == cfg.vision.depth - 1 == 2
  assert make_cfg(vision=dict(feature_layer=-1)).vision.layers_used == 3
  assert make_cfg(vision=dict(feature_layer=0)).vision.layers_used == 0
  assert make_cfg(vision=dict(feature_layer=1)).vision.layers_used == 1
  _, params = init(cfg)
  images = make_batch(cfg, lengths=(8, 8), total=8)["images"]
  ref = _vision_out(cfg, params, images)
  assert ref.shape == (2, 4, 32)

  def bump_block(p, i):
    p = jax.tree.map(lambda x: x, p)
    p["vision"]["blocks"] = jax.tree.map(lambda a: a.at[i].add(0.5), p["vision"]["blocks"])
    return p

  # The last block never runs under feature_layer=-2 ...
  np.testing.assert_array_equal(_vision_out(cfg, bump_block(params, 2), images), ref)
  # ... and neither do the post-norm's parameters (LLaVA does not use it) ...
  p = jax.tree.map(lambda x: x, params)
  p["vision"]["post_norm"]["scale"] = p["vision"]["post_norm"]["scale"] * 3
  np.testing.assert_array_equal(_vision_out(cfg, p, images), ref)
  # ... but the penultimate one does.
  assert not np.allclose(_vision_out(cfg, bump_block(params, 1), images), ref)
  # feature_layer=-1 uses every block: the last one matters.
  last = make_cfg(vision=dict(feature_layer=-1))
  assert not np.allclose(_vision_out(last, bump_block(params, 2), images), _vision_out(last, params, images))
  # feature_layer=1 = the output of block 1 (index 0): block index 1 is unused.
  one = make_cfg(vision=dict(feature_layer=1))
  np.testing.assert_array_equal(_vision_out(one, bump_block(params, 1), images), _vision_out(one, params, images))
  # feature_layer=-2 on depth 3 == feature_layer=2.
  np.testing.assert_array_equal(_vision_out(make_cfg(vision=dict(feature_layer=2)), params, images), ref)


def test_select_strategy_full_keeps_class_token():
  default = make_cfg()
  full = make_cfg(vision=dict(select_strategy="full"))
  assert default.vision.num_image_tokens == default.vision.num_patches == 4
  assert full.vision.num_image_tokens == 5
  _, params = init(default)
  images = make_batch(default, lengths=(8, 8), total=8)["images"]
  a, b = _vision_out(default, params, images), _vision_out(full, params, images)
  assert a.shape == (2, 4, 32) and b.shape == (2, 5, 32)
  np.testing.assert_array_equal(b[:, 1:], a)
  # The model with the class token kept consumes 5 image tokens per row.
  graphdef, full_params = init(full)
  batch = make_batch(full, lengths=(9, 8), total=9)
  assert int((batch["tokens"] == IMAGE_ID).sum(-1)[0]) == 5
  assert forward_fn(graphdef)(full_params, batch).hidden_btd.shape == (2, 9, 32)
  with pytest.raises(ValueError):
    make_cfg(vision=dict(select_strategy="cls_only"))


def test_patchify_order():
  cfg = make_cfg(vision=dict(image_size=16, patch_size=8))
  model = build(cfg)
  img = np.arange(16 * 16 * 3, dtype=np.float32).reshape(1, 16, 16, 3)
  patches = np.asarray(model.vision.patchify(jnp.asarray(img)))
  assert patches.shape == (1, 4, 8 * 8 * 3)
  # Row-major patches; pixels (row, col, channel) inside a patch.
  np.testing.assert_array_equal(patches[0, 1], img[0, :8, 8:16].reshape(-1))
  np.testing.assert_array_equal(patches[0, 2], img[0, 8:16, :8].reshape(-1))


# --------------------------------------------------------------------------- <image> splicing
def test_image_tokens_replaced_by_projected_features_in_order(base):
  cfg, graphdef, params, _ = base
  model = merge(graphdef, params)
  n_img = cfg.vision.num_image_tokens
  rng = np.random.default_rng(5)
  # Row 0: image tokens at 2..5; row 1: left padded, image tokens split around text (positions 4,5 and 8,9).
  tokens = np.array([[1, 7, 4, 4, 4, 4, 9, 10, 11, 12],
                     [0, 0, 1, 8, 4, 4, 20, 21, 4, 4]], np.int32)
  images = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  inputs = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray((tokens != 0) | (np.arange(10) >= 2)),
            "images": images}
  # Expected features computed from the parts: vision tower, then projector.
  x, feats = jit(lambda p, x: (merge(graphdef, p).embed(x),
                               merge(graphdef, p).projector(merge(graphdef, p).vision(x["images"]))))(params, inputs)
  x, feats = np.asarray(x), np.asarray(feats)
  table = np.asarray(params["decoder"]["embed"])
  assert feats.shape == (2, n_img, 32)
  for b in range(2):
    img_pos = np.flatnonzero(tokens[b] == IMAGE_ID)
    assert len(img_pos) == n_img
    for i, pos in enumerate(img_pos):
      np.testing.assert_allclose(x[b, pos], feats[b, i], rtol=1e-6, atol=1e-6)
    for pos in np.flatnonzero(tokens[b] != IMAGE_ID):
      np.testing.assert_array_equal(x[b, pos], table[tokens[b, pos]])
  # Each row gets its own image's features.
  assert not np.allclose(feats[0], feats[1])


# --------------------------------------------------------------------------- scan / remat
_GRADS: dict = {}


def _loss_and_grads(cfg, params, batch):
  """SFT loss and grads of the `base` params/batch under model config `cfg` (cached per cfg)."""
  if cfg not in _GRADS:
    graphdef, _ = split(build(cfg))

    def loss(p):
      return sft.nll(merge(graphdef, p), batch, impl="reference")

    _GRADS[cfg] = jit(jax.value_and_grad(loss))(params)
  return _GRADS[cfg]


def test_scan_layers_true_and_false_agree(base):
  cfg, _, params, batch = base
  outs = {}
  for scan in (True, False):
    c = dataclasses.replace(cfg, scan_layers=scan)
    graphdef, p2 = split(build(c))
    assert jax.tree.structure(p2) == jax.tree.structure(params)
    outs[scan] = forward_fn(graphdef, collect=(1,))(params, batch)
  np.testing.assert_allclose(outs[True].hidden_btd, outs[False].hidden_btd, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[True].layers[1], outs[False].layers[1], rtol=1e-5, atol=1e-5)


def test_remat_policies_same_loss_and_grads(base):
  cfg, _, params, batch = base
  ref_loss, ref_grads = _loss_and_grads(dataclasses.replace(cfg, remat="none"), params, batch)
  assert float(ref_loss) > 0
  assert float(optax_norm(ref_grads)) > 0
  for policy in ("full", "dots", "dots_no_batch"):
    loss, grads = _loss_and_grads(dataclasses.replace(cfg, remat=policy), params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7, err_msg=f"{policy}: {jax.tree_util.keystr(path)}")


def test_remat_unrolled_layers_same_grads(base):
  cfg, _, params, batch = base
  ref_loss, ref_grads = _loss_and_grads(dataclasses.replace(cfg, remat="none"), params, batch)
  loss, grads = _loss_and_grads(dataclasses.replace(cfg, remat="full", scan_layers=False), params, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_remat_policy_table():
  assert layers.remat_policy("none") is None
  assert layers.remat_policy("full") is jax.checkpoint_policies.nothing_saveable
  assert layers.remat_policy("dots") is jax.checkpoint_policies.checkpoint_dots


def test_run_stack_range_checks(base):
  cfg, graphdef, params, _ = base
  model = merge(graphdef, params)
  with pytest.raises(ValueError, match="outside a stack of 3 layers"):
    layers.run_stack(model.decoder.layers, lambda b, c, x: (c, None), jnp.zeros(()), start=2, stop=4)
  carry, ys = layers.run_stack(model.decoder.layers, lambda b, c, x: (c + 1, None), jnp.zeros(()), start=1, stop=1)
  assert float(carry) == 0 and ys is None
  carry, _ = layers.run_stack(model.decoder.layers, lambda b, c, x: (c + 1, None), jnp.zeros(()), start=1)
  assert float(carry) == 2


def test_stop_after_with_cache_is_rejected(base):
  cfg, graphdef, params, batch = base
  model = merge(graphdef, params)
  mask = causal_mask(batch["mask"])
  pos = positions_from_mask(batch["mask"])
  pre = jax.eval_shape(lambda: model.decoder(model.embed(batch), mask_bts=mask, positions_bt=pos,
                                             return_cache=True))
  # Prefill cache: [L, B, S, K, E].
  assert pre.cache.k.shape == (3, 4, 12, 2, 8)
  with pytest.raises(ValueError, match="stop_after and cache"):
    jax.eval_shape(lambda c: model.decoder(model.embed(batch), mask_bts=mask, positions_bt=pos, stop_after=0,
                                           cache=c, cache_index=jnp.int32(0)), pre.cache)
