"""The package layering of mirage_jax (README "Layout"), read from the code's imports with `ast`.

Every `import` / `from ... import` in every module counts, lazy ones inside functions included. Layers, bottom
to top (a package may import its own layer, when that makes no cycle, and the layers below; never above):

  0  errors, seeds, configlib, sharding, distributed
  1  models, data, losses
  2  train, compile, describe
  3  eval
  4  audit, report
  5  commands, cli, main

`models` imports only from layer 0 minus `configlib` (errors, seeds, sharding). The experiment configs
(`configs/`, installed as `mirage_configs`) sit beside layer 0: they import no jax and from mirage_jax only
`errors` (the world's knobs and defaults live in `configs/world.py`); `models` never imports them. No import cycle between
packages, nor between modules (mirage_configs included). `python tests/test_layering.py` prints the
package graph.
"""

from __future__ import annotations

import ast
import pathlib
import sys
from collections.abc import Iterable, Mapping

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = (
    ("errors", "seeds", "configlib", "sharding", "distributed"),
    ("models", "data", "losses"),
    ("train", "compile", "describe"),
    ("eval",),
    ("audit", "report"),
    ("commands", "cli", "main"),
)
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
MODELS_MAY_IMPORT = {"errors", "seeds", "sharding", "models"}
CONFIGS_MAY_IMPORT = {"mirage_jax.errors"}
HEAVY = ("jax", "flax", "optax", "orbax", "tensorflow", "tensorflow_datasets")


def modules() -> dict[str, pathlib.Path]:
  """Dotted name -> file of every module of mirage_jax and of the configs (as `mirage_configs`)."""
  out = {}
  for top, base in (("mirage_jax", ROOT / "mirage_jax"), ("mirage_configs", ROOT / "configs")):
    for path in sorted(base.rglob("*.py")):
      parts = list(path.relative_to(base).with_suffix("").parts)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join([top, *parts])] = path
  return out


def imports_of(name: str, path: pathlib.Path, known: Iterable[str]) -> set[str]:
  """The project modules `name` imports anywhere in its file (`from a import b` -> `a.b` when b is a module)."""
  known = set(known)
  is_pkg = path.name == "__init__.py"
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = name.split(".") if is_pkg else name.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in known and "." in t:  # `import a.b.c` of a module-less attribute path
        t = t.rpartition(".")[0]
      if t.split(".")[0] in ("mirage_jax", "mirage_configs") or t.split(".")[0] in HEAVY:
        out.add(t)
  out.discard(name)
  return out


def package(module: str) -> str:
  """`mirage_jax.train.loop` -> `train`; `mirage_jax.cli` -> `cli`; `mirage_configs.x` -> `mirage_configs`."""
  parts = module.split(".")
  if parts[0] == "mirage_configs":
    return "mirage_configs"
  return parts[1] if len(parts) > 1 else "mirage_jax"


def graph() -> dict[str, set[str]]:
  mods = modules()
  return {name: {t for t in imports_of(name, path, mods) if t in mods or t.split(".")[0] in HEAVY}
          for name, path in mods.items()}


def package_edges(g: Mapping[str, set[str]]) -> dict[str, set[str]]:
  out: dict[str, set[str]] = {}
  for src, targets in g.items():
    for t in targets:
      if t.split(".")[0] in HEAVY:
        continue
      a, b = package(src), package(t)
      if a != b:
        out.setdefault(a, set()).add(b)
  return out


def cycles(g: Mapping[str, Iterable[str]]) -> list[list[str]]:
  """Strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in g.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  sys.setrecursionlimit(10_000)
  for v in list(g):
    if v not in index:
      visit(v)
  return out


def test_every_package_has_a_layer():
  pkgs = {package(m) for m in modules()} - {"mirage_jax", "mirage_configs"}
  assert pkgs - set(RANK) == set(), "add the new package to LAYERS here and to the README's layout"


def test_no_upward_import_between_packages():
  g = graph()
  upward = sorted(f"{src} -> {t}" for src, targets in g.items() for t in targets
                  if src.startswith("mirage_jax.") and t.startswith("mirage_jax.")
                  and package(src) in RANK and package(t) in RANK and RANK[package(t)] > RANK[package(src)])
  assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_cycles_between_packages_or_modules():
  g = graph()
  mirage = {k: {t for t in v if t.startswith("mirage_jax.")} for k, v in g.items() if k.startswith("mirage_jax.")}
  assert not cycles(package_edges(mirage)), f"package cycles: {cycles(package_edges(mirage))}"
  project = {k: {t for t in v if t.split(".")[0] not in HEAVY} for k, v in g.items()}
  assert not cycles(project), f"module cycles: {cycles(project)}"


def test_models_import_only_the_bottom_layer():
  g = graph()
  bad = sorted(f"{src} -> {t}" for src, targets in g.items() if package(src) == "models" for t in targets
               if t.split(".")[0] not in HEAVY and package(t) not in MODELS_MAY_IMPORT)
  assert not bad, "models/ must stay a library of layer 0 only:\n" + "\n".join(bad)


def test_configs_are_pure_data():
  g = graph()
  bad = sorted(f"{src} -> {t}" for src, targets in g.items() if src.startswith("mirage_configs") for t in targets
               if t.split(".")[0] in HEAVY or (t.startswith("mirage_jax") and t not in CONFIGS_MAY_IMPORT))
  assert not bad, "configs import no jax and from mirage_jax only errors and WorldConfig:\n" + "\n".join(bad)


def main() -> None:
  g = graph()
  mirage = {k: {t for t in v if t.startswith(("mirage_jax.", "mirage_configs"))} for k, v in g.items()}
  for src, targets in sorted(package_edges(mirage).items(), key=lambda kv: (RANK.get(kv[0], -1), kv[0])):
    print(f"{src:15s} -> {', '.join(sorted(targets, key=lambda p: (RANK.get(p, 0.5), p)))}")


if __name__ == "__main__":
  main()
