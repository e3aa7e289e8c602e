"""Where the time of a compiled step goes: XLA's per-op timing on this CPU, from a `jax.profiler` trace.

Two programs, each warmed up, then traced for `--steps` calls (`jax.profiler.trace(...,
create_perfetto_trace=True)`), and the trace's XLA op events summed by op name and by op kind:

  train   a `mirage demo` stage's compiled train step at `--size` (the demo's config, `--stage`, default the
          base's pretraining step), through `mirage_jax.train.loop.Stepper.device_step` on batches drawn
          beforehand
  decode  `decode.generate` under `jax.jit` (`benchmarks/decode_speed.py`'s prompts: 8 rows, image tokens + 24
          text tokens, 32 new tokens) with random weights at `--size`

Prints one JSON line: for each program the wall seconds per call, the traced op time per call, and the top
`--top` ops and op kinds with milliseconds per call and their share of the traced op time. Op kinds are the
op name without its numeric suffix (`fusion.12` -> `fusion`, `dot.3` -> `dot`); a fusion's name comes from
XLA (`loop_fusion`, `input_reduce_fusion`, ...) so the kinds say whether matmuls, fused elementwise loops,
reductions or copies take the time.

  python benchmarks/profile_ops.py                                   # train (base) and decode at tiny
  python benchmarks/profile_ops.py --programs=train --stage=npo --size=tiny --steps=5
  python benchmarks/profile_ops.py --programs=decode --size=small --root=../older-checkout
"""

from __future__ import annotations

import argparse
import collections
import gzip
import itertools
import json
import os
import pathlib
import re
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Trace events that are not XLA ops: the runtime's own bookkeeping, Python frames, thread names.
_NOT_OPS = re.compile(r"^(\$|Thunk|Execute|PjRt|TfrtCpu|ThreadpoolListener|XlaModule|jit_|Compile|"
                      r"ProcessInput|HandleInput|CopyToDevice|BufferFromHostBuffer|Await|PjitFunction)")


def op_kind(name: str) -> str:
  """`fusion.12` -> `fusion`, `dot.3` -> `dot`, `loop_add_fusion` -> `loop_add_fusion`."""
  return re.sub(r"[.:]\d+$", "", name)


def read_trace(trace_dir: pathlib.Path) -> list[dict]:
  """The complete ('X') events of the perfetto trace `jax.profiler.trace` wrote under `trace_dir`."""
  files = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: the profiler wrote no trace")
  with gzip.open(files[-1], "rt") as f:
    doc = json.load(f)
  events = doc["traceEvents"] if isinstance(doc, dict) else doc
  return [e for e in events if e.get("ph") == "X" and "dur" in e]


def op_table(events: list[dict], calls: int, top: int) -> dict:
  """Per-call milliseconds of XLA op events, by name and by kind, with each one's share of the op time."""
  by_name: collections.Counter = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if name and not _NOT_OPS.match(name) and "::" not in name and " " not in name:
      by_name[name] += e["dur"] / 1e3  # microseconds -> ms
  total = sum(by_name.values())
  by_kind: collections.Counter = collections.Counter()
  for name, ms in by_name.items():
    by_kind[op_kind(name)] += ms

  def rows(counter):
    return [{"op": k, "ms_per_call": round(v / calls, 3), "share": round(v / total, 3) if total else 0.0}
            for k, v in counter.most_common(top)]
  return {"op_ms_per_call": round(total / calls, 2), "ops": len(by_name), "top_ops": rows(by_name),
          "top_kinds": rows(by_kind)}


def profile(fn, *, steps: int, warmup: int, trace_dir: pathlib.Path, top: int) -> dict:
  """Warm `fn` up, time `steps` calls, trace `steps` more and tabulate the trace's ops."""
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn())
  t = time.perf_counter()
  for _ in range(steps):
    jax.block_until_ready(fn())
  wall = (time.perf_counter() - t) / steps
  with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(fn())
  return {"wall_s_per_call": round(wall, 4), **op_table(read_trace(trace_dir), steps, top)}


def train_program(stage: str, size: str, overrides, tmp: pathlib.Path):
  """The compiled train step of demo stage `stage` (from a 2-step base when it starts from one), with the
  demo's configs as `benchmarks/cpu_roofline.py` builds them."""
  import cpu_roofline
  from mirage_configs import methods
  from mirage_jax.train import loop
  configs = cpu_roofline.stage_configs([methods.BASE, stage] if stage != methods.BASE else [methods.BASE],
                                       size, overrides)
  point, config = configs[stage]
  if point.init_from:
    config = cpu_roofline.from_base(config, configs[methods.BASE][1], tmp / "init-base")
  stepper = loop.stepper(config, tmp / stage)
  drawn = itertools.cycle([stepper.batches() for _ in range(4)])
  return stepper, lambda: stepper.device_step(next(drawn))


def decode_program(size: str):
  import jax
  from flax import nnx

  import vs_hf
  from mirage_jax.models import decode
  from mirage_jax.models.vlm import VLM
  cfg = vs_hf.model_config(size)
  graphdef, params = nnx.split(VLM(cfg, rngs=nnx.Rngs(0)))
  batch = vs_hf.make_batch(cfg, 8, cfg.vision.num_image_tokens + 24)
  prompts = {k: batch[k] for k in ("tokens", "mask", "images")}
  gen_cfg = decode.GenerateConfig(max_new_tokens=32, eos_id=-1, pad_id=0)
  gen = jax.jit(lambda p, pr: decode.generate(nnx.merge(graphdef, p), prompts=pr, config=gen_cfg))
  return lambda: gen(params, prompts)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--programs", default="train,decode")
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--stage", default="base", help="the demo stage whose train step is profiled")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--top", type=int, default=12)
  parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parents[1]),
                      help="import mirage_jax from this checkout (before / after on one machine)")
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad} (config overrides look like --config.key=value)")
  programs = [p for p in args.programs.split(",") if p]
  unknown = sorted(set(programs) - {"train", "decode"})
  if unknown:
    parser.error(f"unknown programs {unknown}; valid: train, decode")
  root = pathlib.Path(args.root).resolve()
  sys.path[:0] = [str(root / "benchmarks"), str(root)]
  out = {"size": args.size, "steps": args.steps, "root": str(root), "cpus": os.cpu_count(),
         "load_avg_before": list(os.getloadavg())}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    if "train" in programs:
      stepper, fn = train_program(args.stage, args.size, overrides, tmp)
      try:
        out[f"train_{args.stage}"] = profile(fn, steps=args.steps, warmup=args.warmup, trace_dir=tmp / "trace-train",
                                             top=args.top)
      finally:
        stepper.close()
    if "decode" in programs:
      out["decode"] = profile(decode_program(args.size), steps=args.steps, warmup=args.warmup,
                              trace_dir=tmp / "trace-decode", top=args.top)
  out["load_avg_after"] = list(os.getloadavg())
  print(json.dumps(out))
  return out


if __name__ == "__main__":
  main()
