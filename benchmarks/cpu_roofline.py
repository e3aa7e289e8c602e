"""This CPU's practical peak, and each `mirage demo` stage's train step measured against it.

In one process: a jitted float32 matmul at a few sizes (the best GFLOP/s is the machine's practical peak),
then the compiled train step of every demo stage at `--size` (the demo's own configs and overrides, built
by `mirage_jax.commands.demo`), each warmed up and timed for `--steps` steps two ways:

  step         what the demo's loop does per step: draw the batches on the host, put them on the devices,
               run the step (`mirage_jax.train.loop.Stepper.step`)
  device_only  the same steps on batches drawn beforehand: the compiled step alone

Model FLOPs per step are XLA's cost analysis of the compiled step (at `tiny` the layers are unrolled, so
every layer is counted; a scanned stack is counted once per loop body, which the output flags). The stages
that start from the base are initialised from a 2-step base trained first into a temporary directory (the
weights do not change the step's cost). Prints one JSON line:

  {"peak_gflops", "matmul_gflops": {n: ...}, "stages": {stage: achieved / peak (host batching included)},
   "device_only": {stage: ...}, "step_s": {...}, "device_step_s": {...}, "gflop_per_step": {...},
   "scanned_layers": bool, "load_avg": [...], "cpus": n}

  python benchmarks/cpu_roofline.py                      # every stage at tiny: ~3-5 minutes on 2 cores
  python benchmarks/cpu_roofline.py --stages=base,npo --steps=20 --config.data.world.seed=1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def matmul_gflops(n: int, reps: int = 5) -> float:
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(reps))
  return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def stage_configs(stages, size: str, overrides) -> dict:
  """{stage: its demo training config} in the demo's order."""
  from mirage_jax.commands import demo
  points = demo.stage_points(stages, size=size, seed=0)
  configs = demo.point_configs(points, overrides)
  return {p.labels["method"]: (p, configs[p.name]) for p in points}


def from_base(config, base_config, init: pathlib.Path):
  """`config` initialised from a 2-step run of `base_config` in `init` (trained once, then reused): the
  weights do not change a step's cost."""
  from mirage_jax import configlib
  from mirage_jax.train import checkpoint, loop
  if checkpoint.latest_step_on_disk(init / checkpoint.CHECKPOINT_DIR) != 2:
    loop.run(configlib.apply_overrides(base_config, ["--config.total_steps=2", "--config.checkpoint_every=2"]),
             init)
  return configlib.apply_overrides(config, [f"--config.init_from={init}"])


def time_stage(config, workdir: pathlib.Path, steps: int, warmup: int) -> dict:
  import jax

  from mirage_jax.train import loop
  s = loop.stepper(config, workdir)
  try:
    s.step(warmup)
    t_step = _timed(lambda: s.step(steps)) / steps
    drawn = [s.batches() for _ in range(steps)]
    jax.block_until_ready(drawn)

    def device_steps():
      metrics = {}
      for b in drawn:
        metrics = s.device_step(b)
      jax.block_until_ready(metrics)
    t_device = _timed(device_steps) / steps
    return {"step_s": t_step, "device_step_s": t_device, "flops": xla_flops(s.compiled)}
  finally:
    s.close()


def main(argv=None) -> dict:
  from mirage_configs import methods
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="tiny")
  parser.add_argument("--stages", default=",".join(methods.NAMES))
  parser.add_argument("--steps", type=int, default=10, help="timed steps per stage")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--matmul", default="1024,2048,4096", help="matmul sizes for the peak")
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad} (config overrides look like --config.key=value)")
  mm = {int(n): matmul_gflops(int(n)) for n in args.matmul.split(",")}
  peak = max(mm.values())
  stages = [s for s in args.stages.split(",") if s]
  unknown = sorted(set(stages) - set(methods.NAMES))
  if unknown:
    parser.error(f"unknown stages {unknown}; valid: {', '.join(methods.NAMES)}")
  configs = stage_configs([methods.BASE, *stages], args.size, overrides)
  out = {"peak_gflops": peak, "matmul_gflops": mm, "stages": {}, "device_only": {}, "step_s": {},
         "device_step_s": {}, "gflop_per_step": {}, "size": args.size, "steps": args.steps,
         "cpus": os.cpu_count(), "load_avg_before": list(os.getloadavg())}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    base_config = configs[methods.BASE][1]
    for stage in stages:
      point, config = configs[stage]
      if point.init_from:
        config = from_base(config, base_config, tmp / "init-base")
      r = time_stage(config, tmp / stage, args.steps, args.warmup)
      gflop = r["flops"] / 1e9
      out["gflop_per_step"][stage] = gflop
      out["step_s"][stage] = r["step_s"]
      out["device_step_s"][stage] = r["device_step_s"]
      out["stages"][stage] = round(gflop / r["step_s"] / peak, 4)
      out["device_only"][stage] = round(gflop / r["device_step_s"] / peak, 4)
    out["scanned_layers"] = bool(base_config.model.scan_layers)
  out["load_avg_after"] = list(os.getloadavg())
  print(json.dumps(out, sort_keys=True))
  return out


if __name__ == "__main__":
  main()
