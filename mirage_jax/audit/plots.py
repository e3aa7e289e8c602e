"""Plots of the model audit (matplotlib, Agg backend): flip rates of one model, and the word x model heatmap."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def flip_bars(flips: Sequence, path: pathlib.Path, *, title: str, top: int = 20) -> None:
  """Flip rate with its Wilson 95 % interval per (word, operation), best first."""
  rows = [f for f in flips if not math.isnan(f.flip_rate)][:top][::-1]
  fig, ax = plt.subplots(figsize=(6, 0.28 * max(len(rows), 4) + 1.2))
  if rows:
    y = np.arange(len(rows))
    rate = np.array([100 * f.flip_rate for f in rows])
    err = 100 * np.array([[f.flip_rate - f.ci_low for f in rows], [f.ci_high - f.flip_rate for f in rows]])
    ax.barh(y, rate, xerr=np.maximum(err, 0), color=["#d9534f" if f.op == "substitute" else "#f0ad4e" for f in rows],
            error_kw=dict(lw=0.8, capsize=2))
    ax.set_yticks(y, [f"{f.op[:3]} {f.word}" for f in rows], fontsize=8)
  else:
    ax.text(0.5, 0.5, "no query outside the goal state: nothing to flip", ha="center", transform=ax.transAxes)
  ax.set_xlim(0, 100)
  ax.set_xlabel("flip rate (%) with 95% Wilson CI")
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def flip_heatmap(panels: dict[str, dict[str, dict[str, float]]], path: pathlib.Path, *,
                 words: dict[str, Sequence[str]]) -> None:
  """`panels[title][model][word]` = flip rate in % (nan: no eligible query); one heatmap per panel, rows
  `words[title]`."""
  titles = list(panels)
  rows = max(len(words[t]) for t in titles)
  fig, axes = plt.subplots(1, len(titles), figsize=(3.2 + 1.4 * sum(len(panels[t]) for t in titles),
                                                     0.3 * rows + 1.6), squeeze=False)
  for ax, title in zip(axes[0], titles):
    models = list(panels[title])
    grid = np.array([[panels[title][m].get(w, math.nan) for m in models] for w in words[title]], np.float64)
    cmap = plt.get_cmap("Reds").with_extremes(bad="#dddddd")
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
      ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7,
              color="white" if v > 60 else "black")
    ax.set_xticks(range(len(models)), models, rotation=25, ha="right", fontsize=8)
    ax.set_yticks(range(len(words[title])), words[title], fontsize=8)
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
