"""`mirage data build | stats`: build a dataset (the synthetic world of a config, or VLGuard) and print the
first word x label table of a built split (for VLGuard: the split sizes, one table per instruction kind and a
closing JSON line)."""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

from mirage_jax import configlib
from mirage_jax.data import pipeline, synthetic, tfds_builders, vlguard
from mirage_jax.data.records import decode_record
from mirage_jax.errors import MissingFileError, UsageError


def _open(args: argparse.Namespace, overrides: Sequence[str], *, path: str = "") -> pipeline.Data:
  """The config's dataset (built on first use), with `--data_dir` / `--path` in place of the config's."""
  config = configlib.apply_overrides(configlib.load(args.config), overrides)
  data_cfg = config.data.to_dict()
  if args.data_dir:
    data_cfg["data_dir"] = args.data_dir
  if path:
    data_cfg["path"] = path
  return pipeline.open_data(data_cfg)


def build(args: argparse.Namespace, *, overrides: Sequence[str] = ()) -> dict:
  """`mirage data build`: VLGuard with `--name=vlguard` (its own flags), else the config's synthetic world.

  Returns the JSON the command prints: the dataset's path, its splits' record counts and (synthetic) the
  vocabulary size. VLGuard flags without `--name=vlguard` are a `UsageError` (not a quiet synthetic build).
  """
  if args.name == "vlguard":
    return vlguard.build_from_args(args)
  given = vlguard.given_flags(args)
  if given:
    raise UsageError(f"{', '.join(given)} {'is a flag' if len(given) == 1 else 'are flags'} of the VLGuard "
                     f"builder: add --name=vlguard (without it `mirage data build` builds the synthetic set of "
                     "--config)")
  data = _open(args, overrides)
  return {"path": str(data.dataset.path), "splits": {s: data.dataset.num_records(s) for s in data.dataset.splits()},
          "vocab_size": data.tokenizer.vocab_size}


def stats(args: argparse.Namespace, *, overrides: Sequence[str] = ()) -> str:
  """`mirage data stats`: the first word x label table of `args.split` of the config's (or `--path`'s)
  dataset; VLGuard (`--name=vlguard`, or a `--path` that is a VLGuard build): `vlguard_stats`."""
  name = getattr(args, "name", "")
  if name == "vlguard" or (not name and args.path and _is_vlguard(pathlib.Path(args.path))):
    return vlguard_stats(find_vlguard(args.path, args.data_dir), args.split)
  data = _open(args, overrides, path=args.path)
  src = data.dataset.source(args.split)
  table = synthetic.first_word_table(
      decode_record({k: v for k, v in src[i].items() if k in ("first_word", "label")}) for i in range(len(src)))
  return (f"first word x label, split {args.split!r} of {data.dataset.path}\n\n" +
          synthetic.format_first_word_table(table))


def _is_vlguard(path: pathlib.Path) -> bool:
  info = path / "extra" / "world.json"
  return info.exists() and json.loads(info.read_text()).get("name") == vlguard.NAME


def find_vlguard(path: str = "", data_dir: str = "") -> tfds_builders.BuiltDataset:
  """The VLGuard build at `path`, else the newest complete one under `data_dir/vlguard/*/<version>`."""
  if path:
    if not _is_vlguard(pathlib.Path(path)):
      raise MissingFileError(f"{path} is not a VLGuard build (no extra/world.json naming vlguard)")
    return tfds_builders.BuiltDataset(pathlib.Path(path))
  root = pathlib.Path(data_dir or tfds_builders.default_data_dir()) / vlguard.NAME
  builds = sorted((p for p in root.glob(f"*/{vlguard.VERSION}") if _is_vlguard(p)),
                  key=lambda p: (p / "extra" / "world.json").stat().st_mtime)
  if not builds:
    raise MissingFileError(f"no complete VLGuard {vlguard.VERSION} build under {root}: run `mirage data build "
                           "--name=vlguard --manual_dir=...` with this --data_dir, or give --path")
  return tfds_builders.BuiltDataset(builds[-1])


def kind_tables(dataset: tfds_builders.BuiltDataset, split: str) -> dict[str, dict[str, dict[str, int]]]:
  """instruction kind (safe / unsafe_text / unsafe_image) -> first word -> {"comply": n, "refuse": n}."""
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(str(dataset.path))
  if split not in builder.info.splits:
    raise UsageError(f"split {split!r} not in {dataset.path}; available: {sorted(builder.info.splits.keys())}")
  src = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})  # text fields only
  by_kind: dict[str, list[dict]] = {}
  for i in range(len(src)):
    rec = decode_record({k: v for k, v in src[i].items() if k in ("first_word", "label", "kind")})
    by_kind.setdefault(rec["kind"], []).append(rec)
  return {kind: synthetic.first_word_table(recs) for kind, recs in sorted(by_kind.items())}


def vlguard_stats(dataset: tfds_builders.BuiltDataset, split: str = "sft") -> str:
  """Split sizes, the notes of the build (per input file), the first word x label table of `split` per
  instruction kind, and one closing JSON line `{"splits", "split", "first_words", "notes", "path"}`."""
  info = dataset.world_info
  tables = kind_tables(dataset, split)
  notes = {name: r["notes"] for name, r in info.get("inputs", {}).items() if r.get("notes")}
  lines = [f"VLGuard build {dataset.path}", "", "| split | records |", "|---|---:|"]
  lines += [f"| {s} | {n} |" for s, n in sorted(info["splits"].items())]
  for name, counts in sorted(notes.items()):
    lines.append(f"notes (kept) in {name}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
  for kind, table in tables.items():
    n = sum(c["comply"] + c["refuse"] for c in table.values())
    lines += ["", f"first word x label, split {split!r}, kind {kind!r} ({n} records)", "",
              synthetic.format_first_word_table(table)]
  summary = {"splits": info["splits"], "split": split, "first_words": tables, "notes": notes,
             "path": str(dataset.path)}
  return "\n".join(lines) + "\n\n" + json.dumps(summary, sort_keys=True)
