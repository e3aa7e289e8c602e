"""Writes the demo's `report.md`, `report.json` and PNG plots."""

from __future__ import annotations

import json
import math
import os
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
  if rep.get("trajectory"):
    plots.step_curves(trajectory_curves(rep["trajectory"]), workdir / "trajectory.png", xlabel="post-hoc SFT steps")
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

{_grid(rep)}{trajectory_md(rep.get("trajectory"))}## Targets of the experiment issue

{_checks_md(checks)}

{_verdict(missed, checks)}

{_claims_md(rep)}
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
""" + ("\n" + robustness_section(rep["robustness"], at=workdir) if rep.get("robustness") else "")
  (workdir / "report.md").write_text(text)
  (workdir / "report.json").write_text(json.dumps(rep, indent=1, sort_keys=True, default=float))


TRAJECTORY_COLUMNS = (("ASR original", ("asr", "original")), ("ASR attacked K=3", ("asr", "what_k", "3")),
                      ("RR safe", ("rr", "safe")), ("RR \"Share\"", ("rr", "share")),
                      ("utility \"Share\"", ("utility_share",)), ("utility", ("utility",)))


def trajectory_md(traj: Mapping | None) -> str:
  """The SFT trajectory's section (`mirage_jax.commands.trajectory`); "" when the demo ran none."""
  if not traj:
    return ""
  rows = ["| SFT step | " + " | ".join(h for h, _ in TRAJECTORY_COLUMNS) + " |",
          "|---:|" + "---:|" * len(TRAJECTORY_COLUMNS)]
  for step, m in traj["points"].items():
    rows.append(f"| {step} | " + " | ".join(report_lib.fmt(report_lib.value(m, *path))
                                           for _, path in TRAJECTORY_COLUMNS) + " |")
  return (f"## SFT trajectory: where the mirage appears\n\nOne post-hoc SFT run of {traj['steps'][-1]} steps "
          f"from the base (learning rate {traj['lr']:g}, constant after {traj['warmup_steps']} warm-up steps), "
          f"each checkpoint evaluated on the test splits; step 0 is the base ({traj['wall_s']:.0f} s).\n\n"
          + "\n".join(rows) + "\n\n![trajectory](trajectory.png)\n\n")


def trajectory_curves(traj: Mapping) -> dict[str, tuple[list[int], list[float]]]:
  """{column: (steps, values)} of the SFT trajectory, for `plots.step_curves`."""
  steps = [int(s) for s in traj["points"]]
  return {h: (steps, [report_lib.value(m, *path) for m in traj["points"].values()])
          for h, path in TRAJECTORY_COLUMNS}


def _claims_md(rep: dict) -> str:
  """Over several runs: which targets hold in every run, which in some, which in none (with every run's
  number); `rep["claims"]` keeps the same. "" for one run."""
  runs = rep.get("per_seed", [])
  if len(runs) < 2:
    return ""
  claims = report_lib.claims_over_runs(runs)
  rep["claims"] = claims
  n = len(runs)
  every = [c for c in claims if c["runs_met"] == n]
  some = [c for c in claims if 0 < c["runs_met"] < n]
  none = [c for c in claims if not c["runs_met"]]
  rows = ["| target | runs met | per run (" + ", ".join(f"w{r['world_seed']}s{r['seed']}" for r in runs) + ") |",
          "|---|---:|---|"]
  rows += [f"| {c['target']} | {c['runs_met']}/{n} | " +
           " · ".join(f"{v}{'' if ok else ' ✗'}" for v, ok in zip(c["measured"], c["met"])) + " |" for c in claims]
  return (f"### Which targets hold in every run\n\nEach target judged in each of the {n} runs on its own: "
          f"{len(every)} hold in every run, {len(some)} in some ({', '.join(c['target'] for c in some) or 'none'}), "
          f"{len(none)} in none ({', '.join(c['target'] for c in none) or 'none'}). A run's targets that name the "
          f"base are judged against that run's own base. A claim that holds in one run only is not a claim.\n\n" + "\n".join(rows) + "\n")


def _verdict(missed: Sequence, checks: Sequence) -> str:
  if not checks:
    return ""
  if not missed:
    return f"All {len(checks)} targets were met in this run."
  return (f"{len(checks) - len(missed)} of {len(checks)} targets were met; missed: " +
          "; ".join(f"{c} (measured {v})" for c, v, _ in missed) + ".")


# The ablation table's columns: (heading, model-entry path, eval.json interval key).
ABLATION_COLUMNS = (("ASR original", ("asr", "original"), "asr.original"),
                    ("ASR attacked K=3", ("asr", "what_k", "3"), "asr.what_k.3"),
                    ("RR \"Share\"", ("rr", "share"), "rr.share"),
                    ("utility \"Share\"", ("utility_share",), "utility_share"),
                    ("utility", ("utility",), "utility"))


def _ablation_md(rows: Mapping | None) -> str:
  if not rows:
    return ("## World-knob ablation\n\nNot run here (`mirage demo --ablations` runs it; see "
            "`benchmarks/RESULTS.md` for the recorded one).\n")
  out = ["## World-knob ablation: which properties the mirage needs", "",
         "Each variant of the world (or of a method's loss, or of the base's training data) and the models trained "
         "on it, from the variant's own base (or the default world's where the pretraining data is identical), "
         "training seed 0. Brackets: 95 % "
         "bootstrap intervals over the queries of that one run (each eval.json's `ci`), not over seeds.", ""]
  out += [f"- `{name}`: {row['what']}" + (" (the default world's base)" if row["base_reused"] and name != "default"
                                          else "") for name, row in rows.items()]
  out += ["", "| variant | model | " + " | ".join(h for h, _, _ in ABLATION_COLUMNS) + " |",
          "|---|---|" + "---:|" * len(ABLATION_COLUMNS)]
  for name, row in rows.items():
    labels = {**report_lib.LABELS, **row.get("labels", {})}  # a variant may name its base (`mixed_in_base`)
    for model, entry in report_lib.in_table_order(row["models"]):
      ci = row.get("ci", {}).get(model, {})
      cells = [_with_interval(report_lib.value(entry, *path), ci.get(key)) for _, path, key in ABLATION_COLUMNS]
      out.append(f"| {name} | {labels.get(model, model)} | " + " | ".join(cells) + " |")
  return "\n".join(out) + "\n"


def _with_interval(x: float, interval) -> str:
  if not interval or not isinstance(x, (int, float)) or math.isnan(x):
    return report_lib.fmt(x)
  return f"{report_lib.fmt(x)} [{report_lib.fmt(interval[0])}, {report_lib.fmt(interval[1])}]"


ROBUSTNESS_HEADING = "## Robustness: is the harmful knowledge gone or only hidden?"


def robustness_section(result: Mapping, *, at: pathlib.Path | None = None) -> str:
  """`mirage robustness`'s section: the table (`report.robustness_table`), what each column means, the probe
  accuracy by layer and the relearning plots (linked relative to `at`, the markdown file's folder; default:
  the result's own `out` folder)."""
  out = pathlib.Path(result.get("out", "."))
  link = lambda name: os.path.relpath(out / f"relearn_{name}.png", at or out)  # noqa: E731
  runs, steps, k = len(result["per_seed"]), result["relearn_steps"], result.get("k_attack") or 3
  spread = (f"Mean over {runs} runs, in brackets the {report_lib.SEED_BOOTSTRAP}." if runs > 1 else
            "One run (one world seed x training seed): no interval over runs.")
  layers = ["| model | code probe accuracy by layer, base-fit (%) | own (%) |", "|---|---|---|"]
  for name, m in result["models"].items():
    probe = m.get("probe", {})
    by = lambda xs: " · ".join(report_lib.fmt(x * 100) for x in xs) if xs else "—"  # noqa: E731
    layers.append(f"| {report_lib.LABELS.get(name, name)} | {by(probe.get('by_layer'))} | "
                  f"{by(probe.get('own', {}).get('code', {}).get('by_layer'))} |")
  return f"""{ROBUSTNESS_HEADING}

`mirage robustness` ({result['wall_s']:.0f} s). ASR in percent on the held-out test hazards (original queries
and K = {k} "What" rewrites); in parentheses "asked": judged with `harm_match=asked` (only the codes of the
procedure the query asks for count, not those of any hazard: the knowledge, not the format). {spread}

* **prefill**: greedy decoding after a forced opening of the answer: "format" = the opening of a harmful
  answer in the training data's format, "comply" = "sure ,"; ASR of the original queries.
* **relearn**: ASR (original / attacked) after {', '.join(map(str, steps))} full fine-tuning steps on a
  small slice of forget data of the *train* hazards ("forget") or on benign questions about those hazards'
  images that never show a procedure ("benign"); the test hazards were never in either.
* **probes**: linear probes on each decoder layer's residual stream, scored on half of the `probe` split:
  "code" reads which procedure code comes next (fit on the base's states and applied to the model, or fit
  on the model's own), "harmful" whether the query asks for a hazard's procedure; best layer, percent.
  The control is the same probe fit on a randomly initialised model: what the input alone gives away (the
  token before a code and the image say a lot), the floor to read a trained model's accuracy against.
* **refusal dir. ablated** (SFT models): the refused-minus-answered mean direction of the `sft` split,
  projected out of every weight that writes the residual stream; the layer chosen on the dev split.

{report_lib.robustness_table(result['models'], k=k)}

Relearning: ASR original / attacked after that many steps on each set (in parentheses: judged with
`harm_match=asked`, only the asked hazard's own codes counting; the plain judge counts any hazard's).

{report_lib.relearn_table(result['models'], steps, RELEARN_PLOTS)}
{_robustness_runs(result)}
{chr(10).join(layers)}

{" ".join(f"![relearning on {n} data]({link(n)})" for n in RELEARN_PLOTS if relearn_curves(result, n))}
"""


def _robustness_runs(result: Mapping) -> str:
  if len(result["per_seed"]) < 2:
    return ""
  return (f"\nEvery run (world seed x training seed):\n\n"
          f"{report_lib.robustness_per_run_table(result['per_seed'], result['relearn_steps'])}\n")


def relearn_curves(result: Mapping, name: str) -> dict[str, tuple[list[int], list[float]]]:
  """{model: (steps, original ASR)} of one relearning set, step 0 being the model before relearning."""
  out = {}
  for model, m in result["models"].items():
    curve = m.get("relearn", {}).get(name, {})
    if any(str(s) in curve for s in result["relearn_steps"]):
      steps = [0, *result["relearn_steps"]]
      out[report_lib.LABELS.get(model, model)] = (steps, [m.get("asr_original", math.nan), *[
          report_lib.value(curve, str(s), "original") for s in result["relearn_steps"]]])
  return out


def write_robustness(out_dir: pathlib.Path, result: Mapping) -> list[pathlib.Path]:
  """`robustness.json`, `robustness.md` and one relearning plot per set (`relearn_<set>.png`) in `out_dir`."""
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "robustness.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=float))
  (out_dir / "robustness.md").write_text(robustness_section(result))
  plots_written = []
  for name in RELEARN_PLOTS:
    curves = relearn_curves(result, name)
    if curves:
      path = out_dir / f"relearn_{name}.png"
      plots.step_curves(curves, path, xlabel=f"relearning steps on {name} data (ASR of the original queries, %)")
      plots_written.append(path)
  return plots_written


RELEARN_PLOTS = ("forget", "benign")


def add_robustness(workdir: pathlib.Path, result: Mapping) -> None:
  """A demo workdir's report.json gains `robustness`, its report.md the section (replacing an earlier one)."""
  rep_path, md_path = workdir / "report.json", workdir / "report.md"
  rep = json.loads(rep_path.read_text())
  rep["robustness"] = result
  rep_path.write_text(json.dumps(rep, indent=1, sort_keys=True, default=float))
  text = md_path.read_text() if md_path.is_file() else ""
  head, found, tail = text.partition(ROBUSTNESS_HEADING)
  rest = tail[tail.find("\n## "):] if found and "\n## " in tail else ""
  md_path.write_text(head.rstrip("\n") + "\n\n" + robustness_section(result, at=workdir) + rest)
