"""The one logical -> mesh rule table, the mesh, and the shardings derived from them.

Model code names every parameter axis logically (`("embed", "mlp")`); this table maps each name to mesh axes
of the one mesh `("data", "fsdp", "tensor")` (t5x / MaxText style): data parallel over `data`, parameters and
optimizer state FSDP-sharded over `fsdp`, tensor parallel over `tensor` for heads / MLP / vocabulary. The
batch is split over `data` x `fsdp`. A logical name missing from the table is an error, not a silent replica.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mirage_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_vocab", "tensor"),
    # decoder
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    # vision tower
    ("vit_embed", "fsdp"),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("vit_head_dim", None),
    ("vit_patch", None),
    ("vit_pos", None),
    ("vit_norm", None),
    # RMU control vector and other per-width extras
    ("control", None),
    # LoRA adapters (mirage_jax.models.lora): the rank axis is small and replicated; the flattened fan-in /
    # fan-out split over tensor (major, as the kernel's heads / mlp) and fsdp, so that no adapter is whole on
    # every chip of an fsdp-only pod mesh
    ("lora_rank", None),
    ("lora_in", ("tensor", "fsdp")),
    ("lora_out", ("tensor", "fsdp")),
)

_warned: set[str] = set()


def _rules() -> dict[str, Any]:
  return dict(LOGICAL_RULES)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Axis sizes from `config.mesh` ({"data": -1, "fsdp": 1, "tensor": 1}; one axis may be -1 = fill)."""
  unknown = sorted(set(mesh_config) - set(MESH_AXES) - {"preset"})
  if unknown:
    raise ConfigError(f"config.mesh: unknown axes {unknown}; the mesh axes are {MESH_AXES}")
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  given = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ConfigError(f"config.mesh: at most one axis may be -1 (fill), got {given}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh: axis sizes must be positive or -1, got {given}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config.mesh {given}: {num_devices} devices are not divisible by the fixed axes' "
                       f"product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"config.mesh {given} needs {math.prod(sizes)} devices but {num_devices} are "
                     "available; set one axis to -1 to fill")
  return dict(zip(MESH_AXES, sizes))


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """The device mesh `("data", "fsdp", "tensor")` for `config.mesh`."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(tuple(shape.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def abstract_mesh(mesh_config: Mapping[str, int], num_devices: int) -> jax.sharding.AbstractMesh:
  """A mesh of `num_devices` hypothetical devices (for sizing and AOT planning without the hardware)."""
  shape = mesh_shape(mesh_config, num_devices)
  return jax.sharding.AbstractMesh(tuple(shape.values()), MESH_AXES,
                                   axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh | Any, *,
                    what: str = "array") -> P:
  """PartitionSpec for an array with logical axis `names` on `mesh`.

  A dimension not divisible by its mesh axes' size stays replicated (logged once) rather than failing.
  """
  rules = _rules()
  spec = []
  used: set[str] = set()
  for name, dim in zip(names, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"{what}: logical axis {name!r} has no rule in mirage_jax.sharding.LOGICAL_RULES "
                       f"(known: {sorted(rules)})")
    axes = rules[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and mesh.shape.get(a, 1) > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      key = f"{what}:{name}:{dim}:{size}"
      if key not in _warned:
        _warned.add(key)
        logging.info("sharding: %s axis %r (size %d) not divisible by mesh axes %s (%d); replicated",
                     what, name, dim, axes, size)
      axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside a `jax.set_mesh` context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, what="activation"))


def _names_of(path: tuple, var: nnx.Variable) -> tuple:
  names = var.get_metadata().get("out_sharding")
  if names is None:
    raise ValueError(f"parameter {'/'.join(map(str, path))} has no logical axis names "
                     "(create it with mirage_jax.models.layers.param)")
  if len(names) != len(var.shape):
    raise ValueError(f"parameter {'/'.join(map(str, path))}: logical names {names} vs shape {var.shape}")
  return tuple(names)


def param_specs(abstract_state: nnx.State, mesh: Mesh) -> dict:
  """PartitionSpec of every parameter (a pure nested dict, like the params), via the logical rule table."""
  flat = []
  for path, var in nnx.to_flat_state(abstract_state):
    spec = logical_to_spec(_names_of(path, var), var.shape, mesh, what="/".join(map(str, path)))
    flat.append((path, var.replace(spec)))
  return nnx.to_pure_dict(nnx.from_flat_state(flat))


def named(mesh: Mesh, specs: Any) -> Any:
  """PartitionSpecs -> NamedShardings on `mesh` (any pytree of specs)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batch-leading arrays: the batch axis over `data` x `fsdp`, the rest replicated."""
  axes = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  lead = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def shard_bytes(shape: Sequence[int], itemsize: int, spec: P, mesh: Mesh | Any) -> int:
  """Bytes of one device's shard of an array."""
  n = math.prod(shape) * itemsize
  for axes in spec:
    if axes is None:
      continue
    for a in (axes,) if isinstance(axes, str) else axes:
      n //= mesh.shape[a]
  return n


@dataclasses.dataclass(frozen=True)
class ShardingReport:
  total_bytes: int
  per_device_bytes: int
  replicated_big: tuple[str, ...]  # paths of large arrays left fully replicated


def sharding_report(abstract_state: nnx.State, mesh: Mesh, *, min_bytes: int = 1 << 20) -> ShardingReport:
  total = per_device = 0
  big = []
  for path, var in nnx.to_flat_state(abstract_state):
    spec = logical_to_spec(_names_of(path, var), var.shape, mesh, what="/".join(map(str, path)))
    itemsize = np.dtype(var.dtype).itemsize
    nbytes = math.prod(var.shape) * itemsize
    total += nbytes
    per_device += shard_bytes(var.shape, itemsize, spec, mesh)
    if nbytes >= min_bytes and all(s is None for s in spec):
      big.append("/".join(map(str, path)))
  return ShardingReport(total, per_device, tuple(big))


def assert_sufficiently_sharded(abstract_state: nnx.State, mesh: Mesh, *, min_bytes: int = 1 << 20) -> None:
  """Fail when the mesh has model-parallel axes but large parameters stay fully replicated (MaxText)."""
  if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
    return
  report = sharding_report(abstract_state, mesh, min_bytes=min_bytes)
  if report.replicated_big:
    raise ValueError(f"{len(report.replicated_big)} parameters of >= {min_bytes} bytes are fully replicated on "
                     f"mesh {dict(mesh.shape)}: {', '.join(report.replicated_big[:10])}")
