"""The training loop: one explicit function from a config and a workdir to a trained, checkpointed model.

Sections: mesh -> data -> model & shardings -> optimizer -> restore (own checkpoint, else `init_from`, else
random init) -> streams -> AOT compile (memory analysis logged) -> steps (metrics one step behind, so the
host never blocks the device; non-finite values stop the run before anything is saved) -> periodic eval and
checkpoints -> final save. Every user mistake is raised as `RunError` with one clear message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mirage_jax import configlib, sharding
from mirage_jax.data import pipeline, preprocess
from mirage_jax.eval import scoring
from mirage_jax.losses import make_loss
from mirage_jax.models import VLMConfig
from mirage_jax.train import checkpoint, metrics as metrics_lib, optim
from mirage_jax.errors import ConfigError
from mirage_jax.train.state import (ModelSpec, TrainState, abstract_train_state, init_params, model_spec,
                                    new_rng, param_count, shardings_of)


class RunError(ConfigError):
  """A configuration or data problem found before or during training (reported as one line)."""


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
class Setup:
  """Everything static about a run, shared by training, evaluation and tools."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  data: pipeline.Data
  fmt: preprocess.TextFormat
  spec: ModelSpec


def setup(config: ml_collections.ConfigDict) -> Setup:
  mesh = sharding.make_mesh(config.mesh)
  data = pipeline.open_data(config.data)
  tok = data.tokenizer
  model_cfg = VLMConfig.from_config(config.model, image_token_id=tok.image_id)
  if tok.vocab_size > model_cfg.text.vocab_size:
    raise RunError(f"the tokenizer has {tok.vocab_size} tokens but config.model.text.vocab_size is "
                   f"{model_cfg.text.vocab_size}")
  img = config.data.world.image_size if config.data.name == "mirage_synth" and not config.data.path else None
  if img is not None and img != model_cfg.vision.image_size:
    raise RunError(f"data.world.image_size={img} but model.vision.image_size={model_cfg.vision.image_size}")
  fmt = preprocess.TextFormat.from_config(config.data, num_image_tokens=model_cfg.vision.num_image_tokens)
  preprocess.check_template(tok, fmt)
  if model_cfg.text.max_len < fmt.max_len:
    raise RunError(f"data.max_len={fmt.max_len} exceeds model.text.max_len={model_cfg.text.max_len}")
  return Setup(config=config, mesh=mesh, data=data, fmt=fmt, spec=model_spec(model_cfg, mesh))


def _stream_seed(seed: int, name: str) -> int:
  return int(np.random.SeedSequence([seed, *name.encode()]).generate_state(1)[0] % (2**31))


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> RunSummary:
  t_start = time.time()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  main = jax.process_index() == 0
  s = setup(config)
  mesh, spec = s.mesh, s.spec
  loss = make_loss(config.loss)
  check_run(config, mesh, loss, spec)
  uses_reference = loss.needs_reference or getattr(loss, "reference_cache", False)
  if uses_reference and not config.init_from:
    raise RunError(f"loss {config.loss.name!r} starts from a trained model: set --config.init_from=<run dir>")

  splits = pipeline.SplitCache(s.data.dataset, s.data.tokenizer, s.fmt, cache=config.data.cache)
  tok_fp = s.data.tokenizer.fingerprint()
  available = set(s.data.dataset.splits())
  unknown = sorted({x.strip() for x in config.eval.splits.split(",") if x.strip()} - available)
  if unknown:  # found now, not after training
    raise RunError(f"config.eval.splits: {unknown} not in the dataset; available: {sorted(available)}")
  cache_split = _cache_split(config, loss)
  tx, sched, make_extras, target = plan_state(
      config, spec, mesh, loss, cache_rows=len(splits.examples(cache_split)) if cache_split else 0)
  state_sh = shardings_of(target)
  ckpt = checkpoint.Checkpointer(workdir / checkpoint.CHECKPOINT_DIR, save_every=config.checkpoint_every,
                                 keep=config.keep_checkpoints)
  restored = ckpt.restore_latest_good(target=target)
  latest = None if restored is None else int(jax.device_get(restored.state.step))
  # The frozen reference: every step for NPO-with-reference / RMU, or once to fill the reference cache.
  reference = (checkpoint.restore_params(config.init_from, spec.abstract_params(), tokenizer=tok_fp)
               if loss.needs_reference or (cache_split and latest is None) else None)
  data_state: dict = {}
  if restored is not None:
    state, data_state = restored.state, restored.data
    dropped = metrics_lib.truncate_after(workdir, latest) if main else 0
    logging.warning("resumed from %s at step %d%s", ckpt.directory, latest,
                    f" (dropped {dropped} metric rows logged after it)" if dropped else "")
  else:
    if config.init_from:
      params = checkpoint.restore_params(config.init_from, spec.abstract_params(), tokenizer=tok_fp)
      logging.info("initialised params from %s", config.init_from)
    else:
      params = init_params(spec, config.seed)
    extras = dict(make_extras())
    if cache_split:
      extras.update(_reference_cache(loss, spec, reference, splits.examples(cache_split), config, mesh))
    state = TrainState(
        step=jax.device_put(jnp.int32(0), state_sh.step), params=params,
        opt_state=jax.jit(tx.init, out_shardings=state_sh.opt_state)(params),
        rng=jax.device_put(new_rng(config.seed), state_sh.rng), extras=jax.device_put(extras, state_sh.extras))
  if not loss.needs_reference:
    reference = None  # only the cache needed it

  streams = {name: pipeline.Stream(name=name, mixture=config.data.streams[name], splits=splits,
                                   global_batch=config.batch_size, seed=_stream_seed(config.seed, name),
                                   process_index=jax.process_index(), process_count=jax.process_count())
             for name in loss.streams}
  for name, st in data_state.get("streams", {}).items():
    if name in streams:
      streams[name].set_state(st)

  batch_abstract = pipeline.abstract_batches(config, streams=tuple(streams), image_size=spec.config.vision.image_size,
                                            mesh=mesh)
  step_fn = compile_step(spec, loss, tx, sched, mesh, target, batch_abstract,
                         None if reference is None else spec.abstract_params(), skip_nonfinite=config.skip_nonfinite)
  log_memory(step_fn)
  compile_s = time.time() - t_start

  first = int(jax.device_get(state.step))
  writer = metrics_lib.MetricWriter(workdir, enabled=main)
  if main and first == 0:
    (workdir / "config.json").write_text(configlib.to_json(config))
  bar = metrics_lib.Progress(total=config.total_steps, initial=first, desc=config.loss.name, enabled=main)
  score_step = scoring.make_score_step(spec)
  put = lambda b: pipeline.to_global(b, mesh)  # noqa: E731
  eval_splits = [x.strip() for x in config.eval.splits.split(",") if x.strip()]

  def evaluate(step: int) -> dict:
    results = {}
    for split in eval_splits:
      batches = pipeline.eval_batches(splits.examples(split), config.eval.batch_size,
                                      max_batches=config.eval.max_batches)
      results[split] = scoring.score_batches(score_step, state.params, batches, put)
      writer.write(step, results[split], prefix=f"eval/{split}")
    return results

  def save(step: int, force: bool = False) -> None:
    data = {"streams": {n: st.get_state() for n, st in streams.items()}}
    meta = {"step": step, "config": json.loads(configlib.to_json(config)), "tokenizer": tok_fp}
    ckpt.save(step, state, data=data, meta=meta, force=force)

  pending, last_logged, window, t_loop = None, {}, [], time.time()
  eval_results: dict = {}
  step, stopped, skipped = first, "", 0
  term = _SigtermFlag()
  try:
    while step < config.total_steps:
      batches = {n: put(next(st)) for n, st in streams.items()}
      state, new_metrics = step_fn(state, batches, reference)
      if pending is not None:  # the previous step's metrics: checked while this step runs
        skipped += _account(step, pending, window, writer, config, bar)[1]
      pending = new_metrics
      step += 1
      stop = "SIGTERM" if term.raised else "preemption" if ckpt.reached_preemption(step) else ""
      if stop or ckpt.should_save(step) or step == config.total_steps or (
          config.eval.every and step % config.eval.every == 0):
        last_logged, n = _account(step, pending, window, writer, config, bar, force_log=True)
        skipped, pending = skipped + n, None
        if config.eval.every and step % config.eval.every == 0 and step < config.total_steps and not stop:
          evaluate(step)
        if stop or ckpt.should_save(step) or step == config.total_steps:
          save(step, force=bool(stop) or step == config.total_steps)
        if stop:
          stopped = stop
          logging.warning("%s: saved step %d and stopped; rerun the same command to resume", stop, step)
          break
    if pending is not None:
      last_logged, n = _account(step, pending, window, writer, config, bar, force_log=True)
      skipped += n
    if step >= config.total_steps and eval_splits:
      eval_results = evaluate(step)
  finally:
    term.restore()
    bar.close()
    ckpt.close()
    writer.close()
  wall = time.time() - t_start
  done = step - first
  return RunSummary(workdir=str(workdir), first_step=first, last_step=step, final=last_logged,
                    eval=eval_results, wall_s=wall, compile_s=compile_s,
                    steps_per_s=done / max(time.time() - t_loop, 1e-9), stopped=stopped, skipped_steps=skipped)


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
  """The forget split whose per-row reference values are precomputed ("" when the loss wants no cache)."""
  if not getattr(loss, "reference_cache", False):
    return ""
  mixture = pipeline.parse_mixture(config.data.streams["forget"])
  if len(mixture) != 1:
    raise RunError(f"loss.reference_cache needs a single-split forget stream, got {config.data.streams.forget!r}")
  return mixture[0].split


def _reference_cache(loss, spec: ModelSpec, reference, examples, config, mesh) -> dict:
  """Run `loss.precompute` with the reference model over a whole split, in row order."""
  fn = jax.jit(lambda ref, batch: loss.precompute(spec.merge(ref), batch))
  parts: dict[str, list] = {}
  for batch in pipeline.eval_batches(examples, config.batch_size):
    n = int(batch.pop("weight").sum())
    out = jax.device_get(fn(reference, pipeline.to_global(batch, mesh)))
    for k, v in out.items():
      parts.setdefault(k, []).append(np.asarray(v, np.float32)[:n])
  return {f"cache/forget/{k}": np.concatenate(v) for k, v in parts.items()}


def check_run(config: ml_collections.ConfigDict, mesh, loss, spec: ModelSpec) -> None:
  """Configuration mistakes that would otherwise surface inside compilation (or after hours of training)."""
  if config.batch_size % sharding.batch_divisor(mesh):
    raise RunError(f"batch_size={config.batch_size} is not divisible by the mesh's data x fsdp = "
                   f"{sharding.batch_divisor(mesh)} devices")
  missing = [n for n in loss.streams if n not in config.data.streams]
  if missing:
    raise RunError(f"loss {config.loss.name!r} needs data streams {list(loss.streams)}; config.data.streams "
                   f"lacks {missing}")
  if hasattr(loss, "validate"):
    loss.validate(spec.config)


def plan_state(config: ml_collections.ConfigDict, spec: ModelSpec, mesh, loss, *, cache_rows: int = 0):
  """(optimizer, schedule, extras factory, abstract TrainState with shardings) of a run.

  `cache_rows` > 0 adds the precomputed reference values of that many forget rows to the extras."""
  tx, sched = optim.make_optimizer(config.optim, config.total_steps, spec.abstract_params())
  make_extras = lambda: loss.init_extras(spec, config.seed) if hasattr(loss, "init_extras") else {}  # noqa: E731
  extras_abstract = dict(jax.eval_shape(make_extras))
  if cache_rows:
    extras_abstract.update({f"cache/forget/{k}": jax.ShapeDtypeStruct((cache_rows,), jnp.float32)
                            for k in ("ref_logp", "n_tokens")})
  return tx, sched, make_extras, abstract_train_state(spec, tx, mesh, extras_abstract)


def compile_step(spec: ModelSpec, loss, tx, sched, mesh, target: TrainState, batch_abstract, reference_abstract, *,
                 skip_nonfinite: bool = False):
  """AOT-compile the train step for the devices of `mesh` (real ones, or a TPU topology's from a CPU host)."""
  from mirage_jax.train import step as step_lib
  shardings = step_lib.StepShardings(
      state=shardings_of(target), batches=shardings_of(batch_abstract),
      reference=None if reference_abstract is None else spec.shardings, replicated=sharding.replicated(mesh))
  fn = step_lib.make_train_step(spec=spec, loss=loss, tx=tx, sched=sched, shardings=shardings,
                                skip_nonfinite=skip_nonfinite)
  with jax.set_mesh(mesh):
    return fn.lower(target, batch_abstract, reference_abstract).compile()


def log_memory(compiled) -> None:
  mem = compiled.memory_analysis()
  if mem is not None:
    logging.info("train step memory per device: args %.1f MiB, temps %.1f MiB, outputs %.1f MiB",
                 mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20,
                 mem.output_size_in_bytes / 2**20)


def describe_params(spec: ModelSpec) -> dict[str, int]:
  params = spec.abstract_params()
  return {k: param_count(v) for k, v in params.items()}
