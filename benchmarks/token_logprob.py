"""Benchmarks of `mirage_kernels.token_logprob`: compiled memory, CPU speed, and the 7b NPO step (TPU AOT).

  python benchmarks/token_logprob.py                          # memory + speed (a few minutes on 2 cores)
  python benchmarks/token_logprob.py --only=memory --dtypes=bfloat16
  python benchmarks/token_logprob.py --only=e2e --e2e_config=configs/unlearn/npo.py:7b --e2e_topology=v5e:16x16
      # ~3 CPU-minutes per 7b compile (one per --e2e_impls entry; --e2e_max_batch: several more)

Prints one JSON line per measurement (and nothing else on stdout):

  memory  XLA's `memory_analysis()` of the compiled `value_and_grad` of sum(logp) at N x D x V (default
          8192 x 4096 x 32000, nothing is run): temp bytes per implementation and the ratio to the reference
          compiled for the same platform. CPU compiles for `reference` / `chunked_xla`; TPU AOT (libtpu, one
          chip of `--tpu_topology`) for `reference` / `chunked_xla` / `pallas_tpu`.
  speed   CPU wall time of the jitted value_and_grad at a size that runs in about a second, implementations
          interleaved in one run (best and median of `--repeats`), and the ratios to the reference.
  e2e     the NPO train step of a config AOT-compiled for a TPU topology (`mirage_jax.compile`) with each
          `loss.logprob_impl` of `--e2e_impls`: bytes per device at a global batch, and with
          `--e2e_max_batch` the largest global batch that fits (several compiles each).

Target (issue 6): fused temp bytes <= 1/8 of the reference; CPU time <= 1.1x the reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import time

# A CPU host: TPU numbers come from AOT compiles (libtpu describes the topology; no TPU backend is started).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import mirage_kernels  # noqa: E402

CPU_IMPLEMENTATIONS = ("reference", "chunked_xla")
TPU_IMPLEMENTATIONS = ("reference", "chunked_xla", "pallas_tpu")


def emit(**record) -> None:
  print(json.dumps(record, sort_keys=True), flush=True)


def value_and_grad(implementation: str):
  """value_and_grad of sum(logp) in (h, w): the shape of every loss's use of the kernel."""

  def loss(h_nd, w_dv, labels_n):
    return jnp.sum(mirage_kernels.token_logprob(h_nd, w_dv, labels_n, implementation=implementation))

  return jax.value_and_grad(loss, argnums=(0, 1))


def shapes(n: int, d: int, v: int, dtype, sharding=None) -> tuple[jax.ShapeDtypeStruct, ...]:
  return tuple(jax.ShapeDtypeStruct(shape, t, sharding=sharding)
               for shape, t in (((n, d), dtype), ((d, v), dtype), ((n,), jnp.int32)))


def compiled_memory(implementation: str, args, *, mesh=None) -> dict:
  """Temp bytes of the compiled value_and_grad and its number of Mosaic kernels; for TPU (`mesh` of TPU
  devices) compiled ahead of time. (XLA:TPU keeps small buffers, such as per-token vectors, in VMEM: they
  are not HBM temp bytes.)"""
  traced = jax.jit(value_and_grad(implementation)).trace
  if mesh is None:
    compiled = traced(*args).lower().compile()
  else:
    with jax.set_mesh(mesh):  # Pallas reads the chip it lowers for from the ambient mesh
      compiled = traced(*args).lower(lowering_platforms=("tpu",)).compile()
  return dict(temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
              mosaic_kernels=compiled.as_text().count('custom_call_target="tpu_custom_call"'))


def tpu_chip(topology: str) -> jax.sharding.Mesh | None:
  """A one-chip mesh of a TPU topology described by libtpu (None when libtpu is not installed)."""
  if importlib.util.find_spec("libtpu") is None:
    return None
  from mirage_jax import compile as aot
  return jax.sharding.Mesh(np.array(aot.topology_devices(topology)[:1]), ("chip",))


def bench_memory(args) -> None:
  n, d, v = args.memory_shape
  platforms = [("cpu", CPU_IMPLEMENTATIONS, None)]
  chip = tpu_chip(args.tpu_topology)
  if chip is None:
    emit(bench="memory", platform="tpu", skipped="libtpu not installed (pip install -e '.[tpu]')")
  else:
    platforms.append((f"tpu {args.tpu_topology} (1 chip, AOT)", TPU_IMPLEMENTATIONS, chip))
  for (platform, implementations, mesh), dtype in itertools.product(platforms, map(jnp.dtype, args.dtypes)):
    sharding = None if mesh is None else NamedSharding(mesh, P())
    base = None
    for implementation in implementations:
      t0 = time.perf_counter()
      mem = compiled_memory(implementation, shapes(n, d, v, dtype, sharding), mesh=mesh)
      temp = mem["temp_bytes"]
      base = temp if implementation == "reference" else base
      emit(bench="memory", platform=platform, implementation=implementation, n=n, d=d, v=v, dtype=dtype.name,
           temp_mib=round(temp / 2**20, 1), ratio_to_reference=round(temp / base, 4),
           compile_s=round(time.perf_counter() - t0, 1), **mem)


def bench_speed(args) -> None:
  n, d, v = args.speed_shape
  dtype = jnp.dtype(args.speed_dtype)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(n, d)), dtype)
  w = jnp.asarray(0.05 * rng.normal(size=(d, v)), dtype)
  labels = jnp.asarray(rng.integers(-1, v, n), jnp.int32)
  fns = {impl: jax.jit(value_and_grad(impl)) for impl in CPU_IMPLEMENTATIONS}
  for fn in fns.values():
    jax.block_until_ready(fn(h, w, labels))  # compile and warm up
  times = {impl: [] for impl in fns}
  for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
    for impl, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(h, w, labels))
      times[impl].append(time.perf_counter() - t0)
  best, median = min(times["reference"]), float(np.median(times["reference"]))
  for impl, ts in times.items():
    emit(bench="speed", platform="cpu", implementation=impl, n=n, d=d, v=v, dtype=dtype.name,
         best_s=round(min(ts), 4), median_s=round(float(np.median(ts)), 4), repeats=args.repeats,
         ratio_to_reference=round(min(ts) / best, 3), median_ratio_to_reference=round(np.median(ts) / median, 3))


def bench_e2e(args) -> None:
  from mirage_jax import compile as aot
  from mirage_jax import configlib
  if importlib.util.find_spec("libtpu") is None:
    emit(bench="e2e", skipped="libtpu not installed (pip install -e '.[tpu]')")
    return
  devices = aot.topology_devices(args.e2e_topology)
  for impl in args.e2e_impls:
    config = configlib.apply_overrides(configlib.load(args.e2e_config), [f"--config.loss.logprob_impl={impl}"])
    with config.unlocked():
      config.batch_size = args.e2e_batch or config.batch_size
    result = aot.compile_train_step(config, devices, topology=args.e2e_topology).to_json()
    record = dict(bench="e2e", config=args.e2e_config, topology=args.e2e_topology, logprob_impl=impl,
                  **{k: result[k] for k in ("global_batch", "temp_bytes", "total_bytes", "hbm_bytes", "fits",
                                            "compile_s") if k in result})
    if args.e2e_max_batch:
      record["max_global_batch"], _ = aot.max_batch(config, devices, topology=args.e2e_topology)
    emit(**record)


def _shape(text: str) -> tuple[int, int, int]:
  try:
    n, d, v = (int(x) for x in text.lower().split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected NxDxV (e.g. 8192x4096x32000), got {text!r}") from None
  return n, d, v


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="memory,speed", help="comma list of memory, speed, e2e")
  parser.add_argument("--dtypes", default="float32,bfloat16", type=lambda s: [d for d in s.split(",") if d],
                      help="dtypes of h and w (memory)")
  parser.add_argument("--speed_dtype", default="float32", choices=("float32", "bfloat16"),
                      help="dtype of h and w (speed; XLA:CPU has no fast bf16 matmul)")
  parser.add_argument("--memory_shape", type=_shape, default=(8192, 4096, 32000), help="NxDxV")
  parser.add_argument("--speed_shape", type=_shape, default=(2048, 512, 8192), help="NxDxV")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--tpu_topology", default="v5e:2x2", help="topology whose first chip the TPU AOT uses")
  parser.add_argument("--e2e_config", default="configs/unlearn/npo.py:7b")
  parser.add_argument("--e2e_topology", default="v5e:16x16")
  parser.add_argument("--e2e_batch", type=int, default=256, help="global batch (0: the config's)")
  parser.add_argument("--e2e_impls", default="reference,pallas_tpu", type=lambda s: [i for i in s.split(",") if i],
                      help="loss.logprob_impl values to compile")
  parser.add_argument("--e2e_max_batch", action="store_true", help="also search the largest batch that fits")
  args = parser.parse_args(argv)
  benches = {"memory": bench_memory, "speed": bench_speed, "e2e": bench_e2e}
  only = [b for b in args.only.split(",") if b]
  unknown = sorted(set(only) - set(benches))
  if unknown:
    parser.error(f"--only: unknown benchmarks {unknown}; valid: {sorted(benches)}")
  for name in only:
    benches[name](args)


if __name__ == "__main__":
  main()
