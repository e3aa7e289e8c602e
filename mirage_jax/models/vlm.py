"""LLaVA composition: vision tower -> projector -> image features spliced in place of the `<image>` tokens.

The token sequence carries one `<image>` token per image feature (HF's current LLaVA processor expands the
placeholder the same way), so splicing is a static-shape gather: the i-th `<image>` token of a row receives
the i-th projected feature of that row's image. Positions come from the attention mask (cumsum - 1), so
left-padded (decoding) and right-padded (training) batches both get RoPE positions starting at 0.

Inputs are a mapping with `tokens` [B, T] int32, `mask` [B, T] (1 = real token) and `images` [B, H, W, C]
float (already normalised by the data pipeline).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax import sharding
from mirage_jax.models import layers, lora
from mirage_jax.models.config import VLMConfig
from mirage_jax.models.decoder import Decoder, DecoderOutput
from mirage_jax.models.projector import Projector
from mirage_jax.models.vit import VisionTower

Array = jax.Array

# Every parameter that writes into the decoder's residual stream (its last axis is the stream's width): the
# token embedding, the projected image features, each block's attention output and MLP down projection. A
# direction projected out of all of them is never written (`mirage_jax.eval.robustness.ablate_direction`).
RESIDUAL_WRITERS = ("decoder/embed", "projector/linear_2/(kernel|bias)", "decoder/layers/attn/o/kernel",
                    "decoder/layers/mlp/down/kernel")


@dataclasses.dataclass
class VLMOutput:
  hidden_btd: Array | None  # final hidden states (after the final norm); None when stopped early
  layers: dict[int, Array]  # residual stream after the requested decoder blocks


jax.tree_util.register_dataclass(VLMOutput, data_fields=["hidden_btd", "layers"], meta_fields=[])


def positions_from_mask(mask_bt: Array) -> Array:
  return jnp.maximum(jnp.cumsum(mask_bt.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(mask_bt: Array) -> Array:
  """[B, T, T]: query t sees key s <= t when s is a real token."""
  t = mask_bt.shape[-1]
  causal_tt = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
  return causal_tt[None] & (mask_bt[:, None, :] > 0)


class VLM(nnx.Module):
  def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = layers.dtype_of(cfg.dtype), layers.dtype_of(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.vision = VisionTower(cfg.vision, remat=cfg.remat, scan_layers=cfg.scan_layers, **kw)
    self.projector = Projector(cfg.vision.width, cfg.text.width, act=cfg.projector_act, **kw)
    self.decoder = Decoder(cfg.text, remat=cfg.remat, scan_layers=cfg.scan_layers, **kw)
    if cfg.lora.enabled:  # last: the base parameters are those of the same seed without LoRA
      lora.add_adapters(self, cfg.lora, rngs)

  def image_features(self, images_bhwc: Array) -> Array:
    """Projected image tokens [B, P, D]."""
    return self.projector(self.vision(images_bhwc))

  def embed(self, inputs: Mapping[str, Array]) -> Array:
    """Token embeddings with the image features spliced in at the `<image>` tokens."""
    tokens_bt = inputs["tokens"]
    x_btd = self.decoder.embed_tokens(tokens_bt)
    feats_bpd = self.image_features(inputs["images"]).astype(x_btd.dtype)
    feats_bpd = sharding.constrain(feats_bpd, ("batch", "length", "act_embed"))
    is_img_bt = tokens_bt == self.cfg.image_token_id
    idx_bt = jnp.clip(jnp.cumsum(is_img_bt, axis=-1) - 1, 0, feats_bpd.shape[1] - 1)
    img_btd = jnp.take_along_axis(feats_bpd, idx_bt[..., None], axis=1)
    return jnp.where(is_img_bt[..., None], img_btd, x_btd)

  def __call__(self, inputs: Mapping[str, Array], *, collect: tuple[int, ...] = (),
               stop_after: int | None = None) -> VLMOutput:
    """Training/scoring forward: hidden states, never logits (see `mirage_jax.losses.logprob`)."""
    mask_bt = inputs["mask"]
    out: DecoderOutput = self.decoder(
        self.embed(inputs), mask_bts=causal_mask(mask_bt), positions_bt=positions_from_mask(mask_bt),
        collect=collect, stop_after=stop_after)
    return VLMOutput(hidden_btd=out.hidden_btd, layers=out.layers)

  def head_weight(self) -> Array:
    return self.decoder.head_weight()

  def logits(self, hidden_btd: Array) -> Array:
    return self.decoder.logits(hidden_btd)
