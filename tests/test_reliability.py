"""Reliability: bit-exact resume after SIGKILL, SIGTERM stops cleanly, non-finite guards, corrupted
checkpoints, and user errors that print one line (issue 8)."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mirage_jax import errors
from mirage_jax.train import faults

from worlds import SMALL_WORLD_FLAGS

RUN = ["--config.batch_size=8", "--config.log_every=1", "--config.eval.splits=", "--config.keep_checkpoints=3"]


def mirage(*args, timeout=300, check=True) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1")  # one CPU device: faster small runs
  proc = subprocess.run([sys.executable, "-m", "mirage_jax.cli", *args], capture_output=True, text=True,
                        timeout=timeout, env=env, stdin=subprocess.DEVNULL)
  if check and proc.returncode:
    raise AssertionError(f"mirage {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return proc


def train_args(config: str, workdir: pathlib.Path, *extra: str) -> list[str]:
  return ["train", f"--config={config}", f"--workdir={workdir}", *SMALL_WORLD_FLAGS, *RUN, *extra]


def checksum(workdir: pathlib.Path) -> dict:
  return json.loads(mirage("checksum", f"--workdir={workdir}").stdout)


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS="", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", **(env or {}))
  return subprocess.Popen([sys.executable, "-m", "mirage_jax.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen, timeout=300) -> str:
  """The stderr of a started run once it ends; a run still going after `timeout` s is aborted, and the
  failure shows where each of its threads was (faulthandler's dump on SIGABRT)."""
  try:
    return proc.communicate(timeout=timeout)[1]
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGABRT)
    err = proc.communicate(timeout=60)[1]
    raise AssertionError(f"the run did not end within {timeout} s; its threads:\n{err[-8000:]}") from None


def wait_for_checkpoint(workdir: pathlib.Path, proc: subprocess.Popen, step: int, timeout=240) -> None:
  marker = workdir / "checkpoints" / str(step) / "commit_success.txt"
  t = time.time()
  while not marker.exists():
    if proc.poll() is not None:
      raise AssertionError(f"run ended before checkpoint {step}: {proc.stderr.read()[-2000:]}")
    if time.time() - t > timeout:
      proc.kill()
      raise AssertionError(f"no checkpoint {step} after {timeout} s")
    time.sleep(0.05)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir):
  """A short SFT run to start unlearning from."""
  workdir = tmp_path_factory.mktemp("base")
  mirage(*train_args("configs/pretrain/base.py:tiny", workdir, "--config.total_steps=4",
                     "--config.checkpoint_every=4"))
  return workdir


KILL_AT = 10  # with checkpoint_every=4: step 4 is committed (the save of 8 waited for it), 8 may be in flight


def _kill_and_resume(tmp_path, config: str, steps: int, extra=()):
  """Run to the end once; run again with `MIRAGE_FAULT` so that it SIGKILLs itself right after step
  `KILL_AT` (`mirage_jax.train.faults`), rerun the same command; the final params must be bitwise equal."""
  args = lambda w: train_args(config, w, f"--config.total_steps={steps}", "--config.checkpoint_every=4",  # noqa: E731
                              *extra)
  straight = tmp_path / "straight"
  mirage(*args(straight))
  killed = tmp_path / "killed"
  proc = start(args(killed), env={"MIRAGE_FAULT": f"kill@step_done:{KILL_AT}"})
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, f"expected death by SIGKILL, got {proc.returncode}:\n{err[-2000:]}"
  assert f"kill at step_done {{'step': {KILL_AT}}}" in err
  assert checksum(killed)["step"] in (4, 8)  # the kill really interrupted the run, after a committed save
  mirage(*args(killed))
  assert checksum(killed) == checksum(straight)
  rows = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
  train_steps = [r["step"] for r in rows if r["split"] == "train"]
  assert train_steps == sorted(set(train_steps)) == list(range(1, steps + 1))  # replayed rows dropped


@pytest.mark.parametrize("spec,want", [
    ("", ()),
    ("kill@step_done:3", (faults.Fault("kill", "step_done", 3),)),
    (" kill@step_done:3, kill@saved ", (faults.Fault("kill", "step_done", 3), faults.Fault("kill", "saved"))),
])
def test_fault_specs_parse(spec, want):
  assert faults.parse(spec) == want


@pytest.mark.parametrize("spec", ["kill", "pause@step_done:3", "kill@", "kill@step_done:three", "kill@:3"])
def test_bad_fault_specs_are_usage_errors(spec):
  with pytest.raises(errors.UsageError, match="ACTION@POINT"):
    faults.parse(spec)


def test_fault_fires_only_at_its_point_and_step():
  code = ("from mirage_jax.train import faults\n"
          "for step in range(1, 6):\n"
          "  faults.trigger('other', step=step)\n"
          "  faults.trigger('step_done', step=step)\n"
          "  print(step, flush=True)\n")
  env = dict(os.environ, MIRAGE_FAULT="kill@step_done:3")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
  assert proc.returncode == -signal.SIGKILL and proc.stdout.split() == ["1", "2"]
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                        env={k: v for k, v in os.environ.items() if k != faults.ENV})
  assert proc.returncode == 0 and proc.stdout.split() == ["1", "2", "3", "4", "5"]


def test_sigkill_then_resume_is_bitwise_exact_sft(tmp_path, data_dir):
  _kill_and_resume(tmp_path, "configs/sft/posthoc.py:tiny", 60)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["npo", "rmu"])
def test_sigkill_then_resume_is_bitwise_exact_unlearning(tmp_path, base_run, method):
  _kill_and_resume(tmp_path, f"configs/unlearn/{method}.py:tiny", 60, extra=(f"--config.init_from={base_run}",))


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir):
  workdir = tmp_path / "run"
  args = train_args("configs/sft/posthoc.py:tiny", workdir, "--config.total_steps=400",
                    "--config.checkpoint_every=2")
  proc = start(args)
  wait_for_checkpoint(workdir, proc, 2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  summary = json.loads(out[out.index("{"):])
  assert summary["stopped"] == "SIGTERM" and summary["steps"][1] < 400
  assert "stopped by SIGTERM" in err and "rerun the same command" in err
  assert checksum(workdir)["step"] == summary["steps"][1]  # the stop step itself was saved


def test_nonfinite_loss_stops_with_the_step_and_term(tmp_path, data_dir):
  workdir = tmp_path / "run"
  proc = mirage(*train_args("configs/sft/posthoc.py:tiny", workdir, "--config.total_steps=6",
                            "--config.checkpoint_every=1", "--config.optim.lr=1e30",
                            "--config.optim.clip_norm=0.0", "--config.optim.warmup_steps=0"), check=False)
  assert proc.returncode == 2
  line = proc.stderr.strip().splitlines()[-1]
  assert line.startswith("mirage train: error: non-finite value at step") and "loss=nan" in line
  assert "Traceback" not in proc.stderr
  bad_step = int(line.split("at step ")[1].split(":")[0])
  saved = checksum(workdir)["step"]
  assert saved == bad_step - 1  # the last good checkpoint is intact; the bad step was never saved


def test_skip_nonfinite_counts_and_completes(tmp_path, data_dir):
  workdir = tmp_path / "run"
  proc = mirage(*train_args("configs/sft/posthoc.py:tiny", workdir, "--config.total_steps=5",
                            "--config.checkpoint_every=5", "--config.optim.lr=1e30", "--config.optim.clip_norm=0.0",
                            "--config.optim.warmup_steps=0", "--config.skip_nonfinite=true"))
  summary = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert summary["steps"] == [0, 5] and summary["skipped_steps"] >= 1
  assert "skipped (config.skip_nonfinite)" in proc.stderr


def test_corrupted_latest_checkpoint_falls_back(tmp_path, data_dir):
  workdir = tmp_path / "run"
  args = train_args("configs/sft/posthoc.py:tiny", workdir, "--config.total_steps=4", "--config.checkpoint_every=2")
  mirage(*args)
  good = checksum(workdir)
  assert good["step"] == 4
  # Truncate every data file of step 4's params: the checkpoint still "exists" but cannot be read.
  for f in (workdir / "checkpoints" / "4" / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and f.name not in ("commit_success.txt",):
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
  proc = mirage(*args)
  assert "unreadable" in proc.stderr and "trying the previous one" in proc.stderr
  assert "resumed from" in proc.stderr and "at step 2" in proc.stderr
  assert checksum(workdir) == good  # steps 3-4 replayed from step 2: the same params


@pytest.mark.parametrize("extra,message", [
    (["--config.mesh.data=3"], "config.mesh"),
    (["--config.batch_size=7", "--config.mesh.data=-1"], None),  # 1 device: any batch divides
    (["--config.optim.frozen=nothing/.*"], "matches no parameter"),
    (["--config.loss.layer=9"], "out of range"),
])
def test_bad_configs_fail_before_training(tmp_path, data_dir, base_run, extra, message):
  workdir = tmp_path / "run"
  config = "configs/unlearn/rmu.py:tiny" if "--config.loss.layer=9" in extra else "configs/sft/posthoc.py:tiny"
  init = [f"--config.init_from={base_run}"] if "rmu" in config else []
  proc = mirage(*train_args(config, workdir, "--config.total_steps=1", *init, *extra), check=False)
  if message is None:
    assert proc.returncode == 0
    return
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert message in proc.stderr.strip().splitlines()[-1]
  assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


# --------------------------------------------------------------------------- operations (issue 19)
def test_second_writer_exits_2_naming_the_holder(tmp_path, data_dir):
  """A relaunched job whose old process is alive: the second writer stops at once, one line, exit 2."""
  workdir = tmp_path / "run"
  args = train_args("configs/sft/posthoc.py:tiny", workdir, "--config.total_steps=400", "--config.checkpoint_every=2")
  first = start(args)
  try:
    wait_for_checkpoint(workdir, first, 2)
    second = mirage(*args, check=False)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"mirage train: error: {workdir} is in use by pid {first.pid} on "), line
    evaluate = mirage("eval", f"--workdir={workdir}", check=False)  # an eval writing into the run: refused too
    assert evaluate.returncode == 2 and f"in use by pid {first.pid}" in evaluate.stderr
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
  assert first.returncode == 0  # the holder was never disturbed


def _tmp_dirs(workdir: pathlib.Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name)


def _kill_inside_save(tmp_path, config: str, extra=()):
  """SIGKILL while the asynchronous save of step 8 is being written (its temporary directory on disk): the
  rerun resumes from step 4, removes the leftovers and ends bitwise equal to an uninterrupted run."""
  args = lambda w: train_args(config, w, "--config.total_steps=12", "--config.checkpoint_every=4", *extra)  # noqa: E731
  straight = tmp_path / "straight"
  mirage(*args(straight))
  killed = tmp_path / "killed"
  proc = start(args(killed), env={"MIRAGE_FAULT": "kill@save_started:8"})
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, err[-2000:]
  assert _tmp_dirs(killed), "the kill should leave the save of step 8 half written"
  assert checksum(killed)["step"] == 4  # the half-written step is not a checkpoint
  rerun = mirage(*args(killed))
  assert "at step 4" in rerun.stderr
  assert not _tmp_dirs(killed)
  assert checksum(killed) == checksum(straight)


@pytest.mark.parametrize("method", ["sft", "npo", "rmu"])
def test_kill_inside_an_async_save_resumes_bitwise(tmp_path, base_run, method):
  if method == "sft":
    _kill_inside_save(tmp_path, "configs/sft/posthoc.py:tiny")
  else:
    _kill_inside_save(tmp_path, f"configs/unlearn/{method}.py:tiny", extra=(f"--config.init_from={base_run}",))


@pytest.mark.slow
def test_soak_many_kills_of_one_run(tmp_path, data_dir):
  """A run saving every step, SIGKILLed five times (inside saves and between steps), then finished: the
  same params as an uninterrupted run."""
  args = lambda w: train_args("configs/sft/posthoc.py:tiny", w, "--config.total_steps=16",  # noqa: E731
                              "--config.checkpoint_every=1")
  straight = tmp_path / "straight"
  mirage(*args(straight))
  soaked = tmp_path / "soaked"
  for fault in ("kill@save_started:3", "kill@step_done:6", "kill@save_started:8", "kill@save_started:11",
                "kill@step_done:14"):
    proc = start(args(soaked), env={"MIRAGE_FAULT": fault})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"{fault}: {err[-2000:]}"
  mirage(*args(soaked))
  assert checksum(soaked) == checksum(straight)


@pytest.fixture
def small_fs(tmp_path):
  """A 64 MiB tmpfs (root and mount rights needed; skipped otherwise), unmounted after the test."""
  mnt = tmp_path / "fs"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    yield mnt
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: pathlib.Path) -> None:
  with (path / "filler").open("wb") as f:
    try:
      while True:
        f.write(b"\0" * 2**20)
        f.flush()
    except OSError:
      pass


def _wait_stopped(proc: subprocess.Popen, timeout=240) -> None:
  t = time.time()
  while pathlib.Path(f"/proc/{proc.pid}/stat").read_text().split(")")[1].split()[0] != "T":
    if proc.poll() is not None or time.time() - t > timeout:
      raise AssertionError(f"the run did not pause: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}")
    time.sleep(0.05)


STORAGE_RUN = ("--config.total_steps=8", "--config.checkpoint_every=2")


@pytest.fixture(scope="module")
def straight_storage_run(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("straight")
  mirage(*train_args("configs/sft/posthoc.py:tiny", workdir, *STORAGE_RUN))
  return checksum(workdir)


def _read_only(path: pathlib.Path) -> None:
  """Make `path` read-only under the running job: a bind mount of it onto itself, remounted read-only (a
  remount of the whole filesystem is refused while the paused run holds files open; the fresh bind mount has
  no open writers). New writes under `path` fail with EROFS; `umount` makes it writable again."""
  for cmd in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]):
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.mark.parametrize("fault", ["full", "removed", "readonly"])
def test_storage_faults_during_a_save(tmp_path, small_fs, straight_storage_run, fault):
  """The disk fills up / loses the checkpoint directory / turns read-only under a running job: one clear
  error (exit 2) that names the saves lost and the step to resume from, and the rerun resumes from it to the
  same params.

  The run pauses itself (`stop@save_started:6`: steps 2 and 4 are committed, Orbax having waited for them,
  and the save of 6 is in flight) while the test changes the filesystem; then it continues into the fault.
  Where the fault lands inside Orbax's writes is a race, so every outcome a user can meet is checked."""
  args = train_args("configs/sft/posthoc.py:tiny", small_fs / "run", *STORAGE_RUN)
  workdir = small_fs / "run"
  proc = start(args, env={"MIRAGE_FAULT": "stop@save_started:6"})
  _wait_stopped(proc)
  assert checkpoint_steps(workdir) >= {2, 4}
  if fault == "full":
    _fill(small_fs)
  elif fault == "readonly":
    _read_only(workdir / "checkpoints")
  else:
    shutil.copytree(workdir / "checkpoints", tmp_path / "saved_checkpoints")
    shutil.rmtree(workdir / "checkpoints")
  proc.send_signal(signal.SIGCONT)
  err = finish(proc, timeout=420)
  mirage_frame = re.search(r'File "[^"]*mirage_jax/', err)
  # No traceback of mirage's (the failure shows the text around the frame).
  assert not mirage_frame, err[max(mirage_frame.start() - 2500, 0):mirage_frame.end() + 2500]
  if proc.returncode == 0 and fault == "removed":
    # Orbax re-created the directory and the save of 6 and 8 got through: a finished run, nothing lost.
    assert checksum(workdir) == straight_storage_run
    return
  # Orbax's background threads log their own failures above; the one error line comes last.
  assert proc.returncode == 2, err[-3000:]
  mine = [ln for ln in err.splitlines() if ln.startswith("mirage train: error:")]
  assert len(mine) == 1 and err.strip().splitlines()[-1] == mine[0], err[-3000:]
  failed = re.match(r"mirage train: error: saving checkpoint steps? ([\d, ]+) in \S+ failed: ([^;]*); the last "
                    r"committed checkpoint, step (\d+), (is intact|is no longer on disk)", mine[0])
  assert failed, mine[0]
  named, committed = [int(s) for s in failed.group(1).split(", ")], int(failed.group(3))
  # Every save started after the committed step is named (the failure of 6 may surface in the save of 8).
  assert committed in (4, 6) and set(named) <= {6, 8} and min(named) > committed, mine[0]
  assert committed == 6 or 6 in named, mine[0]
  resume = committed
  if failed.group(4) == "is no longer on disk":
    assert fault == "removed" and "put it back and a rerun resumes from it" in mine[0], mine[0]
    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
    shutil.copytree(tmp_path / "saved_checkpoints", workdir / "checkpoints")  # the operator puts it back
    # The copy was taken while 6 was in flight: when 6 was committed into the re-created directory before
    # the loss, the copy put back holds 4 (the race seen in CI), and the rerun resumes from there.
    resume = checksum(workdir)["step"]
    assert resume in {4, committed}, (resume, mine[0])
  if fault == "full":
    assert failed.group(2) == "No space left on device", mine[0]
    (small_fs / "filler").unlink()
  if fault == "readonly":
    assert failed.group(2) == "Read-only file system", mine[0]
    subprocess.run(["umount", str(workdir / "checkpoints")], check=True)  # the operator fixes the mount
  assert checksum(workdir)["step"] == resume
  rerun = mirage(*args, timeout=600)
  assert f"at step {resume}" in rerun.stderr
  assert checksum(workdir) == straight_storage_run


def test_package_frames_are_dropped_wherever_a_reraised_error_collected_them():
  """Orbax re-raises one writer exception object in several threads, so its traceback collects this package's
  frames in the middle, not only at the head; every one of them goes (in the cause chain too), the library's
  frames stay in order."""
  ours = {}
  exec(compile("def call(f):\n  return f()\n", os.path.join(errors.PACKAGE_DIR, "_fake_module.py"), "exec"), ours)

  def lib_write():
    raise FileNotFoundError("gone")

  def lib_reraise(exc):
    raise exc

  try:
    ours["call"](lib_write)
  except FileNotFoundError as e:
    first = e
  try:  # the same object raised again through a library frame called from ours
    ours["call"](lambda: lib_reraise(first))
  except FileNotFoundError:
    pass
  try:
    try:
      ours["call"](lambda: lib_reraise(first))
    except FileNotFoundError as e:
      raise errors.CheckpointError("save failed") from e
  except errors.CheckpointError as e:
    top = e

  def frames(e):
    tb, out = e.__traceback__, []
    while tb is not None:
      out.append((tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name))
      tb = tb.tb_next
    return out

  before = frames(first)
  assert sum(f.startswith(errors.PACKAGE_DIR) for f, _ in before) == 3  # head, middle, middle
  errors.drop_package_frames(top)
  after = frames(first)
  assert [f for f in before if not f[0].startswith(errors.PACKAGE_DIR)] == after
  assert [n for _, n in after].count("lib_reraise") == 2 and after[-1][1] == "lib_write"
  assert not any(f.startswith(errors.PACKAGE_DIR) for f, _ in frames(top))


def test_joining_orbax_writers_after_a_failure_does_not_reraise_their_errors():
  """Orbax's thread classes re-raise their target's exception from `join`; the checkpointer joins them after
  it classified that failure, which must not raise it again (it surfaced as a crash of mirage's)."""
  import threading

  from mirage_jax.train import checkpoint

  class Writer(threading.Thread):  # like orbax's futures.ThreadRaiseException
    __module__ = "orbax.checkpoint._src.futures.future"

    def run(self):
      self.exception = OSError(30, "Read-only file system")

    def join(self, *a, **k):
      super().join(*a, **k)
      raise self.exception

  w = Writer()
  w.start()
  with pytest.raises(OSError):
    Writer.join(w)
  checkpoint.Checkpointer._join_writers(timeout=5)  # waits, raises nothing
  assert not w.is_alive()


def test_an_unexplained_save_error_is_classified_by_the_disk(tmp_path, monkeypatch):
  """A library error that does not say why a save failed is a storage failure when a write to the checkpoint
  directory is refused (the refusal is the reason given), and re-raised as it is when the disk takes writes;
  after a failure, closing waits for nothing more."""
  import errno
  from mirage_jax.train import checkpoint
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", save_every=1, keep=1)
  assert checkpoint._refused_write(ckpt.directory) is None and not list(ckpt.directory.iterdir())
  assert isinstance(checkpoint._refused_write(tmp_path / "absent"), FileNotFoundError)

  def opaque():
    raise RuntimeError("commit failed")  # noqa: EM101

  with pytest.raises(RuntimeError, match="commit failed"):
    ckpt._guarded(3, opaque)
  monkeypatch.setattr(checkpoint, "_refused_write",
                      lambda d: OSError(errno.EROFS, os.strerror(errno.EROFS), str(d)))
  with pytest.raises(errors.UserError, match=r"saving checkpoint step 3 in .* failed: Read-only file system; no "
                                             r"step was committed") as e:
    ckpt._guarded(3, opaque)
  assert isinstance(e.value.__cause__, RuntimeError) and e.value.abandon_process
  # The library's exception (which it may log again later) keeps none of mirage's frames.
  import traceback
  frames = traceback.extract_tb(e.value.__cause__.__traceback__)
  assert frames and not [f for f in frames if "/mirage_jax/" in f.filename], frames
  monkeypatch.setattr(ckpt._mgr, "wait_until_finished", lambda: pytest.fail("waited after the failure"))
  ckpt.close()


def checkpoint_steps(workdir: pathlib.Path) -> set[int]:
  return {int(p.name) for p in (workdir / "checkpoints").iterdir()
          if p.name.isdigit() and (p / "commit_success.txt").exists()}


def test_a_checkpoint_of_other_shapes_is_refused_by_name_and_left_in_place(tmp_path):
  """Resuming (or loading) over a checkpoint written for other shapes, e.g. LoRA adapters saved in the layout
  before they were flattened, is a CheckpointError naming the parameters; the step is not set aside as
  corrupt, and a checkpoint of the same shapes still restores."""
  import jax
  import numpy as np
  from mirage_jax.train import checkpoint
  from mirage_jax.train.state import TrainState

  def state(b_shape):
    params = {"q": {"kernel": np.ones((4, 2, 3), np.float32), "lora_b": np.zeros(b_shape, np.float32)}}
    return TrainState(step=np.int32(5), params=params, opt_state={"mu": np.zeros(3, np.float32)},
                      rng=np.zeros(2, np.uint32), extras={"n": np.zeros((), np.float32)})

  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", save_every=1, keep=1, async_save=False)
  ckpt.save(5, state((8, 2, 3)), data={}, meta={}, force=True)
  ckpt.wait()
  target = lambda shape: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), state(shape))  # noqa: E731
  with pytest.raises(errors.CheckpointError, match=r"1: q/lora_b: saved \(8, 2, 3\), this model \(8, 6\)"):
    ckpt.restore_latest_good(target=target((8, 6)))
  assert (tmp_path / "ckpt" / "5" / "params").is_dir() and not list((tmp_path / "ckpt").glob("5.corrupt-*"))
  with pytest.raises(errors.CheckpointError, match="q/lora_b: saved"):
    checkpoint.restore_params(tmp_path / "ckpt", target((8, 6)).params)
  restored = ckpt.restore_latest_good(target=target((8, 2, 3)))
  np.testing.assert_array_equal(restored.state.params["q"]["kernel"], np.ones((4, 2, 3)))
  ckpt.close()
