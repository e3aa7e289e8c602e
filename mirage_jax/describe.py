"""`mirage describe`: parameter counts per module and per-device parameter bytes on the configured mesh,
computed with `nnx.eval_shape` (nothing is allocated, so 13B describes in seconds on a laptop), and what
trains: `trainable_params` (after the `optim.frozen` / `trainable` / decoder-layer masks, the loss's layers
included) and `trainable_decoder_layers` (sorted 0-based; every layer when none is frozen). With LoRA on
(`config.lora.rank` > 0) the totals include the adapters (`lora_params`), and only the adapters (plus the
projector with `lora.train_projector`) train."""

from __future__ import annotations

import ml_collections
from flax import nnx

from mirage_jax import sharding
from mirage_jax.losses import make_loss
from mirage_jax.models import VLM, VLMConfig, lora
from mirage_jax.train import optim, runtime
from mirage_jax.train.state import param_count


def describe(config: ml_collections.ConfigDict, *, num_devices: int) -> dict:
  model_cfg = VLMConfig.from_config(config.model, lora=config.get("lora"))
  abstract = nnx.state(nnx.eval_shape(lambda: VLM(model_cfg, rngs=nnx.Rngs(0))))
  mesh = sharding.abstract_mesh(config.mesh, num_devices)
  report = sharding.sharding_report(abstract, mesh)
  pure = nnx.to_pure_dict(abstract)
  by_module = {k: param_count(v) for k, v in sorted(pure.items())}
  loss = make_loss(config.loss)
  loss.validate(model_cfg)
  optim_block = runtime.optim_config(config, loss, model_cfg)
  on = model_cfg.lora.enabled
  trainable = lora.trainable_part(pure, model_cfg.lora) if on else pure
  universe = pure if on else None
  return {
      "model_size": config.model.get("size", ""),
      "params_total": sum(by_module.values()),
      "params_by_module": by_module,
      "trainable_params": optim.trainable_count(trainable, optim_block, universe=universe),
      "trainable_decoder_layers": optim.trainable_layers(trainable, optim_block, universe=universe),
      "lora_rank": model_cfg.lora.rank,
      "lora_params": param_count(lora.adapter_part(pure)),
      "param_dtype": model_cfg.param_dtype,
      "image_tokens": model_cfg.vision.num_image_tokens,
      "devices": num_devices,
      "mesh": dict(mesh.shape),
      "param_bytes_total": report.total_bytes,
      "param_bytes_per_device": report.per_device_bytes,
      "replicated_large_params": list(report.replicated_big),
  }
