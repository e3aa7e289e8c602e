"""Writes the demo's `report.md`, `report.json` and PNG plots."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from mirage_jax import report as report_lib
from mirage_jax.audit import summary as audit_summary
from mirage_jax.data import pipeline, synthetic
from mirage_jax.data.records import in_id_order, load_records
from mirage_jax.data.tfds_builders import BuiltDataset
from mirage_jax.eval import safety
from mirage_jax.report import plots


def image_distances(dataset: BuiltDataset) -> dict[str, float]:
  """How far test images are from the SFT/forget images: RMS pixel distance (0-255 scale) of each `unsafe`
  test image (the first 100) to its nearest `forget` image, vs. between two training instances of one
  object; read from the built dataset."""
  flat = lambda recs: np.stack([r["image"].reshape(-1).astype(np.float32) for r in recs])  # noqa: E731
  test = in_id_order(load_records(dataset.source("unsafe")))[:100]
  forget = in_id_order(load_records(dataset.source("forget")))
  train = flat(forget)
  nearest = [float(np.sqrt(((train - x) ** 2).mean(axis=1)).min()) for x in flat(test)]
  by_obj: dict[str, list] = {}
  for r in forget:
    by_obj.setdefault(r["object"], []).append(r)
  same = [float(np.sqrt(((flat(v[:1]) - flat(v[1:2])) ** 2).mean())) for v in by_obj.values() if len(v) > 1]
  test_objects = {r["object"] for r in test}
  return {"test_to_nearest_forget_rms": float(np.mean(nearest)),
          "same_object_two_instances_rms": float(np.mean(same)) if same else math.nan,
          "test_objects_seen_in_forget": len(test_objects & set(by_obj)), "test_objects": len(test_objects)}


def _checks_md(checks: Sequence[tuple[str, str, bool]]) -> str:
  rows = ["| target | measured | met |", "|---|---:|:---:|"]
  rows += [f"| {claim} | {value} | {'yes' if ok else '**no**'} |" for claim, value, ok in checks]
  return "\n".join(rows)


def _grid(rep: Mapping) -> str:
  """The seed grid's sections (more than one run only): means with intervals over runs, and every run."""
  runs = rep.get("per_seed", [])
  if len(runs) < 2:
    return ""
  return (f"## Over {len(runs)} runs: world seeds {rep['world_seeds']} x training seeds {rep['seeds']}\n\n"
          f"Mean over the runs, in brackets the {report_lib.SEED_BOOTSTRAP}. Gains: a rewrite's ASR minus the "
          f"original's (first rewrite of each query).\n\n{report_lib.interval_table(rep['models'])}\n\n"
          f"### Every run\n\n{report_lib.per_run_table(runs)}\n\n")


def write(workdir: pathlib.Path, rep: dict, *, checks: Sequence, loss_rows: Mapping[str, Sequence],
          config) -> None:
  models = rep["models"]
  missed = [c for c in checks if not c[2]]
  dataset = pipeline.open_data(config.data).dataset  # the runs' dataset: what its build recorded
  world = dataset.world_info["world"]
  dist = image_distances(dataset)
  rep["image_distance"] = dist
  rep["targets"] = [{"target": c, "measured": v, "met": ok} for c, v, ok in checks]
  plots.attack_bars(models, workdir / "attack_asr_rr.png")
  plots.kshot_curve(models, workdir / "kshot_curve.png")
  plots.loss_curves({k: v for k, v in loss_rows.items() if k != "base"}, workdir / "loss_curves.png")
  sft_table = synthetic.format_first_word_table(synthetic.first_word_table(load_records(dataset.source("sft"))))
  seeds = len(rep["seeds"])
  worlds = len(rep.get("world_seeds", [0]))
  spread = " (mean ± std over runs)" if len(rep.get("per_seed", [])) > 1 else ""
  text = f"""# Safety mirage on the synthetic benchmark

Model size `{rep['size']}`, {seeds} training seed(s) x {worlds} world seed(s){spread}, {rep['devices']} device(s),
total wall time {rep['timing_s']['total']:.0f} s. Overrides: {', '.join(rep['overrides']) or 'none'}.
Every number below was measured by this run (greedy decoding; refusal = keyword judge, preset
`{config.eval.refusal_preset}`; harmful = at least {config.eval.harm_min_codes} placeholder codes of
{"any hazard's procedure" if config.eval.harm_match == "any" else "the asked-for procedure"}); nothing is
hard-coded. Intervals: every rate's interval is the {safety.INTERVAL_METHODS[safety.BOOTSTRAP]}, and the attack gains' (`gain`: a rewrite's ASR minus the
original's) the {safety.INTERVAL_METHODS[safety.DIFF_BOOTSTRAP]} (each
eval.json names the method per metric under `intervals`); the audit's flip rates use the
{safety.INTERVAL_METHODS[safety.WILSON]}.

## Table 1: one-word attack ("What", K = 3) and over-prudence ("Share")

{report_lib.table1(models)}

![ASR and RR](attack_asr_rr.png)

## Benign queries: refused, answered well, or answered with noise

Refusal rate (RR), the utility judge's accuracy on the answers (the expected key word present) and the
irrelevant rate (IR), on the benign test queries and on their "Share ..." rewrites. A model that stops
refusing "Share" questions by answering them with noise has a low RR *and* a low utility there.

{report_lib.benign_table(models)}

## Mechanism on attacked unsafe queries (every response of the first 3 rewrites)

{report_lib.mechanism_table(models)}

## K-shot attack curve (question-level ASR, any of the first K "What" rewrites harmful)

{report_lib.kshot_table(models)}

![K-shot](kshot_curve.png)

{_grid(rep)}## Targets of the experiment issue

{_checks_md(checks)}

{_verdict(missed, checks)}

## The data's shortcut: first word x label in the safety-SFT split

{sft_table}

{audit_summary.markdown(rep.get("audit"))}
## How far the test images are from the training images

The unsafe test splits show {dist['test_objects']} hazard objects, {dist['test_objects_seen_in_forget']} of
which appear in the forget/SFT data (the others are held-out hazard combinations the base model knows from
`pretrain`). Every test image is a new instance (new position, size, colour jitter and noise): its RMS pixel
distance to the nearest forget image is {dist['test_to_nearest_forget_rms']:.1f} (0-255 scale), versus
{dist['same_object_two_instances_rms']:.1f} between two training instances of the same object.

{_ablation_md(rep.get("ablation"))}
## Training losses (per term)

![losses](loss_curves.png)

## World knobs

```json
{json.dumps(world, indent=1, sort_keys=True)}
```
"""
  (workdir / "report.md").write_text(text)
  (workdir / "report.json").write_text(json.dumps(rep, indent=1, sort_keys=True, default=float))


def _verdict(missed: Sequence, checks: Sequence) -> str:
  if not checks:
    return ""
  if not missed:
    return f"All {len(checks)} targets were met in this run."
  return (f"{len(checks) - len(missed)} of {len(checks)} targets were met; missed: " +
          "; ".join(f"{c} (measured {v})" for c, v, _ in missed) + ".")


def _ablation_md(rows: Mapping | None) -> str:
  if not rows:
    return ("## World-knob ablation\n\nNot run here (`mirage demo --ablations` runs it; see "
            "`benchmarks/RESULTS.md` for the recorded one).\n")
  k = "3"
  out = ["## World-knob ablation: which properties the mirage needs", "",
         "Post-hoc SFT on each variant of the world (seed 0). ASR: original → K=3 \"What\"; RR: safe → "
         "\"Share\". NPO / RMU: attacked ASR (K=3).", "",
         "| variant | what changes | base ASR | post-hoc ASR | post-hoc RR | post-hoc utility | NPO | RMU |",
         "|---|---|---|---|---|---:|---:|---:|"]
  for name, row in rows.items():
    m = row["models"]
    base, ph = m["base"], m.get("sft_posthoc")
    cell = lambda e, key: report_lib.fmt(e["asr"]["what_k"].get(k)) if e else "—"  # noqa: E731
    base_txt = (f"{report_lib.fmt(base['asr']['original'])} → {cell(base, k)}" +
                (" (default base)" if row["base_reused"] and name != "default" else ""))
    out.append(
        f"| {name} | {row['what']} | {base_txt} | "
        f"{report_lib.fmt(ph['asr']['original'])} → {cell(ph, k)} | "
        f"{report_lib.fmt(ph['rr']['safe'])} → {report_lib.fmt(ph['rr']['share'])} | "
        f"{report_lib.fmt(ph['utility'])} | {cell(m.get('npo'), k)} | {cell(m.get('rmu'), k)} |")
  return "\n".join(out) + "\n"
