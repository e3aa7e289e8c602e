"""Greedy decoding speed of mirage_jax alone: tokens/s of `decode.generate` under `jax.jit` (8 rows, a prompt of
the image tokens + 24 text tokens, 32 new tokens, EOS never hit) at each size, median of 5 calls after one warm-up.

    python benchmarks/decode_speed.py --sizes=tiny,small [--root=DIR]

`--root` imports mirage_jax from another checkout (a `git worktree` of an older commit), so that before and
after are timed one after the other on one machine; `checksum` (the sum of the generated ids) must agree.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="tiny,small")
  p.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parents[1]))
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--new_tokens", type=int, default=32)
  args = p.parse_args(argv)
  sys.path[:0] = [os.path.join(args.root, "benchmarks"), args.root]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  from flax import nnx

  import vs_hf
  from mirage_jax.models import decode
  from mirage_jax.models.vlm import VLM
  out = {"root": args.root, "load_1min": round(os.getloadavg()[0], 2), "sizes": {}}
  for size in args.sizes.split(","):
    cfg = vs_hf.model_config(size)
    graphdef, params = nnx.split(VLM(cfg, rngs=nnx.Rngs(0)))
    batch = vs_hf.make_batch(cfg, args.batch, cfg.vision.num_image_tokens + 24)
    prompts = {k: batch[k] for k in ("tokens", "mask", "images")}
    gen_cfg = decode.GenerateConfig(max_new_tokens=args.new_tokens, eos_id=-1, pad_id=0)
    gen = jax.jit(lambda p, pr: decode.generate(nnx.merge(graphdef, p), prompts=pr, config=gen_cfg))
    t = time.perf_counter()
    ids = np.asarray(gen(params, prompts))
    first = time.perf_counter() - t
    times = []
    for _ in range(5):
      t = time.perf_counter()
      ids = np.asarray(gen(params, prompts))
      times.append(time.perf_counter() - t)
    out["sizes"][size] = {"tokens_per_s": round(args.batch * args.new_tokens / statistics.median(times), 1),
                          "first_call_s": round(first, 2), "checksum": int(ids.sum())}
  print(json.dumps(out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
