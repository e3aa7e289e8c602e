"""Test setup: 8 fake CPU devices (set before jax is imported), a session-wide data directory."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """Built datasets shared by the whole session (content-addressed, so each world builds once)."""
  path = tmp_path_factory.mktemp("mirage_data")
  os.environ["MIRAGE_DATA_DIR"] = str(path)
  return path


@pytest.fixture(scope="session")
def synth(data_dir):
  """The default synthetic world, built once: a `pipeline.Data` (dataset + tokenizer)."""
  from mirage_jax.data import pipeline
  from mirage_jax import configlib
  config = configlib.load("configs/pretrain/base.py:tiny")
  data = pipeline.open_data(config.data)
  return data


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """A session-wide persistent XLA compilation cache (a fresh directory per session).

  The suite's many short training runs (and the CLI subprocesses, through the environment) compile the same
  programs again and again — new `jax.jit` closures per run miss the in-memory cache, but the persistent
  cache is keyed by the program itself — so each program compiles once (a short run drops from ~17 s to ~5 s
  on 2 cores). A cache directory given by the caller is used as is.
  """
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    yield
    return
  import jax
  path = str(tmp_path_factory.mktemp("jax_cache"))
  os.environ.update({"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
