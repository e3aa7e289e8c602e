"""Representation Misdirection for Unlearning (Li et al. 2024, WMDP) as the paper uses it.

  forget = mean over masked forget tokens of ||h_l(x_f) - c * u||^2 / D
  retain = mean over masked retain tokens of ||h_l(x_r) - h_l^frozen(x_r)||^2 / D

h_l is the residual stream after decoder block `layer` (0-based), which alone also decides the trained decoder
layers: l-2..l (clipped at 0; `decoder_layers`, the official default); u is a seeded random unit vector in the
positive orthant (uniform [0, 1) then normalised, as in the official code) created once and saved in the
checkpoint (`extras["control"]`, so a resumed run steers toward the same direction); D is the width, the
official `F.mse_loss` normalisation. The forget pass stops after block `layer`; the frozen model only runs
up to it too.

`mask` selects the token positions (the official code has none: every position, padding included):
  answer        (default) positions whose next token is an answer token: the states that generate the harmful
                content. The query positions are left alone, so the steering cannot key on the query's first
                word (feasibility prototypes that steered every position learned "Share..." -> gibberish).
  image_answer  the image tokens and the answer positions
  query         the question's tokens only (`query_mask`): steering that can key on the first word alone
  text          every real text token (query and answer)
  all           every real token, image tokens included
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp

from mirage_jax import seeds
from mirage_jax.errors import ConfigError
from mirage_jax.losses import composite, logprob

Array = jax.Array


class Mask(enum.StrEnum):
  ANSWER = "answer"
  IMAGE_ANSWER = "image_answer"
  QUERY = "query"
  TEXT = "text"
  ALL = "all"


MASKS = tuple(m.value for m in Mask)


def position_mask(batch: Mapping[str, Array], kind: str, image_token_id: int) -> Array:
  """[B, T] float mask of the hidden-state positions an RMU term covers."""
  valid = batch["mask"] > 0
  answer = logprob.next_token_labels(batch["tokens"], batch["loss_mask"]) >= 0
  image = batch["tokens"] == image_token_id
  masks = {"answer": answer, "image_answer": answer | image, "query": batch["query_mask"] > 0,
           "text": valid & ~image, "all": valid}
  if kind not in masks:
    raise ValueError(f"loss.mask={kind!r}; valid: {MASKS}")
  return masks[kind].astype(jnp.float32)


def masked_mse(h_btd: Array, target: Array, mask_bt: Array) -> Array:
  """Mean over masked positions of the squared distance divided by D."""
  se_bt = jnp.mean(jnp.square(h_btd.astype(jnp.float32) - target.astype(jnp.float32)), axis=-1)
  return jnp.sum(se_bt * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


def control_vector(key: Array, width: int, steering: float) -> Array:
  u = jax.random.uniform(key, (width,), jnp.float32)
  return steering * u / jnp.linalg.norm(u)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMU(composite.Unlearning):
  name: ClassVar[str] = "rmu"

  layer: int  # the steered decoder block (0-based); trains blocks layer-2..layer
  steering: float = 10.0
  mask: Mask = Mask.ANSWER

  @property
  def needs_reference(self) -> bool:
    return True

  @property
  def decoder_layers(self) -> tuple[int, ...]:
    """The trained decoder layers: l-2..l, clipped at 0 (the official default)."""
    return tuple(range(max(self.layer - 2, 0), self.layer + 1))

  def validate(self, model_config) -> None:
    depth = model_config.text.depth
    if not 0 <= self.layer < depth:
      raise ConfigError(f"loss.layer={self.layer} out of range: the decoder has {depth} layers (0-based)")

  def init_extras(self, spec, seed: int) -> dict[str, Array]:
    return {"control": control_vector(seeds.key(seed, seeds.RMU_CONTROL), spec.config.text.width, self.steering)}

  def __call__(self, model, *, batches, reference=None, extras=None):
    forget_batch, retain_batch = batches["forget"], batches["retain"]
    image_id = model.cfg.image_token_id
    h_f = model(forget_batch, stop_after=self.layer).layers[self.layer]
    forget = masked_mse(h_f, extras["control"], position_mask(forget_batch, self.mask, image_id))
    ret = composite.score(model, retain_batch, impl=self.logprob_impl, collect=(self.layer,))
    h_ref = jax.lax.stop_gradient(reference(retain_batch, stop_after=self.layer).layers[self.layer])
    retain = masked_mse(ret.layers[self.layer], h_ref, position_mask(retain_batch, self.mask, image_id))
    norm = jnp.sqrt(jnp.sum(jnp.square(h_f.astype(jnp.float32)), -1)).mean()
    return self.compose(forget, retain, ret.token_mean_nll(), forget_act_norm=norm)
