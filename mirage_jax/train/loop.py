"""The training loop: one explicit function from a config and a workdir to a trained, checkpointed model.

Phases (`run` calls them in order):
  prepare  mesh, data, model & shardings (`runtime.setup`), checks, optimizer, restore (own checkpoint, else
           `init_from`, else random init), streams
  compile  the AOT-compiled step (memory analysis logged)
  train    steps (metrics one step behind, so the host never blocks the device; non-finite values stop the run
           before anything is saved), periodic eval and checkpoints, final save and eval
Every user mistake is raised as `RunError` with one clear message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mirage_configs import comma_list
from mirage_jax import configlib, errors, seeds
from mirage_jax.data import pipeline
from mirage_jax.losses import Loss, make_loss
from mirage_jax.models import lora
from mirage_jax.train import checkpoint, faults, lease, metrics as metrics_lib, runtime, scoring
from mirage_jax.train.runtime import RunError, Setup, check_run, compile_step, log_memory, plan_state, setup
from mirage_jax.train.state import ModelSpec, TrainState, init_params, new_rng, shardings_of


@dataclasses.dataclass
class RunSummary:
  workdir: str
  first_step: int
  last_step: int
  final: dict  # last logged train metrics
  eval: dict  # {split: {"loss", "token_accuracy"}} at the end
  wall_s: float
  compile_s: float
  steps_per_s: float
  stopped: str = ""  # why the run ended before total_steps ("SIGTERM", "preemption"), else ""
  skipped_steps: int = 0  # non-finite steps skipped (config.skip_nonfinite)


@dataclasses.dataclass
class _Run:
  """The live pieces of a run, handed from one phase to the next."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  main: bool  # process 0: writes metrics and config.json
  setup: Setup
  loss: Loss
  splits: pipeline.SplitCache
  tok_fp: str
  ckpt: checkpoint.Checkpointer
  plan: tuple  # (optimizer, schedule, abstract TrainState) from `plan_state`
  state: TrainState
  reference: Any  # the step's frozen argument: the reference params, the LoRA base, or None
  streams: dict[str, pipeline.Stream]
  lora_meta: dict | None = None  # LoRA: the adapters' settings and their base's identity (saved in meta)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> RunSummary:
  """Train `config` in `workdir` (resuming from its latest good checkpoint) to `config.total_steps`.

  The workdir's lease (`train.lease`) is held throughout: a second writer fails at once naming this one."""
  t_start = time.time()
  with lease.hold(workdir, what=f"mirage train (loss {config.loss.name})"):  # one writer per workdir
    r = _prepare(runtime.inherit_from_init(config), pathlib.Path(workdir))
    step_fn = _compile(r)
    return _train(r, step_fn, t_start=t_start, compile_s=time.time() - t_start)


@dataclasses.dataclass
class Stepper:
  """A run prepared and compiled but not trained (benchmarks): `step(n)` runs n steps on the run's own
  streams, host-side batching included; `batches()` draws one step's device batches and `device_step` runs
  the compiled step on them (device time only); `compiled` has XLA's cost and memory analyses."""

  run: Any  # _Run
  compiled: Any

  def batches(self) -> dict:
    return {n: pipeline.to_global(next(st), self.run.setup.mesh) for n, st in self.run.streams.items()}

  def device_step(self, batches: dict) -> dict:
    self.run.state, metrics = self.compiled(self.run.state, batches, self.run.reference)
    return metrics

  def step(self, n: int = 1) -> dict:
    metrics = {}
    for _ in range(n):
      metrics = self.device_step(self.batches())
    return jax.block_until_ready(metrics)

  def close(self) -> None:
    _close_all(*(st.close for st in self.run.streams.values()), self.run.ckpt.close)


def stepper(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> Stepper:
  """`config`'s run in `workdir` prepared and compiled as `run` does, without its lease or its step loop."""
  r = _prepare(runtime.inherit_from_init(config), pathlib.Path(workdir))
  return Stepper(run=r, compiled=_compile(r))


def run_to_end(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> RunSummary:
  """`run` for commands that go on to use the trained model (`mirage demo`'s stages, relearning, the
  trajectory): a run stopped early (SIGTERM, a preemption notice) raises `errors.Stopped` after its save,
  so nothing evaluates or builds on a half-trained stage; the rerun resumes it."""
  summary = run(config, workdir)
  if summary.stopped:
    raise errors.Stopped(f"stopped by {summary.stopped} after saving step {summary.last_step} of "
                         f"{config.total_steps} in {workdir}; rerun the same command to resume")
  return summary


# --------------------------------------------------------------------------- phase 1: prepare
def _prepare(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> _Run:
  """Setup and checks, the optimizer plan, the state (restored, `init_from`, or random) and the streams."""
  workdir.mkdir(parents=True, exist_ok=True)
  s = setup(config)
  loss = make_loss(config.loss)
  check_run(config, s.mesh, loss, s.spec)
  if (loss.needs_reference or loss.cache is not None) and not config.init_from:
    raise RunError(f"loss {config.loss.name!r} starts from a trained model: set --config.init_from=<run dir>")

  splits = pipeline.SplitCache(s.data.dataset, s.data.tokenizer, s.fmt, cache=config.data.cache)
  tok_fp = s.data.tokenizer.fingerprint()
  available = set(s.data.dataset.splits())
  unknown = sorted(set(_eval_splits(config)) - available)
  if unknown:  # found now, not after training
    raise RunError(f"config.eval.splits: {unknown} not in the dataset; available: {sorted(available)}")
  cache_split = _cache_split(config, loss)
  tx, sched, make_extras, target = plan_state(
      config, s.spec, s.mesh, loss, cache_rows=len(splits.examples(cache_split)) if cache_split else 0)
  ckpt = checkpoint.Checkpointer(workdir / checkpoint.CHECKPOINT_DIR, save_every=config.checkpoint_every,
                                 keep=config.keep_checkpoints)
  r = _Run(config=config, workdir=workdir, main=jax.process_index() == 0, setup=s, loss=loss, splits=splits,
           tok_fp=tok_fp, ckpt=ckpt, plan=(tx, sched, target), state=None, reference=None, streams={})
  data_state = _restore_or_init(r, make_extras, cache_split)
  read = pipeline.read_options(config.data)
  r.streams = {name: pipeline.Stream(name=name, mixture=config.data.streams[name], splits=splits,
                                     global_batch=config.batch_size, seed=seeds.derive(config.seed, name, bits=31),
                                     process_index=jax.process_index(), process_count=jax.process_count(),
                                     read=read)
               for name in loss.streams}
  for name, st in data_state.get("streams", {}).items():
    if name in r.streams:
      r.streams[name].set_state(st)
  return r


def _restore_or_init(r: _Run, make_extras, cache_split: str) -> dict:
  """Set `r.state` (the latest good checkpoint, else `init_from` or random params and a fresh optimizer)
  and `r.reference`; returns the restored data-stream state ({} for a new run)."""
  config, spec, (tx, _, target) = r.config, r.setup.spec, r.plan
  state_sh = shardings_of(target)
  restored = r.ckpt.restore_latest_good(target=target)
  latest = None if restored is None else int(jax.device_get(restored.state.step))
  r.lora_meta = runtime.lora_meta(config, spec) if spec.lora else None  # the base, identified once
  if spec.lora and restored is not None:  # adapters trained on another base are refused
    checkpoint.check_base((restored.meta.get("lora") or {}).get("base"), r.lora_meta["base"],
                          where=r.ckpt.directory / str(latest))
  # The frozen reference: every step for NPO-with-reference / RMU, or once to fill the reference cache. With
  # LoRA, the frozen base (every step; the reference is that base without adapters).
  if spec.lora:
    reference = runtime.load_base(config, spec, tokenizer=r.tok_fp)
  else:
    reference = (checkpoint.restore_params(config.init_from, spec.abstract_params(), tokenizer=r.tok_fp)
                 if r.loss.needs_reference or (cache_split and latest is None) else None)
  data_state: dict = {}
  if restored is not None:
    r.state, data_state = restored.state, restored.data
    dropped = metrics_lib.truncate_after(r.workdir, latest) if r.main else 0
    logging.warning("resumed from %s at step %d%s", r.ckpt.directory, latest,
                    f" (dropped {dropped} metric rows logged after it)" if dropped else "")
  else:
    if spec.lora:
      params = runtime.init_trainable(spec, config.seed, base=reference)
    elif config.init_from:
      params = checkpoint.restore_params(config.init_from, spec.abstract_params(), tokenizer=r.tok_fp)
      logging.info("initialised params from %s", config.init_from)
    else:
      params = init_params(spec, config.seed)
    extras = dict(make_extras())
    if cache_split:
      extras.update(_reference_cache(r.loss, spec, reference, r.splits.examples(cache_split), config,
                                     r.setup.mesh))
    r.state = TrainState(
        step=jax.device_put(jnp.int32(0), state_sh.step), params=params,
        opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
        rng=jax.device_put(new_rng(config.seed), state_sh.rng), extras=jax.device_put(extras, state_sh.extras))
  r.reference = reference if r.loss.needs_reference or spec.lora else None  # else only the cache needed it
  return data_state


# --------------------------------------------------------------------------- phase 2: compile
def _compile(r: _Run):
  """The AOT-compiled train step for this run's streams and reference (memory analysis logged)."""
  spec, (tx, sched, target) = r.setup.spec, r.plan
  batch_abstract = pipeline.abstract_batches(r.config, streams=tuple(r.streams),
                                            image_size=spec.config.vision.image_size, mesh=r.setup.mesh)
  step_fn = compile_step(spec, r.loss, tx, sched, r.setup.mesh, target, batch_abstract,
                         None if r.reference is None else runtime.frozen_abstract(spec, r.loss),
                         skip_nonfinite=r.config.skip_nonfinite, accum_steps=runtime.accum_steps(r.config))
  log_memory(step_fn)
  return step_fn


# --------------------------------------------------------------------------- phase 3: train, then finish
@dataclasses.dataclass
class _Hooks:
  """What the step loop writes: metrics, the progress bar, periodic evaluation and checkpoints."""

  r: _Run
  writer: metrics_lib.MetricWriter
  bar: metrics_lib.Progress
  score_step: Any

  def put(self, batch):
    return pipeline.to_global(batch, self.r.setup.mesh)

  def evaluate(self, step: int) -> dict:
    config, results = self.r.config, {}
    for split in _eval_splits(config):
      batches = pipeline.eval_batches(self.r.splits.examples(split), config.eval.batch_size,
                                      max_batches=config.eval.max_batches)
      results[split] = scoring.score_batches(self.score_step, self.params(), batches, self.put)
      self.writer.write(step, results[split], prefix=f"eval/{split}")
    return results

  def params(self) -> Any:
    """The whole model's params (LoRA: the frozen base with the trained adapters beside it)."""
    r = self.r
    return lora.combine(r.reference, r.state.params) if r.setup.spec.lora else r.state.params

  def save(self, step: int, force: bool = False) -> None:
    r = self.r
    data = {"streams": {n: st.get_state() for n, st in r.streams.items()}}
    meta = {"step": step, "config": json.loads(configlib.to_json(r.config)), "tokenizer": r.tok_fp}
    if r.lora_meta:  # an adapter-only checkpoint names (and hashes) its base
      meta["lora"] = r.lora_meta
    r.ckpt.save(step, r.state, data=data, meta=meta, force=force)


def _train(r: _Run, step_fn, *, t_start: float, compile_s: float) -> RunSummary:
  """Run the steps from the state's step to `total_steps` (or a stop signal), evaluate, close everything."""
  config = r.config
  first = int(jax.device_get(r.state.step))
  writer = metrics_lib.MetricWriter(r.workdir, enabled=r.main)
  if r.main and first == 0:
    (r.workdir / "config.json").write_text(configlib.to_json(config))
  bar = metrics_lib.Progress(total=config.total_steps, initial=first, desc=config.loss.name, enabled=r.main)
  hooks = _Hooks(r=r, writer=writer, bar=bar, score_step=scoring.make_score_step(r.setup.spec))
  eval_results: dict = {}
  t_loop = time.time()
  term = _SigtermFlag()
  try:
    step, stopped, last_logged, skipped = _steps(r, step_fn, hooks, first, term)
    if step >= config.total_steps and _eval_splits(config):
      eval_results = hooks.evaluate(step)
  finally:
    term.restore()
    bar.close()
    _close_all(*(st.close for st in r.streams.values()), r.ckpt.close, writer.close)
  wall = time.time() - t_start
  return RunSummary(workdir=str(r.workdir), first_step=first, last_step=step, final=last_logged,
                    eval=eval_results, wall_s=wall, compile_s=compile_s,
                    steps_per_s=(step - first) / max(time.time() - t_loop, 1e-9), stopped=stopped,
                    skipped_steps=skipped)


def _steps(r: _Run, step_fn, hooks: _Hooks, first: int, term: "_SigtermFlag") -> tuple[int, str, dict, int]:
  """The step loop: metrics fetched one step behind, logged, evaluated and checkpointed on their steps.

  Returns (last step, why it stopped early or "", the last logged metrics, non-finite steps skipped)."""
  config, ckpt, writer, bar = r.config, r.ckpt, hooks.writer, hooks.bar
  pending, last_logged, window = None, {}, []
  step, stopped, skipped = first, "", 0
  while step < config.total_steps:
    batches = {n: hooks.put(next(st)) for n, st in r.streams.items()}
    r.state, new_metrics = step_fn(r.state, batches, r.reference)
    if pending is not None:  # the previous step's metrics: checked while this step runs
      skipped += _account(step, pending, window, writer, config, bar)[1]
    pending = new_metrics
    step += 1
    stop = "SIGTERM" if term.raised else "preemption" if ckpt.reached_preemption(step) else ""
    evaluate_now = bool(config.eval.every and step % config.eval.every == 0)
    if stop or ckpt.should_save(step) or step == config.total_steps or evaluate_now:
      last_logged, n = _account(step, pending, window, writer, config, bar, force_log=True)
      skipped, pending = skipped + n, None
      if evaluate_now and step < config.total_steps and not stop:
        hooks.evaluate(step)
      if stop or ckpt.should_save(step) or step == config.total_steps:
        hooks.save(step, force=bool(stop) or step == config.total_steps)
      if stop:
        stopped = stop
        logging.warning("%s: saved step %d and stopped; rerun the same command to resume", stop, step)
        break
    faults.trigger("step_done", step=step)
  if pending is not None:
    last_logged, n = _account(step, pending, window, writer, config, bar, force_log=True)
    skipped += n
  return step, stopped, last_logged, skipped


def _eval_splits(config: ml_collections.ConfigDict) -> list[str]:
  return comma_list(config.eval.splits)


def _close_all(*closers) -> None:
  """Run every closer; while an exception is propagating, a closer's own failure (often the same full disk)
  is logged instead of replacing it; otherwise the first failure is raised after all ran."""
  failing = sys.exc_info()[1] is not None
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # noqa: BLE001 - reported below
      if failing:
        logging.warning("while stopping: %s", e)
      first = first or e
  if first is not None and not failing:
    raise first


class _SigtermFlag:
  """SIGTERM (a TPU preemption notice, `kill`, SLURM's time limit) -> finish the step, save, stop."""

  def __init__(self):
    self.raised = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.raised = True

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _account(step: int, metrics, window: list, writer, config, bar, *,
             force_log: bool = False) -> tuple[dict, int]:
  """Fetch one step's metrics (blocking on that step only), check them, log on log steps.

  Returns the logged means ({} when not a log step) and whether the step was skipped as non-finite."""
  values = {k: float(v) for k, v in jax.device_get(metrics).items()}
  metrics_lib.check_finite(step, values)
  if values.get("skipped"):
    logging.warning("step %d: non-finite loss or gradient, skipped (config.skip_nonfinite)", step)
  skipped = int(bool(values.get("skipped")))
  window.append(values)
  bar.update(1, {k: values[k] for k in ("loss",) if k in values})
  if force_log or step % config.log_every == 0:
    mean = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
    writer.write(step, mean)
    window.clear()
    return mean, skipped
  return {}, skipped


def _cache_split(config, loss) -> str:
  """The split whose per-row reference values the loss caches ("" when it wants no cache)."""
  if loss.cache is None:
    return ""
  stream = loss.cache.stream
  mixture = pipeline.parse_mixture(config.data.streams[stream])
  if len(mixture) != 1:
    raise RunError(f"loss {config.loss.name!r} caches reference values of the {stream!r} stream: it needs a "
                   f"single split, got data.streams.{stream}={config.data.streams[stream]!r}")
  return mixture[0].split


def _reference_cache(loss, spec: ModelSpec, reference, examples, config, mesh) -> dict:
  """Run `loss.precompute` with the reference model over a whole split, in row order."""
  fn = jax.jit(lambda ref, batch: loss.precompute(spec.reference_model(ref), batch))
  parts: dict[str, list] = {}
  for batch in pipeline.eval_batches(examples, config.batch_size):
    n = int(batch.pop("weight").sum())
    out = jax.device_get(fn(reference, pipeline.to_global(batch, mesh)))
    for k, v in out.items():
      parts.setdefault(k, []).append(np.asarray(v, np.float32)[:n])
  return {loss.cache.key(k): np.concatenate(v) for k, v in parts.items()}
