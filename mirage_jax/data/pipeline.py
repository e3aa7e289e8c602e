"""grain pipelines: infinite, deterministic, checkpointable batch streams over mixtures of dataset splits.

A stream is `config.data.streams.<name>`: a mixture spec such as `"pretrain"`, `"pretrain,sft"` (mixed in
proportion to the splits' sizes, i.e. concatenated) or `"sft:0.7,helpfulness:0.3"` (explicit weights). Each
split is shuffled per epoch and repeated forever, so a stream never runs dry (the official code's silent
zero-loss bug). Each process reads only its own slice of every global batch; its iterator state (grain's
`next_index`) is saved in checkpoints, so a resumed run sees exactly the batches it would have seen.
Small splits are preprocessed once and held in memory (`data.cache`), which keeps the CPU demo fast.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np

from mirage_configs import comma_list
from mirage_jax import seeds, sharding
from mirage_jax.data import preprocess, synthetic, tfds_builders
from mirage_jax.data.tfds_builders import BuiltDataset
from mirage_jax.data.tokenizer import Tokenizer
from mirage_jax.errors import ConfigError, DataError

MODEL_KEYS = ("tokens", "mask", "loss_mask", "query_mask", "images")  # + "row": the record's index


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
  split: str
  weight: float | None  # None = proportional to the split's size


def parse_mixture(spec: str) -> tuple[MixtureEntry, ...]:
  entries = []
  for part in comma_list(spec):
    name, _, w = part.partition(":")
    try:
      weight = float(w) if w else None
    except ValueError:
      raise ConfigError(f"bad mixture entry {part!r} in {spec!r}: weight must be a number") from None
    if weight is not None and weight <= 0:
      raise ConfigError(f"bad mixture entry {part!r} in {spec!r}: weight must be positive")
    entries.append(MixtureEntry(name.strip(), weight))
  if not entries:
    raise ConfigError(f"empty mixture spec {spec!r}")
  if len({e.weight is None for e in entries}) > 1:
    raise ConfigError(f"mixture {spec!r}: give a weight to every split or to none")
  return tuple(entries)


class SplitCache:
  """Preprocessed training examples per split, shared by every stream of a run."""

  def __init__(self, dataset: BuiltDataset, tok: Tokenizer, fmt: preprocess.TextFormat, *, cache: bool = True):
    self.dataset, self.tok, self.fmt, self.cache = dataset, tok, fmt, cache
    self._examples: dict[str, Any] = {}

  def records(self, split: str):
    return self.dataset.source(split)

  def examples(self, split: str) -> grain.MapDataset:
    """A MapDataset of preprocessed examples (model arrays only)."""
    if not self.cache:
      return grain.MapDataset.source(self.records(split)).map_with_index(
          lambda i, rec: {**{k: v for k, v in self._preprocess(rec).items() if k in MODEL_KEYS},
                          "row": np.int32(i)})
    if split not in self._examples:
      src = self.records(split)
      rows = [self._preprocess(src[i]) for i in range(len(src))]
      stacked = {k: np.stack([r[k] for r in rows]) for k in MODEL_KEYS}
      stacked["row"] = np.arange(len(rows), dtype=np.int32)
      truncated = sum(int(r["truncated"]) for r in rows)
      if truncated:
        logging.warning("split %s: %d of %d answers truncated to data.max_len=%d", split, truncated, len(rows),
                        self.fmt.max_len)
      self._examples[split] = stacked
    stacked = self._examples[split]
    n = len(stacked["tokens"])
    return grain.MapDataset.range(n).map(lambda i: {k: v[i] for k, v in stacked.items()})

  def _preprocess(self, rec: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return preprocess.training_example(rec, self.tok, self.fmt)


NO_PREFETCH = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)  # batches assembled in the caller's thread


def read_options(data: Mapping[str, Any]) -> grain.ReadOptions:
  """grain's prefetch of a training stream from the `config.data` block (`prefetch_batches` batches
  assembled ahead by `read_threads` threads; either 0 = none, batches are then assembled in the step's
  thread)."""
  values = {}
  for key in ("prefetch_batches", "read_threads"):
    v = data.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ConfigError(f"data.{key}={v!r}: expected an integer >= 0 (0 = no prefetch)")
    values[key] = v
  if not (values["prefetch_batches"] and values["read_threads"]):
    return NO_PREFETCH
  return grain.ReadOptions(num_threads=values["read_threads"], prefetch_buffer_size=values["prefetch_batches"])


class Stream:
  """An infinite iterator of local batches (dicts of numpy arrays) from a mixture of splits, assembled
  ahead as `read` says (`read_options`); `close` stops the threads that do it."""

  def __init__(self, *, name: str, mixture: str, splits: SplitCache, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1, read: grain.ReadOptions | None = None):
    if global_batch % process_count:
      raise ConfigError(f"batch size {global_batch} is not divisible by the {process_count} processes")
    self.name = name
    self.mixture = parse_mixture(mixture)
    datasets, sizes = [], []
    for e in self.mixture:
      ds = splits.examples(e.split)
      sizes.append(len(ds))
      if not len(ds):
        raise DataError(f"stream {name!r}: split {e.split!r} is empty")
      datasets.append(ds.shuffle(seed=seeds.derive(seed, e.split)).repeat(None))
    weights = [e.weight if e.weight is not None else float(n) for e, n in zip(self.mixture, sizes)]
    ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    if process_count > 1:
      ds = ds.slice(slice(process_index, None, process_count))
    self._dataset = ds.batch(global_batch // process_count, drop_remainder=True)
    self._iter = iter(self._dataset.to_iter_dataset(read or NO_PREFETCH))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def get_state(self) -> dict[str, Any]:
    return dict(self._iter.get_state())

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._iter.set_state(dict(state))

  def close(self) -> None:
    """Cancel the batches being assembled ahead and stop their threads (without waiting for them)."""
    close = getattr(self._iter, "close", None)
    if close is not None:
      close()


def to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Process-local batch -> global arrays sharded over the mesh's batch axes."""
  shardings = {k: sharding.batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}
  if jax.process_count() == 1:
    return jax.device_put(dict(batch), shardings)
  return {k: jax.make_array_from_process_local_data(shardings[k], v, (v.shape[0] * jax.process_count(),
                                                                     *v.shape[1:]))
          for k, v in batch.items()}


def abstract_batches(config, *, streams: tuple[str, ...], image_size: int, mesh) -> dict:
  """Global-batch ShapeDtypeStructs (with shardings) of each stream: what the train step receives."""
  b, t = config.batch_size, config.data.max_len
  shapes = {"tokens": (b, t), "mask": (b, t), "loss_mask": (b, t), "query_mask": (b, t), "row": (b,),
            "images": (b, image_size, image_size, 3)}
  one = {k: jax.ShapeDtypeStruct(s, np.float32 if k == "images" else np.int32,
                                 sharding=sharding.batch_sharding(mesh, len(s))) for k, s in shapes.items()}
  return {name: dict(one) for name in streams}


def eval_batches(examples: grain.MapDataset, batch_size: int, *, max_batches: int | None = None):
  """Finite sequential batches over a split; the last batch is padded with `weight` = 0 rows."""
  n = len(examples)
  stop = n if max_batches is None else min(n, max_batches * batch_size)
  for start in range(0, stop, batch_size):
    rows = [examples[i] for i in range(start, min(start + batch_size, stop))]
    weight = np.ones((batch_size,), np.float32)
    weight[len(rows):] = 0
    rows += [rows[-1]] * (batch_size - len(rows))
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["weight"] = weight
    yield batch


@dataclasses.dataclass(frozen=True)
class Data:
  dataset: BuiltDataset
  tokenizer: Tokenizer


def open_data(data: Mapping[str, Any]) -> Data:
  """The dataset a config names (`data.path`, or the synthetic world `data.world`, built on first use)."""
  if data.get("path"):
    dataset = tfds_builders.open_dataset(data["path"])
  elif data["name"] == tfds_builders.SYNTH_NAME:
    world = synthetic.WorldConfig.from_dict(dict(data["world"]))
    dataset = tfds_builders.build_synth(world, data.get("data_dir") or None)
  else:
    raise ConfigError(f"data.name={data['name']!r}: set data.path to a built dataset directory "
                     f"(only {tfds_builders.SYNTH_NAME!r} is built automatically)")
  return Data(dataset=dataset, tokenizer=Tokenizer.load(dataset.tokenizer_dir))


def split_digest(data: Mapping[str, Any], split: str) -> str:
  """The digest the build recorded for `split` of the dataset `data` (a config's `data` block) names, built on
  first use: sha256 of the world's vocabulary and the split's questions, answers and image bytes
  (`tfds_builders.split_digest`). Equal `pretrain` digests mean an identical base model would be trained."""
  return open_data(data).dataset.split_digest(split)
