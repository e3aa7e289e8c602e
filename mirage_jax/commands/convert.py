"""`mirage convert`: Hugging Face LLaVA directories <-> mirage run directories (the command's orchestration).

`hf_to_jax` reads a transformers `LlavaForConditionalGeneration` directory (`config.json` plus
`model.safetensors` or a sharded `model.safetensors.index.json`; the weight and config mapping is
`mirage_jax.models.hf_convert`) and writes an Orbax checkpoint in the layout training runs use
(`OUT/checkpoints/0/{params,train,data,meta}`), `OUT/config.json` (the full mirage config: model block from the
HF config, LLaVA-1.5 data settings) and `OUT/tokenizer/` when the HF directory has a tokenizer. So
`--config.init_from=OUT`, `mirage eval --workdir=OUT` and `mirage eval --checkpoint=OUT/checkpoints/0` work on
it. `jax_to_hf` writes the reverse: `config.json`, `model.safetensors` (sharded above `max_shard_bytes`), the
tokenizer and a `preprocessor_config.json`. The tokenizer is a converted model's `tokenizer/`, else the one the
run's dataset recorded (`data.path/extra/tokenizer`, or the synthetic world's build), checked against the
fingerprint the checkpoint saved. A LoRA run is written merged; with `adapter_out` also as a PEFT adapter plus
the HF base it applies to. The checkpoint is read by this one process onto one device, whatever process count
wrote it. No torch is needed (`mirage convert check-parity` needs it: `mirage_jax.models.hf_parity`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from mirage_configs import common
from mirage_jax import configlib
from mirage_jax.data import images, preprocess
from mirage_jax.data.tokenizer import Tokenizer
from mirage_jax.errors import UsageError
from mirage_jax.models import hf_convert
from mirage_jax.models.config import VLMConfig
from mirage_jax.models.safetensors_io import ConversionError, numpy_dtype, read_hf_state, write_hf_state
from mirage_jax.train import checkpoint, runtime

TOKENIZER_DIR = "tokenizer"


class OutputExistsError(UsageError, FileExistsError):
  """`--out` already holds checkpoints (a converted model is never written over a run)."""


def _base_size(n_params: int) -> str:
  """The size whose training defaults (batch, lr, mesh preset) suit a model of `n_params`."""
  for limit, size in ((20e6, "tiny"), (500e6, "small"), (3e9, "1b"), (10e9, "7b")):
    if n_params < limit:
      return size
  return "13b"


def mirage_config(model: Mapping[str, Any], *, n_params: int, image_mean=None, image_std=None,
                  base: str = "") -> ml_collections.ConfigDict:
  """The full run config of a converted model: `base`'s training defaults, the converted model block and
  LLaVA-1.5 data settings (Vicuna/llava_v1 template, CLIP statistics, dataset `vlguard`, path unset)."""
  c = common.training_config(base or _base_size(n_params))
  c.model = ml_collections.ConfigDict(dict(model))
  c.data.name = "vlguard"
  c.data.path = ""
  c.data.prompt_template = preprocess.LLAVA_V1_TEMPLATE
  c.data.max_len = min(int(model["text"]["max_len"]), 2048)
  c.data.image_mean = tuple(image_mean or images.CLIP_MEAN)
  c.data.image_std = tuple(image_std or images.CLIP_STD)
  c.data.streams = ml_collections.ConfigDict(dict(train="sft"))
  c.eval.splits = "sft"
  c.eval.refusal_preset = "vlguard"
  return c


def _image_stats(hf_dir: pathlib.Path) -> tuple[Any, Any]:
  path = hf_dir / "preprocessor_config.json"
  if not path.exists():
    return None, None
  d = json.loads(path.read_text())
  return d.get("image_mean"), d.get("image_std")


def _tokenizer(hf_dir: pathlib.Path):
  """The HF directory's tokenizer (None when it has no tokenizer files)."""
  if not any((hf_dir / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    return None
  return Tokenizer.from_hf(hf_dir)


@dataclasses.dataclass
class Converted:
  params: dict  # nested dict of numpy arrays
  model: VLMConfig
  config: ml_collections.ConfigDict  # the full mirage run config
  tokenizer: Any  # mirage Tokenizer or None


def convert_hf(hf_dir: str | pathlib.Path, *, dtype: str = "float32", param_dtype: str = "float32",
               base: str = "") -> Converted:
  """Read and convert an HF LLaVA directory in memory (config, weights, tokenizer)."""
  hf_dir = pathlib.Path(hf_dir)
  block = hf_convert.model_block_from_hf(hf_convert.read_hf_config(hf_dir), dtype=dtype, param_dtype=param_dtype)
  tok = _tokenizer(hf_dir)
  if tok is not None and tok.image_id != block["image_token_id"]:
    raise ConversionError(f"the tokenizer's <image> id {tok.image_id} differs from image_token_index "
                          f"{block['image_token_id']} in {hf_dir}/config.json")
  if tok is not None and tok.vocab_size > block["text"]["vocab_size"]:
    raise ConversionError(f"the tokenizer has {tok.vocab_size} tokens, the model's vocabulary only "
                          f"{block['text']['vocab_size']}")
  model = hf_convert.model_config(block, where=hf_dir)
  params = hf_convert.params_from_hf(read_hf_state(hf_dir), model, param_dtype=param_dtype)
  n = sum(a.size for a in hf_convert.flatten(params).values())
  mean, std = _image_stats(hf_dir)
  config = mirage_config(block, n_params=n, image_mean=mean, image_std=std, base=base)
  return Converted(params=params, model=model, config=config, tokenizer=tok)


def hf_to_jax(hf_dir: str | pathlib.Path, out: str | pathlib.Path, *, dtype: str = "float32",
              param_dtype: str = "float32", base: str = "") -> dict:
  """Convert an HF LLaVA directory into a mirage checkpoint directory `out` (see the module docstring)."""
  import jax

  from mirage_jax.train.state import TrainState, new_rng
  out = pathlib.Path(out)
  ckpt_dir = out / checkpoint.CHECKPOINT_DIR
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    raise OutputExistsError(f"{ckpt_dir} already holds checkpoints; choose an empty --out")
  conv = convert_hf(hf_dir, dtype=dtype, param_dtype=param_dtype, base=base)
  out.mkdir(parents=True, exist_ok=True)
  tok_fp = None
  if conv.tokenizer is not None:
    conv.tokenizer.save(out / TOKENIZER_DIR)
    tok_fp = conv.tokenizer.fingerprint()
  (out / "config.json").write_text(configlib.to_json(conv.config))
  meta = {"step": 0, "config": json.loads(configlib.to_json(conv.config)),
          "source": {"hf_dir": str(pathlib.Path(hf_dir).absolute()), "converter": "mirage_jax.commands.convert"}}
  if tok_fp:
    meta["tokenizer"] = tok_fp
  state = TrainState(step=np.int32(0), params=conv.params, opt_state={}, rng=np.asarray(jax.device_get(new_rng(0))),
                     extras={})
  ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=1, keep=1, async_save=False)
  ckpt.save(0, state, data={}, meta=meta, force=True)
  ckpt.close()
  n = sum(a.size for a in hf_convert.flatten(conv.params).values())
  return {"out": str(out), "checkpoint": str(ckpt_dir / "0"), "params": int(n),
          "tokenizer": str(out / TOKENIZER_DIR) if tok_fp else None, "config": str(out / "config.json")}


def load_checkpoint(ckpt: str | pathlib.Path) -> tuple[dict, VLMConfig, ml_collections.ConfigDict]:
  """Params (numpy, one host, one process: whatever mesh and process count saved them), model config and run
  config of a mirage checkpoint (run dir or step dir). LoRA leaves (`lora_a`, `lora_b`) stay in the params."""
  params_dir = checkpoint.find_params_dir(ckpt)
  config = runtime.checkpoint_config(params_dir.parent)  # the step directory of `params_dir`
  image_id = int(config.model.image_token_id)
  if image_id < 0:
    tok = checkpoint_tokenizer(ckpt, config)
    if tok is None:
      raise ConversionError(f"config.model.image_token_id is -1 (the data's tokenizer) and no tokenizer was "
                            f"found: not in {TOKENIZER_DIR}/ beside {ckpt}, nor in the dataset config.data names")
    image_id = tok.tokenizer.image_id
  model = VLMConfig.from_config(config.model, image_token_id=image_id)
  meta = checkpoint.read_meta(params_dir)
  params = _lora_params(params_dir, config, model, meta) if meta.get("lora") else host_params(params_dir)
  base, _ = hf_convert.split_lora(params)
  shapes = {k: tuple(np.shape(v)) for k, v in hf_convert.flatten(base).items()}
  want = hf_convert.param_shapes(model)
  if shapes != want:
    wrong = sorted(k for k in set(shapes) & set(want) if shapes[k] != want[k])
    raise ConversionError(f"parameters in {params_dir} do not match its config.model: missing "
                          f"{sorted(set(want) - set(shapes))[:8]}, unexpected {sorted(set(shapes) - set(want))[:8]}, "
                          f"other shapes {wrong[:8]}")
  return params, model, config


def host_params(params_dir: pathlib.Path) -> dict:
  """A saved `params` item as a nested dict of numpy arrays, restored by this one process onto one device
  (never a multi-process save: checkpoints written by several processes read back here like any other)."""
  import jax
  params = checkpoint.load_on_host(params_dir)
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)


def _lora_params(params_dir: pathlib.Path, config, model: VLMConfig, meta: dict) -> dict:
  """An adapter-only LoRA checkpoint's whole tree (its recorded base with the adapters beside each kernel),
  restored by this one process onto a one-device mesh (`runtime.restore_lora` checks the base's identity)."""
  import jax

  from mirage_jax import sharding
  from mirage_jax.models.config import LoRAConfig
  from mirage_jax.train.state import model_spec
  lora_model = dataclasses.replace(model, lora=LoRAConfig.from_config(config.get("lora")))
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.local_devices()[:1])
  full = runtime.restore_lora(params_dir.parent, config, model_spec(lora_model, mesh),
                              tokenizer=meta.get("tokenizer"))
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), full)


@dataclasses.dataclass(frozen=True)
class FoundTokenizer:
  tokenizer: Tokenizer
  directory: pathlib.Path


def _dataset_tokenizer_dir(data) -> pathlib.Path | None:
  """The tokenizer the run's dataset recorded: `data.path/extra/tokenizer`, or the synthetic world's build
  (`<data_dir>/<world fingerprint>/.../extra/tokenizer`, built again if absent: the build is deterministic)."""
  from mirage_jax.data import synthetic, tfds_builders
  path = data.get("path", "")
  if path:
    tok_dir = tfds_builders.BuiltDataset(pathlib.Path(path)).tokenizer_dir
    return tok_dir if (tok_dir / "tokenizer.json").exists() else None
  if data.get("name") != tfds_builders.SYNTH_NAME or "world" not in data:
    return None
  world = synthetic.WorldConfig.from_dict(dict(data["world"]))
  tok_dir = tfds_builders.BuiltDataset(tfds_builders.synth_path(world, data.get("data_dir") or None)).tokenizer_dir
  if not (tok_dir / "tokenizer.json").exists():
    tok_dir = tfds_builders.build_synth(world, data.get("data_dir") or None).tokenizer_dir
  return tok_dir


def checkpoint_tokenizer(ckpt: str | pathlib.Path, config) -> FoundTokenizer | None:
  """The tokenizer belonging to a checkpoint: `<out>/tokenizer` of a converted model, else the one the run's
  dataset recorded (`config.data`). Refused when its fingerprint differs from the one the checkpoint saved."""
  ckpt = pathlib.Path(ckpt)
  tok_dir = next((p / TOKENIZER_DIR for p in (ckpt, *ckpt.absolute().parents[:4])
                  if (p / TOKENIZER_DIR / "tokenizer.json").exists()), None)
  tok_dir = tok_dir or _dataset_tokenizer_dir(config.data)
  if tok_dir is None:
    return None
  tok = Tokenizer.load(tok_dir)
  saved = checkpoint.read_meta(checkpoint.find_params_dir(ckpt)).get("tokenizer")
  if saved and saved != tok.fingerprint():
    raise ConversionError(f"{ckpt} was trained with tokenizer {saved} but {tok_dir} holds {tok.fingerprint()}: "
                          "was the dataset rebuilt with another world or vocabulary?")
  return FoundTokenizer(tokenizer=tok, directory=tok_dir)


def _write_hf_dir(params: Mapping, model: VLMConfig, config, tok: FoundTokenizer | None, out: pathlib.Path, *,
                  dtype: str, max_shard_bytes: int) -> list[str]:
  """config.json, the safetensors, the tokenizer files and preprocessor_config.json of one HF LLaVA dir."""
  out.mkdir(parents=True, exist_ok=True)
  pad = tok.tokenizer.pad_id if tok else None
  hf_convert.hf_config_from_model(model, torch_dtype=dtype, pad_token_id=pad).save_pretrained(str(out))
  files = write_hf_state(hf_convert.hf_state_from_params(params, model, dtype=dtype), out,
                         max_shard_bytes=max_shard_bytes)
  if tok:
    for f in tok.directory.iterdir():
      if f.is_file():
        shutil.copy2(f, out / f.name)
  size = model.vision.image_size
  (out / "preprocessor_config.json").write_text(json.dumps({
      "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor", "do_resize": True,
      "size": {"shortest_edge": size}, "do_center_crop": True, "crop_size": {"height": size, "width": size},
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
      "image_mean": list(config.data.image_mean), "image_std": list(config.data.image_std), "resample": 3,
  }, indent=1))
  return files


def _lora_alpha(config, ckpt, adapters: Mapping[str, hf_convert.Adapter]) -> tuple[float, float]:
  """(alpha, dropout) of a run with LoRA adapters, from its `lora` block (alpha 0 means 2 x rank: the scale
  is `LoRAConfig.scale`); the block's rank must be the adapters'."""
  from mirage_jax.models.config import LoRAConfig
  block = config.get("lora")
  lora = LoRAConfig.from_config(block.to_dict() if hasattr(block, "to_dict") else block)
  ranks = sorted({a.rank for a in adapters.values()})
  if not lora.enabled or ranks != [lora.rank]:
    raise ConversionError(f"{ckpt} holds LoRA adapters of rank {ranks} but its config has lora.rank={lora.rank}")
  return lora.resolved_alpha, lora.dropout


def jax_to_hf(ckpt: str | pathlib.Path, out: str | pathlib.Path, *, dtype: str = "float32",
              max_shard_bytes: int = 5 << 30, adapter_out: str | pathlib.Path | None = None) -> dict:
  """Write a mirage checkpoint as a transformers LLaVA directory (config, safetensors, tokenizer).

  A run with LoRA adapters is written merged (W + alpha/r * lora_a @ lora_b). `adapter_out`: also a PEFT
  adapter there (`adapter_config.json`, `adapter_model.safetensors`) with the base model it applies to, the
  run's weights without the adapters, as an HF directory in `adapter_out/base` (its
  `base_model_name_or_path`)."""
  params, model, config = load_checkpoint(ckpt)
  base, adapters = hf_convert.split_lora(params)
  if adapter_out and not adapters:
    raise UsageError(f"--adapter_out: {ckpt} has no LoRA adapters (no lora_a / lora_b parameters)")
  alpha, dropout = _lora_alpha(config, ckpt, adapters) if adapters else (0.0, 0.0)
  merged = hf_convert.merge_lora(params, alpha=alpha) if adapters else params
  tok = checkpoint_tokenizer(ckpt, config)
  out = pathlib.Path(out)
  files = _write_hf_dir(merged, model, config, tok, out, dtype=dtype, max_shard_bytes=max_shard_bytes)
  result = {"out": str(out), "files": files, "tokenizer": bool(tok), "dtype": dtype}
  if adapters:
    result["lora"] = {"adapters": len(adapters), "rank": sorted({a.rank for a in adapters.values()}),
                      "alpha": alpha, "merged": True}
  if adapter_out:
    adapter_out = pathlib.Path(adapter_out)
    base_dir = (adapter_out / "base").absolute()
    _write_hf_dir(base, model, config, tok, base_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)
    peft = hf_convert.peft_adapter(params, model, alpha=alpha, dropout=dropout, base_model=str(base_dir),
                                   dtype=dtype)
    result["adapter"] = {"out": str(adapter_out), "files": hf_convert.write_peft_adapter(peft, adapter_out),
                         "base": str(base_dir), "target_modules": peft.config["target_modules"]}
  return result
