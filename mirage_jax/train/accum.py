"""Gradient accumulation (`optim.accum_steps`): one global batch as k micro-batches inside the jitted step.

Every stream of the batch (forget and retain, the reference cache's `row` indices, ...) is split into k
micro-batches of B / k rows; `lax.scan` runs forward + backward on one micro-batch at a time and sums the
gradients in float32, so only one micro-batch's activations live at once. `accum_steps = 1` never reaches
this module (the step keeps its one `value_and_grad`).

Exactness. Each loss is a weighted sum of terms (`forget + alpha * retain + ft_weight * ft` for the
unlearning losses, `nll` for SFT), and every term is a ratio `A / max(N, 1)` whose numerator A sums over the
rows and whose normaliser N depends on the batch's masks only: scored answer tokens (the token-mean NLLs, the
KL retain term), RMU's masked positions, or the rows (NPO's and SimNPO's sequence means). A micro-batch's term
is `A_j / max(N_j, 1)`; weighting it by `N_j / max(N, 1)` (N over the whole batch, computed from the masks
before the scan) and summing gives `A / max(N, 1)` exactly, for the loss value and its gradient. So k
micro-batches give the same update as one batch up to float32 summation order (`tests/test_accum.py`).

NPO with `normalize=mean_token` pools the whole batch's log-ratio into one sigmoid: not a sum over rows, so
it cannot be accumulated exactly; it is refused with accumulation (`check`).

Metrics: the loss terms (`forget`, `retain`, `ft`, `nll`) and `loss` combine with the same weights (exact);
every other metric (`logratio`, `forget_nll`, `forget_act_norm`, ...) is the plain mean over micro-batches
(a token-weighted metric then differs slightly from the one-batch value when micro-batches hold different
token counts).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mirage_jax import sharding
from mirage_jax.errors import ConfigError
from mirage_jax.losses import logprob
from mirage_jax.losses.composite import Unlearning
from mirage_jax.losses.graddiff import GradDiff
from mirage_jax.losses.npo import NPO, Normalize
from mirage_jax.losses.rmu import RMU, position_mask
from mirage_jax.losses.sft import SFT
from mirage_jax.losses.simnpo import SimNPO
from mirage_jax.models import layers

Array = jax.Array
Counter = Callable[[Mapping[str, Mapping[str, Array]]], Array]  # batches -> float32 scalar normaliser


@dataclasses.dataclass(frozen=True)
class Term:
  """One additive term of a loss: its metric name, its weight in the loss and how it is normalised."""

  metric: str
  coef: float
  count: Counter


def _tokens(stream: str, target: str = "answer") -> Counter:
  """Scored next-token labels of a stream (the token-mean NLL / KL normaliser)."""
  key = {"answer": "loss_mask", "query": "query_mask"}[target]

  def count(batches):
    b = batches[stream]
    return jnp.sum(logprob.next_token_labels(b["tokens"], b[key]) >= 0).astype(jnp.float32)

  return count


def _rows(stream: str) -> Counter:
  return lambda batches: jnp.float32(batches[stream]["tokens"].shape[0])


def _positions(stream: str, kind: str, image_token_id: int) -> Counter:
  return lambda batches: jnp.sum(position_mask(batches[stream], kind, image_token_id))


def terms(loss, *, image_token_id: int) -> tuple[Term, ...]:
  """The additive terms of `loss` with their normalisers; a ConfigError for a loss that has no exact
  accumulation rule."""
  if isinstance(loss, SFT):
    return (Term("nll", 1.0, _tokens("train")),)
  if isinstance(loss, NPO) and loss.normalize == Normalize.MEAN_TOKEN:
    raise ConfigError("optim.accum_steps > 1 with loss.normalize='mean_token': NPO's pooled token mean puts "
                      "the whole batch in one sigmoid, which micro-batches cannot reproduce; use "
                      "loss.normalize=sum or optim.accum_steps=1")
  if isinstance(loss, Unlearning):
    ft = Term("ft", loss.ft_weight, _tokens("retain"))
    retain = Term("retain", loss.alpha, _tokens("retain"))
    if isinstance(loss, (NPO, SimNPO)):
      return (Term("forget", 1.0, _rows("forget")), retain, ft)
    if isinstance(loss, GradDiff):
      return (Term("forget", 1.0, _tokens("forget")), retain, ft)
    if isinstance(loss, RMU):
      return (Term("forget", 1.0, _positions("forget", loss.mask, image_token_id)),
              Term("retain", loss.alpha, _positions("retain", loss.mask, image_token_id)), ft)
  raise ConfigError(f"optim.accum_steps > 1: loss {loss.name!r} has no accumulation rule "
                    "(mirage_jax.train.accum.terms); use optim.accum_steps=1")


def check(*, batch_size: int, accum_steps: int, mesh, loss=None, image_token_id: int = 0) -> None:
  """ConfigErrors before compiling: a positive `accum_steps` that, times the mesh's batch axes, divides the
  batch, and (with a loss) a loss that accumulates exactly."""
  if not isinstance(accum_steps, int) or isinstance(accum_steps, bool) or accum_steps < 1:
    raise ConfigError(f"optim.accum_steps={accum_steps!r} must be an integer >= 1 (1 = no accumulation)")
  if accum_steps == 1:
    return
  shards = sharding.batch_divisor(mesh)
  if batch_size % (accum_steps * shards):
    raise ConfigError(f"batch_size={batch_size} is not divisible by optim.accum_steps={accum_steps} x the "
                      f"mesh's data x fsdp = {shards} devices ({accum_steps * shards}): every micro-batch of "
                      f"batch_size / accum_steps rows must split over the batch axes")
  if loss is not None:
    terms(loss, image_token_id=image_token_id)


def split(batches: Mapping[str, Mapping[str, Array]], k: int) -> dict:
  """[B, ...] -> [k, B / k, ...] for every array of every stream; micro-batch j holds rows j, j + k, ...

  Strided rows keep each micro-batch spread over all the batch shards (row-major blocks would put micro-batch
  j on 1 / k of the devices)."""

  def one(x):
    b = x.shape[0]
    if b % k:
      raise ValueError(f"a batch of {b} rows does not split into accum_steps={k} micro-batches")
    y = jnp.swapaxes(x.reshape(b // k, k, *x.shape[1:]), 0, 1)
    return _constrain(y)

  return {name: {key: one(x) for key, x in stream.items()} for name, stream in batches.items()}


def _constrain(y: Array) -> Array:
  """Micro-batches on the leading (scanned) axis, rows over the batch axes (a no-op without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or sharding.batch_divisor(mesh) == 1:
    return y
  (rows,) = sharding.logical_to_spec(("batch",), y.shape[1:2], mesh, what="micro-batch rows")
  return jax.lax.with_sharding_constraint(y, P(None, rows, *([None] * (y.ndim - 2))))


def value_and_grad(loss_fn: Callable, params: Any, batches: Mapping[str, Mapping[str, Array]], *, loss,
                   steps: int, image_token_id: int, shardings: Any = None):
  """`((value, metrics), grads)` of `loss_fn(params, batches)` over the whole batch, computed as `steps`
  micro-batches (see the module docstring); grads are summed in float32 and returned in the params' dtypes.

  `shardings` (the params' NamedShardings, optional) pins the float32 gradient accumulator's layout."""
  parts = terms(loss, image_token_id=image_token_id)
  micro = split(batches, steps)
  totals = [p.count(batches) for p in parts]
  # weights[t][j] = N_j / max(N, 1): micro-batch j's share of term t's normaliser.
  weights = jnp.stack([jax.vmap(p.count)(micro) / jnp.maximum(n, 1.0) for p, n in zip(parts, totals)], axis=1)

  def surrogate(p, mb, w_t):
    _, metrics = loss_fn(p, mb)
    value = sum(t.coef * w_t[i] * metrics[t.metric] for i, t in enumerate(parts))
    return value, metrics

  pin = (lambda g: g) if shardings is None else (lambda g: jax.lax.with_sharding_constraint(g, shardings))
  zeros = pin(jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), params))

  def body(acc, xs):
    mb, w_t, j = xs
    with layers.dropout_fold(j):  # adapter dropout (training with LoRA dropout): a mask per micro-batch
      (value, metrics), g = jax.value_and_grad(surrogate, has_aux=True)(params, mb, w_t)
    acc = pin(jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g))
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return acc, (value.astype(jnp.float32), metrics)

  acc, (values, metrics) = jax.lax.scan(body, zeros, (micro, weights, jnp.arange(steps)))
  combined = {k: jnp.mean(v) for k, v in metrics.items()}
  for i, t in enumerate(parts):
    combined[t.metric] = jnp.sum(weights[:, i] * metrics[t.metric])
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), acc, params)
  return (jnp.sum(values), combined), grads
