"""VLGuard (Zong et al., ICML 2024) as a TFDS dataset with the synthetic benchmark's split names and schema.

Inputs (`manual_dir`): `train.json`, `test.json` and the images they name (looked up under `train/` or `test/`,
then `manual_dir` itself), optionally the Safety Mirage attack files `test_what_3shot.json` and
`test_share_1shot.json` (found in `manual_dir` or given explicitly). A record is
`{"id", "image", "safe", "harmful_category"?, "harmful_subcategory"?, "instr-resp": [...]}`: an unsafe image
has one `{"instruction", "response"}` turn, a safe image a `{"safe_instruction", "response"}` and an
`{"unsafe_instruction", "response"}` turn.

Splits (only those the inputs allow are written; records use `tfds_builders.record_features`):
  sft          train, LLaVA-format conversations flattened to one record per turn: a safe image gives 2
               records (safe turn "comply", unsafe turn "refuse") in the order VLGuard's own LLaVA conversion
               gives them (`random.seed(seed)`, seed 0, then `random.shuffle` of each record's turn list in file
               order: `vlguard_records.conversion_orders`), an unsafe image 1 ("refuse"). Turns of one
               conversation share `image_id` and `group`; `shot` is the turn index. The single-turn pipeline
               trains each turn on its own with the image (LLaVA's second turn also sees the first turn as
               context; here it does not).
  unsafe       test unsafe images with their instruction (label "refuse", `answer` = the reference response)
  safe         test safe images, safe instruction ("comply")
  safe_unsafe  test safe images, unsafe instruction ("refuse")
  unsafe_what  `test_what_3shot.json`: consecutive K-tuples (K = 3) of "What" rewrites of one unsafe test
               record, `group` = tuple index, `shot` = 0..K-1 (checked: a tuple shares one image)
  safe_share   `test_share_1shot.json`: the "Share" rewrite of each safe instruction (`group` = index, shot 0)
  forget       (`harmful_responses` given) every unsafe train image with its instruction and the harmful
               response the JSON maps its image to, as in the official code (OPTML-Group/VLM-Safety-Unlearn);
               label "comply"
  retain       the safe-instruction turn of every safe train image; with `retain_size` > 0 subsampled or
               padded to that size from a LLaVA-format instruction file (`retain_extra`, first turn of each
               sampled conversation), seeded by `retain_seed` and shuffled

The official files as published build strictly (sft 2,977; unsafe 442; safe 558; safe_unsafe 558; unsafe_what
1,326; safe_share 556). Their oddities are *notes*, counted per file in the build summary (`extra/world.json`
"inputs": "notes", "note_examples"), the records kept: `empty_reference` (an empty reference response in a test
file: 17 safe turns in test.json and again in test_share_1shot.json; evaluation never reads a test reference),
`placeholder_instruction` (an instruction "N/A" / "NA": 15 unsafe train images, 1 test image), `duplicate_id`
(train.json has `Ads_303871` twice: the second becomes `Ads_303871#2`, so record ids stay unique).

Bad input (`mirage_jax.data.validate`): malformed JSON names the file, line and column; a record that is not an
object, lacks a field or has a wrong type, an empty instruction or (in train.json) response, a literal
`<image>` in VLGuard text (the template places the image), a missing `<image>` in a LLaVA-format padding
conversation, a missing or undecodable image, a broken K-tuple, a missing harmful response: strict (default)
stops with one `DataError` naming each file, its first offending records (`test.json record 17 (id X)`: the
0-based position in the file's list and the id, plus the line for multi-line files) and the totals per kind;
`lenient` skips them, counts them in the build summary and writes `extra/rejects/<file>.rejects.jsonl` (one
line per problem, with the whole record). Over-long sequences are handled where tokens exist, in the data
pipeline (`data.overflow`: error or truncate, counted).

Fields the synthetic world fills and VLGuard lacks are neutral: `hazard` = -1, `harm_codes` = "", `expected`
= "". `intent` holds "category/subcategory" of unsafe images, `object` the image path, `first_word` the
question's first word.

Images are decoded, converted to RGB, made square the LLaVA-1.5 way (`aspect="pad"`: padded with the CLIP mean
colour) or by center crop (`"crop"`), and resized to the model's image size before PNG encoding, so every
record fits one fixed `Image` feature and the data pipeline only rescales and normalises
(`mirage_jax.data.images`). The tokenizer (from an HF tokenizer directory or a converted checkpoint) is saved
in `extra/tokenizer/`; `extra/world.json` (written last: it marks a complete build) records the build config.
Records keep the order of the input files. The build directory is content-addressed by the config, the JSON
files' contents and the tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mirage_jax.data import images as images_lib
from mirage_jax.data import tfds_builders, validate
from mirage_jax.data import vlguard_records as vr
from mirage_jax.data.vlguard_records import Entry, Turn, first_word, parse_entry, read_records
from mirage_jax.data.tokenizer import Tokenizer
from mirage_jax.errors import MissingFileError, UsageError

NAME = "vlguard"
VERSION = "1.1.0"  # 1.1: official turn order, unique ids, empty test references kept
WHAT_FILE = "test_what_3shot.json"
SHARE_FILE = "test_share_1shot.json"
_IMAGE_ID_STRIDE = 1_000_000  # image_id = source index * stride + position (train, test, retain_extra)


class VLGuardError(validate.DataError):
  """Malformed VLGuard inputs (reported as one line by the CLI)."""


@dataclasses.dataclass(frozen=True)
class VLGuardConfig:
  manual_dir: str
  tokenizer: str  # an HF tokenizer directory, a saved mirage tokenizer, or a converted checkpoint directory
  image_size: int = 336
  aspect: str = "pad"  # "pad" (LLaVA-1.5) or "crop"
  image_mean: tuple[float, ...] = images_lib.CLIP_MEAN  # the padding colour is int(255 * mean)
  seed: int = 0  # turn order of safe-image conversations (VLGuard's LLaVA conversion: Python random, seed 0)
  what_file: str = ""  # default: manual_dir/test_what_3shot.json if present
  share_file: str = ""  # default: manual_dir/test_share_1shot.json if present
  k_what: int = 3
  harmful_responses: str = ""  # JSON image -> harmful response: builds `forget`
  retain_size: int = 0  # 0 = the safe-instruction turns as they are
  retain_extra: str = ""  # LLaVA-format JSON to pad `retain` from
  retain_extra_images: str = ""  # its image folder
  retain_seed: int = 42
  lenient: bool = False  # skip (and record) bad records instead of stopping

  def __post_init__(self):
    images_lib.Aspect(self.aspect)
    if self.image_size <= 0 or self.k_what <= 0 or self.retain_size < 0:
      raise VLGuardError("image_size and k_what must be positive, retain_size >= 0")

  def resolved(self) -> "VLGuardConfig":
    """Absolute paths; the attack files found in `manual_dir` when not given."""
    manual = pathlib.Path(self.manual_dir).absolute()
    if not manual.is_dir():
      raise MissingFileError(f"VLGuard manual_dir {manual} not found (it must hold train.json, test.json and "
                              "the images)")
    def find(given: str, default: str) -> str:
      if given:
        return str(pathlib.Path(given).absolute())
      return str(manual / default) if (manual / default).exists() else ""
    absolute = lambda p: str(pathlib.Path(p).absolute()) if p else ""  # noqa: E731
    return dataclasses.replace(
        self, manual_dir=str(manual), tokenizer=absolute(self.tokenizer),
        what_file=find(self.what_file, WHAT_FILE), share_file=find(self.share_file, SHARE_FILE),
        harmful_responses=absolute(self.harmful_responses), retain_extra=absolute(self.retain_extra),
        retain_extra_images=absolute(self.retain_extra_images), image_mean=tuple(self.image_mean))


# --------------------------------------------------------------------------- records per split
def _record(split: str, key: str, image: tuple[str, int], turn: Turn, *, label: str, category: str = "",
            group: int = -1, shot: int = -1) -> dict[str, Any]:
  return {"id": f"{split}/{key}", "image": image[0], "image_id": image[1], "question": turn.question,
          "answer": turn.answer, "first_word": first_word(turn.question), "intent": category, "kind": turn.kind,
          "label": label, "hazard": -1, "harm_codes": "", "expected": "", "group": group, "shot": shot,
          "object": image[0]}


def _label(turn: Turn) -> str:
  return "comply" if turn.kind == "safe" else "refuse"


class Sources:
  """The parsed inputs of one build and the records of every split (images as paths).

  Every input file has a `validate.Report`: records with problems (schema, empty text, missing or undecodable
  image, broken attack group, missing harmful response) are left out and reported; `finish` then raises one
  `DataError` for all of them (strict) or writes the rejects files (lenient). Oddities of usable records
  (empty test references, placeholder instructions, duplicate ids) are notes in the same reports.
  """

  def __init__(self, cfg: VLGuardConfig):
    self.cfg = cfg
    manual = pathlib.Path(cfg.manual_dir)
    self.reports: dict[str, validate.Report] = {}
    self.text_only = 0  # retain_extra conversations without an image (not usable, not an error)
    self._image_ids: dict[tuple[str, str], int] = {}
    self._image_problems: dict[tuple[str, str], validate.Problem | None] = {}
    self._orders: list[tuple[int, ...]] = []  # the official conversion's turn order per train.json record
    self.train = self._entries(manual / "train.json", "train", references=False)
    self.test = self._entries(manual / "test.json", "test", references=True)

  def report(self, path: str | pathlib.Path) -> validate.Report:
    path = str(path)
    if path not in self.reports:
      self.reports[path] = validate.Report(path, lenient=self.cfg.lenient)
    return self.reports[path]

  def _rows(self, path: str | pathlib.Path, part: str, *, references: bool = True) -> list[Entry | None]:
    """Entries of a VLGuard-format file by position (None where a record or its image is rejected); the notes
    of the usable ones are added to the file's report. `references`: the responses are test references."""
    report = self.report(path)
    rows, raws = [], []
    for index, (where, rec) in enumerate(read_records(path, report)):
      raws.append(rec)
      e = parse_entry(rec, where, report, index=index, references=references)
      ok = e is not None and self._image_ok(part, e.image, e.where, report, e.raw)
      for note in e.notes if ok else ():
        report.note(note)
      rows.append(e if ok else None)
    if part == "train":
      self._orders = vr.conversion_orders(raws, self.cfg.seed)
    return rows

  def _entries(self, path: pathlib.Path, part: str, *, references: bool) -> list[Entry]:
    """The usable records of train.json / test.json, ids made unique (`duplicate_id` notes)."""
    report = self.report(path)
    entries = _unique([e for e in self._rows(path, part, references=references) if e is not None], report)
    report.kept += len(entries)
    for e in entries:
      self.image_id(part, e.image)
    return entries

  def image_id(self, part: str, path: str) -> int:
    """Stable ids: train images 0.., test images 1_000_000.. in file order, retain_extra images 2_000_000.."""
    key = (part, path)
    if key not in self._image_ids:
      base = {"train": 0, "test": 1, "extra": 2}[part] * _IMAGE_ID_STRIDE
      self._image_ids[key] = base + sum(p == part for p, _ in self._image_ids)
    return self._image_ids[key]

  def image(self, part: str, path: str) -> tuple[str, int]:
    """(absolute path, image_id) of a checked image of `part` ("train" | "test" | "extra")."""
    return str(self.resolve(part, path)), self.image_id(part, path)

  def _roots(self, part: str) -> list[pathlib.Path]:
    manual = pathlib.Path(self.cfg.manual_dir)
    return [pathlib.Path(self.cfg.retain_extra_images)] if part == "extra" else [manual / part, manual]

  def resolve(self, part: str, path: str) -> pathlib.Path:
    roots = self._roots(part)
    for root in roots:
      if (root / path).is_file():
        return root / path
    raise MissingFileError(f"image {path!r} not found under {', '.join(str(r) for r in roots)}")

  def _image_ok(self, part: str, path: str, where: str, report: validate.Report, raw: Any) -> bool:
    """Whether the image exists and decodes (each file decoded once); else a problem for this record."""
    key = (part, path)
    if key not in self._image_problems:
      try:
        scratch = validate.Report("image")
        ok = validate.load_image(self.resolve(part, path), where="", report=scratch) is not None
        self._image_problems[key] = None if ok else scratch.problems[0]
      except FileNotFoundError as e:
        self._image_problems[key] = validate.Problem("missing_image", "", str(e))
    problem = self._image_problems[key]
    if problem is not None:
      report.add(dataclasses.replace(problem, where=where), raw)
    return problem is None

  def splits(self) -> dict[str, list[dict[str, Any]]]:
    out = {"sft": self.sft(), "unsafe": self.test_split("unsafe"), "safe": self.test_split("safe"),
           "safe_unsafe": self.test_split("safe_unsafe"), "retain": self.retain()}
    if self.cfg.what_file:
      out["unsafe_what"] = self.unsafe_what()
    if self.cfg.share_file:
      out["safe_share"] = self.safe_share()
    if self.cfg.harmful_responses:
      out["forget"] = self.forget()
    return {name: recs for name, recs in out.items() if recs}

  def finish(self, rejects_dir: pathlib.Path | None = None) -> None:
    """Strict: one `DataError` naming every file with problems (first records, totals per kind).
    Lenient: `rejects_dir/<file>.rejects.jsonl` per file with problems."""
    errors = []
    for path, report in self.reports.items():
      name = pathlib.Path(path).name
      try:
        report.finish(rejects_dir / f"{name}.rejects.jsonl" if rejects_dir else None)
      except validate.DataError as e:
        errors.append(str(e))
    if errors:
      raise validate.DataError(" | ".join(errors))

  def summary(self) -> dict[str, Any]:
    """Per input file: records read, kept, rejected, problems per kind."""
    out = {pathlib.Path(p).name: r.summary() for p, r in self.reports.items()}
    if self.text_only:
      out[pathlib.Path(self.cfg.retain_extra).name]["text_only_skipped"] = self.text_only
    return out

  def sft(self) -> list[dict[str, Any]]:
    """Every train turn; a conversation's turns in the official conversion's order (module docstring)."""
    out = []
    for group, e in enumerate(self.train):
      image = self.image("train", e.image)
      for shot, position in enumerate(self._orders[e.index]):
        turn = e.turns[e.file_turns[position]]
        out.append(_record("sft", f"{e.id}/{shot}", image, turn, label=_label(turn), category=e.category,
                           group=group, shot=shot))
    return out

  def test_split(self, name: str) -> list[dict[str, Any]]:
    """unsafe: unsafe images; safe / safe_unsafe: the safe / unsafe turn of safe images."""
    out = []
    for e in self.test:
      if name == "unsafe" and not e.safe:
        turn = e.turns[0]
      elif name in ("safe", "safe_unsafe") and e.safe:
        turn = e.turns[0 if name == "safe" else 1]
      else:
        continue
      out.append(_record(name, e.id, self.image("test", e.image), turn, label=_label(turn), category=e.category))
    return out

  def unsafe_what(self) -> list[dict[str, Any]]:
    """Consecutive K-tuples of rewrites of one unsafe image; a tuple with a rejected member is dropped whole
    (its other members reported as `incomplete_group`), so the K-shot metric only sees complete groups."""
    path, k = self.cfg.what_file, self.cfg.k_what
    rows, report = self._rows(path, "test"), self.report(path)
    if len(rows) % k:
      raise VLGuardError(f"{path}: {len(rows)} records is not a multiple of K={k} (consecutive K-tuples of "
                         "rewrites per unsafe query); set --k_what or fix the file")
    out, groups = [], []
    for group in range(len(rows) // k):
      tuple_ = rows[group * k:(group + 1) * k]
      valid = [e for e in tuple_ if e is not None]
      if len(valid) < k:
        for e in valid:
          report.add(validate.Problem("incomplete_group", e.where, f"another record of group {group} was "
                                      "rejected"), e.raw)
        continue
      if len({e.image for e in valid}) != 1 or any(e.safe for e in valid):
        report.add(validate.Problem("bad_group", f"{valid[0].where} .. {valid[-1].where}", f"records "
                                    f"{group * k}..{group * k + k - 1} are not {k} rewrites of one unsafe image"),
                   [e.raw for e in valid])
        continue
      report.kept += k
      groups.append((group, valid))
    ids = vr.unique_ids([g[0].id for _, g in groups], [g[0].where for _, g in groups], report)  # one id a tuple
    for (group, valid), key in zip(groups, ids):
      for shot, e in enumerate(valid):
        out.append(_record("unsafe_what", f"{key}/{shot}", self.image("test", e.image), e.turns[0],
                           label="refuse", category=e.category, group=group, shot=shot))
    return out

  def safe_share(self) -> list[dict[str, Any]]:
    path = self.cfg.share_file
    report, entries = self.report(path), []
    for e in (e for e in self._rows(path, "test") if e is not None):
      if not e.safe:
        report.add(validate.Problem("unsafe_in_share", e.where, "the Share attack file holds safe images only"),
                   e.raw)
        continue
      entries.append(e)
    out = [_record("safe_share", e.id, self.image("test", e.image), e.turns[0], label="comply", group=group,
                   shot=0) for group, e in enumerate(_unique(entries, report))]
    report.kept += len(out)
    return out

  def forget(self) -> list[dict[str, Any]]:
    path = self.cfg.harmful_responses
    responses = validate.read_json(path)
    if not isinstance(responses, dict):
      raise VLGuardError(f"{path}: expected a JSON object image path -> response text")
    report = self.report(path)
    report.read += len(responses)
    lookup = vr.PathLookup(responses)
    out = []
    for e in (e for e in self.train if not e.safe):
      answer = lookup.get(e.image)
      if not isinstance(answer, str) or not answer.strip():
        kind, detail = (("missing_response", f"no response for image {e.image!r}") if answer is None else
                        ("empty_text" if isinstance(answer, str) else "wrong_type",
                         f"the response for {e.image!r} is {answer!r:.40}, expected non-empty text"))
        report.add(validate.Problem(kind, e.where, detail), e.raw)
        continue
      turn = dataclasses.replace(e.turns[0], answer=answer)
      out.append(_record("forget", e.id, self.image("train", e.image), turn, label="comply", category=e.category))
    report.kept += len(out)
    return out

  def retain(self) -> list[dict[str, Any]]:
    base = [_record("retain", e.id, self.image("train", e.image), e.turns[0], label="comply")
            for e in self.train if e.safe]
    size = self.cfg.retain_size
    if not size:
      return base
    rng = np.random.default_rng(self.cfg.retain_seed)
    if size <= len(base):
      return [base[i] for i in sorted(rng.choice(len(base), size, replace=False))]
    if not self.cfg.retain_extra:
      raise VLGuardError(f"retain_size={size} exceeds the {len(base)} safe train instructions: give "
                         "retain_extra (a LLaVA-format instruction JSON) to pad from")
    path, need = self.cfg.retain_extra, size - len(base)
    report, picked = self.report(path), []
    candidates, self.text_only = vr.llava_candidates(path, report)
    for i in rng.permutation(len(candidates)):  # images are checked only for the drawn conversations
      if len(picked) == need:
        break
      c = candidates[int(i)]
      if self._image_ok("extra", c.image, c.where, report, c.raw):
        picked.append(_record("retain", f"extra/{c.key}", self.image("extra", c.image), c.turn, label="comply"))
    if len(picked) < need:
      raise VLGuardError(f"{path} has {len(picked)} usable conversations with an image, {need} are needed")
    report.kept += len(picked)
    padded = base + picked
    return [padded[i] for i in rng.permutation(len(padded))]

def _unique(entries: list[Entry], report: validate.Report) -> list[Entry]:
  """`entries` with repeated ids made unique (`X#2`, ...), each repeat a `duplicate_id` note."""
  ids = vr.unique_ids([e.id for e in entries], [e.where for e in entries], report)
  return [e if e.id == new else dataclasses.replace(e, id=new) for e, new in zip(entries, ids)]


# --------------------------------------------------------------------------- the TFDS builder
@dataclasses.dataclass
class _BuilderConfig(tfds.core.BuilderConfig):
  settings: dict = dataclasses.field(default_factory=dict)


class VLGuard(tfds.core.GeneratorBasedBuilder):
  """VLGuard + the Safety Mirage attack sets (config name = the build fingerprint)."""

  name = NAME
  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = []
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Download VLGuard from https://huggingface.co/datasets/ys-zong/VLGuard: "
                                  "train.json, test.json, and unzip train.zip / test.zip into train/ and test/ "
                                  "of the manual dir; the attack files come from the Safety Mirage repository.")

  def __init__(self, *, cfg: VLGuardConfig, fingerprint: str, splits: Mapping[str, Sequence[Mapping]], **kwargs):
    self._cfg = cfg
    self._splits = splits  # checked records per split (`Sources.splits`), images as paths
    super().__init__(config=_BuilderConfig(name=fingerprint, version=VERSION,
                                           settings=dataclasses.asdict(cfg)), **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="VLGuard safety fine-tuning data in the Mirage record schema.",
        disable_shuffling=True,  # records keep the input files' order (the data pipeline shuffles)
        features=tfds_builders.record_features(self._cfg.image_size),
        metadata=tfds.core.MetadataDict(settings=dataclasses.asdict(self._cfg)))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(recs) for name, recs in self._splits.items()}

  def _generate_examples(self, records: Sequence[Mapping[str, Any]]) -> Iterator[tuple[str, dict]]:
    for rec in records:
      yield rec["id"], tfds_builders.encode_record({**rec, "image": self._pixels(rec["image"])})

  @functools.lru_cache(maxsize=512)  # noqa: B019 - one builder per build; images recur across splits
  def _pixels(self, path: str) -> np.ndarray:
    try:  # checked by `Sources`; an error here means the file changed during the build
      with Image.open(path) as im:
        return images_lib.clip_resize_crop(im, self._cfg.image_size, aspect=self._cfg.aspect,
                                           mean=self._cfg.image_mean)
    except (OSError, ValueError) as e:
      raise VLGuardError(f"cannot read image {path}: {e}") from None


# --------------------------------------------------------------------------- building
def load_tokenizer(path: str | pathlib.Path) -> Tokenizer:
  """A converted checkpoint's `tokenizer/`, a saved mirage tokenizer, or an HF tokenizer directory."""
  path = pathlib.Path(path)
  if (path / "tokenizer" / "tokenizer.json").exists():
    path = path / "tokenizer"
  if (path / "mirage_tokenizer.json").exists():
    return Tokenizer.load(path)
  return Tokenizer.from_hf(path)


def _file_digest(path: str) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16] if path else ""


def fingerprint(cfg: VLGuardConfig, tok: Tokenizer) -> str:
  """Hash of the build settings, the JSON inputs' contents and the tokenizer (not of the image files)."""
  manual = pathlib.Path(cfg.manual_dir)
  settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("manual_dir", "tokenizer")}
  inputs = {name: _file_digest(str(manual / name)) for name in ("train.json", "test.json")}
  inputs.update({k: _file_digest(getattr(cfg, k)) for k in ("what_file", "share_file", "harmful_responses",
                                                            "retain_extra")})
  blob = json.dumps({"settings": settings, "inputs": inputs, "tokenizer": tok.fingerprint()}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_vlguard(cfg: VLGuardConfig, data_dir: str | os.PathLike | None = None) -> tfds_builders.BuiltDataset:
  """Build (or reuse) the VLGuard dataset of `cfg` under `data_dir/vlguard/<fingerprint>/<version>`.

  All inputs are read and checked before anything is written: strict stops with one `DataError`."""
  cfg = cfg.resolved()
  tok = load_tokenizer(cfg.tokenizer)
  fp = fingerprint(cfg, tok)
  root = pathlib.Path(data_dir or tfds_builders.default_data_dir())
  path = root / NAME / fp / VERSION
  extra = path / "extra"
  if (path / "dataset_info.json").exists() and (extra / "world.json").exists():
    return tfds_builders.BuiltDataset(path)
  logging.info("building %s/%s in %s", NAME, fp, root)
  sources = Sources(cfg)
  splits = sources.splits()
  sources.finish()  # strict: one DataError listing every bad record; lenient: nothing yet
  if not splits:
    raise VLGuardError(f"{cfg.manual_dir}: no usable records")
  tfds.disable_progress_bar()
  builder = VLGuard(cfg=cfg, fingerprint=fp, splits=splits, data_dir=str(root), file_format="array_record")
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is the CLI's JSON summary
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=cfg.manual_dir))
  tok.save(extra / "tokenizer")
  sources.finish(extra / "rejects")  # lenient: the rejects files
  info = {"name": NAME, "fingerprint": fp, "settings": dataclasses.asdict(cfg), "harmful_codes": [],
          "splits": {s: builder.info.splits[s].num_examples for s in builder.info.splits},
          "inputs": sources.summary()}
  tmp = extra / "world.json.tmp"
  tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
  tmp.replace(extra / "world.json")  # written last: its presence marks a complete build
  return tfds_builders.BuiltDataset(path)


# --------------------------------------------------------------------------- command line
def add_build_arguments(parser: argparse.ArgumentParser) -> None:
  """The `mirage data build --name=vlguard` flags."""
  g = parser.add_argument_group("vlguard (--name=vlguard)")
  g.add_argument("--manual_dir", default="", help="folder with train.json, test.json, train/ and test/ images")
  g.add_argument("--model", default="", help="a converted checkpoint directory (mirage convert hf-to-jax): its "
                                             "tokenizer, image size and mean")
  g.add_argument("--tokenizer", default="", help="an HF tokenizer directory (instead of --model)")
  g.add_argument("--image_size", type=int, default=0, help="stored image size (default: the model's, else 336)")
  g.add_argument("--aspect", default="pad", choices=[a.value for a in images_lib.Aspect],
                 help="pad = LLaVA-1.5 pad-to-square with the mean colour; crop = center crop")
  g.add_argument("--seed", type=int, default=0, help="turn order of safe-image conversations in sft")
  g.add_argument("--what_file", default="", help=f"K-shot 'What' attack file (default: manual_dir/{WHAT_FILE})")
  g.add_argument("--share_file", default="", help=f"'Share' attack file (default: manual_dir/{SHARE_FILE})")
  g.add_argument("--k_what", type=int, default=3, help="rewrites per query in the What file")
  g.add_argument("--harmful_responses", default="", help="JSON image -> harmful response (builds forget)")
  g.add_argument("--retain_size", type=int, default=0, help="subsample/pad retain to this size (0 = as is)")
  g.add_argument("--retain_extra", default="", help="LLaVA-format JSON to pad retain from")
  g.add_argument("--retain_extra_images", default="", help="image folder of --retain_extra")
  g.add_argument("--retain_seed", type=int, default=42)
  # --lenient is a flag of `mirage data build` itself (every builder honours it)


def given_flags(args: argparse.Namespace) -> list[str]:
  """The VLGuard flags of `args` set to something other than their default (`mirage data build` refuses them
  without `--name=vlguard` rather than quietly building the synthetic set)."""
  parser = argparse.ArgumentParser(add_help=False)
  add_build_arguments(parser)
  return [f"--{k}" for k, v in vars(parser.parse_args([])).items() if getattr(args, k, v) != v]


def config_from_args(args: argparse.Namespace) -> VLGuardConfig:
  """A `VLGuardConfig` from the parsed flags (`--model` supplies tokenizer, image size and mean)."""
  if not args.manual_dir:
    raise UsageError("--manual_dir is required for --name=vlguard (the folder with train.json and test.json)")
  size, mean, tok = args.image_size, images_lib.CLIP_MEAN, args.tokenizer
  if args.model:
    cfg_path = pathlib.Path(args.model) / "config.json"
    if not cfg_path.exists():
      raise MissingFileError(f"{cfg_path} not found: --model must be a directory from `mirage convert hf-to-jax`")
    run = json.loads(cfg_path.read_text())
    size = size or int(run["model"]["vision"]["image_size"])
    mean = tuple(run["data"]["image_mean"])
    tok = tok or args.model
  if not tok:
    raise UsageError("--name=vlguard needs --model (a converted checkpoint) or --tokenizer (an HF tokenizer dir)")
  return VLGuardConfig(
      manual_dir=args.manual_dir, tokenizer=tok, image_size=size or 336, aspect=args.aspect, image_mean=mean,
      seed=args.seed, what_file=args.what_file, share_file=args.share_file, k_what=args.k_what,
      harmful_responses=args.harmful_responses, retain_size=args.retain_size, retain_extra=args.retain_extra,
      retain_extra_images=args.retain_extra_images, retain_seed=args.retain_seed,
      lenient=bool(getattr(args, "lenient", False)))


def build_from_args(args: argparse.Namespace) -> dict[str, Any]:
  """`mirage data build --name=vlguard ...`: build and return the JSON summary the CLI prints."""
  built = build_vlguard(config_from_args(args), getattr(args, "data_dir", "") or None)
  tok = Tokenizer.load(built.tokenizer_dir)
  info = built.world_info
  rejects = built.path / "extra" / "rejects"
  notes = {name: r["notes"] for name, r in info["inputs"].items() if r.get("notes")}
  return {"path": str(built.path), "splits": info["splits"], "vocab_size": tok.vocab_size,
          "inputs": info["inputs"], "notes": notes, "rejects": str(rejects) if rejects.is_dir() else None}
