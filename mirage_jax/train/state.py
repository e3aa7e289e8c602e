"""Train state and sharded parameter initialisation.

Parameters live as a pure nested dict of arrays (`nnx.to_pure_dict` of the model state); the model is
rebuilt inside jitted functions with `nnx.merge(graphdef, params)`. The graphdef is static, so nothing of
NNX's Python object graph is traced per step.

With LoRA on (`config.lora.rank` > 0) the state's params are only the trainable tree (adapters, plus the
projector with `lora.train_projector`); the frozen base is one separate, non-donated argument of the step,
and the reference / frozen model of NPO, SimNPO and RMU is that base merged into the graphdef without
adapters (`ModelSpec.reference_model`): one base in memory.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from mirage_jax import sharding
from mirage_jax.models import VLM, VLMConfig, lora

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
  """Everything static about a model on a mesh: how to rebuild it and where its params live.

  `graphdef`/`abstract`/`specs`/`shardings` describe the whole model (the adapters included when LoRA is on);
  `base_graphdef` is the model without adapters (None when LoRA is off)."""

  config: VLMConfig
  graphdef: Any
  abstract: nnx.State  # ShapeDtypeStructs with logical-name metadata
  specs: dict  # PartitionSpec per parameter
  shardings: dict  # NamedSharding per parameter
  base_graphdef: Any = None

  @property
  def lora(self) -> bool:
    return self.config.lora.enabled

  def merge(self, params: dict, base: dict | None = None) -> VLM:
    """The model from the full tree, or (LoRA on, `base` given) from the trainable tree over the base."""
    if base is None or not self.lora:
      return nnx.merge(self.graphdef, params)
    return nnx.merge(self.graphdef, lora.combine(base, params))

  def reference_model(self, frozen: dict) -> VLM:
    """The frozen reference / RMU model: the base without adapters (LoRA on), else the given params."""
    return nnx.merge(self.base_graphdef if self.lora else self.graphdef, frozen)

  def abstract_params(self) -> dict:
    """ShapeDtypeStructs carrying the shardings (restore targets, AOT compile inputs) of the whole model."""
    pure = nnx.to_pure_dict(self.abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure, self.shardings)

  def base_abstract_params(self) -> dict:
    """The base (every parameter but the adapters): the whole model when LoRA is off."""
    return lora.base_part(self.abstract_params()) if self.lora else self.abstract_params()

  def trainable_abstract_params(self) -> dict:
    """What the TrainState's params hold: the trainable tree with LoRA on, else the whole model."""
    return lora.trainable_part(self.abstract_params(), self.config.lora) if self.lora else self.abstract_params()


def model_spec(config: VLMConfig, mesh: Mesh) -> ModelSpec:
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: VLM(config, rngs=nnx.Rngs(0))))
  specs = sharding.param_specs(abstract, mesh)
  base_graphdef = None
  if config.lora.enabled:
    no_lora = dataclasses.replace(config, lora=dataclasses.replace(config.lora, rank=0))
    base_graphdef = nnx.graphdef(nnx.eval_shape(lambda: VLM(no_lora, rngs=nnx.Rngs(0))))
  return ModelSpec(config=config, graphdef=graphdef, abstract=abstract, specs=specs,
                   shardings=sharding.named(mesh, specs), base_graphdef=base_graphdef)


class Part(enum.Enum):
  """Which parameters `init_params` creates."""

  ALL = "all"
  BASE = "base"  # every parameter but the LoRA adapters
  ADAPTERS = "adapters"  # the LoRA adapters only


def init_params(spec: ModelSpec, seed: int, *, part: Part = Part.ALL) -> dict:
  """Random parameters created directly in their shards (no host copy of the full model). The base
  parameters of a seed are the same with and without LoRA; XLA skips the parts not asked for."""
  pick = {Part.ALL: lambda p: p, Part.BASE: lora.base_part,
          Part.ADAPTERS: lora.adapter_part}[Part(part)]

  def init(key):
    return pick(nnx.to_pure_dict(nnx.state(VLM(spec.config, rngs=nnx.Rngs(params=key)))))

  return jax.jit(init, out_shardings=pick(spec.shardings))(jax.random.key(seed))


def param_count(tree: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))


def new_rng(seed: int) -> Array:
  return jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))




def abstract_train_state(spec: ModelSpec, tx, mesh: Mesh, extras: dict) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the whole train state: the restore target and AOT input."""
  from mirage_jax.train import optim
  repl = sharding.replicated(mesh)
  params = spec.trainable_abstract_params()
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
