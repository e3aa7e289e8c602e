"""`mirage sweep`: the points of an ablation config (`configs/ablations/*.py`) as one shell command each.

A point trains one run (`mirage train`, initialised from its upstream point's run when it has one) and then
evaluates it (`mirage eval`, which writes `eval.json` for `mirage report`). Points come out in dependency
order (a base before the runs initialised from it). Launchers:

  local   `mirage train ... && mirage eval ...`, run here one after the other
  tpu_vm  `launch/tpu_vm.sh run <launcher args> -- train ...` on every worker of a TPU VM slice, in sequence
  slurm   `sbatch launch/slurm_gpu.sbatch train ...` jobs chained with `--dependency=afterok:<upstream job>`

Every point's config is loaded and its overrides applied before anything runs, so a bad key fails the whole
sweep at once. `mirage demo` runs points in-process instead (`mirage_jax.commands.demo`): `load` and `expand`
are its loaders too. No jax is imported here.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

from mirage_jax import configlib
from mirage_jax.errors import ConfigError
from mirage_jax.report import runs as report_runs

LAUNCHERS = ("local", "tpu_vm", "slurm")
LAUNCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "launch"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")
_KEYS = {"name", "config", "overrides", "init_from", "labels"}


class SweepError(ConfigError):
  """A bad sweep definition or a failed point (reported as one line by the CLI)."""


@dataclasses.dataclass(frozen=True)
class Point:
  name: str  # the run's directory under the sweep's workdir
  config: str  # training config spec, "configs/unlearn/npo.py:tiny"
  overrides: tuple[str, ...]
  init_from: str  # name of the upstream point ("" = none)
  labels: Mapping
  config_hash: str  # `mirage_jax.report.runs.config_hash` of the point's training config


@dataclasses.dataclass(frozen=True)
class Sweep:
  spec: str
  points: tuple[Point, ...]  # dependency order


@dataclasses.dataclass(frozen=True)
class Command:
  point: Point
  line: str  # one bash command line


@dataclasses.dataclass(frozen=True)
class Plan:
  spec: str
  launcher: str
  commands: tuple[Command, ...]  # dependency order


def load(spec: str, *, overrides: Sequence[str] = ()) -> Sweep:
  """Load `configs/ablations/X.py[:arg]`, apply `--config.x=y` to its knobs, expand and check its points."""
  module = configlib.load_module(spec.partition(":")[0])
  if not callable(getattr(module, "sweep", None)):
    raise SweepError(f"{spec}: no sweep(config) function; ablation configs live in configs/ablations/")
  config = configlib.apply_overrides(configlib.load(spec), overrides)
  try:
    raw = module.sweep(config)
  except ValueError as e:
    raise SweepError(f"{spec}: {e}") from None
  return Sweep(spec=spec, points=expand(raw, every=_every_run_overrides(config)))


def expand(raw: Sequence[Mapping], *, every: Sequence[str] = ()) -> tuple[Point, ...]:
  """Point dicts (`configs/ablations/__init__.py`) -> checked Points in dependency order, each with `every`
  appended to its overrides and its training config loaded (a bad key fails here) and hashed."""
  return tuple(_with_hash(p) for p in order([_check_point(p, every) for p in raw]))


def _every_run_overrides(config) -> list[str]:
  """The sweep config's `overrides` knob ("total_steps=4 eval.max_new_tokens=4") as `--config.` flags."""
  text = config.get("overrides", "") or ""
  return [item if item.startswith("--config.") else f"--config.{item}" for item in shlex.split(text)]


def _check_point(raw, every: Sequence[str]) -> Point:
  if not isinstance(raw, Mapping):
    raise SweepError(f"sweep point {raw!r} is not a dict with keys {sorted(_KEYS)}")
  problems = [f"{what} keys {sorted(keys)}" for what, keys in (("missing", {"name", "config"} - set(raw)),
                                                                ("unknown", set(raw) - _KEYS)) if keys]
  if problems:
    raise SweepError(f"sweep point {raw.get('name', raw)!r}: {'; '.join(problems)}; valid keys: {sorted(_KEYS)}")
  name = str(raw["name"])
  if not _NAME.match(name):
    raise SweepError(f"sweep point name {name!r}: use letters, digits and . _ = - (it names a directory)")
  overrides = tuple(raw.get("overrides", ()))
  bad = [o for o in overrides if not str(o).startswith("--config.")]
  if bad:
    raise SweepError(f"sweep point {name}: overrides must look like --config.key=value, got {bad}")
  return Point(name=name, config=str(raw["config"]), overrides=(*overrides, *every),
               init_from=str(raw.get("init_from", "") or ""), labels=dict(raw.get("labels", {})), config_hash="")


def order(points: Sequence[Point]) -> list[Point]:
  """Points in dependency order (each after its `init_from`), otherwise as given; names must be unique."""
  by_name: dict[str, Point] = {}
  for p in points:
    if p.name in by_name:
      raise SweepError(f"sweep point name {p.name!r} appears twice")
    by_name[p.name] = p
  out: list[Point] = []
  state: dict[str, str] = {}

  def visit(p: Point, chain: tuple[str, ...]) -> None:
    if state.get(p.name) == "done":
      return
    if state.get(p.name) == "visiting":
      raise SweepError(f"sweep points depend on each other in a cycle: {' -> '.join((*chain, p.name))}")
    state[p.name] = "visiting"
    if p.init_from:
      if p.init_from not in by_name:
        raise SweepError(f"sweep point {p.name}: init_from {p.init_from!r} is not a point of the sweep")
      visit(by_name[p.init_from], (*chain, p.name))
    state[p.name] = "done"
    out.append(p)

  for p in points:
    visit(p, ())
  return out


def _with_hash(p: Point) -> Point:
  """Load the point's training config with its overrides (a bad key fails here, before anything runs)."""
  init = [f"--config.init_from=<{p.init_from}>"] if p.init_from else []
  try:
    config = configlib.apply_overrides(configlib.load(p.config), [*p.overrides, *init])
  except configlib.ConfigError as e:
    raise SweepError(f"sweep point {p.name}: {e}") from None
  return dataclasses.replace(p, config_hash=report_runs.config_hash(config))


def make_plan(sweep: Sweep, *, workdir: str, launcher: str = "local", launcher_args: str = "") -> Plan:
  """One bash command line per point, in dependency order."""
  if launcher not in LAUNCHERS:
    raise SweepError(f"unknown launcher {launcher!r}; valid: {', '.join(LAUNCHERS)}")
  if not workdir:
    raise SweepError("a sweep needs --workdir (every point's run goes to <workdir>/<point name>)")
  index = {p.name: i for i, p in enumerate(sweep.points)}
  extra = shlex.split(launcher_args)
  out = []
  for i, p in enumerate(sweep.points):
    run_dir = f"{workdir.rstrip('/')}/{p.name}"
    init = [f"--config.init_from={workdir.rstrip('/')}/{p.init_from}"] if p.init_from else []
    train = ["train", f"--config={p.config}", f"--workdir={run_dir}", *p.overrides, *init]
    evaluate = ["eval", f"--workdir={run_dir}"]
    if launcher == "local":
      line = f"{shlex.join(['mirage', *train])} && {shlex.join(['mirage', *evaluate])}"
    elif launcher == "tpu_vm":
      script = [_launch_script("tpu_vm.sh"), "run", *extra, "--"]
      line = f"{shlex.join([*script, *train])} && {shlex.join([*script, *evaluate])}"
    else:
      after = [f"--dependency=afterok:$jid_{index[p.init_from]}"] if p.init_from else []
      sbatch = ["sbatch", "--parsable", f"--job-name={p.name}", *extra]
      script = _launch_script("slurm_gpu.sbatch")
      line = (f"jid_{i}=$({_join_keep_vars([*sbatch, *after, script, *train])}) && "
              f"jid_{i}_eval=$({_join_keep_vars([*sbatch, f'--dependency=afterok:$jid_{i}', script, *evaluate])})")
    out.append(Command(point=p, line=line))
  return Plan(spec=sweep.spec, launcher=launcher, commands=tuple(out))


def _launch_script(name: str) -> str:
  path = LAUNCH_DIR / name
  if not path.exists():
    raise SweepError(f"{path} not found: launchers other than local need the repository checkout")
  try:
    return str(path.relative_to(pathlib.Path.cwd()))
  except ValueError:
    return str(path)


def _join_keep_vars(args: Sequence[str]) -> str:
  """shlex.join, but `--dependency=afterok:$jid_N` stays expandable."""
  return " ".join(a if re.fullmatch(r"--dependency=afterok:\$jid_\d+", a) else shlex.quote(a) for a in args)


def script(plan: Plan) -> str:
  """The dry-run text: a bash script, one comment + one command line per point."""
  cmds = plan.commands
  lines = ["#!/usr/bin/env bash", f"# mirage sweep {plan.spec}: {len(cmds)} points, launcher {plan.launcher}",
           "set -euo pipefail"]
  for i, c in enumerate(cmds):
    labels = " ".join(f"{k}={v}" for k, v in c.point.labels.items() if v != "")
    after = f" after {c.point.init_from}" if c.point.init_from else ""
    lines += [f"# [{i + 1}/{len(cmds)}] {c.point.name}{after} ({labels}; config {c.point.config_hash})", c.line]
  return "\n".join(lines) + "\n"


def execute(plan: Plan) -> None:
  """Run the commands: local and tpu_vm one by one (stopping at the first failure), slurm as one script (its
  job ids chain the submissions)."""
  env = dict(os.environ, PATH=os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ["PATH"]]))
  if plan.launcher == "slurm":
    _bash(script(plan), env, what="sbatch submissions")
    return
  for i, c in enumerate(plan.commands):
    print(f"mirage sweep: [{i + 1}/{len(plan.commands)}] {c.point.name}", file=sys.stderr, flush=True)
    _bash(c.line, env, what=f"point {c.point.name}")


def _bash(text: str, env: Mapping, *, what: str) -> None:
  rc = subprocess.run(["bash", "-euo", "pipefail", "-c", text], env=env, check=False).returncode
  if rc:
    raise SweepError(f"{what} failed with exit status {rc}")


def default_workdir(spec: str) -> str:
  """`runs/<sweep config name>`: where `mirage sweep` puts the points' runs without `--workdir`."""
  return os.path.join("runs", os.path.basename(spec.partition(":")[0]).removesuffix(".py"))


def run(spec: str, *, overrides: Sequence[str] = (), workdir: str | None = None, launcher: str = "local",
        launcher_args: str = "", dry_run: bool = False) -> str:
  """`mirage sweep`: load the sweep, plan its commands, then run them (returns "") or, with `dry_run`, return
  the bash script instead."""
  plan = make_plan(load(spec, overrides=overrides), workdir=default_workdir(spec) if workdir is None else workdir,
                   launcher=launcher, launcher_args=launcher_args)
  if dry_run:
    return script(plan)
  execute(plan)
  return ""
