"""The `mirage` command line: thin wrappers over importable modules.

  mirage train    --config=configs/sft/posthoc.py:tiny --workdir=W [--config.key=value ...]
  mirage eval     --workdir=W | --checkpoint=STEP_DIR [--splits=...]
  mirage describe --config=configs/unlearn/npo.py:7b [--devices=256]
  mirage data     build [--name=vlguard --manual_dir=DIR --model=CKPT_DIR] [--lenient] | stats
  mirage convert  hf-to-jax --hf=DIR --out=W | jax-to-hf --ckpt=W --out=DIR [--adapter_out=D2] | check-parity --hf=DIR
  mirage demo     --workdir=W [--seeds=N] [--world_seeds=W] [--stages=base,...] [--ablations [--ablation_variants=a,b]]
                  [--no_audit] [--trajectory=N]
  mirage robustness --workdir=DEMO [--run=RUN --out=D] [--relearn_steps=5,20,50]
  mirage recipes  --workdir=W [--methods=sft_posthoc,sft_mixed] [--lr_scales=0.5,1,2] [--step_scales=0.5,1,2]
  mirage checksum --workdir=W
  mirage compile  --config=configs/unlearn/npo.py:7b --topology=v5e:16x16 [--batch=B] [--max_batch]
  mirage sweep    --config=configs/ablations/sizes.py:cpu [--workdir=W] [--launcher=local|tpu_vm|slurm] [--dry-run]
  mirage report   --runs=DIR [DIR ...] [--out=DIR]   (table + plot over every eval.json)
  mirage audit    --data=synth:sft --out=DIR   (shortcut words of a dataset)
  mirage attack   --checkpoint=RUN --split=unsafe --search=beam --out=DIR
  mirage generate --workdir=BASE (--split=sft --kinds=unsafe_image | --input=train.json) --out=C.jsonl
  mirage select   --candidates=C.jsonl --judge_checkpoint=JUDGE --out=harmful_responses.json

User errors (bad config key, missing file, bad data) print one line `mirage: error: ...` and exit 2; set
MIRAGE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence

from mirage_jax.errors import Stopped, UsageError, UserError, drop_package_frames

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
               "compile_s": round(summary.compile_s, 1), "steps_per_s": round(summary.steps_per_s, 2),
               "stopped": summary.stopped, "skipped_steps": summary.skipped_steps})
  if summary.stopped:
    print(f"mirage train: stopped by {summary.stopped} after saving step {summary.last_step}; rerun the same "
          "command to resume", file=sys.stderr)
  return 0


@command("checksum", "step and params SHA-256 of a run's latest checkpoint (compare runs bit for bit)")
def _checksum(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--workdir", required=True, help="a run directory (or a checkpoint step directory)")
  args = parser.parse_args(argv)
  from mirage_jax.train import checkpoint
  print(json.dumps(checkpoint.checksum(args.workdir), sort_keys=True))
  return 0


@command("eval", "evaluate a trained run (or one checkpoint) on the dataset's splits")
def _eval(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  _add_run_flags(parser, "a run directory: its latest checkpoint and config.json")
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


@command("compile", "AOT-compile a config's train step for a TPU topology from this host; memory per device")
def _compile(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--config", required=True, help="e.g. configs/unlearn/npo.py:7b")
  parser.add_argument("--topology", required=True, help="<chip>:<shape>, e.g. v5e:16x16, v5p:4x4x4")
  parser.add_argument("--mesh", default="", help="axis sizes, e.g. fsdp:-1,tensor:4 (default: the config's)")
  parser.add_argument("--batch", type=int, default=0, help="global batch (default: the config's)")
  parser.add_argument("--max_batch", action="store_true",
                      help="search the largest global batch that fits in HBM (several compiles)")
  args = parser.parse_args(argv)
  from mirage_jax import compile as aot
  config = _load_config(args.config, overrides)
  with config.unlocked():
    config.mesh.update(aot.parse_mesh(args.mesh))
    config.batch_size = args.batch or config.batch_size
  devices = aot.topology_devices(args.topology)
  result = aot.compile_train_step(config, devices, topology=args.topology).to_json()
  if args.max_batch:
    result["max_global_batch"], tried = aot.max_batch(config, devices, topology=args.topology)
    result["max_batch_tried"] = {r.global_batch: r.total_bytes for r in tried}
  result["config"] = args.config
  print(json.dumps(result, sort_keys=True))
  if not result["fits"]:
    need = result["total_bytes"] if result["total_bytes"] >= 0 else result["temp_bytes"]
    print(f"mirage compile: {need / 2**30:.1f} GiB per device (at least) exceeds the "
          f"{result['hbm_bytes'] / 2**30:.0f} GiB HBM of {result['device_kind']}", file=sys.stderr)
    return 1
  return 0


@command("data", "build a dataset or print its first-word x label statistics")
def _data(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  sub = parser.add_subparsers(dest="action", required=True)
  build = sub.add_parser("build", help="build a TFDS dataset (array_record, PNG images)")
  build.add_argument("--name", default="mirage_synth", choices=["mirage_synth", "vlguard"])
  build.add_argument("--lenient", action="store_true",
                     help="skip bad input records, count them and write a rejects file (default: stop)")
  from mirage_jax.data import vlguard
  vlguard.add_build_arguments(build)
  stats = sub.add_parser("stats", help="first word x label table of a split")
  stats.add_argument("--split", default="sft")
  stats.add_argument("--path", default="", help="a built dataset directory (default: the config's)")
  stats.add_argument("--name", default="", choices=["", "mirage_synth", "vlguard"],
                     help="vlguard: the newest VLGuard build under --data_dir (or --path): split sizes, notes, "
                          "a table per instruction kind and a closing JSON line")
  for p in (build, stats):
    p.add_argument("--config", default="configs/pretrain/base.py:tiny",
                   help="config whose data.* (world knobs) to use; --config.data.world.x=v overrides")
    p.add_argument("--data_dir", default="", help="root of built datasets (default: $MIRAGE_DATA_DIR or "
                                                  "~/.cache/mirage_jax/data)")
  args = parser.parse_args(argv)
  from mirage_jax.commands import data
  if args.action == "build":
    print(json.dumps(data.build(args, overrides=overrides), indent=1))
  else:
    print(data.stats(args, overrides=overrides))
  return 0


@command("demo", "the whole experiment on CPU: data, base, SFT, unlearning, evaluation, report")
def _demo(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--workdir", default="mirage_demo", help="where runs, report.md/json and plots go")
  parser.add_argument("--seeds", type=int, default=1, help="number of training seeds (means and stds reported)")
  parser.add_argument("--world_seeds", type=int, default=1,
                      help="number of worlds: data.world.seed + i for i < W (the grid is worlds x seeds)")
  parser.add_argument("--size", default="tiny", help="model size of every run")
  parser.add_argument("--stages", default="", help="only these stages (comma list, the base included; default: "
                                                    "all seven)")
  parser.add_argument("--lora_rank", type=int, default=0,
                      help="train every stage that starts from the base with LoRA of this rank (0 = full)")
  parser.add_argument("--ablations", action="store_true",
                      help="also run the world-knob ablation: 14 variants, each retraining what it changes (six "
                           "of them took 51 minutes on 2 CPU cores; --ablation_variants picks some)")
  parser.add_argument("--ablation_variants", default="",
                      help="with --ablations: only these variants of configs/ablations/world.py (comma list; the "
                           "default world is always included)")
  parser.add_argument("--no_audit", action="store_true",
                      help="skip the shortcut audit and attack search against seed 0's models")
  parser.add_argument("--trajectory", type=int, default=0,
                      help="also the SFT trajectory: a post-hoc SFT run of this many steps, evaluated at checkpoints")
  parser.add_argument("--trajectory_points", type=int, default=8, help="checkpoints of the trajectory evaluated")
  args = parser.parse_args(argv)
  from mirage_configs import comma_list
  from mirage_jax.commands import demo
  report = demo.run_demo(workdir=args.workdir, seeds=args.seeds, size=args.size, overrides=overrides,
                         stages=comma_list(args.stages),
                         ablations=args.ablations, ablation_variants=comma_list(args.ablation_variants),
                         audit=not args.no_audit, world_seeds=args.world_seeds,
                         lora_rank=args.lora_rank, trajectory=args.trajectory,
                         trajectory_points=args.trajectory_points)
  print(report.summary())
  return 0


@command("recipes", "choose each method's learning rate x steps on the dev splits (configs/ablations/recipes.py)")
def _recipes(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--workdir", default="mirage_demo", help="a demo workdir (its base and stages are reused) "
                                                               "or a new one; recipes.json / recipes.md go here")
  parser.add_argument("--methods", default=None, help="comma list of methods (default: the config's, "
                                                       "sft_posthoc,sft_mixed)")
  parser.add_argument("--lr_scales", default=None, help="learning rates tried, as multiples of each config's")
  parser.add_argument("--step_scales", default=None, help="training steps tried, as multiples of each config's")
  parser.add_argument("--seed", type=int, default=None, help="training seed of the base and the candidates (0)")
  args = parser.parse_args(argv)
  from mirage_jax.commands import recipes
  result = recipes.run(workdir=args.workdir, overrides=overrides, methods_=args.methods, lr_scales=args.lr_scales,
                       step_scales=args.step_scales, seed=args.seed)
  print(json.dumps(recipes.summary_line(result), sort_keys=True, default=float))
  return 0


@command("robustness", "relearning, prefill, probe and refusal-direction attacks on every model of a demo run")
def _robustness(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--workdir", help="a finished `mirage demo` workdir: every model of every run")
  group.add_argument("--run", help="one run directory (then --out is required)")
  parser.add_argument("--out", default="", help="default: <workdir>/robustness")
  parser.add_argument("--relearn_steps", default="5,20,50", help="fine-tuning steps at which ASR is re-measured")
  parser.add_argument("--relearn_sets", default="forget,benign", help="forget (train hazards' procedures), "
                                                                       "benign (their images, no procedures)")
  parser.add_argument("--prefills", default="format,comply", help="forced answer openings")
  parser.add_argument("--max_runs", type=int, default=0, help="only the demo's first N runs (0: all)")
  args = parser.parse_args(argv)
  from mirage_configs import comma_list
  from mirage_jax.commands import robustness
  try:
    steps = tuple(int(s) for s in comma_list(args.relearn_steps))
  except ValueError:
    raise UsageError(f"--relearn_steps={args.relearn_steps!r}: comma-separated integers") from None
  options = robustness.Options(relearn_steps=steps, relearn_sets=tuple(comma_list(args.relearn_sets)),
                               prefills=tuple(comma_list(args.prefills)), overrides=tuple(overrides))
  result = robustness.run(workdir=args.workdir, run_dir=args.run, out=args.out or None, options=options,
                          max_groups=args.max_runs)
  print(json.dumps(robustness.summary_line(result), sort_keys=True, default=float))
  return 0


@command("audit", "rank the words and n-grams of a safety dataset that predict refuse vs comply (shortcuts)")
def _audit(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--data", required=True,
                      help="synth[:SPLIT] (default world, in memory), a built dataset DIR[:SPLIT] (synthetic or "
                           "VLGuard), VLGuard's train.json, or a JSONL of {\"instruction\", \"label\"} rows")
  parser.add_argument("--out", required=True, help="writes shortcuts.json/.md/.png and summary.json here")
  parser.add_argument("--label_source", default="auto", choices=["auto", "field", "judge"],
                      help="label field, or the refusal judge on the response (auto: field when present)")
  parser.add_argument("--max_n", type=int, default=3, help="longest n-gram")
  parser.add_argument("--min_count", type=int, default=5, help="test grams seen in at least this many rows")
  parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates for the CIs")
  parser.add_argument("--top", type=int, default=15, help="rows to print")
  args = parser.parse_args(argv)
  from mirage_jax.audit import shortcuts
  config = shortcuts.AuditConfig(max_n=args.max_n, min_count=args.min_count, bootstrap=args.bootstrap)
  result = shortcuts.run_audit(args.data, out_dir=args.out, config=config, label_source=args.label_source)
  print(shortcuts.format_table(result.rows[:args.top]))
  _print_json({**result.summary(), "files": result.files})
  return 0


@command("attack", "search word substitutions that flip a trained model (on logits), verify by generation")
def _attack(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--checkpoint", required=True, help="a run directory or a checkpoint step directory")
  parser.add_argument("--split", default="unsafe", help="queries to attack (unsafe: jailbreak; safe: over-prudence)")
  parser.add_argument("--goal", default="", choices=["", "jailbreak", "overprudence"],
                      help="default: jailbreak for refuse-labelled queries, else overprudence")
  parser.add_argument("--search", default="beam", choices=["exhaustive", "greedy", "beam"])
  parser.add_argument("--positions", default="first", choices=["first", "any"],
                      help="edit only the first k words, or anywhere")
  parser.add_argument("--k", type=int, default=1, help="most edits per query (1..3)")
  parser.add_argument("--candidates", default="auto",
                      help="auto (the audit's top words + the data's first words) or a file, one word per line")
  parser.add_argument("--out", default="", help="writes attack.json/.md, attack_set.jsonl, plots here")
  parser.add_argument("--shots", type=int, default=3, help="rewrites kept per query (the K of K-shot ASR)")
  parser.add_argument("--beam_width", type=int, default=4)
  parser.add_argument("--max_queries", type=int, default=0, help="attack only the first N queries (0: all)")
  parser.add_argument("--no_verify", action="store_true", help="skip the verification by generation")
  parser.add_argument("--evaluate", default="",
                      help="instead of searching: evaluate a saved attack_set.jsonl against --checkpoint")
  args = parser.parse_args(argv)
  from mirage_jax.audit import attack
  if args.evaluate:
    _print_json(attack.evaluate_attack_set(args.evaluate, checkpoint=args.checkpoint, overrides=overrides))
    return 0
  if not args.out:
    raise UsageError("--out=DIR is required (or --evaluate=ATTACK_SET.jsonl)")
  result = attack.run_attack(args.checkpoint, split=args.split, goal=args.goal or None, search=args.search,
                             positions=args.positions, k=args.k, candidates=args.candidates, out_dir=args.out,
                             shots=args.shots, beam_width=args.beam_width, max_queries=args.max_queries,
                             verify=not args.no_verify, overrides=overrides)
  print(attack.markdown(result))
  return 0


@command("sweep", "print or run one command per point of an ablation sweep (configs/ablations/*.py)")
def _sweep(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  from mirage_jax.commands import sweep
  parser.add_argument("--config", required=True, help="sweep config[:arg], e.g. configs/ablations/sizes.py:cpu; "
                                                      "--config.x=y sets its knobs")
  parser.add_argument("--workdir", default=None, help="every point's run goes to <workdir>/<point name> "
                                                     "(default: runs/<sweep config name>)")
  parser.add_argument("--launcher", default="local", choices=sweep.LAUNCHERS)
  parser.add_argument("--launcher_args", default="", help="extra arguments for the launcher, e.g. "
                                                          "\"--name=my-v5e --zone=us-west4-a\" (tpu_vm) or "
                                                          "\"--nodes=4 --partition=gpu\" (slurm)")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print the commands (a bash script) instead of running them")
  args = parser.parse_args(argv)
  print(sweep.run(args.config, overrides=overrides, workdir=args.workdir, launcher=args.launcher,
                  launcher_args=args.launcher_args, dry_run=args.dry_run), end="")
  return 0


@command("report", "one markdown + CSV table (and ASR/RR vs size plot) over every eval.json under run dirs")
def _report(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--runs", nargs="+", action="extend", default=[], required=True,
                      help="directories searched for eval.json (--runs=A B C works too)")
  parser.add_argument("more_runs", nargs="*", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="", help="where runs.md, runs.csv and the plot go (default: the first "
                                                "--runs directory)")
  args = parser.parse_args(argv)
  from mirage_jax.report import runs
  dirs = [*args.runs, *args.more_runs]
  files = runs.write(dirs, out=args.out or dirs[0])
  print(files.markdown.read_text())
  print(f"mirage report: {files.runs} runs, {files.settings} settings -> {files.markdown}, {files.csv}, "
        f"{files.plot}", file=sys.stderr)
  return 0


@command("convert", "Hugging Face LLaVA checkpoints <-> mirage checkpoints, and logit parity against PyTorch")
def _convert(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  sub = parser.add_subparsers(dest="action", required=True)
  to_jax = sub.add_parser("hf-to-jax", help="transformers LLaVA dir -> Orbax checkpoint + mirage config")
  to_jax.add_argument("--hf", required=True, help="dir with config.json and model.safetensors(.index.json)")
  to_jax.add_argument("--out", required=True, help="new run directory (checkpoints/0, config.json, tokenizer/)")
  to_jax.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
  to_jax.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  to_jax.add_argument("--base", default="", help="training defaults of this size (default: by parameter count)")
  to_hf = sub.add_parser("jax-to-hf", help="mirage checkpoint -> a directory transformers loads")
  to_hf.add_argument("--ckpt", required=True, help="a run directory or a checkpoint step directory")
  to_hf.add_argument("--out", required=True)
  to_hf.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
  to_hf.add_argument("--max_shard_gb", type=float, default=5.0)
  to_hf.add_argument("--adapter_out", default="", help="LoRA runs: also a PEFT adapter in this dir (and its HF "
                     "base model in DIR/base); --out gets the merged model")
  parity = sub.add_parser("check-parity", help="HF PyTorch vs converted Flax logits (needs torch: the hf extra)")
  parity.add_argument("--hf", required=True)
  parity.add_argument("--tolerance", type=float, default=1e-4, help="exit 1 above this max |logit diff|")
  parity.add_argument("--seed", type=int, default=0)
  parity.add_argument("--batch", type=int, default=2)
  args = parser.parse_args(argv)
  if overrides:
    raise UsageError(f"mirage convert takes no --config.* overrides (got {overrides[0]})")
  from mirage_jax.commands import convert
  if args.action == "hf-to-jax":
    out = convert.hf_to_jax(args.hf, args.out, dtype=args.dtype, param_dtype=args.param_dtype, base=args.base)
  elif args.action == "jax-to-hf":
    out = convert.jax_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                            adapter_out=args.adapter_out or None)
  else:
    from mirage_jax.models import hf_parity
    out = hf_parity.check_parity(args.hf, hf_parity.ParityConfig(seed=args.seed, batch=args.batch,
                                                                 tol=args.tolerance))
  print(json.dumps(out, sort_keys=True))
  return 0 if out.get("ok", True) else 1


@command("generate", "sample N candidate responses per query (forget-set construction), resumable JSONL")
def _generate(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  _add_run_flags(parser, "a run directory (its latest checkpoint), e.g. a converted base model")
  parser.add_argument("--split", default="", help="a split of the run's dataset (--config.data.path=BUILT)")
  parser.add_argument("--kinds", default="", help="only these instruction kinds of --split (e.g. unsafe_image)")
  parser.add_argument("--input", default="", help="a VLGuard-format JSON (train.json): its unsafe images' queries")
  parser.add_argument("--image_dir", action="append", default=[],
                      help="more folders to find --input's images in (default: <dir>/train, <dir>)")
  parser.add_argument("--tokenizer", default="", help="tokenizer dir for --input (default: the checkpoint's)")
  parser.add_argument("--aspect", default="pad", choices=["pad", "crop"], help="--input image squaring")
  parser.add_argument("--lenient", action="store_true", help="skip (and count) unusable --input records")
  parser.add_argument("--out", required=True, help="JSONL, one row per query (appended: reruns resume)")
  parser.add_argument("--num_candidates", type=int, default=4)
  parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (then --num_candidates=1)")
  parser.add_argument("--top_p", type=float, default=0.9)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--limit", type=int, default=0, help="only the first N queries (0: all)")
  _add_distributed_flags(parser)
  args = parser.parse_args(argv)
  _init_distributed(args)
  from mirage_jax.commands import generate
  _print_json(generate.generate(
      out=args.out, workdir=args.workdir, checkpoint=args.checkpoint, config_spec=args.config, overrides=overrides,
      split=args.split, input_json=args.input, kinds=args.kinds, image_dirs=args.image_dir,
      tokenizer=args.tokenizer, aspect=args.aspect, lenient=args.lenient, num_candidates=args.num_candidates,
      temperature=args.temperature, top_p=args.top_p, seed=args.seed, limit=args.limit))
  return 0


@command("select", "a judge model picks the most harmful candidate per image -> the harmful_responses JSON")
def _select(parser: argparse.ArgumentParser, argv: Sequence[str], overrides: Sequence[str]) -> int:
  parser.add_argument("--candidates", nargs="+", action="extend", default=[], required=True,
                      help="mirage generate JSONL file(s), merged per image in this order (e.g. one per model)")
  parser.add_argument("--judge_checkpoint", default="", help="the judge: a converted HF LLaVA or LLaMA checkpoint "
                                                            "(--config.* overrides apply to it)")
  parser.add_argument("--out", required=True, help="the harmful_responses JSON (image -> response)")
  parser.add_argument("--prompt", default="", help="a preset (default optml_harmful: the official selection "
                                                   "prompt of OPTML-Group/VLM-Safety-Unlearn) or a prompt file")
  parser.add_argument("--judge_batch_size", type=int, default=64, help="judge rows per batch")
  parser.add_argument("--max_new_tokens", type=int, default=100, help="judge answer length (the official: 100)")
  _add_distributed_flags(parser)
  args = parser.parse_args(argv)
  _init_distributed(args)
  from mirage_jax.commands import generate
  from mirage_jax.eval import select
  summary = generate.select(candidates=args.candidates, out=args.out, judge_checkpoint=args.judge_checkpoint,
                            prompt=args.prompt, overrides=overrides, judge_batch_size=args.judge_batch_size,
                            max_new_tokens=args.max_new_tokens)
  _print_json(summary)
  print(select.summary_line(summary), file=sys.stderr)
  return 0


def _add_run_flags(parser: argparse.ArgumentParser, workdir_help: str) -> None:
  """--workdir | --checkpoint (one of them, required) and --config: which trained model a command loads."""
  group = parser.add_mutually_exclusive_group(required=True)
  group.add_argument("--workdir", help=workdir_help)
  group.add_argument("--checkpoint", help="a checkpoint step directory (…/checkpoints/<step>)")
  parser.add_argument("--config", help="config spec to use instead of the run's saved config")


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
  program = argv is None  # run as the `mirage` program (not called with arguments from Python)
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
  except UserError as e:  # a user's mistake is one line; anything else keeps its traceback
    if os.environ.get("MIRAGE_DEBUG"):
      raise
    kind = "stopped" if isinstance(e, Stopped) else "error"
    message, abandon = f"mirage {name}: {kind}: {e}", e.abandon_process
    drop_package_frames(e)  # what caused it may be logged again by a library (below); it is not a crash of ours
  # The failed command's frames are gone now: collecting them lets libraries that log what they leave behind
  # (asyncio's "exception was never retrieved" from a failed background save) do so above the one error line;
  # the "coroutine was never awaited" warnings of that garbage would name this line, so they are not shown.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    gc.collect()
  print(message, file=sys.stderr)
  if abandon and program:  # see UserError.abandon_process; never from a caller's own process (tests)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)
  return 2


if __name__ == "__main__":
  sys.exit(main())
