"""Train state and sharded parameter initialisation.

Parameters live as a pure nested dict of arrays (`nnx.to_pure_dict` of the model state); the model is
rebuilt inside jitted functions with `nnx.merge(graphdef, params)`. The graphdef is static, so nothing of
NNX's Python object graph is traced per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from mirage_jax import sharding
from mirage_jax.models import VLM, VLMConfig

Array = jax.Array


@dataclasses.dataclass
class TrainState:
  step: Array  # int32 scalar: optimizer steps taken
  params: dict  # pure nested dict of arrays
  opt_state: Any
  rng: Array  # raw uint32 PRNG key data (jax.random.key_data), checkpointable
  extras: dict  # method state that is not trained, e.g. the RMU control vector


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "params", "opt_state", "rng", "extras"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything static about a model on a mesh: how to rebuild it and where its params live."""

  config: VLMConfig
  graphdef: Any
  abstract: nnx.State  # ShapeDtypeStructs with logical-name metadata
  specs: dict  # PartitionSpec per parameter
  shardings: dict  # NamedSharding per parameter

  def merge(self, params: dict) -> VLM:
    return nnx.merge(self.graphdef, params)

  def abstract_params(self) -> dict:
    """ShapeDtypeStructs carrying the shardings (restore targets, AOT compile inputs)."""
    pure = nnx.to_pure_dict(self.abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure, self.shardings)


def model_spec(config: VLMConfig, mesh: Mesh) -> ModelSpec:
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VLM(config, rngs=nnx.Rngs(0))))
  specs = sharding.param_specs(abstract, mesh)
  return ModelSpec(config=config, graphdef=graphdef, abstract=abstract, specs=specs,
                   shardings=sharding.named(mesh, specs))


def init_params(spec: ModelSpec, seed: int) -> dict:
  """Random parameters created directly in their shards (no host copy of the full model)."""

  def init(key):
    return nnx.to_pure_dict(nnx.state(VLM(spec.config, rngs=nnx.Rngs(params=key))))

  return jax.jit(init, out_shardings=spec.shardings)(jax.random.key(seed))


def param_count(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def new_rng(seed: int) -> Array:
  return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))




def abstract_train_state(spec: ModelSpec, tx, mesh: Mesh, extras: dict) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the whole train state: the restore target and AOT input."""
  from mirage_jax.train import optim
  repl = sharding.replicated(mesh)
  params = spec.abstract_params()
  opt_abstract = jax.eval_shape(tx.init, params)
  opt_sh = optim.state_shardings(opt_abstract, spec.shardings, repl)
  opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), opt_abstract, opt_sh)
  sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl)  # noqa: E731
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=repl), params=params, opt_state=opt,
                    rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl),
                    extras=jax.tree.map(sds, dict(extras)))


def shardings_of(tree: Any) -> Any:
  """The shardings of a tree of ShapeDtypeStructs / arrays."""
  return jax.tree.map(lambda a: a.sharding, tree)
