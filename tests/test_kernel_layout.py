"""The token_logprob kernel under a mesh without `layout=`: read from the inputs' shardings, else one error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mirage_kernels
from mirage_kernels.token_logprob import api


def _inputs(n=64, d=32, v=256):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k1, (n, d), jnp.float32)
  w = jax.random.normal(k2, (d, v), jnp.float32) * 0.1
  labels = jax.random.randint(k3, (n,), -1, v)
  return h, w, labels


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)


@pytest.mark.parametrize("impl", ["reference", "chunked_xla", "pallas_tpu"])
def test_layout_is_read_from_sharded_inputs(mesh, impl):
  h, w, labels = _inputs()
  want = mirage_kernels.token_logprob(h, w, labels, implementation="reference")
  hs = jax.device_put(h, NamedSharding(mesh, P("data", None)))
  ws = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
  ls = jax.device_put(labels, NamedSharding(mesh, P("data")))
  layout = api.infer_layout(hs, ws)
  assert layout.token_axes == ("data",) and layout.vocab_axis == "tensor" and layout.embed_axes == ()
  got = mirage_kernels.token_logprob(hs, ws, ls, implementation=impl)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "chunked_xla", "pallas_tpu"])
def test_layout_is_read_from_traced_inputs_on_explicit_axes(impl):
  """Inside `jax.jit` under a mesh with explicit axes the traced inputs carry their shardings: every
  implementation runs without `layout=` and gives the oracle's values."""
  mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 3)
  h, w, labels = _inputs()
  want = mirage_kernels.token_logprob(h, w, labels, implementation="reference")
  with jax.set_mesh(mesh):
    hs = jax.device_put(h, NamedSharding(mesh, P("data", None)))
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
    ls = jax.device_put(labels, NamedSharding(mesh, P("data")))
    got = jax.jit(lambda h, w, l: mirage_kernels.token_logprob(h, w, l, implementation=impl))(hs, ws, ls)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_unsharded_inputs_need_no_layout():
  h, w, labels = _inputs()
  assert api.infer_layout(h, w) is None
  out = jax.jit(lambda h, w, l: mirage_kernels.token_logprob(h, w, l, implementation="chunked_xla"))(h, w, labels)
  assert out.shape == labels.shape


def test_pallas_under_a_mesh_without_a_readable_layout_names_the_fix(mesh):
  h, w, labels = _inputs()
  fn = jax.jit(lambda h, w, l: mirage_kernels.token_logprob(h, w, l, implementation="pallas_tpu"))
  with jax.set_mesh(mesh), pytest.raises(mirage_kernels.UnsupportedError, match=r"layout=Layout\(mesh, token_axes"):
    fn(h, w, labels)


def test_chunked_xla_under_a_mesh_is_partitioned_by_xla(mesh):
  h, w, labels = _inputs()
  want = mirage_kernels.token_logprob(h, w, labels, implementation="reference")
  fn = jax.jit(lambda h, w, l: mirage_kernels.token_logprob(h, w, l, implementation="chunked_xla"))
  with jax.set_mesh(mesh):
    got = fn(h, w, labels)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.tpu_aot
@pytest.mark.parametrize("topology,impl", [("v5e:2x2", "pallas_tpu"), ("v5p:2x2x1", "pallas_tpu"),
                                           ("v5e:2x2", "chunked_xla"), ("v5e:2x2", "reference")])
def test_inferred_layout_compiles_for_tpu(topology, impl):
  """Under a TPU topology's mesh with explicit axes, `token_logprob` without `layout=` reads the layout from
  the traced inputs' shardings, runs the Mosaic kernel per shard and compiles through libtpu (AOT from a CPU
  host) — the call that Mosaic refuses to partition when nothing says how the arrays are split."""
  import importlib.util
  from mirage_jax import compile as aot
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (pip install -e '.[tpu]'): cannot compile for TPU topologies")
  devices = np.array(aot.topology_devices(topology)).reshape(2, 1, -1)
  mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 3)
  n, d, v = 2048, 256, 4000
  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("data", None))),
          jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=NamedSharding(mesh, P(None, "tensor"))),
          jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P("data"))))
  seen = []

  def loss(h, w, labels):
    seen.append(api.infer_layout(h, w, implementation=impl))
    return jnp.sum(mirage_kernels.token_logprob(h, w, labels, implementation=impl))

  with jax.set_mesh(mesh):
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(*args).lower(lowering_platforms=("tpu",))
  assert seen and seen[0].token_axes == ("data",) and seen[0].vocab_axis == "tensor"
  assert lowered.as_text().count("tpu_custom_call") == (3 if impl == "pallas_tpu" else 0)  # fwd, dh, dw
  if impl != "reference":  # the oracle materialises the logits by design
    assert lowered.compile().memory_analysis().temp_size_in_bytes < n * v * 4 // 8  # no f32 [N, V] shard
  else:
    lowered.compile()
