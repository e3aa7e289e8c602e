"""LoRA (issue 17): adapters on the stacked Dense layers, one frozen base in memory, adapter-only checkpoints
that name their base, exact resume, and SFT / NPO / RMU training with `--config.lora.rank=4` at the tiny size."""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from mirage_jax import compile as aot
from mirage_jax import configlib, describe, sharding
from mirage_jax.errors import CheckpointError, ConfigError
from mirage_jax.models import VLM, VLMConfig, layers, lora
from mirage_jax.models.config import LoRAConfig
from mirage_jax.train import checkpoint, loop, runtime
from mirage_jax.train import metrics as metrics_lib
from mirage_jax.train.state import model_spec

SFT = "configs/sft/posthoc.py:tiny"
WORLD = [f"--config.data.world.{k}={v}" for k, v in dict(
    pretrain_size=64, sft_images=32, helpfulness_size=16, retain_size=16, forget_size=16,
    unsafe_size=8, safe_size=8, utility_size=8, safe_unsafe_size=8).items()]
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
SHORT = ["--config.batch_size=8", "--config.eval.splits=", "--config.optim.warmup_steps=1", "--config.log_every=1"]
RANK = ["--config.lora.rank=4"]


def load(spec: str, *overrides: str):
  return configlib.apply_overrides(configlib.load(spec), [*WORLD, *MESH, *SHORT, *overrides])


def model_config(*overrides: str) -> VLMConfig:
  c = configlib.apply_overrides(configlib.load(SFT), list(overrides))
  return VLMConfig.from_config(c.model, lora=c.lora)


def pure(cfg: VLMConfig, seed: int = 0) -> dict:
  return nnx.to_pure_dict(nnx.state(VLM(cfg, rngs=nnx.Rngs(seed))))


def flat(tree) -> dict[str, np.ndarray]:
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def host_params(step_dir: pathlib.Path) -> dict[str, np.ndarray]:
  return flat(checkpoint.load_on_host(step_dir / "params"))


# --------------------------------------------------------------------------- the model
def test_rank_0_is_off_and_creates_nothing():
  off = model_config()
  assert not off.lora.enabled and off == model_config("--config.lora.rank=0")
  assert not any(lora.is_adapter(p) for p in flat(pure(off)))
  no_block = VLMConfig.from_config(configlib.load(SFT).model)  # configs saved before the block existed
  assert off == no_block
  dense = lora.dense_layers(VLM(off, rngs=nnx.Rngs(0)))
  assert dense and not any(hasattr(m, "lora_a") or hasattr(m, "lora_scale") for m in dense.values())


def test_adapters_are_stacked_named_and_start_as_the_base():
  on, off = model_config(*RANK), model_config()
  p_on, p_off = flat(pure(on)), flat(pure(off))
  base = {k: v for k, v in p_on.items() if not lora.is_adapter(k)}
  assert base.keys() == p_off.keys() and all(np.array_equal(base[k], p_off[k]) for k in base)  # same seed
  adapters = sorted(k for k in p_on if lora.is_adapter(k))
  assert len(adapters) == 14 and all(k.startswith("decoder/layers/") for k in adapters)
  depth, width = on.text.depth, on.text.width
  assert p_on["decoder/layers/attn/q/lora_a"].shape == (depth, width, 4)
  assert p_on["decoder/layers/attn/q/lora_b"].shape == (depth, 4, on.text.num_heads * on.text.head_dim)
  assert p_on["decoder/layers/attn/o/lora_a"].shape == (depth, on.text.num_heads * on.text.head_dim, 4)
  assert p_on["decoder/layers/mlp/down/lora_a"].shape == (depth, on.text.mlp_dim, 4)
  assert not np.any(p_on["decoder/layers/mlp/down/lora_b"]) and np.std(p_on["decoder/layers/mlp/down/lora_a"]) > 0
  # Logical names and the one rule table: the rank axis is replicated, fan-in / fan-out over tensor x fsdp.
  state = nnx.state(nnx.eval_shape(lambda: VLM(on, rngs=nnx.Rngs(0))))
  attn = state["decoder"]["layers"]["attn"]
  assert attn["q"]["lora_a"].get_metadata()["out_sharding"] == ("layers", "lora_in", "lora_rank")
  assert attn["q"]["lora_b"].get_metadata()["out_sharding"] == ("layers", "lora_rank", "lora_out")
  mesh = sharding.abstract_mesh({"data": 1, "fsdp": 4, "tensor": 2}, 8)
  specs = sharding.param_specs(state, mesh)["decoder"]["layers"]
  assert width % 8 == 0
  assert tuple(specs["attn"]["q"]["lora_a"]) == (None, ("tensor", "fsdp"), None)
  assert tuple(specs["attn"]["q"]["lora_b"]) == (None, None, ("tensor", "fsdp"))


def test_adapted_forward_equals_the_merged_kernels():
  """y = x W + (alpha / r) x A B, and merging W + (alpha / r) A B into the base gives the same model."""
  on = model_config(*RANK, "--config.lora.alpha=6")
  assert on.lora.scale == 1.5 and model_config(*RANK).lora.scale == 2.0
  params = pure(on)
  key = jax.random.key(3)
  params = jax.tree_util.tree_map_with_path(  # non-zero B everywhere
      lambda p, x: jax.random.normal(jax.random.fold_in(key, len(str(p))), x.shape) * 0.05
      if str(p[-1].key) == "lora_b" else x, params)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: VLM(on, rngs=nnx.Rngs(0))))
  base_cfg = model_config()
  base_graphdef = nnx.graphdef(nnx.eval_shape(lambda: VLM(base_cfg, rngs=nnx.Rngs(0))))
  c = on.vision
  inputs = {"tokens": np.array([[1, on.image_token_id, 5, 6, 7, 8]] * 2, np.int32), "mask": np.ones((2, 6), np.int32),
            "images": np.asarray(jax.random.normal(key, (2, c.image_size, c.image_size, c.num_channels)))}

  def logits(gd, p):
    m = nnx.merge(gd, p)
    return np.asarray(m.logits(m(inputs).hidden_btd))

  adapted = logits(graphdef, params)
  merged = logits(base_graphdef, lora.merge_adapters(params, scale=on.lora.scale))
  base = logits(base_graphdef, lora.base_part(params))
  np.testing.assert_allclose(adapted, merged, atol=2e-5, rtol=1e-5)
  assert np.max(np.abs(adapted - base)) > 1e-3  # the adapters do change the model


@pytest.mark.parametrize("overrides, match", [
    (["--config.lora.targets=decoder/layers/attn/q/kernel,decoder/nosuch/kernel"],
     r"lora.targets: 'decoder/nosuch/kernel' matches no Dense kernel"),
    (["--config.lora.targets=decoder/embed"], r"'decoder/embed' matches no Dense kernel"),
    (["--config.lora.dropout=1.0"], r"lora.dropout=1.0 must be in \[0, 1\)"),
    (["--config.lora.dropout=-0.1"], r"lora.dropout=-0.1 must be in \[0, 1\)"),
    (["--config.lora.rank=-1"], r"lora.rank=-1 must be >= 0"),
])
def test_lora_config_errors_name_the_key(overrides, match):
  with pytest.raises(ConfigError, match=match):
    pure(model_config(*RANK, *overrides))


class _Stack(nnx.Module):
  def __init__(self, n: int, width: int, rngs: nnx.Rngs):
    self.layers = layers.stacked(lambda r: layers.Dense((width,), (width,), ("embed", "mlp"), use_bias=False,
                                                        rngs=r, dtype=np.float32, param_dtype=np.float32), n, rngs)


def _dropout_stack(p: float, *, n: int = 3, width: int = 16):
  """A stack of `n` equal adapted Dense layers (non-zero B), applied to the same input at every layer."""
  m = _Stack(n, width, nnx.Rngs(0))
  lora.add_adapters(m, LoRAConfig(rank=4, dropout=p, targets=("layers/kernel",)), nnx.Rngs(1))
  graphdef, state = nnx.split(m)
  pure_state = nnx.to_pure_dict(state)
  one = jax.tree.map(lambda x: x[:1], pure_state)
  pure_state = jax.tree.map(lambda x: np.repeat(np.asarray(x), n, axis=0), one)  # every layer the same
  pure_state["layers"]["lora_b"] = np.full_like(pure_state["layers"]["lora_b"], 0.1)
  nnx.replace_by_pure_dict(state, pure_state)
  x0 = np.asarray(jax.random.normal(jax.random.key(2), (5, width)))

  def apply(key, x=x0, remat="none"):
    with layers.dropout_key(key):
      _, ys = layers.run_stack(nnx.merge(graphdef, state).layers, lambda blk, c, _: (c, blk(c)), x, remat=remat)
    return ys

  return apply, x0


def test_adapter_dropout_draws_per_layer_only_in_training_and_is_unbiased():
  apply, x = _dropout_stack(0.5)
  clean = np.asarray(apply(None))
  assert np.allclose(clean[0], clean[1]) and np.allclose(clean[1], clean[2])  # no context: no dropout
  np.testing.assert_array_equal(clean, np.asarray(_dropout_stack(0.0)[0](jax.random.key(0))))  # p = 0: off
  key = jax.random.key(7)
  drawn = np.asarray(apply(key))
  np.testing.assert_array_equal(drawn, np.asarray(apply(key)))  # a function of the key
  assert not np.allclose(drawn[0], drawn[1]) and not np.allclose(drawn[1], drawn[2])  # a mask per layer
  assert not np.allclose(drawn, np.asarray(apply(jax.random.key(8))))
  # E[mask / (1 - p)] = 1: the mean over many keys is the undropped output.
  mean = np.mean(np.asarray(jax.vmap(apply)(jax.random.split(jax.random.key(9), 4000))), axis=0)
  np.testing.assert_allclose(mean, clean, atol=0.02 * np.max(np.abs(clean)))
  # Rematerialisation redraws the same masks: gradients equal with and without remat.
  grads = {r: np.asarray(jax.grad(lambda v, r=r: (apply(key, v, r) ** 2).sum())(x)) for r in ("none", "full")}
  np.testing.assert_allclose(grads["full"], grads["none"], rtol=1e-6, atol=1e-6)
  assert not np.allclose(grads["none"], np.asarray(jax.grad(lambda v: (apply(None, v) ** 2).sum())(x)))


def test_describe_counts_the_adapters_as_trainable():
  full = describe.describe(configlib.load(SFT), num_devices=8)
  c = configlib.apply_overrides(configlib.load(SFT), RANK)
  out = describe.describe(c, num_devices=8)
  cfg = model_config(*RANK)
  d, f, h, k, e, r = (cfg.text.width, cfg.text.mlp_dim, cfg.text.num_heads, cfg.text.num_kv_heads,
                      cfg.text.head_dim, 4)
  per_layer = (r * (d + h * e) + 2 * r * (d + k * e) + r * (h * e + d)  # q, k, v, o
               + 2 * r * (d + f) + r * (f + d))  # gate, up, down
  assert out["lora_rank"] == 4 and out["lora_params"] == cfg.text.depth * per_layer
  assert out["trainable_params"] == out["lora_params"]
  assert out["params_total"] == full["params_total"] + out["lora_params"]
  assert out["trainable_decoder_layers"] == list(range(cfg.text.depth))
  with_proj = describe.describe(configlib.apply_overrides(c, ["--config.lora.train_projector=true"]), num_devices=8)
  assert with_proj["trainable_params"] == out["lora_params"] + full["params_by_module"]["projector"]
  rmu = describe.describe(configlib.apply_overrides(configlib.load("configs/unlearn/rmu.py:tiny"), RANK),
                          num_devices=8)
  # RMU's `optim.trainable` names the projector and the MLP down kernels: with LoRA, the down kernels' adapters
  # in the loss's layers (the projector trains only with lora.train_projector).
  assert rmu["trainable_decoder_layers"] == [0, 1]
  assert rmu["trainable_params"] == 2 * r * (f + d)


# --------------------------------------------------------------------------- one base in memory
def _argument_bytes(config) -> tuple[aot.CompileResult, int, int]:
  """The compiled step's per-device argument bytes, and the base's and adapters' bytes (replicated mesh)."""
  result = aot.compile_train_step(config, jax.devices())
  spec = model_spec(aot._model_config(config), sharding.make_mesh(config.mesh))
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
  return result, nbytes(spec.base_abstract_params()), nbytes(lora.adapter_part(spec.abstract_params()))


def test_npo_step_holds_one_base_and_adapter_only_optimizer_state():
  """Compiled memory analysis of the tiny NPO step (8 devices, data parallel: params replicated per device).
  Full fine-tuning holds the params, the reference (a second base) and Adam's moments; with LoRA the step's
  arguments are one base plus the adapters and their two moments, and only the adapters are donated/updated."""
  npo = configlib.load("configs/unlearn/npo.py:tiny")
  full, base_bytes, _ = _argument_bytes(npo)
  lo, base_bytes_lora, adapter_bytes = _argument_bytes(configlib.apply_overrides(npo, RANK))
  assert base_bytes_lora == base_bytes and adapter_bytes > 0
  mesh = sharding.make_mesh(npo.mesh)
  batches = aot.pipeline.abstract_batches(npo, streams=("forget", "retain"), image_size=npo.model.vision.image_size,
                                          mesh=mesh)
  batch_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(batches))
  small = 4096  # step counter, PRNG key, Adam's counts
  # Full: params + reference = two bases, plus moments of the trained (non-vision) part.
  assert full.argument_bytes > 2 * base_bytes + batch_bytes
  # LoRA: exactly one base, the adapters and their two Adam moments (batch fields the loss never reads are
  # pruned from the arguments, hence the lower bound without the batch).
  assert base_bytes + 3 * adapter_bytes <= lo.argument_bytes
  assert lo.argument_bytes <= base_bytes + 3 * adapter_bytes + batch_bytes + small
  assert lo.argument_bytes < 1.2 * base_bytes + batch_bytes  # no second copy of the base
  assert lo.alias_bytes <= 3 * adapter_bytes + small  # only the trainable state is donated
  assert lo.trainable_params == adapter_bytes // 4 and full.trainable_params > 10 * lo.trainable_params
  print(f"\ntiny NPO step per device: full {full.argument_bytes} B args vs LoRA {lo.argument_bytes} B "
        f"(base {base_bytes} B, adapters {adapter_bytes} B, batch {batch_bytes} B)")


# --------------------------------------------------------------------------- training end to end
@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
  """A 2-step full-parameter base, a 3-step LoRA SFT on it, and (lazily) LoRA unlearning runs on that SFT."""
  root = tmp_path_factory.mktemp("lora")
  loop.run(load("configs/pretrain/base.py:tiny", "--config.total_steps=2"), root / "base")
  out = {"root": root, "base": root / "base"}
  config = load(SFT, "--config.total_steps=3", f"--config.init_from={root / 'base'}", *RANK)
  out["sft"] = (config, loop.run(config, root / "sft"))
  return out


def _check_trained(workdir: pathlib.Path, summary, base: dict[str, np.ndarray], *, projector: bool = False):
  assert np.isfinite(summary.final["loss"]) and np.isfinite(summary.final["grad_norm"])
  step_dir = workdir / "checkpoints" / str(summary.last_step)
  saved = host_params(step_dir)
  # Adapter-only checkpoint (plus the projector when it trains).
  assert all(lora.is_adapter(k) or (projector and k.startswith("projector/")) for k in saved), sorted(saved)
  assert any(np.any(v) for k, v in saved.items() if k.endswith("lora_b"))  # adapters trained (B left 0)
  meta = json.loads((step_dir / "meta" / "metadata").read_text())
  assert meta["lora"]["rank"] == 4 and meta["lora"]["scale"] == 2.0 and len(meta["lora"]["base"]["sha256"]) == 64
  # The base is unchanged: the run's whole model is the base with the trained adapters beside it.
  whole = flat(runtime.load_run(workdir).params)
  for k, v in base.items():
    if not (projector and k.startswith("projector/")):
      assert np.array_equal(whole[k], v), k
  return saved, meta


def test_lora_sft_trains_adapters_over_an_unchanged_base(runs):
  config, summary = runs["sft"]
  assert summary.last_step == 3
  base = host_params(runs["base"] / "checkpoints" / "2")
  saved, meta = _check_trained(runs["root"] / "sft", summary, base)
  assert meta["lora"]["base"]["init_from"] == str(runs["base"] / "checkpoints" / "2")
  # Rank 4 on the 14 decoder kernels: the checkpoint is a small fraction of the model.
  assert sum(v.size for v in saved.values()) < 0.2 * sum(v.size for v in base.values())


@pytest.mark.slow  # ~1-2 min each on 2 shared cores
@pytest.mark.parametrize("method", ["npo", "rmu"])
def test_lora_unlearning_from_a_lora_sft_run(runs, method):
  """NPO's reference and RMU's frozen model are the base without adapters; the base of a run started from a
  LoRA run is that run's merged model."""
  root = runs["root"]
  config = load(f"configs/unlearn/{method}.py:tiny", "--config.total_steps=3", f"--config.init_from={root / 'sft'}",
                *RANK, "--config.lora.train_projector=true")
  summary = loop.run(config, root / method)
  merged = flat(runtime.load_run(root / "sft", overrides=["--config.lora.rank=0"]).params)
  sft_whole = flat(runtime.load_run(root / "sft").params)
  sft_cfg = runs["sft"][0]
  k = "decoder/layers/mlp/up/kernel"
  expected = sft_whole[k] + np.asarray(lora.delta(sft_whole[k.replace("kernel", "lora_a")],
                                                  sft_whole[k.replace("kernel", "lora_b")], sft_whole[k].shape,
                                                  runtime.lora_meta(sft_cfg, runtime.setup(sft_cfg).spec)["scale"]))
  np.testing.assert_allclose(merged[k], expected, rtol=1e-6, atol=1e-6)
  saved, meta = _check_trained(root / method, summary, merged, projector=True)
  assert any(k.startswith("projector/") for k in saved)
  assert meta["lora"]["base"]["init_from_base"] == json.loads(
      (root / "sft" / "checkpoints" / "3" / "meta" / "metadata").read_text())["lora"]["base"]["sha256"]
  if method == "rmu":  # RMU trains the adapters of its layers only
    layers = config.loss.layer
    b = saved["decoder/layers/mlp/down/lora_b"]
    trained = [l for l in range(b.shape[0]) if np.any(b[l])]
    assert trained and set(trained) <= set(range(max(layers - 2, 0), layers + 1))


def test_lora_resume_is_bit_exact_and_a_different_base_is_refused(synth, tmp_path):
  """LoRA SFT from a random base: stop after step 3, resume to 6 == uninterrupted; a resume or a load over
  another base (another seed) is a CheckpointError."""
  args = ["--config.batch_size=16", "--config.eval.every=0", "--config.eval.splits=", "--config.log_every=1",
          "--config.optim.warmup_steps=2", "--config.total_steps=6", "--config.checkpoint_every=3",
          "--config.keep_checkpoints=5", *RANK]
  cfg = configlib.apply_overrides(configlib.load(SFT), args)
  workdir = tmp_path / "run"
  loop.run(cfg, workdir)
  ckpts = workdir / "checkpoints"
  uninterrupted = host_params(ckpts / "6")
  shutil.rmtree(ckpts / "6")
  resumed = loop.run(cfg, workdir)
  assert (resumed.first_step, resumed.last_step) == (3, 6)
  again = host_params(ckpts / "6")
  assert uninterrupted.keys() == again.keys() and all(np.array_equal(uninterrupted[k], again[k]) for k in again)
  assert all(lora.is_adapter(k) for k in again)
  meta = json.loads((ckpts / "6" / "meta" / "metadata").read_text())
  assert meta["lora"]["base"]["seed"] == 0
  other = configlib.apply_overrides(cfg, ["--config.seed=1", "--config.total_steps=8"])
  with pytest.raises(CheckpointError, match=r"trained on a random base \(seed 0\).*this run's base is a random "
                                            r"base \(seed 1\)"):
    loop.run(other, workdir)
  with pytest.raises(CheckpointError, match="trained on a random base"):
    runtime.load_run(workdir, overrides=["--config.seed=1"])
  with pytest.raises(CheckpointError, match="not a LoRA checkpoint"):
    runtime.checkpoint.check_base(None, meta["lora"]["base"], where=ckpts / "6")


def test_adapter_dropout_in_the_train_step_is_seeded_by_step_and_resumes_exactly(synth, tmp_path):
  """LoRA SFT with lora.dropout=0.5: step 1 equals the undropped run (B starts at 0, and only the adapter path
  is dropped), later steps differ; a stopped and resumed run draws the same masks; with accumulation too."""
  args = ["--config.batch_size=8", "--config.eval.every=0", "--config.eval.splits=", "--config.log_every=1",
          "--config.optim.warmup_steps=1", "--config.total_steps=4", "--config.checkpoint_every=2",
          "--config.keep_checkpoints=5", *RANK]
  cfg = configlib.apply_overrides(configlib.load(SFT), args)
  losses = {}
  for p in (0.0, 0.5):
    c = configlib.apply_overrides(cfg, [f"--config.lora.dropout={p}"])
    loop.run(c, tmp_path / f"p{p}")
    losses[p] = [r["loss"] for r in metrics_lib.read_metrics(tmp_path / f"p{p}") if "loss" in r]
  assert len(losses[0.5]) == 4
  assert losses[0.5][0] == losses[0.0][0] and losses[0.5][2:] != losses[0.0][2:]
  ckpts = tmp_path / "p0.5" / "checkpoints"
  uninterrupted = host_params(ckpts / "4")
  shutil.rmtree(ckpts / "4")
  resumed = loop.run(configlib.apply_overrides(cfg, ["--config.lora.dropout=0.5"]), tmp_path / "p0.5")
  assert (resumed.first_step, resumed.last_step) == (2, 4)
  again = host_params(ckpts / "4")
  assert all(np.array_equal(uninterrupted[k], again[k]) for k in again)
  accum = configlib.apply_overrides(cfg, ["--config.lora.dropout=0.5", "--config.optim.accum_steps=2",
                                          "--config.batch_size=16", "--config.total_steps=2"])
  summary = loop.run(accum, tmp_path / "accum")
  assert np.isfinite(summary.final["loss"])
