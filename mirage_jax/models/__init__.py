"""LLaVA-1.5-style vision-language model in Flax NNX.

Arrays are named by a shape suffix, one letter per axis (Flax gemma / big_vision style):

  B  batch                          T  query sequence (tokens)        S  key/value sequence (cache slots)
  D  model width (decoder)          W  vision width                    F  MLP hidden width
  H  attention heads                K  key/value heads (GQA)           G  query heads per kv head (H // K)
  E  head dim                       V  vocabulary                      L  layers (stacked)
  P  image patches / image tokens   C  image channels                  Q  flattened patch pixels (p*p*C)
  N  flattened tokens (B*T)

e.g. `x_btd` is a [batch, seq, width] activation, `w_dv` the LM head, `k_blske` a stacked KV cache.

Parameters carry logical axis names (`nnx.with_partitioning`), mapped to the mesh by the one rule table in
`mirage_jax.sharding`.
"""

from mirage_jax.models.config import TextConfig, VisionConfig, VLMConfig
from mirage_jax.models.vlm import VLM, VLMOutput

__all__ = ["TextConfig", "VisionConfig", "VLMConfig", "VLM", "VLMOutput"]
