"""`mirage data build | stats`: build a dataset (the synthetic world of a config, or VLGuard) and print the
first word x label table of a built split."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from mirage_jax import configlib
from mirage_jax.data import pipeline, synthetic
from mirage_jax.data.records import decode_record


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
  vocabulary size.
  """
  if args.name == "vlguard":
    from mirage_jax.data import vlguard
    return vlguard.build_from_args(args)
  data = _open(args, overrides)
  return {"path": str(data.dataset.path), "splits": {s: data.dataset.num_records(s) for s in data.dataset.splits()},
          "vocab_size": data.tokenizer.vocab_size}


def stats(args: argparse.Namespace, *, overrides: Sequence[str] = ()) -> str:
  """`mirage data stats`: the first word x label table of `args.split` of the config's (or `--path`'s) dataset."""
  data = _open(args, overrides, path=args.path)
  src = data.dataset.source(args.split)
  table = synthetic.first_word_table(
      decode_record({k: v for k, v in src[i].items() if k in ("first_word", "label")}) for i in range(len(src)))
  return (f"first word x label, split {args.split!r} of {data.dataset.path}\n\n" +
          synthetic.format_first_word_table(table))
