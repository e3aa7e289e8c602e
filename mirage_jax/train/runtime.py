"""Run setup shared by training, evaluation, the audit and the tools: the static parts of a run (mesh, data,
text format, model spec), the checks made before compiling, the optimizer/state plan, the AOT-compiled
train step, and loading a trained run back (its config and params).

`train` and `eval` both use this module, so evaluation never imports the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mirage_jax import configlib, sharding
from mirage_jax.data import pipeline, preprocess
from mirage_jax.errors import ConfigError, MissingFileError
from mirage_jax.losses import Loss
from mirage_jax.models import VLMConfig, lora
from mirage_jax.models.config import LoRAConfig
from mirage_jax.train import accum, checkpoint, optim
from mirage_jax.train.state import (ModelSpec, Part, TrainState, abstract_train_state, init_params, model_spec,
                                    param_count, shardings_of)


class RunError(ConfigError):
  """A configuration or data problem found before or during training (reported as one line)."""


@dataclasses.dataclass
class Setup:
  """Everything static about a run, shared by training, evaluation and tools."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  data: pipeline.Data
  fmt: preprocess.TextFormat
  spec: ModelSpec


def setup(config: ml_collections.ConfigDict, *, data: pipeline.Data | None = None) -> Setup:
  """Mesh, dataset, tokenizer-checked model config and text format of `config` (`data`: instead of opening
  the config's dataset, e.g. a tokenizer without a dataset for generating on a JSON file)."""
  mesh = sharding.make_mesh(config.mesh)
  data = pipeline.open_data(config.data) if data is None else data
  tok = data.tokenizer
  model_cfg = VLMConfig.from_config(config.model, image_token_id=tok.image_id, lora=config.get("lora"))
  if tok.vocab_size > model_cfg.text.vocab_size:
    raise RunError(f"the tokenizer has {tok.vocab_size} tokens but config.model.text.vocab_size is "
                   f"{model_cfg.text.vocab_size}")
  img = config.data.world.image_size if config.data.name == "mirage_synth" and not config.data.path else None
  if img is not None and img != model_cfg.vision.image_size:
    raise RunError(f"data.world.image_size={img} but model.vision.image_size={model_cfg.vision.image_size}")
  fmt = preprocess.TextFormat.from_config(config.data, num_image_tokens=model_cfg.vision.num_image_tokens)
  preprocess.check_template(tok, fmt)
  if model_cfg.text.max_len < fmt.max_len:
    raise RunError(f"data.max_len={fmt.max_len} exceeds model.text.max_len={model_cfg.text.max_len}")
  return Setup(config=config, mesh=mesh, data=data, fmt=fmt, spec=model_spec(model_cfg, mesh))


def check_run(config: ml_collections.ConfigDict, mesh, loss: Loss, spec: ModelSpec) -> None:
  """Configuration mistakes that would otherwise surface inside compilation (or after hours of training)."""
  if config.batch_size % sharding.batch_divisor(mesh):
    raise RunError(f"batch_size={config.batch_size} is not divisible by the mesh's data x fsdp = "
                   f"{sharding.batch_divisor(mesh)} devices")
  accum.check(batch_size=config.batch_size, accum_steps=accum_steps(config), mesh=mesh, loss=loss,
              image_token_id=spec.config.image_token_id)  # optim.accum_steps
  missing = [n for n in loss.streams if n not in config.data.streams]
  if missing:
    raise RunError(f"loss {config.loss.name!r} needs data streams {list(loss.streams)}; config.data.streams "
                   f"lacks {missing}")
  loss.validate(spec.config)
  optim_config(config, loss, spec.config)  # the loss's decoder layers agree with optim.decoder_layers


def accum_steps(config: ml_collections.ConfigDict) -> int:
  """`optim.accum_steps` (1 for configs saved before the key existed)."""
  return config.optim.get("accum_steps", 1)


def optim_config(config: ml_collections.ConfigDict, loss: Loss, model_config) -> ml_collections.ConfigDict:
  """`config.optim` with the decoder layers the loss trains (RMU: from `loss.layer`).

  An explicit `optim.decoder_layers` naming other layers than the loss's is a ConfigError."""
  layers = loss.decoder_layers
  if layers is None:
    return config.optim
  explicit = config.optim.get("decoder_layers", "")
  if explicit.strip():
    given = optim.parse_layers(explicit, model_config.text.depth)
    if tuple(sorted(given)) != tuple(layers):
      raise ConfigError(f"optim.decoder_layers={explicit!r} (layers {list(given)}) disagrees with loss "
                        f"{config.loss.name!r}, which trains layers {list(layers)} (from loss.layer); leave "
                        "optim.decoder_layers empty")
  block = ml_collections.ConfigDict(config.optim.to_dict())
  block.decoder_layers = ",".join(str(l) for l in layers)
  return block


def plan_state(config: ml_collections.ConfigDict, spec: ModelSpec, mesh, loss: Loss, *, cache_rows: int = 0):
  """(optimizer, schedule, extras factory, abstract TrainState with shardings) of a run.

  `cache_rows` > 0 adds the loss's precomputed reference values (`loss.cache`) of that many rows."""
  tx, sched = optim.make_optimizer(optim_config(config, loss, spec.config), config.total_steps,
                                   spec.trainable_abstract_params(), universe=_optim_universe(spec))
  make_extras = lambda: loss.init_extras(spec, config.seed)  # noqa: E731
  extras_abstract = dict(jax.eval_shape(make_extras))
  if cache_rows:
    extras_abstract.update({loss.cache.key(k): jax.ShapeDtypeStruct((cache_rows,), jnp.float32)
                            for k in loss.cache.keys})
  return tx, sched, make_extras, abstract_train_state(spec, tx, mesh, extras_abstract)


def compile_step(spec: ModelSpec, loss, tx, sched, mesh, target: TrainState, batch_abstract, reference_abstract, *,
                 skip_nonfinite: bool = False, accum_steps: int = 1):
  """AOT-compile the train step for the devices of `mesh` (real ones, or a TPU topology's from a CPU host)."""
  from mirage_jax.train import step as step_lib
  shardings = step_lib.StepShardings(
      state=shardings_of(target), batches=shardings_of(batch_abstract),
      reference=None if reference_abstract is None else shardings_of(reference_abstract),
      replicated=sharding.replicated(mesh))
  fn = step_lib.make_train_step(spec=spec, loss=loss, tx=tx, sched=sched, shardings=shardings,
                                skip_nonfinite=skip_nonfinite, accum_steps=accum_steps)
  with jax.set_mesh(mesh):
    return fn.lower(target, batch_abstract, reference_abstract).compile()


def frozen_abstract(spec: ModelSpec, loss: Loss) -> Any:
  """The train step's third, non-donated argument (ShapeDtypeStructs): the frozen base when LoRA is on (the
  reference / RMU frozen model is that base without adapters), else the reference params when the loss needs
  them, else None."""
  if spec.lora:
    return spec.base_abstract_params()
  return spec.abstract_params() if loss.needs_reference else None


def trainable_params(config: ml_collections.ConfigDict, loss: Loss, spec: ModelSpec) -> int:
  """Parameters that train (LoRA: the adapters and a trained projector; RMU's layer restriction counted)."""
  block = optim_config(config, loss, spec.config)
  pure = spec.trainable_abstract_params()
  return optim.trainable_count(pure, block, universe=_optim_universe(spec))


def _optim_universe(spec: ModelSpec) -> Any:
  """The whole model's abstract params when LoRA trains a part of it (the optimizer's layer rules are
  resolved over the whole model), else None."""
  return spec.abstract_params() if spec.lora else None


def log_memory(compiled) -> None:
  mem = compiled.memory_analysis()
  if mem is not None:
    logging.info("train step memory per device: args %.1f MiB, temps %.1f MiB, outputs %.1f MiB",
                 mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20,
                 mem.output_size_in_bytes / 2**20)


def describe_params(spec: ModelSpec) -> dict[str, int]:
  params = spec.abstract_params()
  return {k: param_count(v) for k, v in params.items()}


# --------------------------------------------------------------------------- loading a trained run
@dataclasses.dataclass
class LoadedRun:
  """A trained run read back: its config (overrides applied), setup, params, and the step directory read."""

  config: ml_collections.ConfigDict
  setup: Setup
  params: Any
  source: str


def run_config(source: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a run was trained with.

  `source` is a run directory (its `config.json`), its `checkpoints/` folder or one step directory (the
  config saved in that step's — or the latest step's — `meta` item)."""
  path = pathlib.Path(source)
  if not path.exists():
    raise MissingFileError(f"{source} not found: expected a run directory, its checkpoints/ folder or a step "
                           "directory")
  if (path / "config.json").is_file():
    return configlib.from_json((path / "config.json").read_text())
  try:
    return checkpoint_config(path)
  except MissingFileError as e:
    raise MissingFileError(f"{path / 'config.json'} not found, nor a checkpoint's config ({e}): is {source} a "
                           "training run directory?") from None


def inherit_from_init(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the paths listed in `init_inherit` (a comma list: "model", "data.prompt_template")
  replaced by the values in `init_from`'s own config, e.g. the architecture of a converted HF checkpoint, so
  one paper config trains any converted LLaVA. A path that either config lacks is an error; nothing to
  inherit returns `config` unchanged."""
  paths = [p.strip() for p in str(config.get("init_inherit", "")).split(",") if p.strip()]
  if not paths:
    return config
  if not config.init_from:
    raise ConfigError(f"init_inherit={config.init_inherit!r} copies settings from init_from's config: set "
                      "--config.init_from=<run dir>")
  source = run_config(config.init_from).to_dict()
  out = config.to_dict()
  for path in paths:
    *parents, leaf = path.split(".")
    src, dst = source, out
    for key in parents:
      src, dst = (src.get(key, {}) if isinstance(src, dict) else {}), dst.get(key, {})
    if not isinstance(src, dict) or leaf not in src or not isinstance(dst, dict) or leaf not in dst:
      raise ConfigError(f"init_inherit: {path!r} is not a key of both this config and {config.init_from}'s")
    if dst[leaf] != src[leaf]:
      logging.info("config.%s inherited from %s", path, config.init_from)
    dst[leaf] = src[leaf]
  merged = ml_collections.ConfigDict(out)
  merged.lock()
  return merged


def checkpoint_config(source: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config saved in a checkpoint's `meta` item (`source`: a run dir, its `checkpoints/` or a step dir;
  the latest step unless a step dir)."""
  params_dir = checkpoint.find_params_dir(source)
  meta = checkpoint.read_meta(params_dir)
  if "config" not in meta:
    raise MissingFileError(f"{params_dir.parent} has no meta/metadata with the run config")
  return configlib.from_json(json.dumps(meta["config"]))


def load_params(setup: Setup, source: str | os.PathLike):
  """The params of a run (its latest step) or of one step directory, restored onto `setup`'s model and
  shardings (refused when trained with another tokenizer). A LoRA run's: the whole tree (its base with the
  adapters beside it) when `setup` has LoRA on, else its merged model."""
  tok = setup.data.tokenizer.fingerprint()
  if setup.spec.lora:
    return restore_lora(source, setup.config, setup.spec, tokenizer=tok)
  if checkpoint.read_meta(checkpoint.find_params_dir(source)).get("lora"):
    return restore_merged(source, setup.spec, tokenizer=tok)
  return checkpoint.restore_params(source, setup.spec.abstract_params(), tokenizer=tok)


# --------------------------------------------------------------------------- LoRA: one frozen base
def lora_identity(config: ml_collections.ConfigDict) -> dict:
  """The base a LoRA run of `config` trains on (`checkpoint.base_identity`)."""
  model = json.loads(configlib.to_json(config))["model"]
  return checkpoint.base_identity(init_from=config.init_from, seed=config.seed, model=model)


def lora_meta(config: ml_collections.ConfigDict, spec: ModelSpec) -> dict:
  """What a LoRA checkpoint's `meta["lora"]` records: the adapters' settings and the base's identity."""
  cfg = spec.config.lora
  return {"rank": cfg.rank, "alpha": cfg.resolved_alpha, "scale": cfg.scale, "targets": list(cfg.targets),
          "train_projector": cfg.train_projector, "base": lora_identity(config)}


def load_base(config: ml_collections.ConfigDict, spec: ModelSpec, *, tokenizer: str | None) -> dict:
  """The frozen base of a LoRA run (no adapters): `init_from`'s model (a LoRA checkpoint's merged with its
  adapters), else the seed's random base (the same parameters as the seed's model without LoRA)."""
  if config.init_from:
    return restore_merged(config.init_from, spec, tokenizer=tokenizer)
  return init_params(spec, config.seed, part=Part.BASE)


def init_trainable(spec: ModelSpec, seed: int, *, base: dict) -> dict:
  """A new LoRA run's trainable tree: fresh adapters (B = 0), and a copy of the base's projector when it
  trains (a copy: the state is donated to the step, the base is not)."""
  adapters = init_params(spec, seed, part=Part.ADAPTERS)
  if not spec.config.lora.train_projector:
    return adapters
  proj = jax.tree.map(lambda a: jax.device_put(a, a.sharding, may_alias=False), base[lora.PROJECTOR])
  return lora.combine(adapters, {lora.PROJECTOR: proj})


def restore_lora(source: str | os.PathLike, config: ml_collections.ConfigDict, spec: ModelSpec, *,
                 tokenizer: str | None) -> dict:
  """The whole tree (base + adapters) of a LoRA checkpoint trained with `config`; its recorded base must be
  `config`'s (CheckpointError otherwise)."""
  params_dir = checkpoint.find_params_dir(source)
  saved = checkpoint.read_meta(params_dir).get("lora") or {}
  checkpoint.check_base(saved.get("base"), lora_identity(config), where=params_dir.parent)
  base = load_base(config, spec, tokenizer=tokenizer)
  trainable = checkpoint.restore_params(params_dir.parent, spec.trainable_abstract_params(), tokenizer=tokenizer)
  return lora.combine(base, trainable)


def restore_merged(source: str | os.PathLike, spec: ModelSpec, *, tokenizer: str | None) -> dict:
  """A checkpoint's model as base params (no adapters), onto `spec`'s base shardings: a full-parameter
  checkpoint as saved; a LoRA checkpoint restored over its own base with W + (alpha / r) A B merged."""
  params_dir = checkpoint.find_params_dir(source)
  meta = checkpoint.read_meta(params_dir)
  target = spec.base_abstract_params()
  if not meta.get("lora"):
    return checkpoint.restore_params(source, target, tokenizer=tokenizer)
  src_config = configlib.from_json(json.dumps(meta["config"]))
  src_lora = LoRAConfig.from_config(src_config.get("lora"))
  src_spec = spec if spec.config.lora == src_lora else model_spec(
      dataclasses.replace(spec.config, lora=src_lora), jax.tree.leaves(spec.shardings)[0].mesh)
  full = restore_lora(params_dir.parent, src_config, src_spec, tokenizer=tokenizer)
  merge = jax.jit(lambda p: lora.merge_adapters(p, scale=src_lora.scale), out_shardings=shardings_of(target))
  return merge(full)


def load_run(source: str | os.PathLike, *, overrides: Sequence[str] = (),
             config: ml_collections.ConfigDict | None = None) -> LoadedRun:
  """Config (the run's own unless `config` is given; `overrides` applied), setup and params of a run."""
  step_dir = checkpoint.find_params_dir(source).parent  # a clear error when there is no checkpoint
  config = configlib.apply_overrides(run_config(source) if config is None else config, overrides)
  s = setup(config)
  return LoadedRun(config=config, setup=s, params=load_params(s, step_dir), source=str(step_dir))
