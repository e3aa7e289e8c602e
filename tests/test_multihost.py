"""Multi-host (issue 7): 2 processes x 4 fake CPU devices on localhost train exactly like 1 process x 8 devices,
and a checkpoint written collectively by 2 processes restores onto a different mesh in 1 process."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from mirage_jax.train import lease
from test_reliability import RUN
from worlds import SMALL_WORLD_FLAGS

pytestmark = pytest.mark.slow  # ~6 training runs of a few steps, each a fresh multi-process start


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def train(workdir: pathlib.Path, config: str, *, processes: int, devices: int, extra=(),
          check: bool = True) -> list[tuple[int, str]]:
  """`mirage train` as `processes` cooperating processes with `devices` fake CPU devices each; returns each
  process's (exit code, stderr)."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONUNBUFFERED="1")
  args = [sys.executable, "-m", "mirage_jax.cli", "train", f"--config={config}", f"--workdir={workdir}",
          *SMALL_WORLD_FLAGS, *RUN, "--config.batch_size=16", "--config.checkpoint_every=2", *extra]
  flags = lambda i: ([f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",  # noqa: E731
                      f"--process_id={i}"] if processes > 1 else [])
  procs = [subprocess.Popen(args + flags(i), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(processes)]
  outs = [p.communicate(timeout=600) for p in procs]
  if check:
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
      assert p.returncode == 0, f"process {i} of {processes} failed:\n{err[-3000:]}"
  return [(p.returncode, err) for p, (_, err) in zip(procs, outs)]


def losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def assert_same_losses(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b)
  for step in a:
    assert a[step] == pytest.approx(b[step], abs=1e-5, rel=1e-5), (step, a[step], b[step])


def test_two_processes_match_one_and_restore_onto_another_mesh(tmp_path, data_dir):
  base = "configs/pretrain/base.py:tiny"
  one = tmp_path / "one"  # 1 process x 8 devices, 6 steps straight
  train(one, base, processes=1, devices=8, extra=["--config.total_steps=6"])
  two = tmp_path / "two"  # 2 processes x 4 devices: 4 steps, saved collectively
  train(two, base, processes=2, devices=4, extra=["--config.total_steps=4"])
  assert (two / "checkpoints" / "4").is_dir()
  assert {k: v for k, v in losses(one).items() if k <= 4} == pytest.approx(losses(two), abs=1e-5, rel=1e-5)
  # ... resumed by 1 process x 8 devices on a different mesh (data 2 x fsdp 4 instead of data 8)
  train(two, base, processes=1, devices=8, extra=["--config.total_steps=6", "--config.mesh.data=2",
                                                   "--config.mesh.fsdp=4"])
  assert_same_losses(losses(one), losses(two))

  npo = "configs/unlearn/npo.py:tiny"
  npo_args = [f"--config.init_from={one}", "--config.total_steps=3"]
  npo_one, npo_two = tmp_path / "npo_one", tmp_path / "npo_two"
  train(npo_one, npo, processes=1, devices=8, extra=npo_args)
  train(npo_two, npo, processes=2, devices=4, extra=npo_args)
  assert_same_losses(losses(npo_one), losses(npo_two))


def test_two_processes_follow_process_0s_lease_verdict(tmp_path, data_dir):
  """A 2-process job on a workdir another writer holds: process 0 finds the lease taken and every process
  stops with the same one line naming the holder (exit 2); once it is free, the same job runs."""
  workdir = tmp_path / "held"
  with lease.hold(workdir, what="the test's holder"):
    results = train(workdir, "configs/pretrain/base.py:tiny", processes=2, devices=4,
                    extra=["--config.total_steps=2"], check=False)
  for i, (code, err) in enumerate(results):
    assert code == 2 and "Traceback" not in err, f"process {i}: {err[-3000:]}"
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"mirage train: error: {workdir} is in use by pid {os.getpid()} on "), (i, line)
    assert "the test's holder" in line, (i, line)
  assert not (workdir / "checkpoints").exists()
  train(workdir, "configs/pretrain/base.py:tiny", processes=2, devices=4, extra=["--config.total_steps=2"])
  assert (workdir / "checkpoints" / "2").is_dir()
