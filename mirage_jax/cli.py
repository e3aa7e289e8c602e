"""The `mirage` command line: thin wrappers over importable modules.

  mirage train    --config=configs/sft/posthoc.py:tiny --workdir=W [--config.key=value ...]
  mirage eval     --workdir=W | --checkpoint=STEP_DIR [--splits=...]
  mirage describe --config=configs/unlearn/npo.py:7b [--devices=256]
  mirage data     build | stats
  mirage demo     --workdir=W [--seeds=N]

User errors (bad config key, missing file, bad data) print one line `mirage: error: ...` and exit 2; set
MIRAGE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, Callable] = {}


def command(name: str, help: str):
  def register(fn):
    fn.help = help
    COMMANDS[name] = fn
    return fn
  return register


def _setup_logging(verbose: bool = False) -> None:
  logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                      format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", force=True)
  logging.getLogger("mirage").setLevel(logging.INFO)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


def _load_config(spec: str, overrides: Sequence[str]):
  from mirage_jax import configlib
  return configlib.apply_overrides(configlib.load(spec), overrides)


def _print_json(obj) -> None:
  print(json.dumps(obj, indent=1, sort_keys=True, default=float))


@command("train", "train a model from a config (resumes from the workdir's latest checkpoint)")
def _train(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--config", required=True, help="config file[:arg], e.g. configs/sft/posthoc.py:tiny")
  parser.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, config.json)")
  _add_distributed_flags(parser)
  args = parser.parse_args(argv)
  _init_distributed(args)
  from mirage_jax.train import loop
  summary = loop.run(_load_config(args.config, overrides), args.workdir)
  _print_json({"workdir": summary.workdir, "steps": [summary.first_step, summary.last_step],
               "final": summary.final, "eval": summary.eval, "wall_s": round(summary.wall_s, 1),
               "compile_s": round(summary.compile_s, 1), "steps_per_s": round(summary.steps_per_s, 2)})
  return 0


@command("eval", "evaluate a trained run (or one checkpoint) on the dataset's splits")
def _eval(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--workdir", help="a run directory: its latest checkpoint and config.json")
  group.add_argument("--checkpoint", help="a checkpoint step directory (…/checkpoints/<step>)")
  parser.add_argument("--config", help="config spec to use instead of the run's saved config")
  parser.add_argument("--splits", default="", help="comma-separated splits (default: config.eval.splits)")
  parser.add_argument("--out", default="", help="write the results JSON here too")
  _add_distributed_flags(parser)
  args = parser.parse_args(argv)
  _init_distributed(args)
  from mirage_jax.eval import runner
  results = runner.evaluate_run(workdir=args.workdir, checkpoint=args.checkpoint, config_spec=args.config,
                                overrides=overrides, splits=args.splits, out=args.out)
  _print_json(results)
  return 0


@command("describe", "parameter counts and per-device bytes of a config (no allocation)")
def _describe(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--config", required=True)
  parser.add_argument("--devices", type=int, default=0, help="plan for this many devices (default: local)")
  args = parser.parse_args(argv)
  import jax
  from mirage_jax.describe import describe
  config = _load_config(args.config, overrides)
  out = describe(config, num_devices=args.devices or jax.device_count())
  out["config"] = args.config
  print(json.dumps(out, sort_keys=True))
  return 0


@command("data", "build a dataset or print its first-word x label statistics")
def _data(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  sub = parser.add_subparsers(dest="action", required=True)
  build = sub.add_parser("build", help="build a TFDS dataset (array_record, PNG images)")
  build.add_argument("--name", default="mirage_synth", choices=["mirage_synth"])
  stats = sub.add_parser("stats", help="first word x label table of a split")
  stats.add_argument("--split", default="sft")
  stats.add_argument("--path", default="", help="a built dataset directory (default: the config's)")
  for p in (build, stats):
    p.add_argument("--config", default="configs/pretrain/base.py:tiny",
                   help="config whose data.* (world knobs) to use; --config.data.world.x=v overrides")
    p.add_argument("--data_dir", default="", help="root of built datasets (default: $MIRAGE_DATA_DIR or "
                                                  "~/.cache/mirage_jax/data)")
  args = parser.parse_args(argv)
  config = _load_config(args.config, overrides)
  from mirage_jax.data import pipeline, synthetic
  data_cfg = config.data.to_dict()
  if args.data_dir:
    data_cfg["data_dir"] = args.data_dir
  if args.action == "stats" and args.path:
    data_cfg["path"] = args.path
  data = pipeline.open_data(data_cfg)
  if args.action == "build":
    print(json.dumps({"path": str(data.dataset.path), "splits": {s: data.dataset.num_records(s)
                                                                for s in data.dataset.splits()},
                      "vocab_size": data.tokenizer.vocab_size}, indent=1))
    return 0
  src = data.dataset.source(args.split)
  table = synthetic.first_word_table(
      {k: (v.decode() if isinstance(v, bytes) else v) for k, v in src[i].items() if k in ("first_word", "label")}
      for i in range(len(src)))
  print(f"first word x label, split {args.split!r} of {data.dataset.path}\n")
  print(synthetic.format_first_word_table(table))
  return 0


@command("demo", "the whole experiment on CPU: data, base, SFT, unlearning, evaluation, report")
def _demo(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--workdir", default="mirage_demo", help="where runs, report.md/json and plots go")
  parser.add_argument("--seeds", type=int, default=1, help="number of seeds (means and stds reported)")
  parser.add_argument("--size", default="tiny", help="model size of every run")
  parser.add_argument("--ablations", action="store_true",
                      help="also run the world-knob ablation (about 20 more minutes on 2 CPU cores)")
  args = parser.parse_args(argv)
  from mirage_jax import demo
  report = demo.run_demo(workdir=args.workdir, seeds=args.seeds, size=args.size, overrides=overrides,
                         ablations=args.ablations)
  print(report.summary())
  return 0


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  g = parser.add_argument_group("multi-host (default: detected from the TPU/SLURM environment)")
  g.add_argument("--coordinator_address", default="")
  g.add_argument("--num_processes", type=int, default=0)
  g.add_argument("--process_id", type=int, default=-1)


def _init_distributed(args: argparse.Namespace) -> None:
  from mirage_jax import distributed
  distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                         process_id=args.process_id)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="mirage", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("-v", "--verbose", action="store_true", help="INFO logging")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, fn in COMMANDS.items():
    sub.add_parser(name, help=fn.help, add_help=False)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.") and a not in ("-v", "--verbose")]
  if not rest or rest[0] not in COMMANDS:
    build_parser().parse_args(rest)  # prints the help, or the error for an unknown command
    return 2
  name = rest[0]
  _setup_logging(verbose=len(rest) + len(overrides) < len(argv))
  sub = argparse.ArgumentParser(prog=f"mirage {name}", description=COMMANDS[name].help)
  try:
    return COMMANDS[name](sub, rest[1:], overrides)
  except Exception as e:  # noqa: BLE001 - user errors become one line; MIRAGE_DEBUG shows the traceback
    if os.environ.get("MIRAGE_DEBUG") or not _is_user_error(e):
      raise
    print(f"mirage {name}: error: {e}", file=sys.stderr)
    return 2


def _is_user_error(e: Exception) -> bool:
  from mirage_jax.train.metrics import NonFiniteLoss
  return isinstance(e, (ValueError, FileNotFoundError, NonFiniteLoss))


if __name__ == "__main__":
  sys.exit(main())
