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
