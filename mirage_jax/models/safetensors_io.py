"""Safetensors checkpoint files with numpy only: one file or shards with an index, float32/float16 and bfloat16
(read through a memory-mapped header parser where numpy lacks the dtype, written bit for bit).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

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


def _read_raw(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Header-parsing reader for dtypes numpy lacks (BF16): memory-mapped, converted per tensor."""
  import ml_dtypes
  kinds = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  with path.open("rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in kinds:
      raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    out[name] = data[start:end].view(kinds[info["dtype"]]).reshape(info["shape"])
  return out


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file
  try:
    return load_file(str(path))
  except TypeError:  # e.g. "data type 'bfloat16' not understood"
    return _read_raw(path)


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
  if any(a.dtype.name == "bfloat16" for a in tensors.values()):  # numpy has no bf16: save the bits
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, blobs = 0, []
    for k in sorted(tensors):
      a = np.ascontiguousarray(tensors[k])
      code = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[a.dtype.name]
      header[k] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
      offset += a.nbytes
      blobs.append(a.tobytes())
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
      f.write(len(text).to_bytes(8, "little") + text)
      for b in blobs:
        f.write(b)
    return
  save_file(dict(tensors), str(path), metadata={"format": "pt"})


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
