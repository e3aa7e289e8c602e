"""Loading experiment configs (`configs/**.py:arg`) and applying `--config.x=y` overrides, with clear errors.

ml-collections' own flag parser raises a bare `AttributeError` traceback for an unknown key; here every user
mistake (missing file, unknown key, wrong type) is a `ConfigError` whose one-line message names the key and
the closest valid ones. Config values are parsed with `ast.literal_eval` (never executed).
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib.util
import json
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from mirage_configs import world as world_knobs
from mirage_jax.errors import ConfigError  # noqa: F401  (re-exported: configlib.ConfigError)


def configs_root() -> pathlib.Path:
  """The installed `mirage_configs` package directory (the repository's `configs/`)."""
  import mirage_configs
  return pathlib.Path(mirage_configs.__file__).parent


def resolve_path(path: str) -> pathlib.Path:
  """A config path as given, else relative to the installed configs (`configs/sft/posthoc.py` works
  from any directory, and so does `sft/posthoc.py`)."""
  p = pathlib.Path(path)
  if p.exists():
    return p
  root = configs_root()
  for candidate in (root / p, root / pathlib.Path(*p.parts[1:]) if p.parts[:1] == ("configs",) else None):
    if candidate is not None and candidate.exists():
      return candidate
  helpers = ("common.py", "models.py", "world.py", "methods.py")  # modules of configs/ that are not configs
  known = sorted("configs/" + q.relative_to(root).as_posix() for q in root.rglob("*.py")
                 if q.name != "__init__.py" and not (q.parent == root and q.name in helpers))
  close = difflib.get_close_matches(path, known, n=3, cutoff=0.3)
  raise ConfigError(f"config file {path!r} not found" + (f"; did you mean {', '.join(close)}?" if close else
                                                         f"; available: {', '.join(known)}"))


def load_module(path: str):
  """The Python module of a config file (resolved like `resolve_path`); it must define `get_config`."""
  file = resolve_path(path)
  module_spec = importlib.util.spec_from_file_location(f"_mirage_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{file} has no get_config(arg) function")
  return module


def load(spec: str) -> ml_collections.ConfigDict:
  """`"configs/sft/posthoc.py:tiny"` -> the locked ConfigDict returned by that file's `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  file = module.__file__
  try:
    config = module.get_config(arg or None)
  except ValueError as e:
    raise ConfigError(f"{spec}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{file}: get_config must return an ml_collections.ConfigDict")
  check_world(config)
  config.lock()
  return config


def check_world(config: ml_collections.ConfigDict) -> None:
  """A ConfigError naming the knob and its valid values if a string knob of `config.data.world` (when the
  config has one) is not one of its enum's values (`mirage_configs.world`)."""
  data = config.get("data")
  world = data.get("world") if isinstance(data, ml_collections.ConfigDict) else None
  if isinstance(world, ml_collections.ConfigDict):
    world_knobs.check(world, where="data.world")


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in config.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_flat_keys(v, prefix + k + "."))
  return keys


def _parse_value(key: str, text: str, current: Any) -> Any:
  if isinstance(current, bool):
    low = text.lower()
    if low not in ("true", "false", "1", "0"):
      raise ConfigError(f"--config.{key}={text!r}: expected true or false")
    return low in ("true", "1")
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if current is None:
      return text
    raise ConfigError(f"--config.{key}={text!r}: expected a {type(current).__name__}") from None
  if current is None:
    return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
    return type(current)(value)
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"--config.{key} is a group of settings; set its fields, e.g. "
                      f"--config.{key}.{next(iter(current.keys()), 'x')}=...")
  if type(value) is not type(current):
    raise ConfigError(f"--config.{key}={text!r}: expected a {type(current).__name__}, got {type(value).__name__}")
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
  """Apply `["--config.a.b=1", ...]` (the `--config.` prefix is optional) to a copy of `config`."""
  config = ml_collections.ConfigDict(config.to_dict(), type_safe=True)
  valid = _flat_keys(config)
  for item in overrides:
    body = item[len("--config."):] if item.startswith("--config.") else item
    key, sep, text = body.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} must look like --config.key=value")
    parent, _, leaf = key.rpartition(".")
    node = config
    for part in parent.split(".") if parent else ():
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
      raise ConfigError(f"unknown config key {key!r}" +
                        (f"; closest valid keys: {', '.join(close)}" if close else ""))
    node[leaf] = _parse_value(key, text, node[leaf])
  check_world(config)
  config.lock()
  return config


def to_json(config: ml_collections.ConfigDict | Mapping) -> str:
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  return json.dumps(d, sort_keys=True, indent=1, default=str)


def fingerprint(config: ml_collections.ConfigDict | Mapping, *, drop: Iterable[str] = ()) -> str:
  """Short content hash of a config (top-level keys in `drop` excluded), for content-addressed stages."""
  d = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  for k in drop:
    d.pop(k, None)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def from_json(text: str) -> ml_collections.ConfigDict:
  """A config saved with `to_json` (a run's `config.json`), locked."""
  config = ml_collections.ConfigDict(json.loads(text))
  config.lock()
  return config
