"""The fused token log-prob kernel (`mirage_kernels.token_logprob`): every implementation against the oracle.

Values (logp, lse) and gradients (dh, dw) on shapes that are not block multiples, bf16 inputs with float32
results, ignored labels, leading batch dims, vocabulary-sharded `w` on the 8 fake devices, the API contract
(fallback, fail-fast, block-size checks), the "never holds [N, V]" promise, an NPO step through
`losses/logprob.py` (fused vs reference; the Pallas one is `slow`), `auto` keeping the tiny demo on the
reference path, and AOT compiles of the Mosaic kernels for TPU topologies (marked `tpu_aot`; skipped without
libtpu, the `tpu` extra).

Pallas runs in interpret mode on CPU (~10 ms per grid step), so the Pallas cases use few, large blocks.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import mirage_kernels
from mirage_configs import models as model_configs
from mirage_jax import configlib
from mirage_jax.losses import logprob, make_loss
from mirage_jax.models import VLM, VLMConfig
from mirage_kernels.token_logprob import BlockSizes, Layout, UnsupportedError, api, config

KERNELS = ("chunked_xla", "pallas_tpu")
# (implementation, blocks, N): the table's blocks (on CPU: whole axes for pallas_tpu, ragged vocabulary tiles
# for chunked_xla), whole-axis blocks, and blocks that leave ragged last tiles on both axes.
CASES = [
    ("chunked_xla", None, 37),
    ("chunked_xla", BlockSizes(block_tokens=64, block_vocab=1024), 37),
    ("chunked_xla", BlockSizes(block_tokens=16, block_vocab=384), 37),
    ("pallas_tpu", None, 37),
    ("pallas_tpu", BlockSizes(block_tokens=128, block_vocab=384), 300),
]
D, V = 64, 1000


def make_inputs(n: int, *, d: int = D, v: int = V, dtype=jnp.float32, seed: int = 0):
  """h [n, d], w [d, v], labels [n] with every 5th label ignored (-1)."""
  rng = np.random.default_rng(seed)
  h = jnp.asarray(rng.normal(size=(n, d)), dtype)
  w = jnp.asarray(0.2 * rng.normal(size=(d, v)), dtype)
  labels = rng.integers(0, v, n)
  labels[::5] = -1
  return h, w, jnp.asarray(labels, jnp.int32)


def run(implementation, h, w, labels, *, blocks=None, layout=None):
  """value_and_grad of a loss mixing logp and lse with distinct per-token weights -> numpy outputs."""

  def loss(h, w):
    out = mirage_kernels.token_logprob_and_lse(h, w, labels, implementation=implementation,
                                               block_sizes=blocks, layout=layout)
    g = jnp.linspace(-1.0, 2.0, out.logp.size).reshape(out.logp.shape)
    return jnp.sum(out.logp * g) + 0.3 * jnp.sum(out.lse * g[::-1]), out

  (value, out), (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(h, w)
  return dict(value=value, logp=out.logp, lse=out.lse, dh=dh, dw=dw)


def assert_close(got: dict, want: dict, *, rtol: float, atol: float):
  for key in ("value", "logp", "lse", "dh", "dw"):
    np.testing.assert_allclose(np.asarray(got[key], np.float32), np.asarray(want[key], np.float32), rtol=rtol,
                               atol=atol, err_msg=key)


# --------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize("implementation,blocks,n", CASES)
def test_matches_reference(implementation, blocks, n):
  h, w, labels = make_inputs(n)
  got = run(implementation, h, w, labels, blocks=blocks)
  assert_close(got, run("reference", h, w, labels), rtol=2e-5, atol=2e-5)
  ignored = np.asarray(labels) < 0
  assert np.all(np.asarray(got["logp"])[ignored] == 0.0)
  assert np.all(np.asarray(got["logp"])[~ignored] < 0.0)


@pytest.mark.parametrize("implementation", KERNELS)
def test_ignored_labels_get_no_gradient(implementation):
  h, w, labels = make_inputs(37, seed=1)
  dh = jax.grad(lambda h: jnp.sum(mirage_kernels.token_logprob(h, w, labels, implementation=implementation)))(h)
  dh = np.asarray(dh)
  ignored = np.asarray(labels) < 0
  assert np.all(dh[ignored] == 0.0)
  assert np.all(np.abs(dh[~ignored]).sum(-1) > 0)


@pytest.mark.parametrize("implementation", KERNELS)
def test_bf16_inputs_give_f32_outputs(implementation):
  """bf16 h and w: logp / lse are float32 (the streaming carry is f32: asserted, since XLA:CPU may fold a
  narrowing away), gradients come back in the inputs' dtypes, values track the f32 oracle on the same
  (bf16-rounded) inputs."""
  h, w, labels = make_inputs(37, dtype=jnp.bfloat16, seed=2)
  got = run(implementation, h, w, labels)
  assert got["logp"].dtype == jnp.float32 and got["lse"].dtype == jnp.float32
  assert got["dh"].dtype == jnp.bfloat16 and got["dw"].dtype == jnp.bfloat16
  want = run("reference", h.astype(jnp.float32), w.astype(jnp.float32), labels)
  np.testing.assert_allclose(got["logp"], want["logp"], rtol=0, atol=2e-2 * np.abs(want["logp"]).max())
  np.testing.assert_allclose(got["lse"], want["lse"], rtol=1e-2, atol=1e-2)
  for key in ("dh", "dw"):
    err = np.abs(np.asarray(got[key], np.float32) - np.asarray(want[key]))
    assert err.max() <= 3e-2 * np.abs(np.asarray(want[key])).max(), key


@pytest.mark.parametrize("implementation", KERNELS)
def test_mixed_dtypes_gradient_follows_w(implementation):
  """The model's case: bf16 activations, f32 LM head; dw comes back f32."""
  h, w, labels = make_inputs(37, seed=3)
  dw = jax.grad(lambda w: jnp.sum(mirage_kernels.token_logprob(h.astype(jnp.bfloat16), w, labels,
                                                               implementation=implementation)))(w)
  assert dw.dtype == jnp.float32


@pytest.mark.parametrize("implementation", KERNELS)
def test_leading_batch_dims(implementation):
  h, w, labels = make_inputs(2 * 3 * 7, seed=4)
  flat = mirage_kernels.token_logprob_and_lse(h, w, labels, implementation=implementation)
  out = mirage_kernels.token_logprob_and_lse(h.reshape(2, 3, 7, D), w, labels.reshape(2, 3, 7),
                                             implementation=implementation)
  assert out.logp.shape == out.lse.shape == (2, 3, 7)
  np.testing.assert_allclose(out.logp.reshape(-1), flat.logp, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.lse.reshape(-1), flat.lse, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- vocabulary-sharded w
@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


LAYOUTS = {
    # FSDP as in the rule table: tokens over data x fsdp, w's width over fsdp (dw reduce-scattered).
    "fsdp": dict(token_axes=("data", "fsdp"), vocab_axis="tensor", embed_axes=("fsdp",)),
    # w's width sharded on an axis that does not split tokens (dw summed, then sliced).
    "width_only": dict(token_axes=("data",), vocab_axis="tensor", embed_axes=("fsdp",)),
}


@pytest.mark.parametrize("implementation", KERNELS)
@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_vocab_sharded_matches_reference(implementation, layout_name, mesh):
  if implementation == "pallas_tpu" and layout_name == "width_only":
    pytest.skip("one layout is enough for the interpreted kernel (same shard_map wrapper)")
  h, w, labels = make_inputs(512, d=32, seed=5)
  layout = Layout(mesh, **LAYOUTS[layout_name])
  want = run("reference", h, w, labels)
  tok = P(layout.token_axes)
  hs = jax.device_put(h, NamedSharding(mesh, P(layout.token_axes, None)))
  ws = jax.device_put(w, NamedSharding(mesh, P(layout.embed_axes, "tensor")))
  ls = jax.device_put(labels, NamedSharding(mesh, tok))
  # Per shard: 128 (or 256) tokens, 500 vocabulary columns -> ragged 128-wide vocabulary blocks.
  got = run(implementation, hs, ws, ls, blocks=BlockSizes(block_tokens=128, block_vocab=128), layout=layout)
  assert_close(got, want, rtol=2e-5, atol=2e-5)
  assert got["dw"].sharding.spec == P(layout.embed_axes, "tensor")


def test_layout_rejects_indivisible_shapes(mesh):
  layout = Layout(mesh, token_axes=("data", "fsdp"), vocab_axis="tensor")
  h, w, labels = make_inputs(6, v=10)
  with pytest.raises(ValueError, match="tokens 6 is not divisible"):
    mirage_kernels.token_logprob(h, w, labels, implementation="chunked_xla", layout=layout)
  with pytest.raises(ValueError, match="not mesh axes"):
    Layout(mesh, token_axes=("batch",))


# --------------------------------------------------------------------------- API contract
def test_package_is_callable_and_matches_api():
  h, w, labels = make_inputs(37, seed=6)
  np.testing.assert_array_equal(mirage_kernels.token_logprob(h, w, labels, implementation="chunked_xla"),
                                api.token_logprob(h, w, labels, implementation="chunked_xla"))


def test_explicit_implementation_fails_fast():
  h, w, labels = make_inputs(300)
  with pytest.raises(UnsupportedError, match="'pallas_tpu' cannot run: .*block_tokens=100"):
    mirage_kernels.token_logprob(h, w, labels, implementation="pallas_tpu",
                                 block_sizes=BlockSizes(block_tokens=100, block_vocab=128))
  with pytest.raises(UnsupportedError, match="float32 and bfloat16"):
    mirage_kernels.token_logprob(h.astype(jnp.float16), w, labels, implementation="chunked_xla")
  with pytest.raises(ValueError, match="unknown token_logprob implementation"):
    mirage_kernels.token_logprob(h, w, labels, implementation="triton")


def test_ordered_fallback_warns_and_uses_the_next(monkeypatch, caplog):
  monkeypatch.setattr(api, "_warned", set())
  h, w, labels = make_inputs(300)
  bad_for_pallas = BlockSizes(block_tokens=100, block_vocab=384)
  with caplog.at_level(logging.WARNING):
    got = mirage_kernels.token_logprob(h, w, labels, implementation=("pallas_tpu", "chunked_xla"),
                                       block_sizes=bad_for_pallas)
  assert "pallas_tpu unavailable" in caplog.text
  want = mirage_kernels.token_logprob(h, w, labels, implementation="reference")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(UnsupportedError, match="no implementation could run"):
    mirage_kernels.token_logprob(h.astype(jnp.float16), w, labels, implementation=("pallas_tpu", "chunked_xla"))


def test_default_order_per_platform(mesh):
  assert api._candidates(None, None) == (api.DEFAULT_ORDER[jax.default_backend()], False)
  assert api._candidates(None, Layout(mesh)) == (("chunked_xla",), False)
  assert api.DEFAULT_ORDER["tpu"] == ("pallas_tpu", "chunked_xla")


@pytest.mark.parametrize("blocks,match", [
    (dict(block_tokens=0, block_vocab=128), "block_tokens must be a positive int"),
    (dict(block_tokens=128, block_vocab=-1), "block_vocab must be a positive int"),
    (dict(block_tokens=128.0, block_vocab=128), "block_tokens must be a positive int"),
])
def test_block_sizes_reject_bad_values(blocks, match):
  with pytest.raises(ValueError, match=match):
    BlockSizes(**blocks)


def test_block_size_table_and_checks():
  table = functools.partial(config.default_block_sizes, tokens=8192, width=4096, vocab=32000)
  assert table("pallas_tpu", platform="tpu") == BlockSizes(256, 512)
  assert table("chunked_xla", platform="gpu") == BlockSizes(8192, 1024)
  assert table("chunked_xla", platform="cpu") == BlockSizes(256, 512)  # cache-sized tiles
  assert config.default_block_sizes("chunked_xla", tokens=100, width=64, vocab=1000, platform="tpu").clamp(
      tokens=100, vocab=1000) == BlockSizes(100, 1000)
  kw = dict(tokens=4096, width=4096, vocab=32000, itemsize=2)
  with pytest.raises(ValueError, match="block_vocab=200 must be a multiple of 128"):
    config.validate(BlockSizes(256, 200), "pallas_tpu", **kw)
  with pytest.raises(ValueError, match="need ~.* MiB of VMEM"):
    config.validate(BlockSizes(2048, 4096), "pallas_tpu", **kw)
  with pytest.raises(ValueError, match="widths up to 8192"):
    config.default_block_sizes("pallas_tpu", tokens=8, width=16384, vocab=8, platform="tpu")


def _largest_intermediate(fn, *args) -> int:
  """Elements of the largest array any equation of `fn`'s jaxpr (sub-jaxprs included) produces."""
  biggest = 0

  def walk(jaxpr):
    nonlocal biggest
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return biggest


@pytest.mark.parametrize("implementation", KERNELS)
def test_never_holds_tokens_by_vocab(implementation):
  n, d, v = 8192, 256, 32000
  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, v), jnp.bfloat16),
          jax.ShapeDtypeStruct((n,), jnp.int32))
  grad = jax.value_and_grad(lambda h, w, lab: jnp.sum(mirage_kernels.token_logprob(
      h, w, lab, implementation=implementation)), argnums=(0, 1))
  assert _largest_intermediate(grad, *args) < n * v // 8
  ref = jax.value_and_grad(lambda h, w, lab: jnp.sum(mirage_kernels.token_logprob(
      h, w, lab, implementation="reference")), argnums=(0, 1))
  assert _largest_intermediate(ref, *args) >= n * v


# --------------------------------------------------------------------------- losses/logprob.py
def test_logprob_auto_uses_reference_for_small_and_the_kernel_for_large():
  h, w, labels = make_inputs(37, seed=7)
  small = logprob.token_logprob(h[None], w, labels[None], impl="auto")
  np.testing.assert_array_equal(small, logprob.token_logprob(h[None], w, labels[None], impl="reference"))
  big = (jax.ShapeDtypeStruct((8, 1024, 128), jnp.float32), jax.ShapeDtypeStruct((128, 32000), jnp.float32),
         jax.ShapeDtypeStruct((8, 1024), jnp.int32))
  assert 8 * 1024 * 32000 * 4 >= logprob.AUTO_MIN_LOGITS_BYTES
  assert _largest_intermediate(lambda *a: logprob.token_logprob(*a, impl="auto"), *big) < 8 * 1024 * 32000
  with pytest.raises(ValueError, match="logprob_impl"):
    logprob.token_logprob(h[None], w, labels[None], impl="fused")


def test_one_registry_and_one_gather():
  """`losses/logprob` adds only `auto` to the kernel package's registry; its reference path and the kernel
  oracle share the one gather (`reference.label_logprob`), bit for bit."""
  from mirage_kernels.token_logprob import reference
  assert logprob.IMPLEMENTATIONS == ("auto", *mirage_kernels.token_logprob.IMPLEMENTATIONS)
  h, w, labels = make_inputs(37, seed=3)
  logits = reference.logits(h, w)
  np.testing.assert_array_equal(logprob.reference_token_logprob(h[None], w, labels[None])[0],
                                reference.label_logprob(logits, labels))
  np.testing.assert_array_equal(reference.token_logprob_and_lse(h, w, labels)[0],
                                reference.label_logprob(logits, labels))
  assert np.all(np.asarray(reference.label_logprob(logits, labels))[np.asarray(labels) < 0] == 0.0)


def test_explicit_implementation_that_cannot_run_is_a_config_error():
  from mirage_jax.errors import ConfigError
  h, w, labels = make_inputs(37, dtype=jnp.float16)
  with pytest.raises(ConfigError, match=r"loss.logprob_impl='chunked_xla' cannot run here: .*float32 and bfloat16"):
    logprob.token_logprob(h[None], w, labels[None], impl="chunked_xla")
  with pytest.raises(ConfigError, match="unknown loss.logprob_impl 'fused'"):
    make_loss(dict(name="sft", logprob_impl="fused"))


@pytest.mark.parametrize("spec", ["configs/pretrain/base.py", "configs/sft/mixed.py", "configs/unlearn/npo.py",
                                  "configs/unlearn/rmu.py", "configs/unlearn/graddiff.py", "configs/unlearn/simnpo.py"])
def test_tiny_demo_stays_on_the_reference_path(spec):
  """`auto` keeps the tiny CPU demo on the materialised logits (faster there): a whole batch's float32 logits,
  even on one device, stay below the threshold."""
  cfg = configlib.load(f"{spec}:tiny")
  assert cfg.loss.logprob_impl == "auto"
  assert cfg.batch_size * cfg.data.max_len * cfg.model.text.vocab_size * 4 < logprob.AUTO_MIN_LOGITS_BYTES


VOCAB, BATCH, T, IMAGE_ID = 64, 4, 16, 4


@pytest.fixture(scope="module")
def tiny_npo():
  """A shrunk VLM (params drawn with numpy), a reference nearby, forget / retain batches."""
  mc = model_configs.model_config("tiny")
  mc.vision.update(dict(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64))
  mc.text.update(dict(vocab_size=VOCAB, width=32, depth=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                      max_len=32))
  cfg = VLMConfig.from_config(mc, image_token_id=IMAGE_ID)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(0.5 * rng.normal(size=a.shape), a.dtype), nnx.to_pure_dict(abstract))
  ref = jax.tree.map(lambda x: x + jnp.asarray(0.05 * rng.normal(size=x.shape), x.dtype), params)

  def batch(seed):
    r = np.random.default_rng(seed)
    tokens = np.concatenate([np.ones((BATCH, 1)), np.full((BATCH, 4), IMAGE_ID), r.integers(5, VOCAB, (BATCH, T - 5))],
                            axis=1).astype(np.int32)
    loss_mask = np.zeros((BATCH, T), np.int32)
    loss_mask[:, 9:] = 1
    query_mask = np.zeros((BATCH, T), np.int32)
    query_mask[:, 5:9] = 1
    return {"tokens": tokens, "mask": np.ones((BATCH, T), np.int32), "loss_mask": loss_mask,
            "query_mask": query_mask, "images": r.normal(size=(BATCH, 16, 16, 3)).astype(np.float32),
            "row": np.arange(BATCH, dtype=np.int32)}

  return graphdef, params, ref, {"forget": batch(1), "retain": batch(2)}


def npo_step(tiny_npo, impl):
  """The NPO loss, its metrics and its gradient (what a train step applies) with `logprob_impl=impl`."""
  graphdef, params, ref, batches = tiny_npo
  loss = make_loss(dict(name="npo", beta=0.5, normalize="sum", forget_input="answer", retain="nll",
                        reference_cache=False, alpha=0.5, ft_weight=1.0, logprob_impl=impl))

  def f(params, ref):
    return loss(nnx.merge(graphdef, params), batches=batches, reference=nnx.merge(graphdef, ref), extras=None)

  (value, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params, ref)
  return value, metrics, grads


def assert_npo_equal(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  for key in want[1]:
    np.testing.assert_allclose(got[1][key], want[1][key], rtol=1e-5, atol=1e-5, err_msg=key)
  flat_got, flat_want = jax.tree.leaves_with_path(got[2]), jax.tree.leaves(want[2])
  for (path, g), w in zip(flat_got, flat_want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def npo_reference(tiny_npo):
  return npo_step(tiny_npo, "reference")


@pytest.mark.parametrize("impl", ["chunked_xla", pytest.param("pallas_tpu", marks=pytest.mark.slow)])
def test_npo_step_fused_matches_reference(tiny_npo, npo_reference, impl):
  assert_npo_equal(npo_step(tiny_npo, impl), npo_reference)


def test_npo_step_fused_on_mesh_matches_reference(tiny_npo, mesh):
  """Under `jax.set_mesh` the kernel runs per shard (tokens over data x fsdp, vocabulary over tensor).

  Compared with the reference path on the same mesh: the sharded model alone reorders float32 sums (norm
  scale gradients move by ~2e-5 against the unsharded step, whatever the log-prob path)."""
  h = jax.ShapeDtypeStruct((BATCH, T, 32), jnp.float32)
  w = jax.ShapeDtypeStruct((32, VOCAB), jnp.float32)
  with jax.set_mesh(mesh):
    assert logprob.kernel_layout(h, w) == Layout(mesh.abstract_mesh, token_axes=("data", "fsdp"),
                                                 vocab_axis="tensor", embed_axes=("fsdp",))
    got, want = npo_step(tiny_npo, "chunked_xla"), npo_step(tiny_npo, "reference")
  assert_npo_equal(got, want)


# --------------------------------------------------------------------------- TPU AOT (Mosaic lowering)
def _tpu_mesh(topology: str):
  from mirage_jax import compile as aot
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): cannot compile for TPU topologies")
  devices = np.array(aot.topology_devices(topology))
  return jax.sharding.Mesh(devices.reshape(1, 2, -1), ("data", "fsdp", "tensor"),
                           axis_types=(AxisType.Auto,) * 3)


@pytest.mark.tpu_aot
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1"])
def test_pallas_tpu_aot_compiles_in_shard_map(topology):
  """value_and_grad through the three Mosaic kernels, vocabulary-sharded inside jax.shard_map, compiled by
  libtpu for the topology (interpret mode cannot check the Mosaic lowering: block shapes, layouts, VMEM)."""
  mesh = _tpu_mesh(topology)
  layout = Layout(mesh, token_axes=("data", "fsdp"), vocab_axis="tensor", embed_axes=("fsdp",))
  n, d, v = 2048, 256, 4000  # per shard: 1024 tokens, 2000 vocabulary columns (a ragged last block)

  def loss(h, w, labels):
    out = mirage_kernels.token_logprob_and_lse(h, w, labels, implementation="pallas_tpu", layout=layout)
    return jnp.sum(out.logp) + 0.1 * jnp.sum(out.lse)

  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=NamedSharding(mesh, P(("data", "fsdp"), None))),
          jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", "tensor"))),
          jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P(("data", "fsdp")))))
  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("tpu",))
  assert lowered.as_text().count("tpu_custom_call") == 3  # forward, dh, dw
  compiled = lowered.compile()
  assert compiled.memory_analysis().temp_size_in_bytes < n * v * 4 // 4  # far below one f32 [N, V] shard


@pytest.mark.tpu_aot
def test_logprob_auto_picks_pallas_on_a_tpu_mesh():
  """`logprob_impl=auto` under a TPU mesh (AOT from a CPU host) takes the Mosaic kernel."""
  mesh = _tpu_mesh("v5e:2x2")
  shapes = ((8, 1024, 256), (256, 32000), (8, 1024))
  specs = (P(("data", "fsdp"), None, None), P("fsdp", "tensor"), P(("data", "fsdp"), None))
  dtypes = (jnp.bfloat16, jnp.float32, jnp.int32)
  args = [jax.ShapeDtypeStruct(s, t, sharding=NamedSharding(mesh, p)) for s, t, p in zip(shapes, dtypes, specs)]
  fn = jax.value_and_grad(lambda h, w, lab: jnp.sum(logprob.token_logprob(h, w, lab, impl="auto")), argnums=(0, 1))
  with jax.set_mesh(mesh):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") == 3
