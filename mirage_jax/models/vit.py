"""CLIP-style ViT vision tower (LLaVA-1.5 uses CLIP ViT-L/14 at 336 px).

Patch embedding (a stride-p convolution without bias, written as a matmul over flattened patches), a class
token and learned positions, a pre-LayerNorm, pre-LN transformer blocks; features are taken from
`feature_layer` (HF `hidden_states` indexing, default -2 = penultimate block) and the class token is dropped
under the `default` select strategy. Blocks after the feature layer never run. The post-LayerNorm exists
(HF checkpoints carry it) but LLaVA does not use it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mirage_jax import sharding
from mirage_jax.models import layers
from mirage_jax.models.config import SelectStrategy, VisionConfig

Array = jax.Array


class VisionBlock(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.ln1 = layers.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, name="vit_norm", **kw)
    self.attn = layers.Attention(
        width=cfg.width, num_heads=cfg.num_heads, num_kv_heads=cfg.num_heads,
        head_dim=cfg.width // cfg.num_heads, use_bias=True,
        names=("vit_embed", "vit_heads", "vit_heads", "vit_head_dim"), **kw)
    self.ln2 = layers.LayerNorm(cfg.width, eps=cfg.layer_norm_eps, name="vit_norm", **kw)
    self.fc1 = layers.Dense((cfg.width,), (cfg.mlp_dim,), ("vit_embed", "vit_mlp"), use_bias=True, **kw)
    self.fc2 = layers.Dense((cfg.mlp_dim,), (cfg.width,), ("vit_mlp", "vit_embed"), use_bias=True, **kw)
    self.act = layers.activation(cfg.act)

  def __call__(self, x_bpw: Array, mask_bpp: Array) -> Array:
    h, _ = self.attn(self.ln1(x_bpw), mask_bts=mask_bpp)
    x_bpw = x_bpw + h
    x_bpw = x_bpw + self.fc2(self.act(self.fc1(self.ln2(x_bpw))))
    return sharding.constrain(x_bpw, ("batch", "length", "act_embed"))


class VisionTower(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any, remat: str = "none",
               scan_layers: bool = True):
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat
    self.scan_layers = scan_layers
    p, c, w = cfg.patch_size, cfg.num_channels, cfg.width
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch = layers.Dense((p * p * c,), (w,), ("vit_patch", "vit_embed"), use_bias=False, **kw)
    self.cls = layers.param(rngs, nnx.initializers.normal(0.02), (w,), ("vit_embed",), param_dtype)
    self.pos = layers.param(rngs, nnx.initializers.normal(0.02), (cfg.num_patches + 1, w),
                            ("vit_pos", "vit_embed"), param_dtype)
    self.pre_norm = layers.LayerNorm(w, eps=cfg.layer_norm_eps, name="vit_norm", **kw)
    self.blocks = layers.stacked(lambda r: VisionBlock(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype),
                                 cfg.depth, rngs)
    self.post_norm = layers.LayerNorm(w, eps=cfg.layer_norm_eps, name="vit_norm", **kw)

  def patchify(self, images_bhwc: Array) -> Array:
    """[B, H, W, C] -> [B, P, p*p*C], patches in row-major order, pixels (row, col, channel) inside."""
    b, h, w, c = images_bhwc.shape
    p = self.cfg.patch_size
    if (h, w, c) != (self.cfg.image_size, self.cfg.image_size, self.cfg.num_channels):
      raise ValueError(f"images of shape {images_bhwc.shape[1:]} do not match the vision config "
                       f"({self.cfg.image_size}, {self.cfg.image_size}, {self.cfg.num_channels})")
    x = images_bhwc.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)

  def __call__(self, images_bhwc: Array) -> Array:
    """Selected features [B, P(+1), W] (before the projector)."""
    x_bpq = sharding.constrain(self.patchify(images_bhwc), ("batch", "length", None))
    x_bpw = self.patch(x_bpq)
    cls_b1w = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x_bpw.shape[0], 1, x_bpw.shape[-1]))
    x_bpw = jnp.concatenate([cls_b1w, x_bpw], axis=1) + self.pos[...].astype(self.dtype)
    x_bpw = self.pre_norm(x_bpw)
    n = x_bpw.shape[1]
    mask_bpp = jnp.ones((x_bpw.shape[0], n, n), bool)

    def body(block, x, _):
      return block(x, mask_bpp), None

    x_bpw, _ = layers.run_stack(self.blocks, body, x_bpw, stop=self.cfg.layers_used, remat=self.remat,
                                  unroll=not self.scan_layers)
    if SelectStrategy(self.cfg.select_strategy) == SelectStrategy.DEFAULT:
      x_bpw = x_bpw[:, 1:]
    return x_bpw
