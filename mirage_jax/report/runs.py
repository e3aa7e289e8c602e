"""`mirage report`: one table over many runs (a sweep's, the demo's, any `mirage eval` output).

Every `eval.json` under the given directories is a row, labelled from the run's `config.json` (model size,
seed, config hash) and directory name (`mirage sweep` names runs `<method>[-<variant>]-<size>-s<seed>`; other
directories give the method from the config). Writes `runs.md` (per-run table and mean ± std over seeds of
each setting), `runs.csv` (per run) and `asr_rr_vs_size.png` (jailbreak ASR, refusals of safe queries and
utility against parameter count).

The config hash is a fingerprint of the training config without `seed` and `init_from`, so the seeds of one
setting share it and a changed hyper-parameter does not.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Mapping, Sequence

from mirage_jax import configlib, report as report_lib
from mirage_jax.errors import CheckpointError, MissingFileError

log = logging.getLogger("mirage")

HASH_DROP = ("seed", "init_from")
# column -> path into a `report.model_entry`; K=3 is the paper's one-word attack.
METRICS = {
    "asr_original": ("asr", "original"), "asr_what_k3": ("asr", "what_k", "3"), "asr_control": ("asr", "control"),
    "rr_safe": ("rr", "safe"), "rr_share": ("rr", "share"), "utility_share": ("utility_share",),
    "utility": ("utility",), "ir_attacked": ("ir_attacked",),
}
HEADERS = {"asr_original": "ASR orig.", "asr_what_k3": "ASR \"What\" K=3", "asr_control": "control ASR",
           "rr_safe": "RR safe", "rr_share": "RR \"Share\"", "utility_share": "utility \"Share\"",
           "utility": "utility", "ir_attacked": "IR attacked"}


def config_hash(config) -> str:
  return configlib.fingerprint(config, drop=HASH_DROP)


@dataclasses.dataclass(frozen=True)
class Run:
  run: str  # directory name (plus `@<step>` for a checkpoint's eval)
  path: str
  size: str
  params: int  # approximate parameter count (orders sizes)
  method: str
  variant: str
  seed: int
  config_hash: str
  entry: dict  # `report.model_entry` of its eval.json

  @property
  def setting(self) -> tuple:
    return (self.size, self.method, self.variant, self.config_hash)


def approx_params(model: Mapping) -> int:
  """Parameter count from `config.model` (decoder, vision tower, projector; norms and biases left out)."""
  t, v = model["text"], model["vision"]
  q, kv = t["num_heads"] * t["head_dim"], t["num_kv_heads"] * t["head_dim"]
  layer = t["width"] * (2 * q + 2 * kv) + 3 * t["width"] * t["mlp_dim"]
  text = t["depth"] * layer + t["vocab_size"] * t["width"] * (1 if t.get("tie_embeddings") else 2)
  tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
  vision = (v["depth"] * (4 * v["width"] ** 2 + 2 * v["width"] * v["mlp_dim"]) +
            v["patch_size"] ** 2 * v.get("num_channels", 3) * v["width"] + tokens * v["width"])
  return int(text + vision + v["width"] * t["width"] + t["width"] ** 2)


def method_of(name: str, config: Mapping) -> str:
  """The method from the run's name (`npo-...`, the demo's `sft_posthoc-s0-...`), else from its config."""
  prefix = name.split("-", 1)[0]
  if prefix in report_lib.MODELS:
    return prefix
  loss = config.get("loss", {}).get("name", "")
  if loss and loss != "sft":
    return loss
  return "base" if config.get("data", {}).get("streams", {}).get("train") == "pretrain" else "sft"


def _variant(name: str, method: str, size: str, seed: int) -> str:
  suffix = f"-{size}-s{seed}"
  if name.startswith(method + "-") and name.endswith(suffix):
    return name[len(method) + 1:-len(suffix)]
  return ""


def find_runs(dirs: Sequence[str | pathlib.Path]) -> list[Run]:
  """Every `eval.json` under `dirs` (a run directory's, or `<run>/eval/<step>/eval.json` of a checkpoint)."""
  runs = []
  for d in map(pathlib.Path, dirs):
    if not d.is_dir():
      raise MissingFileError(f"--runs: {d} is not a directory")
    for path in sorted(d.rglob("eval.json")):
      run_dir, step = path.parent, ""
      if not (run_dir / "config.json").exists() and (run_dir.parent.parent / "config.json").exists():
        run_dir, step = run_dir.parent.parent, f"@{run_dir.name}"
      if not (run_dir / "config.json").exists():
        log.warning("mirage report: skipping %s (no config.json beside it)", path)
        continue
      runs.append(_read_run(path, run_dir, step))
  if not runs:
    raise MissingFileError(f"no eval.json (with a config.json) under {', '.join(map(str, dirs))}; "
                            "`mirage eval --workdir=<run>` writes one")
  return sorted(runs, key=lambda r: (r.params, r.size, _method_rank(r.method), r.variant, r.seed, r.run))


def _read_run(path: pathlib.Path, run_dir: pathlib.Path, step: str) -> Run:
  try:
    metrics = json.loads(path.read_text())
    config = json.loads((run_dir / "config.json").read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} or its config.json is not valid JSON: {e}") from None
  model = config["model"]
  size, seed = str(model.get("size", "?")), int(config.get("seed", 0))
  method = method_of(run_dir.name, config)
  return Run(run=run_dir.name + step, path=str(run_dir), size=size, params=approx_params(model), method=method,
             variant=_variant(run_dir.name, method, size, seed), seed=seed, config_hash=config_hash(config),
             entry=report_lib.model_entry(metrics))


def _method_rank(method: str) -> int:
  return report_lib.MODELS.index(method) if method in report_lib.MODELS else len(report_lib.MODELS)


def value(entry: Mapping, column: str) -> float:
  node = entry
  for key in METRICS[column]:
    node = node.get(key, math.nan) if isinstance(node, Mapping) else math.nan
  return float(node)


def settings(runs: Sequence[Run]) -> dict[tuple, dict]:
  """Mean (and `_std` over seeds, `report.aggregate`) of each setting (size, method, variant, config hash)."""
  groups: dict[tuple, list[Run]] = {}
  for r in runs:
    groups.setdefault(r.setting, []).append(r)
  return {key: {"runs": rs, "entry": report_lib.aggregate([{"m": r.entry} for r in rs])["m"]}
          for key, rs in groups.items()}


def _size_label(r: Run) -> str:
  return f"{r.size} ({r.params / 1e6:.1f}M)" if r.params < 1e9 else f"{r.size} ({r.params / 1e9:.1f}B)"


def markdown(runs: Sequence[Run]) -> str:
  cols = list(METRICS)
  head = "| run | size | method | variant | seed | config hash | " + " | ".join(HEADERS[c] for c in cols) + " |"
  sep = "|---|---|---|---|---:|---|" + "---:|" * len(cols)
  rows = [f"| {r.run} | {_size_label(r)} | {r.method} | {r.variant or '—'} | {r.seed} | `{r.config_hash}` | " +
          " | ".join(report_lib.fmt(value(r.entry, c)) for c in cols) + " |" for r in runs]
  agg_head = "| size | method | variant | seeds | config hash | " + " | ".join(HEADERS[c] for c in cols) + " |"
  agg_sep = "|---|---|---|---|---|" + "---:|" * len(cols)
  agg = []
  for (size, method, variant, h), g in settings(runs).items():
    e, seeds = g["entry"], ",".join(str(r.seed) for r in g["runs"])
    agg.append(f"| {_size_label(g['runs'][0])} | {method} | {variant or '—'} | {seeds} | `{h}` | " +
               " | ".join(report_lib.fmt(value(e, c), _std(e, c)) for c in cols) + " |")
  return "\n".join([
      "# Runs", "", f"{len(runs)} evaluated runs. ASR / RR / IR / utility in %; \"What\" K=3 = the one-word attack, "
      "\"Share\" = over-prudence on safe queries (see the demo's report).", "", "## Mean ± std over seeds", "",
      agg_head, agg_sep, *agg, "", "## Every run", "", head, sep, *rows, "",
      "![ASR, RR and utility vs size](asr_rr_vs_size.png)", ""])


def _std(entry: Mapping, column: str) -> float | None:
  *parent, leaf = METRICS[column]
  node = entry
  for key in parent:
    node = node.get(key, {})
  return node.get(f"{leaf}_std")


def write_csv(runs: Sequence[Run], path: pathlib.Path) -> None:
  with path.open("w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["run", "size", "params", "method", "variant", "seed", "config_hash", *METRICS, "path"])
    for r in runs:
      w.writerow([r.run, r.size, r.params, r.method, r.variant, r.seed, r.config_hash,
                  *(value(r.entry, c) for c in METRICS), r.path])


@dataclasses.dataclass(frozen=True)
class ReportFiles:
  markdown: pathlib.Path
  csv: pathlib.Path
  plot: pathlib.Path
  runs: int
  settings: int


def write(dirs: Sequence[str | pathlib.Path], *, out: str | pathlib.Path) -> ReportFiles:
  from mirage_jax.report import plots  # matplotlib only when writing
  runs = find_runs(dirs)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  files = ReportFiles(markdown=out / "runs.md", csv=out / "runs.csv", plot=out / "asr_rr_vs_size.png",
                      runs=len(runs), settings=len(settings(runs)))
  files.markdown.write_text(markdown(runs))
  write_csv(runs, files.csv)
  curves: dict[str, list] = {}
  for (_, method, variant, _), g in settings(runs).items():
    r, e = g["runs"][0], g["entry"]
    curves.setdefault(f"{method} {variant}".strip(), []).append(
        (r.params, r.size, {c: (value(e, c), _std(e, c) or 0.0) for c in METRICS}))
  plots.size_curves(curves, files.plot)
  return files
