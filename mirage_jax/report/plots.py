"""PNG plots of the experiment (matplotlib, Agg backend): ASR / RR before and after the one-word attack per
method, the K-shot attack curve, per-term training-loss curves, and ASR / RR / utility vs model size
(`mirage report`)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def attack_bars(models: Mapping[str, Mapping], path: pathlib.Path, *, k: int = 3) -> None:
  names = list(models)
  x = np.arange(len(names))
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for ax, (title, before, after, labels) in zip(axes, (
      ("Jailbreak ASR (%)", [m["asr"]["original"] for m in models.values()],
       [m["asr"]["what_k"][str(k)] for m in models.values()], ("original", f'"What" {k}-shot')),
      ("Refusal rate on safe queries (%)", [m["rr"]["safe"] for m in models.values()],
       [m["rr"]["share"] for m in models.values()], ("original", '"Share" rewrite')))):
    ax.bar(x - 0.2, before, 0.4, label=labels[0], color="#7f9fbf")
    ax.bar(x + 0.2, after, 0.4, label=labels[1], color="#d9534f")
    ax.set_xticks(x, names, rotation=25, ha="right")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def kshot_curve(models: Mapping[str, Mapping], path: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for name, m in models.items():
    ks = sorted((k for k in m["asr"]["what_k"] if k.isdigit()), key=int)  # not the `_std` siblings
    ax.plot([int(k) for k in ks], [m["asr"]["what_k"][k] for k in ks], marker="o", label=name)
  ax.set_xlabel('K ("What" rewrites per query)')
  ax.set_ylabel("question-level ASR (%)")
  ax.set_ylim(0, 105)
  ax.legend(fontsize=7)
  ax.set_title("K-shot one-word attack")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def loss_curves(runs: Mapping[str, Sequence[Mapping]], path: pathlib.Path) -> None:
  """`runs[name]` = rows of that run's metrics.jsonl; every loss term (keys other than bookkeeping)."""
  skip = {"step", "split", "time", "lr", "grad_norm"}
  if not runs:  # a demo of the base alone: nothing to plot
    return
  fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 3.0), squeeze=False)
  for ax, (name, rows) in zip(axes[0], runs.items()):
    train = [r for r in rows if r.get("split") == "train"]
    keys = sorted({k for r in train for k in r} - skip)
    for key in keys:
      pts = [(r["step"], r[key]) for r in train if key in r]
      if pts:
        ax.plot(*zip(*pts), label=key)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def size_curves(curves: Mapping[str, Sequence[tuple]], path: pathlib.Path) -> None:
  """The mirage and its fix against model size (`mirage report`): `curves[label]` = [(params, size, {column:
  (mean, std)})]; one panel each for the jailbreak ASR, the refusals of safe queries and utility; solid lines
  after the attack / rewrite ("What" K=3, "Share"; utility overall), dashed before it (original queries, safe
  queries; utility on the "Share" answers); error bars = std over seeds. Sizes are placed in parameter order
  and labelled with their parameter count."""
  sizes = sorted({(p, s) for pts in curves.values() for p, s, _ in pts})
  x_of = {s: i for i, (_, s) in enumerate(sizes)}
  panels = (("Jailbreak ASR (%)", "asr_what_k3", "asr_original", "attacked (K=3)", "original"),
            ("Refusal rate on safe queries (%)", "rr_share", "rr_safe", "\"Share\" rewrite", "original"),
            ("Utility (%)", "utility", "utility_share", "utility split", "\"Share\" answers"))
  fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.8))
  for ax, (title, solid, dashed, solid_what, dashed_what) in zip(axes, panels):
    for i, (label, pts) in enumerate(curves.items()):
      pts = sorted(pts, key=lambda t: (t[0], t[1]))
      xs = [x_of[s] for _, s, _ in pts]
      color = f"C{i % 10}"
      for column, style in ((solid, "-"), (dashed, "--")):
        ys = [v[column] for *_, v in pts]
        ax.errorbar(xs, [m for m, _ in ys], yerr=[sd for _, sd in ys], fmt=style, marker="o", color=color,
                    capsize=3, label=label if style == "-" else None)
    ax.set_xticks(range(len(sizes)), [f"{s}\n{p / 1e6:.2g}M" if p < 1e9 else f"{s}\n{p / 1e9:.2g}B"
                                      for p, s in sizes])
    ax.set_xlabel("model size (parameters)")
    ax.set_ylim(-2, 105)
    ax.set_title(f"{title}: solid = {solid_what}, dashed = {dashed_what}", fontsize=8)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def step_curves(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: pathlib.Path, *,
                xlabel: str) -> None:
  """Percent metrics against training steps, one line each (the SFT trajectory)."""
  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  for name, (steps, values) in curves.items():
    ax.plot(steps, values, marker="o", label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("%")
  ax.set_ylim(-2, 102)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
