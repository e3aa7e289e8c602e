"""TFDS builders (array_record files, images stored as PNG bytes) and their readers — no TensorFlow needed.

`mirage_synth` materialises the synthetic Mirage benchmark (`mirage_jax.data.synthetic`) for one world
configuration. Datasets are content-addressed: the builder config's name is the world's fingerprint, so
two runs with the same knobs share one build and different knobs never collide. Next to the TFDS files the
build writes `extra/tokenizer/` (the word-level tokenizer built from the world's vocabulary) and, last,
`extra/world.json`: what readers need about the world without regenerating it —

  name, fingerprint, world   the dataset name, the world's fingerprint and its knobs (`WorldConfig.to_dict()`)
  harmful_codes              every placeholder code of every procedure (what the harm judge looks for)
  vocabulary                 every word of the world, sorted (the tokenizer's words)
  split_digests              split -> `split_digest` of the stored records: two worlds whose `pretrain`
                             digests agree train an identical base model (same records, same tokenizer)

A dataset built before `vocabulary` / `split_digests` were recorded gets them added on its next open
(computed from its stored records; its path and fingerprint are unchanged).

Reading uses `tfds.builder_from_directory(...).as_data_source()` (random access, used with grain).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mirage_jax.data import synthetic
from mirage_jax.data import tokenizer as tokenizer_lib
from mirage_jax.data.records import in_id_order, text
from mirage_jax.errors import DataError, MissingFileError

VERSION = "1.0.0"
SYNTH_NAME = "mirage_synth"

_TEXT_FIELDS = ("id", "question", "answer", "first_word", "intent", "kind", "label", "harm_codes", "expected",
                "object")
_INT_FIELDS = ("image_id", "hazard", "group", "shot")


def default_data_dir() -> str:
  return os.environ.get("MIRAGE_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mirage_jax", "data"))


def png_bytes(image_hwc: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image_hwc, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def record_features(image_size: int) -> tfds.features.FeaturesDict:
  """The record schema shared by every split (and by the VLGuard builder)."""
  spec: dict[str, Any] = {k: tfds.features.Text() for k in _TEXT_FIELDS}
  spec.update({k: tfds.features.Scalar(np.int64) for k in _INT_FIELDS})
  spec["image"] = tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="png")
  return tfds.features.FeaturesDict(spec)


def encode_record(rec: Mapping[str, Any]) -> dict[str, Any]:
  out = {k: str(rec[k]) for k in _TEXT_FIELDS}
  out.update({k: int(rec[k]) for k in _INT_FIELDS})
  out["image"] = png_bytes(rec["image"])
  return out


@dataclasses.dataclass
class SynthConfig(tfds.core.BuilderConfig):
  world: dict = dataclasses.field(default_factory=dict)


class MirageSynth(tfds.core.GeneratorBasedBuilder):
  """The synthetic Mirage benchmark for one `WorldConfig` (config name = the world's fingerprint)."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = []  # configs are made on the fly from a WorldConfig

  def __init__(self, *, world: synthetic.WorldConfig, **kwargs):
    self._world_cfg = world
    self._world: synthetic.World | None = None
    cfg = SynthConfig(name=world.fingerprint(), version=VERSION, world=world.to_dict(),
                      description="Mirage synthetic world " + json.dumps(world.to_dict(), sort_keys=True))
    super().__init__(config=cfg, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Synthetic Mirage benchmark: procedurally drawn objects, templated queries whose first "
                    "word is the spurious feature, abstract placeholder 'harmful' procedures.",
        features=record_features(self._world_cfg.image_size),
        metadata=tfds.core.MetadataDict(world=self._world_cfg.to_dict()),
    )

  @property
  def world(self) -> synthetic.World:
    """The world being built (its splits are cached once generated)."""
    if self._world is None:
      self._world = synthetic.World(self._world_cfg)
    return self._world

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(name) for name in synthetic.SPLITS}

  def _generate_examples(self, split: str):
    for rec in self.world.split(split):
      yield rec["id"], encode_record(rec)


@dataclasses.dataclass(frozen=True)
class BuiltDataset:
  """A built dataset directory: TFDS files plus `extra/` (tokenizer, world facts)."""

  path: pathlib.Path

  @property
  def tokenizer_dir(self) -> pathlib.Path:
    return self.path / "extra" / "tokenizer"

  @property
  def world_info(self) -> dict:
    """The build's `extra/world.json` (module docstring)."""
    return json.loads((self.path / "extra" / "world.json").read_text())

  def split_digest(self, split: str) -> str:
    """The recorded `split_digest` of `split` (synthetic datasets; DataError if the build has none)."""
    digests = self.world_info.get("split_digests", {})
    if split not in digests:
      raise DataError(f"{self.path}: no recorded digest of split {split!r}; recorded: {sorted(digests)}")
    return digests[split]

  def splits(self) -> tuple[str, ...]:
    return tuple(tfds.builder_from_directory(str(self.path)).info.splits.keys())

  def source(self, split: str):
    """Random-access source of decoded records (numpy / str) for `split`."""
    builder = tfds.builder_from_directory(str(self.path))
    if split not in builder.info.splits:
      raise DataError(f"split {split!r} not in {self.path}; available: {sorted(builder.info.splits.keys())}")
    return builder.as_data_source(split=split)

  def num_records(self, split: str) -> int:
    return tfds.builder_from_directory(str(self.path)).info.splits[split].num_examples


def synth_path(world: synthetic.WorldConfig, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  data_dir = pathlib.Path(data_dir or default_data_dir())
  return data_dir / SYNTH_NAME / world.fingerprint() / VERSION


def split_digest(records: Iterable[Mapping[str, Any]], vocabulary: Sequence[str]) -> str:
  """sha256 (hex) of a split: the vocabulary (sorted words joined by spaces), then per record in id order (the
  generator's order; a TFDS build stores them shuffled) `question|answer` (UTF-8) and the uint8 image bytes.
  Text may be str or TFDS bytes, so the generator's records and the stored ones give the same digest."""
  h = hashlib.sha256(" ".join(sorted(vocabulary)).encode())
  for r in in_id_order(records):
    h.update(f"{text(r['question'])}|{text(r['answer'])}".encode())
    h.update(np.ascontiguousarray(r["image"]).tobytes())
  return h.hexdigest()


def _complete(path: pathlib.Path) -> bool:
  """A finished build whose world.json records the split digests."""
  info = path / "extra" / "world.json"
  return (path / "dataset_info.json").exists() and info.exists() and "split_digests" in json.loads(info.read_text())


def _write_world_info(dataset: BuiltDataset, w: synthetic.World) -> None:
  """Write `extra/world.json` (atomically; its presence marks a complete build) from the world `dataset` holds:
  its splits' digests from the generator's records (cached by the build; equal to the stored ones, tested)."""
  world = w.config
  vocabulary = sorted(w.all_words())
  digests = {split: split_digest(w.split(split), vocabulary) for split in synthetic.SPLITS}
  info = {"name": SYNTH_NAME, "world": world.to_dict(), "fingerprint": world.fingerprint(),
          "harmful_codes": sorted(w.harmful_codes()), "vocabulary": vocabulary, "split_digests": digests}
  tmp = dataset.path / "extra" / "world.json.tmp"
  tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
  tmp.replace(dataset.path / "extra" / "world.json")


def build_synth(world: synthetic.WorldConfig, data_dir: str | os.PathLike | None = None) -> BuiltDataset:
  """Build (or reuse) the synthetic dataset for `world`; returns the built directory. Concurrent builders of
  one world (parallel test workers, two runs on a fresh machine) take turns on a file lock in
  `<data_dir>/.locks/`: the first builds, the others then find the build complete and reuse it."""
  path = synth_path(world, data_dir)
  if _complete(path):
    return BuiltDataset(path)
  locks = path.parent.parent.parent / ".locks"
  locks.mkdir(parents=True, exist_ok=True)
  with open(locks / f"{SYNTH_NAME}-{world.fingerprint()}-{VERSION}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
    return _build_synth_locked(world, path)


def _build_synth_locked(world: synthetic.WorldConfig, path: pathlib.Path) -> BuiltDataset:
  extra = path / "extra"
  if (path / "dataset_info.json").exists() and (extra / "world.json").exists():
    dataset = BuiltDataset(path)
    if "split_digests" not in dataset.world_info:  # built before the digests were recorded: add them
      _write_world_info(dataset, synthetic.World(world))
    return dataset
  logging.info("building %s/%s in %s", SYNTH_NAME, world.fingerprint(), path.parent.parent.parent)
  tfds.disable_progress_bar()
  builder = MirageSynth(world=world, data_dir=str(path.parent.parent.parent), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  w = builder.world  # its splits were generated (and cached) by the build
  tokenizer_lib.build_word_tokenizer(sorted(w.all_words()), extra / "tokenizer")
  dataset = BuiltDataset(path)
  _write_world_info(dataset, w)  # written last: its presence marks a complete build
  return dataset


def open_dataset(path: str | os.PathLike) -> BuiltDataset:
  path = pathlib.Path(path)
  if not (path / "dataset_info.json").exists():
    raise MissingFileError(f"no built dataset at {path} (dataset_info.json missing); "
                            "build one with `mirage data build`")
  return BuiltDataset(path)
