"""`mirage compile`: AOT-compile a config's real train step for a TPU pod topology from any host (a CPU laptop).

libtpu (the `tpu` extra) describes the topology (`jax.experimental.topologies`); the mesh, shardings, optimizer
state, data batch and frozen reference are built exactly as `mirage train` builds them, but as
ShapeDtypeStructs, so nothing is allocated. XLA's memory analysis of the compiled executable says whether a
global batch fits in a chip's HBM before anyone pays for the slice:

  mirage compile --config=configs/unlearn/npo.py:7b --topology=v5e:16x16 [--batch=256] [--max_batch]

The topology string is `<chip>:<shape>` (`v5e:16x16`, `v5p:4x4x4`, `v6e:8x8`, `v4:2x2x2`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import jax
import ml_collections

from mirage_configs import comma_list
from mirage_jax import sharding
from mirage_jax.errors import ConfigError
from mirage_jax.data import pipeline
from mirage_jax.losses import make_loss
from mirage_jax.models import VLMConfig
from mirage_jax.train import runtime
from mirage_jax.train.state import model_spec, param_count

# HBM per chip (bytes), by the device kind libtpu reports. Public Cloud TPU specifications.
HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,  # v5e
    "TPU v5": 95 * 2**30,  # v5p
    "TPU v6 lite": 32 * 2**30,  # v6e (Trillium)
}


class CompileError(ConfigError):
  """A topology or configuration that cannot be compiled (reported as one line)."""


def topology_devices(topology: str) -> list:
  """The devices of a TPU topology such as `v5e:16x16`, described by libtpu without any TPU attached."""
  # Several processes may describe topologies at once (tests, sweeps); libtpu's lockfile would refuse them.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  if ":" not in topology:
    raise CompileError(f"--topology={topology!r}: expected <chip>:<shape>, e.g. v5e:16x16 or v5p:4x4x4")
  try:
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as e:  # noqa: BLE001 - no libtpu, or a shape libtpu does not know: one line either way
    raise CompileError(f"cannot describe TPU topology {topology!r} ({str(e).strip().splitlines()[0]}); it needs "
                       "libtpu (pip install -e '.[tpu]') and a valid <chip>:<shape>") from e


@dataclasses.dataclass(frozen=True)
class CompileResult:
  topology: str
  device_kind: str
  devices: int
  mesh: dict
  global_batch: int
  accum_steps: int  # micro-batches per step (`optim.accum_steps`): global_batch / accum_steps rows at once
  seq_len: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  total_bytes: int  # per device: arguments + outputs - donated aliases + temporaries
  hbm_bytes: int
  fits: bool
  flops: float  # per step, all devices: 6 N tokens (+ 2 N tokens for a frozen model's forward), N = params
  xla_flops: float  # XLA's cost analysis of one device's program (counts a scanned layer loop's body once)
  compile_s: float
  error: str = ""  # the compiler's out-of-memory message (other sizes are then -1)
  trainable_params: int = 0  # parameters that train (LoRA: the adapters, and the projector if it trains)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _model_config(config: ml_collections.ConfigDict) -> VLMConfig:
  """The model as `mirage train` would build it, without opening the dataset: an unset `<image>` token id
  (-1, "the tokenizer's") becomes the last vocabulary id, which changes no shape."""
  token = int(config.model.image_token_id)
  return VLMConfig.from_config(config.model, image_token_id=config.model.text.vocab_size - 1 if token < 0 else None,
                               lora=config.get("lora"))


def compile_train_step(config: ml_collections.ConfigDict, devices: list, *, topology: str = "") -> CompileResult:
  """Lower and compile the train step of `config` for `devices`; memory per device from XLA."""
  t0 = time.time()
  try:
    mesh = sharding.make_mesh(config.mesh, devices)
  except ValueError as e:
    raise CompileError(f"mesh {dict(config.mesh)} on {len(devices)} devices: {e}") from e
  spec = model_spec(_model_config(config), mesh)
  loss = make_loss(config.loss)
  runtime.check_run(config, mesh, loss, spec)
  sharding.assert_sufficiently_sharded(spec.abstract, mesh)
  tx, sched, _, target = runtime.plan_state(config, spec, mesh, loss)
  batches = pipeline.abstract_batches(config, streams=tuple(loss.streams), image_size=spec.config.vision.image_size,
                                      mesh=mesh)
  reference = runtime.frozen_abstract(spec, loss)  # LoRA: the one frozen base (the reference without adapters)
  kind = devices[0].device_kind
  hbm = HBM_BYTES.get(kind, 0)
  common = dict(topology=topology, device_kind=kind, devices=len(devices), mesh=dict(mesh.shape),
                global_batch=config.batch_size, accum_steps=runtime.accum_steps(config), seq_len=config.data.max_len, hbm_bytes=hbm,
                flops=model_flops(config, loss, param_count(spec.abstract_params())),
                trainable_params=runtime.trainable_params(config, loss, spec))
  try:
    compiled = runtime.compile_step(spec, loss, tx, sched, mesh, target, batches, reference,
                                 skip_nonfinite=config.skip_nonfinite, accum_steps=runtime.accum_steps(config))
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler itself refuses programs that cannot fit
    temps = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
    if "RESOURCE_EXHAUSTED" not in str(e) or not temps:
      raise
    return CompileResult(**common, argument_bytes=-1, output_bytes=-1, alias_bytes=-1, xla_flops=-1.0,
                         temp_bytes=int(float(temps.group(1)) * 2**30), total_bytes=-1, fits=False,
                         compile_s=round(time.time() - t0, 1), error=str(e).strip().splitlines()[0][:300])
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  return CompileResult(
      **common, argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
      temp_bytes=mem.temp_size_in_bytes, alias_bytes=mem.alias_size_in_bytes, total_bytes=total,
      fits=not hbm or total <= hbm, xla_flops=float((cost or {}).get("flops", 0.0)),
      compile_s=round(time.time() - t0, 1))


def model_flops(config: ml_collections.ConfigDict, loss, n_params: int) -> float:
  """Training FLOPs of one step, the usual MFU estimate: forward + backward = 6 N per token of every stream,
  plus a forward (2 N per token) of the frozen reference / RMU model. Attention's T^2 term is left out."""
  tokens = config.batch_size * config.data.max_len * len(loss.streams)
  return float((6 + 2 * bool(loss.needs_reference)) * n_params * tokens)


def max_batch(config: ml_collections.ConfigDict, devices: list, *, topology: str = "",
              limit: int = 1 << 16) -> tuple[int, list[CompileResult]]:
  """The largest global batch (a multiple of the mesh's batch divisor x `optim.accum_steps`) whose step fits in
  HBM: doubling, then bisection. Returns it (0 if even the smallest does not fit) and every compile tried."""
  mesh = sharding.make_mesh(config.mesh, devices)
  unit = sharding.batch_divisor(mesh) * runtime.accum_steps(config)  # every micro-batch splits over the batch axes
  tried: list[CompileResult] = []

  def fits(units: int) -> bool:
    c = ml_collections.ConfigDict(config.to_dict())
    c.batch_size = units * unit
    tried.append(compile_train_step(c, devices, topology=topology))
    return tried[-1].fits

  lo, hi = 0, 1
  while hi * unit <= limit and fits(hi):
    lo, hi = hi, hi * 2
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo * unit, tried



def parse_mesh(spec: str) -> dict[str, int]:
  """`data:1,fsdp:-1,tensor:4` -> {"data": 1, "fsdp": -1, "tensor": 4} (axes not named keep the config's)."""
  out = {}
  for part in comma_list(spec):
    name, _, size = part.partition(":")
    if name not in sharding.MESH_AXES or not size.lstrip("-").isdigit():
      raise CompileError(f"--mesh={spec!r}: expected axis:size pairs over {sharding.MESH_AXES}, e.g. fsdp:-1,tensor:4")
    out[name] = int(size)
  return out
