"""The jitted train step: a plain `jax.jit` over (state, batches, reference params) with explicit shardings
and donation of the state. The graphdef is closed over (static); `nnx.merge` rebuilds the model inside.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from mirage_jax.models import layers
from mirage_jax.train import accum
from mirage_jax.train.state import ModelSpec, TrainState

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class StepShardings:
  state: TrainState  # a TrainState of NamedShardings
  batches: Any  # {stream: {key: NamedSharding}}
  reference: Any  # param shardings of the reference (LoRA on: of the frozen base), or None
  replicated: NamedSharding


def make_train_step(*, spec: ModelSpec, loss: Callable, tx: optax.GradientTransformation,
                    sched: optax.Schedule, shardings: StepShardings, skip_nonfinite: bool = False,
                    accum_steps: int = 1):
  """Returns `step(state, batches, reference) -> (state, metrics)`, jitted with donation of `state`.

  With `skip_nonfinite`, a step whose loss or gradient norm is not finite leaves params and optimizer state
  unchanged (the step counter still advances) and reports `skipped = 1`; otherwise the loop stops on it.
  `accum_steps` > 1 splits every stream into that many micro-batches (`mirage_jax.train.accum`).
  """

  def step(state: TrainState, batches: Mapping[str, Mapping[str, Array]], reference: Any):
    # `reference`: the frozen reference params, or (LoRA on) the frozen base, whose adapter-free model is
    # the reference (one base in memory).
    frozen = None if reference is None else jax.lax.stop_gradient(reference)
    ref_model = None if frozen is None or not loss.needs_reference else spec.reference_model(frozen)

    def loss_fn(params, batches=batches):
      return loss(spec.merge(params, frozen), batches=batches, reference=ref_model, extras=state.extras)

    # LoRA adapter dropout draws from the run's key folded with the step: a resumed run draws the same masks.
    key = (jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
           if spec.config.lora.enabled and spec.config.lora.dropout else None)
    with layers.dropout_key(key):
      if accum_steps == 1:
        (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      else:  # micro-batches summed in float32 inside the step (mirage_jax.train.accum)
        (value, metrics), grads = accum.value_and_grad(loss_fn, state.params, batches, loss=loss,
                                                       steps=accum_steps, image_token_id=spec.config.image_token_id,
                                                       shardings=shardings.state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    grad_norm = optax.global_norm(grads)
    metrics.update(loss=value.astype(jnp.float32), grad_norm=grad_norm,
                   lr=jnp.asarray(sched(state.step), jnp.float32))
    if skip_nonfinite:
      ok = jnp.isfinite(value) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      metrics["skipped"] = 1.0 - ok.astype(jnp.float32)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
                     extras=state.extras)
    return new, metrics

  return jax.jit(step, in_shardings=(shardings.state, shardings.batches, shardings.reference),
                 out_shardings=(shardings.state, shardings.replicated), donate_argnums=(0,))
