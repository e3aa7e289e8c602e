"""Experiment configs (installed as the package `mirage_configs`): `get_config(arg)` per file.

Besides the config files: `methods` (the table of the seven methods), `models` (the size table), `common`
(training defaults), `world` (the world's string knobs), `ablations` (sweep helpers), and `comma_list`
below, the one parser of comma-separated lists (`eval.splits`, sweep knobs, `--mesh`, ...). Imports nothing.
"""

from __future__ import annotations


def comma_list(text: str) -> list[str]:
  """`"a, b,,c"` -> `["a", "b", "c"]`: split on commas, strip blanks, drop empty items (order kept)."""
  return [item.strip() for item in str(text).split(",") if item.strip()]
