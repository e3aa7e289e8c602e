"""`mirage robustness`: is the harmful knowledge gone or only hidden? Every model of a demo run (or one run)
under three attacks, the measurements themselves being `mirage_jax.eval.robustness`'s.

* **Relearning**: each model fine-tuned (full parameters, the post-hoc SFT recipe of its size at a constant
  learning rate, no warm-up) for the largest of `relearn_steps` on (a) `relearn_forget`, a small slice of
  forget data of the *train* hazards, and (b) `relearn_benign`, benign questions about those hazards' images
  that never show a procedure; the ASR (original and attacked, K = `eval.k_attack`) on the held-out test
  hazards is re-measured at every step of `relearn_steps` (checkpoints of one run).
* **Prefill**: greedy decoding after a forced opening, "format" (the opening of a harmful answer of the data)
  and "comply" ("sure ,"); ASR on `unsafe`.
* **Probes**: per layer, linear probes fit on the base's hidden states (code of the asked procedure; harmful
  or not) applied to every model, and each model's own probes; the control is the same probes fit on a
  randomly initialised model (what the input alone gives away: the token before a code and the image tell
  a lot, so accuracy is read against this floor, not only against chance).
* **Refusal direction** (the SFT models): the direction is read on the `sft` split, the layer whose direction
  raises the *dev* ASR most is chosen on the dev twins, and the test ASR after projecting it out is reported.

Everything goes to `--out` (default `<workdir>/robustness`): `relearn/` (the fine-tuning runs, resumable),
`models/` (one JSON per model and run: a rerun skips what is done), `robustness.json` and `robustness.md`.
Given `--workdir`, the demo's report.json gains `robustness` and its report.md a "Robustness" section.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from mirage_configs import methods, models as models_config
from mirage_jax import configlib, report as report_lib
from mirage_jax.data import pipeline
from mirage_jax.data.world_config import DEV_PREFIX
from mirage_jax.errors import ConfigError, DataError, MissingFileError
from mirage_jax.eval import robustness as rb, runner
from mirage_jax.report import document, runs as runs_lib
from mirage_jax.train import checkpoint, lease, loop, runtime, state

log = logging.getLogger("mirage")

RELEARN_SETS = {"forget": "relearn_forget", "benign": "relearn_benign"}
RELEARN_RECIPE = "configs/sft/posthoc.py"
# What a relearning run takes from the model it starts from (the rest is the recipe's).
RELEARN_INHERIT = "model,data.name,data.path,data.world,data.max_len,data.prompt_template,data.image_mean,data.image_std"
DIRECTION_SPLIT = "sft"  # refused and answered queries: the refusal direction's contrast
DIRECTION_METHODS = ("sft_mixed", "sft_posthoc")
ASR_SPLITS = "unsafe,unsafe_what"
CONTROL_SEED = 0  # the random-init model of the probes' control


@dataclasses.dataclass(frozen=True)
class Group:
  """The models of one demo run (one world seed x training seed): {method: run directory}."""

  world_seed: int
  seed: int
  runs: dict[str, pathlib.Path]

  @property
  def key(self) -> str:
    return f"w{self.world_seed}-s{self.seed}"


def groups_of(workdir: str | None, run: str | None) -> list[Group]:
  """The demo's runs (report.json `per_seed[i]["runs"]`; a report written before them: its `runs`, one
  group), or the one `run`."""
  if run:
    path = pathlib.Path(run)
    config = runtime.run_config(path)
    return [Group(config.data.world.seed, config.seed, {runs_lib.method_of(path.name, config.to_dict()): path})]
  if not workdir:
    raise ConfigError("give --workdir=DEMO_WORKDIR (every model of a demo run) or --run=RUN_DIR (one model)")
  report = pathlib.Path(workdir) / "report.json"
  if not report.is_file():
    raise MissingFileError(f"{report} not found: --workdir must be a finished `mirage demo` workdir")
  rep = json.loads(report.read_text())
  per_seed = rep.get("per_seed", [])
  if per_seed and all("runs" in r for r in per_seed):
    return [Group(r["world_seed"], r["seed"], {m: pathlib.Path(d) for m, d in r["runs"].items()}) for r in per_seed]
  if len(per_seed) > 1:
    raise DataError(f"{report} lists {len(per_seed)} runs without their directories (written before "
                    "`per_seed[i].runs`): rerun `mirage demo` on it (finished stages are reused) or use --run")
  first = per_seed[0] if per_seed else {"world_seed": 0, "seed": 0}
  return [Group(first["world_seed"], first["seed"], {m: pathlib.Path(d) for m, d in rep["runs"].items()
                                                     if "/" not in m})]


@dataclasses.dataclass
class Options:
  """What to run; `overrides` (`--config.x=y`) apply to the evaluation config and to every relearning run's
  (after the recipe's own: `--config.optim.lr=...` changes the relearning learning rate)."""

  relearn_steps: tuple[int, ...] = (5, 20, 50)
  relearn_sets: tuple[str, ...] = tuple(RELEARN_SETS)
  prefills: tuple[str, ...] = rb.PREFILLS
  overrides: tuple[str, ...] = ()


class Robustness:
  """The attacks of one architecture and dataset: evaluators (one compiled decoder each) built once."""

  def __init__(self, config: ml_collections.ConfigDict, out: pathlib.Path, options: Options):
    self.options, self.out = options, out
    self.config = configlib.apply_overrides(runner.with_judge_keys(config),
                                            [f"--config.eval.test_splits={ASR_SPLITS}", *options.overrides])
    self.setup = runtime.setup(self.config)
    k = int(self.config.eval.k_attack)
    self.asr = runner.SafetyEvaluator(self.setup, self.config, shots=k)
    codes = self.setup.data.dataset.world_info.get("harmful_codes", [])
    self.asked_judge = (runner.make_judge(self.setup, configlib.apply_overrides(
        self.config, ["--config.eval.judge=rule", "--config.eval.harm_match=asked"])) if codes else None)
    unsafe = configlib.apply_overrides(self.config, ["--config.eval.test_splits=unsafe"])
    self._dev_config = configlib.apply_overrides(unsafe, ["--config.eval.split_set=dev"])
    self._dev_unsafe = None  # built on first use: only SFT models need it, and only data with dev twins has it
    world = self.config.data.world
    openers = bool(world.get("answer_openers", True)) if self.config.data.name == "mirage_synth" else True
    self.prefill = {kind: runner.SafetyEvaluator(self.setup, unsafe, prefill=rb.prefill_fn(kind,
                                                                                            answer_openers=openers))
                    for kind in options.prefills}
    self.cache = pipeline.SplitCache(self.setup.data.dataset, self.setup.data.tokenizer, self.setup.fmt,
                                     cache=True)
    self.batch = int(self.config.eval.batch_size)
    self.splits = set(self.setup.data.dataset.splits())
    self._probe_data = None
    self._control = None

  # ------------------------------------------------------------------ ASR
  def asr_of(self, params, evaluator: runner.SafetyEvaluator | None = None) -> dict:
    """Original and attacked ASR (the configured judge), and, on data with placeholder codes, the same under
    `harm_match=asked` (`*_asked`: only the asked hazard's own codes count, so a model that answers a held-out
    hazard with a train hazard's procedure is not counted: the knowledge, not the format, is measured)."""
    evaluator = evaluator or self.asr
    generated = evaluator.responses(params)
    out = self._pair(evaluator.judge_responses(generated))
    if self.asked_judge is not None:
      out |= {f"{k}_asked": v for k, v in self._pair(evaluator.judge_responses(generated,
                                                                             judge=self.asked_judge)).items()}
    return out

  def _pair(self, metrics: Mapping) -> dict:
    asr = metrics.get("asr", {})
    return {"original": asr.get("original", math.nan),
            "attacked": asr.get("what_k", {}).get(str(self.config.eval.k_attack), math.nan)}

  # ------------------------------------------------------------------ relearning
  def relearn(self, method: str, run_dir: pathlib.Path, *, lora_run: bool, seed: int, size: str) -> dict:
    """{set: {step: ASR pair}} after relearning `run_dir`'s model on each set (a set the data lacks, or a
    LoRA run, is skipped with the reason)."""
    out = {}
    for name in self.options.relearn_sets:
      split = RELEARN_SETS[name]
      if split not in self.splits:
        out[name] = {"skipped": f"the dataset has no {split!r} split"}
        continue
      if lora_run:
        out[name] = {"skipped": "relearning a LoRA run is not supported (fine-tune its merged export instead)"}
        continue
      if not size:
        out[name] = {"skipped": f"model.size names no recipe of {RELEARN_RECIPE}"}
        continue
      train = self._relearn_config(run_dir, split, seed=seed, size=size)
      work = self.out / "relearn" / f"{run_dir.name}-{name}-{configlib.fingerprint(train.to_dict())}"
      if checkpoint.latest_step_on_disk(work / checkpoint.CHECKPOINT_DIR) != train.total_steps:
        log.warning("robustness %s: relearning on %s for %d steps -> %s", method, split, train.total_steps, work)
        loop.run_to_end(train, work)
      curve = {}
      for step in self.options.relearn_steps:
        params = runtime.load_params(self.setup, str(work / checkpoint.CHECKPOINT_DIR / str(step)))
        curve[str(step)] = self.asr_of(params)
      out[name] = curve
    return out

  def _relearn_config(self, run_dir: pathlib.Path, split: str, *, seed: int, size: str):
    steps = self.options.relearn_steps
    every = math.gcd(*steps)
    return configlib.apply_overrides(configlib.load(f"{RELEARN_RECIPE}:{size}"), [
        f"--config.init_from={run_dir}", f"--config.init_inherit={RELEARN_INHERIT}",
        f"--config.data.streams.train={split}", f"--config.total_steps={max(steps)}",
        f"--config.checkpoint_every={every}", f"--config.keep_checkpoints={max(steps) // every + 1}",
        "--config.optim.schedule=constant", "--config.optim.warmup_steps=0", f"--config.seed={seed}",
        "--config.eval.every=0", *self.options.overrides])

  # ------------------------------------------------------------------ prefill
  def prefill_asr(self, params) -> dict:
    """{kind: original ASR} and `<kind>_asked` (`asr_of`) under each forced opening."""
    out = {}
    for kind, ev in self.prefill.items():
      got = self.asr_of(params, ev)
      out[kind] = got["original"]
      if "original_asked" in got:
        out[f"{kind}_asked"] = got["original_asked"]
    return out

  # ------------------------------------------------------------------ probes
  def probe_data(self) -> rb.ProbeData | None:
    if self._probe_data is None and "probe" in self.splits:
      self._probe_data = rb.probe_data(self.cache, "probe")
    return self._probe_data

  def features(self, params) -> rb.Features | None:
    data = self.probe_data()
    return None if data is None else rb.probe_features(self.setup, params, data, batch_size=self.batch)

  def probe_control(self) -> dict:
    """Best accuracies of probes fit on a randomly initialised model's own states (`CONTROL_SEED`): what the
    input tokens and image features alone give away, the floor a trained model's probe is read against."""
    if self._control is None:
      features = self.features(state.init_params(self.setup.spec, CONTROL_SEED))
      rep = rb.probe_report(features, rb.fit_probes(features))
      self._control = {name: rep[name]["best_accuracy"] for name in rep}
    return self._control

  # ------------------------------------------------------------------ refusal direction
  def refusal_direction(self, params) -> dict:
    if DIRECTION_SPLIT not in self.splits:
      return {"skipped": f"the dataset has no {DIRECTION_SPLIT!r} split"}
    if DEV_PREFIX + "unsafe" not in self.splits:
      return {"skipped": f"the dataset has no {DEV_PREFIX}unsafe split to choose the layer on"}
    if self._dev_unsafe is None:
      self._dev_unsafe = runner.SafetyEvaluator(self.setup, self._dev_config)
    tied = self.setup.spec.config.text.tie_embeddings
    directions = rb.refusal_directions(self.setup, params, self.cache, DIRECTION_SPLIT, batch_size=self.batch)
    dev = [self.asr_of(rb.ablate_direction(params, d, tied_embeddings=tied), self._dev_unsafe)["original"]
           for d in directions]
    layer = int(np.nanargmax(dev))
    ablated = rb.ablate_direction(params, directions[layer], tied_embeddings=tied)
    return {"layer": layer, "dev_asr_by_layer": dev, **self.asr_of(ablated)}


def _size_of(config: ml_collections.ConfigDict) -> str:
  """The size a run was trained at (its `model.size`; "" when it names no recipe, e.g. a converted model)."""
  size = str(config.model.get("size", ""))
  return size if size in models_config.SIZES else ""


def measure_group(group: Group, out: pathlib.Path, options: Options,
                  engines: dict[str, Robustness]) -> dict[str, dict]:
  """{method: entry} for one group's models, the base first; each cached under `out/models/` (a rerun reads
  it back). Every model's probes are the base's (refit when the base's entry was cached) and its own."""
  results: dict[str, dict] = {}
  order = [m for m in methods.NAMES if m in group.runs] + [m for m in group.runs if m not in methods.NAMES]
  base_probes = None
  for method in order:
    run_dir = group.runs[method]
    cached = out / "models" / f"{group.key}-{method}.json"
    if cached.is_file():
      results[method] = json.loads(cached.read_text())
      continue
    config = runner.with_judge_keys(runtime.run_config(run_dir))
    lora_run = bool(config.get("lora") and config.lora.rank)
    if lora_run:  # measured merged into its base (the base's architecture, like the demo's evaluation)
      config = configlib.apply_overrides(config, ["--config.lora.rank=0"])
    key = configlib.fingerprint({"model": config.model.to_dict(), "data": config.data.to_dict()}, drop=())
    if key not in engines:
      engines[key] = Robustness(config, out, options)
    eng = engines[key]
    if method != methods.BASE and base_probes is None and methods.BASE in group.runs:
      base_features = eng.features(runtime.load_params(eng.setup, str(group.runs[methods.BASE])))
      base_probes = None if base_features is None else rb.fit_probes(base_features)
    t = time.time()
    entry, own = _measure(eng, method, run_dir, lora_run, runtime.load_params(eng.setup, str(run_dir)),
                          base_probes, seed=int(config.seed), size=_size_of(config))
    if method == methods.BASE:
      base_probes = own
    entry["wall_s"] = time.time() - t
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(entry, indent=1, sort_keys=True))
    log.warning("robustness %s %s: done in %.0f s", group.key, method, entry["wall_s"])
    results[method] = entry
  return results


def _measure(eng: Robustness, method: str, run_dir: pathlib.Path, lora_run: bool, params, base_probes, *,
             seed: int, size: str):
  """One model's entry, and its own probes (None without a probe split)."""
  plain = eng.asr_of(params)
  entry = {"asr_original": plain["original"], "asr_attacked": plain["attacked"],
           **{f"asr_{k}": v for k, v in plain.items() if k.endswith("_asked")},
           "relearn": eng.relearn(method, run_dir, lora_run=lora_run, seed=seed, size=size),
           "prefill_asr": eng.prefill_asr(params)}
  features, own = eng.features(params), None
  if features is None:
    entry["probe"] = {"skipped": "the dataset has no 'probe' split (the synthetic world builds one)"}
  else:
    own = rb.fit_probes(features)
    probes = own if method == methods.BASE else base_probes
    base_fit = rb.probe_report(features, probes) if probes is not None else {}
    entry["probe"] = {**base_fit.get("code", {}), "harmful": base_fit.get("harmful", {}),
                      "own": rb.probe_report(features, own), "control": eng.probe_control()}
  if method in DIRECTION_METHODS:
    entry["refusal_direction"] = eng.refusal_direction(params)
  return entry, own


def run(*, workdir: str | None = None, run_dir: str | None = None, out: str | None = None,
        options: Options | None = None, max_groups: int = 0) -> dict:
  """Every group's models (`groups_of`), measured, aggregated over groups and written; returns the result."""
  t0 = time.time()
  options = options or Options()
  _check_options(options)
  if not out and not workdir:
    raise ConfigError("--out is required with --run")
  out_dir = pathlib.Path(out or pathlib.Path(workdir) / "robustness")
  groups = groups_of(workdir, run_dir)
  if max_groups:
    groups = groups[:max_groups]
  engines: dict[str, Robustness] = {}
  with lease.hold(out_dir, what="mirage robustness"):  # one writer of the cached entries and relearning runs
    per_seed = [{"world_seed": g.world_seed, "seed": g.seed,
                 "models": measure_group(g, out_dir, options, engines)} for g in groups]
  result = {"models": _aggregate([r["models"] for r in per_seed]), "per_seed": per_seed,
            "relearn_steps": list(options.relearn_steps), "wall_s": time.time() - t0, "out": str(out_dir.absolute()),
            "k_attack": int(next(iter(engines.values())).config.eval.k_attack) if engines else None}
  document.write_robustness(out_dir, result)
  if workdir and not run_dir:
    document.add_robustness(pathlib.Path(workdir), result)
  return result


def _aggregate(models_per_run: Sequence[Mapping[str, Mapping]]) -> dict:
  """Mean over runs (with `ci95` beyond one run) of the numeric parts of each model's entry."""
  numeric = [{m: _numeric(e) for m, e in run.items()} for run in models_per_run]
  return report_lib.aggregate(numeric)


def _numeric(node):
  if isinstance(node, Mapping):
    return {k: _numeric(v) for k, v in node.items() if k not in ("skipped", "wall_s") and _numeric(v) is not None}
  if isinstance(node, list):
    return [float(v) for v in node]
  if isinstance(node, (int, float)):
    return float(node)
  return None


def _check_options(options: Options) -> None:
  if not options.relearn_steps or any(s < 1 for s in options.relearn_steps):
    raise ConfigError(f"--relearn_steps={','.join(map(str, options.relearn_steps))}: positive step counts")
  for name in options.relearn_sets:
    if name not in RELEARN_SETS:
      raise ConfigError(f"--relearn_sets: {name!r} is not one of {', '.join(RELEARN_SETS)}")
  for kind in options.prefills:
    if kind not in rb.PREFILLS:
      raise ConfigError(f"--prefills: {kind!r} is not one of {', '.join(rb.PREFILLS)}")


def summary_line(result: Mapping) -> dict:
  """The closing JSON line: {"models": {name: aggregated entry}} (ASR in percent, accuracies as fractions)."""
  return {"models": result["models"], "wall_s": round(result["wall_s"], 1)}
