"""Test setup: 8 fake CPU devices (set before jax is imported), a data directory and a compilation cache
shared by the whole run.

Parallel runs (`pytest -n auto`, pytest-xdist): every worker is its own session, but the data directory and
the compilation cache live in one directory shared by all workers of the run (keyed by xdist's testrunuid),
so a world is built once per run, not once per worker. Concurrent builders of one world take turns on the
build's file lock (`tfds_builders.build_synth`); concurrent compilation-cache writers on JAX's own file lock
(enabled by giving the cache a size limit).
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

CACHE_MAX_BYTES = 1 << 40  # a size limit turns on JAX's file lock around cache reads/writes; never reached


def run_root(tmp_path_factory) -> pathlib.Path:
  """A directory shared by every xdist worker of this run; the session's own base directory without xdist."""
  base = tmp_path_factory.getbasetemp()
  uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
  if not uid or not os.environ.get("PYTEST_XDIST_WORKER"):
    return base
  root = base.parent / f"shared-{uid}"  # base.parent: the controller's base directory (`popen-gwN`'s parent)
  root.mkdir(exist_ok=True)
  return root


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
  """Built datasets shared by the whole run (content-addressed, so each world builds once).

  Autouse: every test, also one that does not ask for it, builds into this directory and never into the
  user's cache, whatever the order tests run in.
  """
  path = run_root(tmp_path_factory) / "mirage_data"
  path.mkdir(exist_ok=True)
  os.environ["MIRAGE_DATA_DIR"] = str(path)
  return path


@pytest.fixture(scope="session")
def synth(data_dir):
  """The default synthetic world, built once per run: a `pipeline.Data` (dataset + tokenizer)."""
  from mirage_jax.data import pipeline
  from mirage_jax import configlib
  config = configlib.load("configs/pretrain/base.py:tiny")
  data = pipeline.open_data(config.data)
  return data


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent XLA compilation cache shared by the run's workers (a fresh directory per run).

  The suite's many short training runs (and the CLI subprocesses, through the environment) compile the same
  programs again and again — new `jax.jit` closures per run miss the in-memory cache, but the persistent
  cache is keyed by the program itself — so each program compiles once (a short run drops from ~17 s to ~5 s
  on 2 cores). A cache directory given by the caller is used as is.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    yield
    return
  import jax
  path = run_root(tmp_path_factory) / "jax_cache"
  path.mkdir(exist_ok=True)
  env = {"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  locked = _has_filelock()
  if locked:
    env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(CACHE_MAX_BYTES)
  os.environ.update(env)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if locked:
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  yield


def _has_filelock() -> bool:
  try:
    import filelock  # noqa: F401  (installed with torch, the `test` extra)
  except ImportError:
    return False
  return True
