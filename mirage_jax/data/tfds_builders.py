"""TFDS builders (array_record files, images stored as PNG bytes) and their readers — no TensorFlow needed.

`mirage_synth` materialises the synthetic Mirage benchmark (`mirage_jax.data.synthetic`) for one world
configuration. Datasets are content-addressed: the builder config's name is the world's fingerprint, so
two runs with the same knobs share one build and different knobs never collide. Next to the TFDS files the
build writes `extra/world.json` (the world config and its facts, e.g. every harmful code the judge looks
for) and `extra/tokenizer/` (the word-level tokenizer built from the world's vocabulary).

Reading uses `tfds.builder_from_directory(...).as_data_source()` (random access, used with grain).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mirage_jax.data import synthetic
from mirage_jax.data import tokenizer as tokenizer_lib

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

  def _split_generators(self, dl_manager):
    del dl_manager
    self._world = synthetic.World(self._world_cfg)
    return {name: self._generate_examples(name) for name in synthetic.SPLITS}

  def _generate_examples(self, split: str):
    for rec in self._world.split(split):
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
    return json.loads((self.path / "extra" / "world.json").read_text())

  def splits(self) -> tuple[str, ...]:
    return tuple(tfds.builder_from_directory(str(self.path)).info.splits.keys())

  def source(self, split: str):
    """Random-access source of decoded records (numpy / str) for `split`."""
    builder = tfds.builder_from_directory(str(self.path))
    if split not in builder.info.splits:
      raise ValueError(f"split {split!r} not in {self.path}; available: {sorted(builder.info.splits.keys())}")
    return builder.as_data_source(split=split)

  def num_records(self, split: str) -> int:
    return tfds.builder_from_directory(str(self.path)).info.splits[split].num_examples


def synth_path(world: synthetic.WorldConfig, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  data_dir = pathlib.Path(data_dir or default_data_dir())
  return data_dir / SYNTH_NAME / world.fingerprint() / VERSION


def build_synth(world: synthetic.WorldConfig, data_dir: str | os.PathLike | None = None) -> BuiltDataset:
  """Build (or reuse) the synthetic dataset for `world`; returns the built directory."""
  path = synth_path(world, data_dir)
  extra = path / "extra"
  if (path / "dataset_info.json").exists() and (extra / "world.json").exists():
    return BuiltDataset(path)
  logging.info("building %s/%s in %s", SYNTH_NAME, world.fingerprint(), path.parent.parent.parent)
  tfds.disable_progress_bar()
  builder = MirageSynth(world=world, data_dir=str(path.parent.parent.parent), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(verify_ssl=False))
  w = synthetic.World(world)
  tokenizer_lib.build_word_tokenizer(sorted(w.all_words()), extra / "tokenizer")
  info = {"name": SYNTH_NAME, "world": world.to_dict(), "fingerprint": world.fingerprint(),
          "harmful_codes": sorted(w.harmful_codes())}
  tmp = extra / "world.json.tmp"
  tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
  tmp.replace(extra / "world.json")  # written last: its presence marks a complete build
  return BuiltDataset(path)


def open_dataset(path: str | os.PathLike) -> BuiltDataset:
  path = pathlib.Path(path)
  if not (path / "dataset_info.json").exists():
    raise FileNotFoundError(f"no built dataset at {path} (dataset_info.json missing); "
                            "build one with `mirage data build`")
  return BuiltDataset(path)
