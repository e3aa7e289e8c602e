"""The mesh and the logical -> mesh rule table (mirage_jax.sharding), checked on abstract meshes of up to 256
devices (nothing allocated) and on the 8 fake CPU devices."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mirage_configs import models as model_table
from mirage_jax import configlib, sharding
from mirage_jax.models import VLM, VLMConfig, layers

SIZES = tuple(model_table.SIZES)


def abstract_state(config) -> nnx.State:
  cfg = VLMConfig.from_config(config.model)
  return nnx.state(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0))))


@pytest.fixture(scope="module")
def abstract():
  """{size: (config, abstract params)}."""
  out = {}
  for size in SIZES:
    config = configlib.load(f"configs/sft/posthoc.py:{size}")
    out[size] = config, abstract_state(config)
  return out


def flat_specs(specs: dict) -> dict[str, P]:
  leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  return {"/".join(str(k.key) for k in path): s for path, s in leaves}


# --------------------------------------------------------------------------- the rule table
@pytest.mark.parametrize("devices", [8, 256])
@pytest.mark.parametrize("size", SIZES)
def test_every_parameter_maps_through_the_rules(abstract, size, devices):
  config, state = abstract[size]
  mesh = sharding.abstract_mesh(config.mesh, devices)
  assert math.prod(mesh.shape.values()) == devices
  specs = flat_specs(sharding.param_specs(state, mesh))
  shapes = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(state)}
  assert set(specs) == set(shapes)
  for path, spec in specs.items():
    assert isinstance(spec, P)
    assert len(spec) == len(shapes[path]), path
    used = [a for s in spec if s is not None for a in ((s,) if isinstance(s, str) else s)]
    assert len(used) == len(set(used)), (path, spec)  # a mesh axis shards at most one dimension
    for dim, s in zip(shapes[path], spec):
      if s is not None:
        n = math.prod(mesh.shape[a] for a in ((s,) if isinstance(s, str) else s))
        assert n > 1 and dim % n == 0, (path, spec)


def test_rule_table_is_well_formed():
  names = [n for n, _ in sharding.LOGICAL_RULES]
  assert len(names) == len(set(names))
  for _, axes in sharding.LOGICAL_RULES:
    for a in () if axes is None else (axes,) if isinstance(axes, str) else axes:
      assert a in sharding.MESH_AXES


def test_7b_layout_on_256_devices(abstract):
  config, state = abstract["7b"]
  mesh = sharding.abstract_mesh(config.mesh, 256)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 256, "tensor": 1}
  specs = flat_specs(sharding.param_specs(state, mesh))
  assert specs["decoder/embed"] == P(None, "fsdp")  # vocab over tensor (size 1: dropped), embed over fsdp
  assert specs["decoder/lm_head"] == P("fsdp", None)
  assert specs["decoder/layers/attn/q/kernel"] == P(None, "fsdp", None, None)
  assert specs["decoder/layers/mlp/down/kernel"] == P(None, None, "fsdp")
  assert specs["vision/blocks/fc1/kernel"] == P(None, "fsdp", None)
  assert specs["decoder/norm/scale"] == P(None)


def test_13b_tensor_parallel_layout(abstract):
  config, state = abstract["13b"]
  mesh = sharding.abstract_mesh(config.mesh, 256)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 64, "tensor": 4}
  specs = flat_specs(sharding.param_specs(state, mesh))
  assert specs["decoder/layers/mlp/up/kernel"] == P(None, "fsdp", "tensor")
  assert specs["decoder/layers/attn/q/kernel"] == P(None, "fsdp", "tensor", None)
  assert specs["decoder/lm_head"] == P("fsdp", "tensor")
  report = sharding.sharding_report(state, mesh)
  assert report.per_device_bytes == pytest.approx(report.total_bytes / 256, rel=0.03)


def test_unknown_logical_name_is_an_error():
  mesh = sharding.abstract_mesh(dict(data=2, fsdp=2, tensor=2), 8)
  with pytest.raises(ValueError, match="logical axis 'bogus' has no rule"):
    sharding.logical_to_spec(("embed", "bogus"), (8, 8), mesh)

  class Odd(nnx.Module):
    def __init__(self, rngs):
      self.w = layers.param(rngs, nnx.initializers.zeros_init(), (4, 4), ("embed", "bogus"), jnp.float32)

  state = nnx.state(nnx.eval_shape(lambda: Odd(nnx.Rngs(0))))
  with pytest.raises(ValueError, match=r"w: logical axis 'bogus'"):
    sharding.param_specs(state, mesh)


def test_parameter_without_logical_names_is_an_error():
  class Bare(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((4,)))

  mesh = sharding.abstract_mesh(dict(data=-1), 8)
  with pytest.raises(ValueError, match="w has no logical axis names"):
    sharding.param_specs(nnx.state(Bare()), mesh)
  with pytest.raises(ValueError, match="differ in rank"):
    layers.param(nnx.Rngs(0), nnx.initializers.zeros_init(), (4, 4), ("embed",), jnp.float32)


def test_non_divisible_dimensions_stay_replicated():
  mesh = sharding.abstract_mesh(dict(data=1, fsdp=2, tensor=4), 8)
  assert sharding.logical_to_spec(("vocab", "embed"), (12, 6), mesh) == P("tensor", "fsdp")
  assert sharding.logical_to_spec(("vocab", "embed"), (10, 6), mesh) == P(None, "fsdp")
  assert sharding.logical_to_spec(("vocab", "embed"), (12, 5), mesh) == P("tensor", None)
  # `batch` spans data x fsdp; axes of size 1 are dropped; unnamed dims are replicated.
  assert sharding.logical_to_spec(("batch", None, "act_embed"), (4, 3, 5), mesh) == P("fsdp", None, None)
  both = sharding.abstract_mesh(dict(data=2, fsdp=2, tensor=2), 8)
  assert sharding.logical_to_spec(("batch", "length"), (8, 3), both) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("batch", "length"), (6, 3), both) == P(None, None)  # 6 % 4
  # A mesh axis is used once: the second fsdp-mapped dimension stays replicated.
  assert sharding.logical_to_spec(("embed", "vit_embed"), (8, 8), both) == P("fsdp", None)


def test_small_vision_tower_replicated_on_256_devices(abstract):
  """A real non-divisible case: the small ViT width 384 does not split 256 ways, so it stays replicated (and
  the sufficiency check flags it), while 8 devices shard it."""
  config, state = abstract["small"]
  big = sharding.abstract_mesh(config.mesh, 256)
  specs = flat_specs(sharding.param_specs(state, big))
  assert specs["vision/blocks/fc1/kernel"] == P(None, None, None)
  with pytest.raises(ValueError, match="vision/blocks/fc1/kernel"):
    sharding.assert_sufficiently_sharded(state, big)
  small = sharding.abstract_mesh(config.mesh, 8)
  assert flat_specs(sharding.param_specs(state, small))["vision/blocks/fc1/kernel"] == P(None, "fsdp", None)
  sharding.assert_sufficiently_sharded(state, small)


# --------------------------------------------------------------------------- mesh
def test_mesh_shape_fill_and_defaults():
  assert sharding.mesh_shape(dict(data=-1, fsdp=1, tensor=1), 8) == dict(data=8, fsdp=1, tensor=1)
  assert sharding.mesh_shape(dict(fsdp=-1, tensor=2), 8) == dict(data=1, fsdp=4, tensor=2)
  assert sharding.mesh_shape(dict(data=2, fsdp=2, tensor=2, preset="cpu"), 8) == dict(data=2, fsdp=2, tensor=2)
  assert sharding.mesh_shape({}, 1) == dict(data=1, fsdp=1, tensor=1)


@pytest.mark.parametrize("mesh, devices, match", [
    (dict(data=-1, fsdp=-1), 8, "at most one axis may be -1"),
    (dict(data=2, fsdp=2, tensor=1), 8, "needs 4 devices but 8 are available"),
    (dict(data=4, fsdp=4), 8, "needs 16 devices"),
    (dict(data=-1, tensor=3), 8, "not divisible by the fixed axes' product 3"),
    (dict(data=-1, pipeline=2), 8, r"unknown axes \['pipeline'\]"),
    (dict(data=0, fsdp=-1), 8, "positive or -1"),
    (dict(data=-2), 8, "positive or -1"),
])
def test_mesh_shape_errors(mesh, devices, match):
  with pytest.raises(ValueError, match=match):
    sharding.mesh_shape(mesh, devices)
  with pytest.raises(ValueError, match=match):
    sharding.abstract_mesh(mesh, devices)


def test_make_mesh_on_fake_devices():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(dict(data=2, fsdp=-1, tensor=2))
  assert mesh.axis_names == sharding.MESH_AXES
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh.axis_types == (AxisType.Auto,) * 3
  assert set(mesh.devices.flat) == set(jax.devices())
  four = sharding.make_mesh(dict(data=-1), devices=jax.devices()[:4])
  assert dict(four.shape) == {"data": 4, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="needs 8 devices but 4"):
    sharding.make_mesh(dict(data=8), devices=jax.devices()[:4])
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.make_mesh(dict(data=-1, tensor=-1))


# --------------------------------------------------------------------------- batch and shardings
def test_batch_sharding_and_divisor():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  sh = sharding.batch_sharding(mesh, 3)
  assert isinstance(sh, NamedSharding) and sh.spec == P(("data", "fsdp"), None, None)
  assert sharding.batch_divisor(mesh) == 4
  x = jax.device_put(np.arange(8 * 3, dtype=np.float32).reshape(8, 3), sharding.batch_sharding(mesh, 2))
  assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}  # 4 batch shards, replicated over tensor
  data = sharding.make_mesh(dict(data=-1))
  assert sharding.batch_sharding(data, 2).spec == P("data", None)
  assert sharding.batch_divisor(data) == 8
  fsdp = sharding.make_mesh(dict(fsdp=-1))
  assert sharding.batch_sharding(fsdp, 1).spec == P("fsdp")
  tensor = sharding.make_mesh(dict(tensor=-1))
  assert sharding.batch_sharding(tensor, 2).spec == P(None, None)
  assert sharding.batch_divisor(tensor) == 1
  assert sharding.replicated(mesh).spec == P()


def test_named_and_shard_bytes():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  tree = {"a": P("fsdp", None), "b": {"c": P()}}
  named = sharding.named(mesh, tree)
  assert named["a"] == NamedSharding(mesh, P("fsdp", None))
  assert named["b"]["c"] == NamedSharding(mesh, P())
  assert sharding.shard_bytes((8, 6), 4, P("fsdp", "tensor"), mesh) == 8 * 6 * 4 // 4
  assert sharding.shard_bytes((8, 6), 2, P(("data", "fsdp"), None), mesh) == 8 * 6 * 2 // 4
  assert sharding.shard_bytes((8, 6), 4, P(), mesh) == 8 * 6 * 4


def test_constrain_is_a_noop_without_mesh_and_shards_with_one():
  x = jnp.ones((8, 4, 6))
  assert sharding.constrain(x, ("batch", "length", "act_embed")) is x
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh):
    y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", None, "act_vocab")))(x)
  assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_array_equal(y, 2 * np.ones((8, 4, 6)))


# --------------------------------------------------------------------------- sufficiency and sizes
def test_7b_sufficiently_sharded_and_bytes_per_device(abstract):
  config, state = abstract["7b"]
  assert config.mesh.fsdp == -1
  mesh = sharding.abstract_mesh(config.mesh, 256)
  sharding.assert_sufficiently_sharded(state, mesh)
  report = sharding.sharding_report(state, mesh)
  n_params = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state))
  assert report.total_bytes == 4 * n_params
  assert n_params == pytest.approx(7.063e9, rel=5e-3)
  assert report.replicated_big == ()
  # Every large array is split 256 ways; only norms, biases and small tables stay whole.
  assert report.per_device_bytes == pytest.approx(report.total_bytes / 256, rel=0.03)
  assert report.per_device_bytes >= report.total_bytes // 256


@pytest.mark.parametrize("size, chips, mesh", [("7b", 256, dict(fsdp=-1)), ("13b", 64, dict(fsdp=16, tensor=4))])
def test_lora_adapters_are_sharded_on_pod_meshes(size, chips, mesh):
  """Rank-128 adapters on every decoder linear: none is whole on every chip of the pod meshes the README
  names (32 heads x 128 head_dim split 256 ways only as one flattened fan-out axis)."""
  config = configlib.apply_overrides(configlib.load(f"configs/sft/posthoc.py:{size}"), ["--config.lora.rank=128"])
  cfg = VLMConfig.from_config(config.model, lora=config.lora)
  state = nnx.state(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0))))
  pod = sharding.abstract_mesh(mesh, chips)
  sharding.assert_sufficiently_sharded(state, pod)
  specs = flat_specs(sharding.param_specs(state, pod))
  adapters = {k: s for k, s in specs.items() if k.endswith(("lora_a", "lora_b"))}
  assert len(adapters) == 14
  for path, spec in adapters.items():
    assert any(s is not None for s in spec), path
  q = adapters["decoder/layers/attn/q/lora_b"]
  assert q == (P(None, None, "fsdp") if size == "7b" else P(None, None, ("tensor", "fsdp")))


def test_replicated_large_params_fail_the_check(abstract, monkeypatch):
  config, state = abstract["7b"]
  mesh = sharding.abstract_mesh(dict(data=1, fsdp=64, tensor=4), 256)
  sharding.assert_sufficiently_sharded(state, mesh)
  # A rule table that leaves the MLP alone (mlp and embed replicated) must be caught.
  rules = tuple((n, None if n in ("mlp", "embed") else a) for n, a in sharding.LOGICAL_RULES)
  monkeypatch.setattr(sharding, "LOGICAL_RULES", rules)
  with pytest.raises(ValueError, match=r"fully replicated on mesh .*decoder/layers/mlp/down/kernel"):
    sharding.assert_sufficiently_sharded(state, mesh)
  report = sharding.sharding_report(state, mesh)
  assert "decoder/layers/mlp/gate/kernel" in report.replicated_big
  assert "decoder/layers/attn/q/kernel" not in report.replicated_big  # heads still over tensor


def test_sufficiency_is_not_required_for_pure_data_parallel(abstract):
  config, state = abstract["7b"]
  mesh = sharding.abstract_mesh(dict(data=-1), 8)
  assert sharding.sharding_report(state, mesh).replicated_big  # everything is replicated ...
  sharding.assert_sufficiently_sharded(state, mesh)  # ... which is what data parallelism means


def test_small_module_threshold():
  """min_bytes: a replicated parameter below the threshold is fine, above it fails."""

  class M(nnx.Module):
    def __init__(self, rngs):
      self.big = layers.param(rngs, nnx.initializers.zeros_init(), (512, 600), ("norm", "norm"), jnp.float32)
      self.ok = layers.param(rngs, nnx.initializers.zeros_init(), (512, 600), ("embed", "mlp"), jnp.float32)

  state = nnx.state(nnx.eval_shape(lambda: M(nnx.Rngs(0))))
  mesh = sharding.abstract_mesh(dict(fsdp=-1), 8)
  with pytest.raises(ValueError, match="1 parameters of >= 1048576 bytes are fully replicated.*big"):
    sharding.assert_sufficiently_sharded(state, mesh)
  sharding.assert_sufficiently_sharded(state, mesh, min_bytes=2 << 20)
  report = sharding.sharding_report(state, mesh)
  assert report.total_bytes == 2 * 512 * 600 * 4
  assert report.per_device_bytes == 512 * 600 * 4 + 512 * 600 * 4 // 8
