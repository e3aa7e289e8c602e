"""Golden dumps of every experiment config (axlearn's `golden_config` style): a changed default is a diff.

`tests/golden/<dir>/<name>__<arg>.json` is `configlib.to_json` of `configs/<dir>/<name>.py:<arg>` for every
config file with a `get_config`: a training config at every model size (tiny, small, 1b, 7b, 13b), a sweep
config (one with `sweep`, `configs/ablations/`) at each preset (cpu, pod). A sweep config's dump also lists its
points (`sweep(config)`), so a changed grid shows too. After an intended change, regenerate the files and
review their diff:

  MIRAGE_UPDATE_GOLDEN=1 pytest tests/test_golden_configs.py

Also here: no tracked .py/.md file cites notes outside the repository (the paper and the official code are
named by title and repository instead).
"""

from __future__ import annotations

import difflib
import json
import os
import pathlib
import subprocess

import pytest

from mirage_configs import models
from mirage_jax import configlib

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden"
SIZES = tuple(models.SIZES)
PRESETS = ("cpu", "pod")  # sweep configs
UPDATE = os.environ.get("MIRAGE_UPDATE_GOLDEN", "") not in ("", "0")
CONFIG_FILES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.py")
                      if "def get_config" in p.read_text())


def golden_path(file: str, arg: str) -> pathlib.Path:
  """`configs/sft/posthoc.py`, `tiny` -> tests/golden/sft/posthoc__tiny.json."""
  rel = pathlib.PurePosixPath(file).relative_to("configs").with_suffix("")
  return GOLDEN / rel.parent / f"{rel.name}__{arg}.json"


def is_sweep(file: str) -> bool:
  return hasattr(configlib.load_module(file), "sweep")


def dump(file: str, arg: str) -> str:
  """The golden text of `file:arg`."""
  config = configlib.load(f"{file}:{arg}")
  module = configlib.load_module(file)
  if hasattr(module, "sweep"):
    return configlib.to_json({"config": config.to_dict(), "sweep": module.sweep(config)}) + "\n"
  return configlib.to_json(config) + "\n"


def cases() -> list[tuple[str, str]]:
  return [(f, a) for f in CONFIG_FILES for a in (PRESETS if is_sweep(f) else SIZES)]


def test_config_files_and_args_discovered():
  assert "configs/sft/posthoc.py" in CONFIG_FILES and "configs/ablations/world.py" in CONFIG_FILES
  assert ("configs/unlearn/rmu.py", "13b") in cases() and ("configs/ablations/sizes.py", "pod") in cases()


@pytest.mark.parametrize("file,arg", cases())
def test_config_matches_its_golden_dump(file, arg):
  text, path = dump(file, arg), golden_path(file, arg)
  if UPDATE:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return
  assert path.exists(), (f"no golden dump for {file}:{arg}; create it with "
                         "`MIRAGE_UPDATE_GOLDEN=1 pytest tests/test_golden_configs.py`")
  want = path.read_text()
  if text != want:
    diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                        fromfile=f"golden {path.relative_to(REPO)}", tofile=f"now {file}:{arg}"))
    pytest.fail(f"{file}:{arg} differs from its golden dump (if intended, regenerate with "
                f"`MIRAGE_UPDATE_GOLDEN=1 pytest tests/test_golden_configs.py` and review the diff):\n{diff}",
                pytrace=False)


def test_no_stale_golden_files():
  known = {golden_path(f, a) for f, a in cases()}
  stale = sorted(p.relative_to(REPO).as_posix() for p in set(GOLDEN.rglob("*.json")) - known)
  if UPDATE:
    for p in stale:
      (REPO / p).unlink()
    return
  assert not stale, f"golden dumps of no config file/argument: {stale}; regenerate"


def test_golden_dumps_are_json():
  for path in GOLDEN.rglob("*.json"):
    assert isinstance(json.loads(path.read_text()), dict), path


# --------------------------------------------------------------------------- docs cite nothing outside the repo
OUTSIDE_FILES = ("reference/" + "paper.md", "reference/" + "peers.md")  # split: this file must not match itself


def tracked_files() -> list[pathlib.Path]:
  """The repository's tracked .py/.md files (every such file under it when git is not available)."""
  try:
    out = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
  except (OSError, subprocess.SubprocessError):
    out = []
  if out:
    return [REPO / f for f in out]
  skip = (".venv", ".git", "build", "mirage_jax.egg-info")
  return [p for p in REPO.rglob("*") if p.suffix in (".py", ".md") and not set(p.relative_to(REPO).parts) & set(skip)]


def test_no_file_cites_notes_outside_the_repository():
  """Docs name the paper (Safety Mirage, Chen, Yao et al., ICLR 2026) or the official code by repository
  (OPTML-Group/VLM-Safety-Unlearn, ys-zong/VLGuard), never a file a user does not have."""
  hits = [f"{p.relative_to(REPO)}:{n}" for p in tracked_files() if p.is_file()
          for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
          if any(name in line for name in OUTSIDE_FILES)]
  assert not hits, f"cite the paper or the official repository instead of {OUTSIDE_FILES}: {hits}"
