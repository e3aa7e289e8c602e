"""Safetensors checkpoint files with numpy only: one file or shards with an index, float32/float16 and bfloat16.

Reading and writing go through the `safetensors` package's numpy API, which handles BF16 as
`ml_dtypes.bfloat16` since 0.4.1 (`install_requires` asks for `safetensors>=0.4.1` and `ml_dtypes`), so no
header parser of our own is needed.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator, Mapping

import numpy as np

from mirage_jax.errors import CheckpointError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


class ConversionError(CheckpointError):
  """A checkpoint or config that cannot be converted (reported as one line by the CLI)."""


def numpy_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  if name not in ("float32", "float16"):
    raise ConversionError(f"unsupported dtype {name!r} (float32, float16 or bfloat16)")
  return np.dtype(name)


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  return load_file(str(path))


def weight_files(hf_dir: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint directory (one file, or the shards of an index)."""
  if (hf_dir / SAFETENSORS_INDEX).exists():
    index = json.loads((hf_dir / SAFETENSORS_INDEX).read_text())
    files = sorted(set(index.get("weight_map", {}).values()))
    missing = [f for f in files if not (hf_dir / f).exists()]
    if not files or missing:
      raise FileNotFoundError(f"{hf_dir / SAFETENSORS_INDEX} names shards that are missing: {missing or 'none'}")
    return [hf_dir / f for f in files]
  if (hf_dir / SAFETENSORS).exists():
    return [hf_dir / SAFETENSORS]
  found = sorted(p.name for p in hf_dir.glob("*.bin"))
  raise FileNotFoundError(f"no {SAFETENSORS} or {SAFETENSORS_INDEX} in {hf_dir}" +
                          (f" (found {found}: PyTorch pickles are not read; re-save with safetensors)" if found
                           else ""))


def read_hf_state(hf_dir: str | pathlib.Path) -> dict[str, np.ndarray]:
  state: dict[str, np.ndarray] = {}
  for path in weight_files(pathlib.Path(hf_dir)):
    for k, v in read_safetensors(path).items():
      if k in state:
        raise ConversionError(f"tensor {k!r} is stored in two shards")
      state[k] = v
  return state


def _shards(state: Mapping[str, np.ndarray], max_bytes: int) -> Iterator[dict[str, np.ndarray]]:
  shard, size = {}, 0
  for k in sorted(state):
    if shard and size + state[k].nbytes > max_bytes:
      yield shard
      shard, size = {}, 0
    shard[k] = state[k]
    size += state[k].nbytes
  if shard:
    yield shard


def _save_file(tensors: Mapping[str, np.ndarray], path: pathlib.Path) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def write_hf_state(state: Mapping[str, np.ndarray], out: pathlib.Path, *, max_shard_bytes: int) -> list[str]:
  """`model.safetensors`, or shards + `model.safetensors.index.json` above `max_shard_bytes`."""
  shards = list(_shards(state, max_shard_bytes))
  if len(shards) == 1:
    _save_file(shards[0], out / SAFETENSORS)
    return [SAFETENSORS]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    _save_file(shard, out / name)
    weight_map.update({k: name for k in shard})
  total = sum(a.nbytes for a in state.values())
  (out / SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                   "weight_map": weight_map}, indent=1))
  return names
