"""Gradient accumulation (`optim.accum_steps`, mirage_jax/train/accum.py): k micro-batches of one global batch
give the same update as the whole batch, for SFT, NPO and RMU (several streams, token-mean and row-mean terms),
through the real jitted train step on the 8 fake CPU devices; and the configuration checks.

Rows get different lengths, so micro-batches hold different token counts: a plain mean of micro-batch losses
would differ from the one-batch loss, the token-count weighting must not.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from mirage_jax import configlib, sharding
from mirage_jax.compile import _model_config
from mirage_jax.errors import ConfigError
from mirage_jax.losses import make_loss
from mirage_jax.train import accum, runtime
from mirage_jax.train.state import TrainState, init_params, model_spec, new_rng, shardings_of

BATCH = 16
TOL = 1e-6  # max abs difference of the updated params, float32
# Gradients: relative to the largest gradient entry (float32 summation order; measured 1.2e-6 for NPO, whose
# largest entry is 11.5, where one float32 ulp is 9.5e-7).
GRAD_RTOL = 4e-6


def _config(name: str, *overrides: str):
  config = configlib.load(f"configs/{name}.py:tiny")
  # No warmup: the first update (the optimizer's own step 0) has a non-zero learning rate.
  return configlib.apply_overrides(config, [f"--config.batch_size={BATCH}", "--config.optim.warmup_steps=0",
                                            *overrides])


def _batch(spec, config, seed: int) -> dict:
  """One stream's batch: BOS, the image tokens, a query, an answer of varying length, EOS, padding."""
  rng = np.random.default_rng(seed)
  t, p = config.data.max_len, spec.config.vision.num_image_tokens
  vocab, image_id = spec.config.text.vocab_size, spec.config.image_token_id
  tokens, mask, loss_mask, query_mask = (np.zeros((BATCH, t), np.int32) for _ in range(4))
  for i in range(BATCH):
    q, a = rng.integers(2, 8), rng.integers(1, t - p - 10)
    row = [1, *[image_id] * p, *rng.integers(5, vocab - 1, q + a), 2]
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = 1
    query_mask[i, 1 + p:1 + p + q] = 1
    loss_mask[i, 1 + p + q:len(row)] = 1
  size = spec.config.vision.image_size
  return dict(tokens=tokens, mask=mask, loss_mask=loss_mask, query_mask=query_mask,
              row=np.arange(BATCH, dtype=np.int32), images=rng.normal(size=(BATCH, size, size, 3)).astype(np.float32))


def _step_result(config, k: int):
  """(params after one real train step with accum_steps=k, its metrics)."""
  mesh = sharding.make_mesh(config.mesh)
  spec = model_spec(_model_config(config), mesh)
  loss = make_loss(config.loss)
  runtime.check_run(config, mesh, loss, spec)
  tx, sched, make_extras, target = runtime.plan_state(config, spec, mesh, loss)
  from mirage_jax.data import pipeline
  batch_abstract = pipeline.abstract_batches(config, streams=tuple(loss.streams),
                                            image_size=spec.config.vision.image_size, mesh=mesh)
  reference_abstract = runtime.frozen_abstract(spec, loss)
  compiled = runtime.compile_step(spec, loss, tx, sched, mesh, target, batch_abstract, reference_abstract,
                                  accum_steps=k)
  sh = shardings_of(target)
  params = init_params(spec, 0)
  state = TrainState(step=jax.device_put(jnp.int32(0), sh.step), params=params,
                     opt_state=jax.jit(tx.init, out_shardings=sh.opt_state)(params),
                     rng=jax.device_put(new_rng(0), sh.rng), extras=jax.device_put(dict(make_extras()), sh.extras))
  batches = {name: jax.device_put(_batch(spec, config, seed), shardings_of(batch_abstract[name]))
             for seed, name in enumerate(loss.streams)}
  reference = None if reference_abstract is None else init_params(spec, 0)
  before = jax.tree.map(lambda x: np.array(x, copy=True), params)  # params are donated
  new, metrics = compiled(state, batches, reference)
  return before, jax.tree.map(np.asarray, new.params), {k: float(v) for k, v in metrics.items()}


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _grads(config, k: int):
  """(loss, grads) of the whole batch and of k micro-batches (`accum.value_and_grad`), in one jitted call on
  the config's mesh, as the train step computes them."""
  mesh = sharding.make_mesh(config.mesh)
  spec = model_spec(_model_config(config), mesh)
  loss = make_loss(config.loss)
  batches = {name: {key: jnp.asarray(v) for key, v in _batch(spec, config, seed).items()}
             for seed, name in enumerate(loss.streams)}
  params = init_params(spec, 0)
  extras = loss.init_extras(spec, config.seed)
  reference = init_params(spec, 0) if loss.needs_reference else None

  def both(params, batches, reference):
    ref_model = None if reference is None else spec.reference_model(jax.lax.stop_gradient(reference))

    def loss_fn(p, batches=batches):
      return loss(spec.merge(p), batches=batches, reference=ref_model, extras=extras)

    (v1, _), g1 = jax.value_and_grad(loss_fn, has_aux=True)(params)
    (vk, _), gk = accum.value_and_grad(loss_fn, params, batches, loss=loss, steps=k,
                                       image_token_id=spec.config.image_token_id, shardings=spec.shardings)
    return v1, g1, vk, gk

  with jax.set_mesh(mesh):
    out = jax.jit(both)(params, batches, reference)
  return jax.tree.map(np.asarray, out)


CASES = [  # ~1 min each on 2 loaded cores: RMU (two streams, masked positions) in the default suite
    pytest.param("sft/posthoc", (), marks=pytest.mark.slow),
    pytest.param("unlearn/npo", (), marks=pytest.mark.slow),
    ("unlearn/rmu", ()),
    pytest.param("unlearn/npo", ("--config.mesh.data=2", "--config.mesh.fsdp=4"),  # FSDP: sharded accumulator
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name,overrides", CASES, ids=["sft", "npo", "rmu", "npo-fsdp"])
def test_micro_batches_give_the_same_gradient_as_one_batch(name, overrides):
  config = _config(name, *overrides)
  v1, g1, v2, g2 = _grads(config, 2)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g1))
  diff = _max_diff(g1, g2)
  print(f"accum {name} {overrides}: grads max |g| = {scale:.3e}, k=1 vs k=2 max |d| = {diff:.3e}, "
        f"loss {float(v1):.7f} vs {float(v2):.7f}")
  assert scale > 1e-3  # a real gradient
  assert diff <= GRAD_RTOL * scale
  assert float(v2) == pytest.approx(float(v1), rel=1e-6, abs=1e-6)


@pytest.mark.slow
def test_train_step_with_accumulation_gives_the_same_update():
  """Through the real jitted step (step.py's call site): RMU, forget + retain streams, k = 2.

  AdamW's first update is lr * g / (|g| + eps): for gradient entries near 0 it magnifies float32 summation
  noise by lr / eps (measured 1.4e-5 for NPO with eps = 1e-8), which is the optimizer's conditioning, not the
  accumulation's; eps = 1e-3 keeps the update a smooth function of the gradient."""
  config = _config("unlearn/rmu", "--config.optim.eps=1e-3")
  before, one, m1 = _step_result(config, 1)
  _, two, m2 = _step_result(config, 2)
  moved, diff = _max_diff(before, one), _max_diff(one, two)
  print(f"accum step rmu: update max |d| = {moved:.3e}, k=1 vs k=2 max |d| = {diff:.3e}")
  assert moved > 1e-6  # the step changed the params, so the comparison means something
  assert diff <= TOL
  assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-6, abs=1e-6)
  assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
  for term in ("forget", "retain", "ft"):  # loss terms combine with their normaliser weights: exact
    assert m2[term] == pytest.approx(m1[term], rel=1e-5, abs=1e-6)


def test_unequal_token_counts_are_weighted_not_averaged():
  """The weighting matters: the plain mean of the micro-batch losses is not the one-batch loss here."""
  config = _config("sft/posthoc")
  mesh = sharding.make_mesh(config.mesh)
  spec = model_spec(_model_config(config), mesh)
  batch = {"train": {k: jnp.asarray(v) for k, v in _batch(spec, config, 0).items()}}
  (term,) = accum.terms(make_loss(config.loss), image_token_id=spec.config.image_token_id)
  micro = accum.split(batch, 2)
  counts = [float(term.count({"train": {k: v[j] for k, v in micro["train"].items()}})) for j in range(2)]
  assert sum(counts) == float(term.count(batch))
  assert counts[0] != counts[1]


def test_split_is_strided_and_keeps_every_row():
  x = jnp.arange(12).reshape(6, 2)
  out = accum.split({"s": {"x": x}}, 3)["s"]["x"]
  assert out.shape == (3, 2, 2)
  np.testing.assert_array_equal(out[1], x[1::3])
  assert sorted(np.asarray(out).reshape(-1).tolist()) == list(range(12))


def test_batch_not_divisible_by_accum_times_batch_axes_names_both():
  config = _config("unlearn/npo", "--config.optim.accum_steps=4")  # 16 rows, 4 x 8 batch shards
  mesh = sharding.make_mesh(config.mesh)
  spec = model_spec(_model_config(config), mesh)
  with pytest.raises(ConfigError, match=r"batch_size=16 .*optim.accum_steps=4 .*data x fsdp = 8"):
    runtime.check_run(config, mesh, make_loss(config.loss), spec)


@pytest.mark.parametrize("value", [0, -1])
def test_accum_steps_must_be_positive(value):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  with pytest.raises(ConfigError, match="optim.accum_steps"):
    accum.check(batch_size=16, accum_steps=value, mesh=mesh)


def test_npo_mean_token_is_refused_with_accumulation():
  config = _config("unlearn/npo", "--config.optim.accum_steps=2", "--config.loss.normalize=mean_token")
  mesh = sharding.make_mesh(config.mesh)
  spec = model_spec(_model_config(config), mesh)
  with pytest.raises(ConfigError, match="mean_token"):
    runtime.check_run(config, mesh, make_loss(config.loss), spec)
