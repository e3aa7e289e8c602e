"""mirage_jax vs Hugging Face PyTorch on the same LLaVA weights, on this machine's CPU (issue 5 §5).

For each model size (the `tiny` and `small` rows of `configs/models.py`, float32, no rematerialisation on
either side) random mirage params are written as an HF LLaVA directory (`hf_convert`) and loaded by
transformers, so both sides run identical weights. Both are warmed up (JAX compiles, PyTorch allocates), then:

  (a) train step: forward + backward + AdamW update on the same batch (answer-token NLL; HF `labels`) —
      `train_step_speedup` = HF seconds / mirage seconds (median of the timed repetitions);
  (b) batched greedy generation with a KV cache (`mirage_jax.models.decode.generate` under `jax.jit` vs HF
      `generate(do_sample=False)`), every row producing exactly `new_tokens` tokens —
      `decode_speedup` = mirage tokens/s / HF tokens/s.

The headline numbers are geometric means over the sizes; per-size numbers (and the first-step losses of both
sides, which must agree) are under `sizes`. Prints one JSON line. Needs the `hf` extra (torch).

  python benchmarks/vs_hf.py --quick        # < 5 minutes on 2 CPU cores
  python benchmarks/vs_hf.py --sizes=tiny,small --batch=8 --seq=256 --new_tokens=64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: no accelerator probing


def model_config(size: str):
  from mirage_configs import models

  from mirage_jax.models.config import VLMConfig
  block = models.model_config(size).to_dict()
  block.update(dtype="float32", param_dtype="float32", remat="none")
  block["image_token_id"] = block["text"]["vocab_size"] - 1
  return VLMConfig.from_config(block)


def write_hf(cfg, params, out: pathlib.Path) -> None:
  from mirage_jax.models import hf_convert
  hf_convert.hf_config_from_model(cfg, pad_token_id=0).save_pretrained(str(out))
  hf_convert.write_hf_state(hf_convert.hf_state_from_params(params, cfg), out, max_shard_bytes=1 << 40)


def make_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
  """BOS, the image tokens, random text; the loss covers the second half (an 'answer')."""
  rng = np.random.default_rng(seed)
  n_img = cfg.vision.num_image_tokens
  if seq <= n_img + 8:
    raise ValueError(f"--seq={seq} leaves no text after {n_img} image tokens")
  text = rng.integers(5, cfg.image_token_id, (batch, seq - n_img - 1))
  tokens = np.concatenate([np.ones((batch, 1), np.int64), np.full((batch, n_img), cfg.image_token_id), text], 1)
  loss_mask = np.zeros_like(tokens)
  loss_mask[:, seq - (seq - n_img) // 2:] = 1
  v = cfg.vision
  images = rng.standard_normal((batch, v.image_size, v.image_size, v.num_channels)).astype(np.float32)
  return {"tokens": tokens.astype(np.int32), "mask": np.ones_like(tokens, np.int32),
          "loss_mask": loss_mask.astype(np.int32), "images": images}


def timed(fn, reps: int) -> tuple[float, object]:
  """Median wall seconds of `reps` calls (after the caller's warm-up) and the last result."""
  times, out = [], None
  for _ in range(reps):
    t = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


# --------------------------------------------------------------------------- mirage_jax
class Mirage:
  def __init__(self, cfg, params, lr: float):
    import jax
    import optax
    from flax import nnx

    from mirage_jax.losses import sft
    from mirage_jax.models import decode
    from mirage_jax.models.vlm import VLM
    self.jax, self.cfg = jax, cfg
    self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0))))
    self.params = jax.device_put(params)
    tx = optax.adamw(lr, weight_decay=0.0)
    self.opt_state = tx.init(self.params)

    def train_step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(lambda p: sft.nll(nnx.merge(self.graphdef, p), batch,
                                                          impl="reference"))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    self._step = jax.jit(train_step, donate_argnums=(0, 1))
    self._decode = decode

  def train_step(self, batch) -> float:
    self.params, self.opt_state, loss = self._step(self.params, self.opt_state, batch)
    return float(loss)  # blocks

  def generator(self, new_tokens: int):
    cfg = self._decode.GenerateConfig(max_new_tokens=new_tokens, eos_id=-1, pad_id=0)  # never stops early
    nnx = __import__("flax").nnx

    @self.jax.jit
    def gen(params, prompts):
      return self._decode.generate(nnx.merge(self.graphdef, params), prompts=prompts, config=cfg)

    return lambda prompts: np.asarray(gen(self.params, prompts))


# --------------------------------------------------------------------------- HF PyTorch
class HF:
  def __init__(self, hf_dir: pathlib.Path, lr: float):
    import torch
    from transformers import LlavaForConditionalGeneration
    self.torch = torch
    self.model = LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32)
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)

  def inputs(self, batch) -> dict:
    t = self.torch
    return {"input_ids": t.from_numpy(batch["tokens"].astype(np.int64)),
            "attention_mask": t.from_numpy(batch["mask"].astype(np.int64)),
            "pixel_values": t.from_numpy(batch["images"].transpose(0, 3, 1, 2).copy())}

  def train_step(self, batch) -> float:
    self.model.train()
    inputs = self.inputs(batch)
    labels = inputs["input_ids"].clone()
    labels[self.torch.from_numpy(batch["loss_mask"]) == 0] = -100
    loss = self.model(**inputs, labels=labels).loss
    loss.backward()
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  def generator(self, new_tokens: int):
    self.model.eval()

    def gen(batch):
      with self.torch.no_grad():
        out = self.model.generate(**self.inputs(batch), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, use_cache=True, pad_token_id=0)
      return out[:, batch["tokens"].shape[1]:].numpy()

    return gen


# --------------------------------------------------------------------------- one size
def bench_size(size: str, args, workdir: pathlib.Path) -> dict:
  import jax
  from flax import nnx

  from mirage_jax.models.vlm import VLM
  cfg = model_config(size)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(VLM(cfg, rngs=nnx.Rngs(0)))))
  write_hf(cfg, params, workdir / size)
  n_params = int(sum(a.size for a in jax.tree.leaves(params)))
  batch = make_batch(cfg, args.batch, args.seq)
  out = {"params": n_params, "batch": args.batch, "seq": args.seq, "image_tokens": cfg.vision.num_image_tokens}

  mirage, hf = Mirage(cfg, params, args.lr), HF(workdir / size, args.lr)
  del params
  t0 = time.perf_counter()
  first = (mirage.train_step(batch), hf.train_step(batch))  # warm-up (compile); same weights, same loss
  out["first_loss"] = {"mirage": first[0], "hf": first[1]}
  out["warmup_s"] = round(time.perf_counter() - t0, 2)
  jax_s, _ = timed(lambda: mirage.train_step(batch), args.reps)
  hf_s, _ = timed(lambda: hf.train_step(batch), args.reps)
  out["train_step_s"] = {"mirage": round(jax_s, 4), "hf": round(hf_s, 4)}
  out["train_step_speedup"] = round(hf_s / jax_s, 3)

  prompt = make_batch(cfg, args.gen_batch, args.prompt_len, seed=1)
  prompts = {k: prompt[k] for k in ("tokens", "mask", "images")}
  gen_j, gen_h = mirage.generator(args.new_tokens), hf.generator(args.new_tokens)
  gen_j(prompts), gen_h(prompts)  # warm-up
  jax_s, toks_j = timed(lambda: gen_j(prompts), args.reps)
  hf_s, toks_h = timed(lambda: gen_h(prompts), args.reps)
  n = args.gen_batch * args.new_tokens
  out["decode_tokens_per_s"] = {"mirage": round(n / jax_s, 1), "hf": round(n / hf_s, 1)}
  out["decode_speedup"] = round(hf_s / jax_s, 3)
  out["greedy_agreement"] = float((toks_j[:, :8] == toks_h[:, :8]).mean())  # the trained weights differ a bit
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="small batches and few repetitions (< 5 min, 2 cores)")
  p.add_argument("--sizes", default="tiny,small")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--gen_batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--lr", type=float, default=1e-5)
  p.add_argument("--torch_threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
  args = p.parse_args(argv)
  if args.quick:
    args.batch, args.seq, args.gen_batch, args.prompt_len, args.new_tokens, args.reps = 4, 128, 4, 96, 32, 3
  import jax
  import torch
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  started, load_before = time.perf_counter(), os.getloadavg()[0]
  sizes = {}
  with tempfile.TemporaryDirectory() as tmp:
    for size in args.sizes.split(","):
      sizes[size] = bench_size(size, args, pathlib.Path(tmp))
  geo = lambda k: round(math.exp(statistics.fmean(math.log(s[k]) for s in sizes.values())), 3)  # noqa: E731
  print(json.dumps({
      "train_step_speedup": geo("train_step_speedup"), "decode_speedup": geo("decode_speedup"),
      "targets": {"train_step_speedup": 1.2, "decode_speedup": 3.0}, "sizes": sizes, "quick": args.quick,
      "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
      "torch_threads": torch.get_num_threads(), "jax": jax.__version__, "torch": torch.__version__,
      "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # other work on a shared machine
      "wall_s": round(time.perf_counter() - started, 1)}, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
