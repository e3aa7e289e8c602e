"""`mirage compile` (issue 7): the real train step AOT-compiled for a TPU topology from this CPU host."""

import json
import os
import subprocess
import sys

import pytest

from mirage_jax import compile as aot


def _has_libtpu() -> bool:
  try:
    aot.topology_devices("v5e:2x2")
    return True
  except aot.CompileError:
    return False


needs_libtpu = pytest.mark.skipif(not _has_libtpu(), reason="libtpu (jax[tpu]) not installed")


def mirage_compile(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")
  return subprocess.run([sys.executable, "-m", "mirage_jax.cli", "compile", *args], capture_output=True, text=True,
                        env=env, stdin=subprocess.DEVNULL, timeout=900)


def test_parse_mesh():
  assert aot.parse_mesh("fsdp:-1,tensor:4") == {"fsdp": -1, "tensor": 4}
  assert aot.parse_mesh("") == {}
  for bad in ("fsdp=4", "model:2", "tensor:x"):
    with pytest.raises(aot.CompileError, match="axis:size"):
      aot.parse_mesh(bad)


def test_bad_topology_is_one_line():
  with pytest.raises(aot.CompileError, match="<chip>:<shape>"):
    aot.topology_devices("v5e")


@needs_libtpu
@pytest.mark.tpu_aot
def test_1b_sft_step_compiles_for_v5e_2x2():
  proc = mirage_compile("--config=configs/sft/posthoc.py:1b", "--topology=v5e:2x2", "--batch=8",
                        "--config.data.max_len=512")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes", "hbm_bytes", "flops", "compile_s",
              "mesh", "global_batch"):
    assert key in out, key
  assert out["device_kind"] == "TPU v5 lite" and out["devices"] == 4
  assert out["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and out["global_batch"] == 8
  # 1.3 B parameters FSDP over 4 chips: f32 params + Adam moments ~ 12 bytes each, a quarter per chip
  assert 2.5e9 < out["argument_bytes"] < 5e9, out
  assert out["total_bytes"] <= out["hbm_bytes"] == 16 * 2**30
  assert out["flops"] > 1e12


@needs_libtpu
@pytest.mark.tpu_aot
@pytest.mark.slow
def test_over_hbm_exits_nonzero():
  proc = mirage_compile("--config=configs/sft/posthoc.py:1b", "--topology=v5e:2x2", "--batch=8",
                        "--config.data.max_len=512", "--mesh=fsdp:1,data:4")  # fully replicated params: too big
  assert proc.returncode != 0
  assert "replicated" in proc.stderr or "exceeds" in proc.stderr, proc.stderr[-2000:]
