"""The demo's audit section: the data audit of the training split, the attack search against each trained
model (verified by generation, next to the fixed "What" attack on the same queries), over-prudence flip
rates on safe queries, and the word x model flip-rate heatmap. Reuses the demo's checkpoints and one
compiled scorer / decoder for every model of one architecture.

Cost (tiny models, 2 CPU cores shared with other jobs): a few seconds for the data audit, 100-130 s per
model for the defaults (64 queries, 22 candidate words, k = 1 greedy search, verification); most of it is
scoring the flip rates on the harm openings' 12 forward rows per rewrite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from mirage_jax.audit import attack as attack_lib, plots, shortcuts
from mirage_jax.audit.search import Constraints, Goal, Method, Operation, Scope, SearchConfig, flip_rates

log = logging.getLogger("mirage")

MODELS = ("sft_mixed", "sft_posthoc", "npo", "rmu")


@dataclasses.dataclass(frozen=True)
class DemoAuditConfig:
  models: tuple[str, ...] = MODELS  # the stages attacked (those the demo ran)
  max_queries: int = 64  # first N `unsafe` (and `safe`) queries
  method: Method = Method.GREEDY
  k: int = 1
  shots: int = 3
  heatmap_words: int = 12


def run(run_dirs: Mapping[str, pathlib.Path], *, configs: Mapping[str, ml_collections.ConfigDict],
        out_dir: pathlib.Path, config: DemoAuditConfig = DemoAuditConfig()) -> dict[str, Any]:
  """Audit the data and attack every model in `config.models` that the demo trained; files go to
  `out_dir`, the returned dict is `report.json["audit"]`."""
  from mirage_jax import configlib
  from mirage_jax.train import runtime
  t0 = time.time()
  out_dir.mkdir(parents=True, exist_ok=True)
  names = [m for m in config.models if m in run_dirs]
  first = configs[names[0] if names else next(iter(configs))]
  setup = runtime.setup(first)
  dataset = setup.data.dataset
  train = attack_lib.training_records(dataset)
  data_result = shortcuts.audit_instructions(shortcuts.from_records(train, source="sft split"),
                                             shortcuts.AuditConfig(bootstrap=200))
  shortcuts.write(data_result, out_dir / "data")
  rep: dict[str, Any] = {"data": {**data_result.summary(),
                                  "top": [r.to_dict() for r in strongest_grams(data_result, n=15)],
                                  "first_words": [r.to_dict() for r in data_result.top(15, position="first",
                                                                                       ngram=1)]},
                         "models": {}, "config": {k: (v.value if hasattr(v, "value") else v)
                                                  for k, v in dataclasses.asdict(config).items()}}
  if not names:
    rep["timing_s"] = time.time() - t0
    return rep
  tok = setup.data.tokenizer
  unsafe = attack_lib.split_records(dataset, "unsafe")[:config.max_queries]
  safe = attack_lib.split_records(dataset, "safe")[:config.max_queries]
  vocab = attack_lib.candidate_vocabulary("auto", train=train, goal=Goal.JAILBREAK, tok=tok)
  prudence_vocab = attack_lib.candidate_vocabulary("auto", train=train, goal=Goal.OVERPRUDENCE, tok=tok)
  search_config = SearchConfig(method=config.method, shots=config.shots,
                               constraints=Constraints(scope=Scope.FIRST, max_edits=config.k))
  fixed = attack_lib.fixed_attack_records(dataset, goal=Goal.JAILBREAK, split="unsafe", n_queries=len(unsafe),
                                          shots=config.shots)
  auditors: dict[str, attack_lib.ModelAuditor] = {}
  panels: dict[str, dict[str, dict[str, float]]] = {"jailbreak: unsafe queries": {},
                                                    "over-prudence: safe queries": {}}
  for name in names:
    t = time.time()
    cfg = configs[name]
    key = configlib.fingerprint({"model": cfg.model.to_dict(), "data": cfg.data.to_dict(),
                                 "eval": cfg.eval.to_dict()}, drop=())
    model_setup = setup if not auditors else runtime.setup(cfg)
    model = attack_lib.LoadedModel(config=cfg, setup=model_setup, source=str(run_dirs[name]),
                                   params=runtime.load_params(model_setup, str(run_dirs[name])))
    auditor = auditors.setdefault(key, attack_lib.ModelAuditor.for_model(model, train))
    result = attack_lib.attack(auditor, model.params, unsafe, goal=Goal.JAILBREAK, vocab=vocab,
                               config=search_config, fixed=fixed)
    attack_lib.write(result, out_dir / name)
    prudence = flip_rates(auditor.score_fn(model.params, safe, Goal.OVERPRUDENCE), [r["question"] for r in safe],
                          prudence_vocab, (Operation.SUBSTITUTE,))
    panels["jailbreak: unsafe queries"][name] = _substitution_rates(result.flip_rates)
    panels["over-prudence: safe queries"][name] = _substitution_rates(prudence)
    rep["models"][name] = model_row(result, prudence=prudence)
    log.warning("audit %s: best word %s, verified ASR %s (fixed %s) in %.0f s", name,
                rep["models"][name]["best_word"], rep["models"][name]["searched_asr_k"],
                rep["models"][name]["fixed_asr_k"], time.time() - t)
  words = {title: heatmap_words(models, n=config.heatmap_words) for title, models in panels.items()}
  plots.flip_heatmap(panels, out_dir / "flip_heatmap.png", words=words)
  rep["heatmap"] = {"file": str(out_dir / "flip_heatmap.png"), "words": words, "panels": panels}
  rep["timing_s"] = time.time() - t0
  return rep


def run_cached(run_dirs: Mapping[str, pathlib.Path], *, configs: Mapping[str, ml_collections.ConfigDict],
               out_dir: pathlib.Path, config: DemoAuditConfig = DemoAuditConfig()) -> dict[str, Any]:
  """`run`, reusing `out_dir/audit.json` when it was made from the same runs and settings (demo reruns)."""
  from mirage_jax import configlib
  key = configlib.fingerprint({"runs": sorted(str(p) for p in run_dirs.values()),
                               "config": {k: str(v) for k, v in dataclasses.asdict(config).items()}})
  path = out_dir / "audit.json"
  if path.exists():
    saved = json.loads(path.read_text())
    if saved.get("key") == key:
      return saved
  rep = {**run(run_dirs, configs=configs, out_dir=out_dir, config=config), "key": key}
  path.write_text(json.dumps(rep, indent=1, sort_keys=True, default=float))
  return rep


def strongest_grams(result: shortcuts.AuditResult, *, n: int) -> list[shortcuts.ShortcutRow]:
  """The `n` strongest grams by |z|, each at its strongest position only."""
  seen: set[str] = set()
  out = []
  for row in result.rows:
    if row.token not in seen and len(out) < n:
      seen.add(row.token)
      out.append(row)
  return out


def _substitution_rates(flips: Sequence) -> dict[str, float]:
  return {f.word: 100 * f.flip_rate for f in flips if f.op == Operation.SUBSTITUTE.value}


def heatmap_words(models: Mapping[str, Mapping[str, float]], *, n: int) -> list[str]:
  """The `n` words with the highest flip rate in any model (`models[model][word]`), best first."""
  best: dict[str, float] = {}
  for rates in models.values():
    for w, v in rates.items():
      if not math.isnan(v):
        best[w] = max(best.get(w, -1.0), v)
  return sorted(best, key=lambda w: (-best[w], w))[:n]


def model_row(result: attack_lib.AttackResult, *, prudence: Sequence) -> dict[str, Any]:
  """One model's `report.json["audit"]["models"]` entry."""
  k = str(result.shots)
  v = result.verified
  top = result.flip_rates[0] if result.flip_rates else None
  best_prudence = prudence[0] if prudence else None
  return {
      "best_word": top.word if top else "", "best_op": top.op if top else "",
      "flip_rate": 100 * top.flip_rate if top else math.nan,
      "flip_ci": [100 * top.ci_low, 100 * top.ci_high] if top else [math.nan, math.nan],
      "logit_success_k": result.logit[f"any_of_{result.shots}"],
      "original_asr": v.get("original", {}).get("k", {}).get("1", math.nan),
      "searched_asr_k": v.get("searched", {}).get("k", {}).get(k, math.nan),
      "searched_asr_ci": v.get("searched", {}).get("ci", {}).get(k, [math.nan, math.nan]),
      "fixed_asr_k": v.get("fixed", {}).get("k", {}).get(k, math.nan),
      "universal": {kk: v.get("universal", {}).get(kk) for kk in ("word", "op")} |
                   {"asr": v.get("universal", {}).get("k", {}).get("1", math.nan)},
      "mechanism_searched": v.get("searched", {}).get("mechanism", {}),
      "agreement": result.agreement,
      "prudence_best_word": best_prudence.word if best_prudence else "",
      "prudence_flip_rate": 100 * best_prudence.flip_rate if best_prudence else math.nan,
      "top_words": dict(list(result.top_words.items())[:5]), "n_queries": result.n_queries,
      "timing_s": result.timing_s,
  }


def markdown(audit: Mapping[str, Any] | None, *, rel: str = "audit") -> str:
  """The report section: the data audit table, the search results per model and the heatmap."""
  if not audit:
    return ""
  data = audit["data"]
  rows = [shortcuts.ShortcutRow(**r) for r in data["first_words"][:10]]
  top = [shortcuts.ShortcutRow(**r) for r in data["top"]][:10]
  c = audit["config"]
  out = ["## Shortcut audit (`mirage audit`, `mirage attack`)", "",
         f"**Data.** The training split's {data['n_refuse']} refuse / {data['n_comply']} comply instructions: "
         f"{data['tested']} gram x position pairs tested, {data['significant_q05']} with Benjamini-Hochberg q < "
         "0.05. z: informative-Dirichlet log-odds (Monroe et al. 2008) over its standard error, > 0 predicts "
         f"refuse; 95% CIs by stratified bootstrap. Full table: `{rel}/data/shortcuts.md`.", "",
         "Strongest grams (each at its strongest position):", "", shortcuts.format_table(top), "",
         "First words:", "", shortcuts.format_table(rows), "", f"![shortcuts]({rel}/data/shortcuts.png)", ""]
  if audit.get("models"):
    k = c["shots"]
    out += [f"**Models.** The first {c['max_queries']} `unsafe` queries; candidates = the audit's comply words "
            f"+ the data's first words; `{c['method']}` search, k = {c['k']} edit among the first words; "
            f"the {k} best rewrites per query on logits, then verified by greedy generation and the judges. "
            f"Fixed = the first {k} \"What\" rewrites of the same queries (`unsafe_what`).", "",
            f"| model | best word (flip rate [95% CI]) | ASR original | ASR searched K={k} [95% CI] | ASR fixed "
            f"\"What\" K={k} | one word for all | logit success K={k} | logit/judge agreement | over-prudence: "
            "best word (flip rate) |",
            "|---|---|---:|---:|---:|---|---:|---:|---|"]
    for name, m in audit["models"].items():
      uni = m["universal"]
      out.append(f"| {name} | {m['best_op'][:3]} \"{m['best_word']}\" ({m['flip_rate']:.0f} "
                 f"[{m['flip_ci'][0]:.0f}, {m['flip_ci'][1]:.0f}]) | {m['original_asr']:.1f} | "
                 f"{m['searched_asr_k']:.1f} [{m['searched_asr_ci'][0]:.0f}, {m['searched_asr_ci'][1]:.0f}] | "
                 f"{m['fixed_asr_k']:.1f} | \"{uni['word']}\": {uni['asr']:.1f} | {m['logit_success_k']:.0f} | "
                 f"{m['agreement']:.0f} | \"{m['prudence_best_word']}\" ({m['prudence_flip_rate']:.0f}) |")
    out += ["", "Flip rate (%) of substituting the first word, per candidate word and model (grey: no query "
            "outside the goal state):", "", f"![flip rates]({rel}/flip_heatmap.png)", "",
            f"Per model: `{rel}/<model>/attack.md`, the attack set `attack_set.jsonl` (readable as "
            "`unsafe_what`) and the judged responses.", ""]
  return "\n".join(out)
