"""One writer per workdir: the lease (mirage_jax.train.lease)."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from mirage_jax.errors import UserError
from mirage_jax.train import lease


def test_second_writer_fails_naming_the_holder(tmp_path):
  first = lease.Lease(tmp_path, what="mirage train")
  first.acquire()
  try:
    with pytest.raises(lease.WorkdirBusy, match=rf"in use by pid {os.getpid()} on .* \(mirage train\)"):
      lease.Lease(tmp_path).acquire()
  finally:
    first.release()
  again = lease.Lease(tmp_path)  # released: free again
  again.acquire()
  again.release()
  assert issubclass(lease.WorkdirBusy, UserError)


def test_holder_in_another_live_process(tmp_path):
  code = textwrap.dedent(f"""
      import sys, time
      from mirage_jax.train import lease
      l = lease.Lease({str(tmp_path)!r}, what="holder"); l.acquire()
      print("held", flush=True); sys.stdin.readline()
  """)
  proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(lease.WorkdirBusy, match=rf"pid {proc.pid} .*\(holder\)"):
      lease.Lease(tmp_path).acquire()
  finally:
    proc.communicate("\n", timeout=30)
  with lease.hold(tmp_path):  # the holder exited: taken without complaint
    pass


def test_stale_lock_file_is_taken_over_with_a_warning(tmp_path, caplog):
  (tmp_path / lease.LOCK_FILE).write_text(json.dumps(
      {"pid": 999999, "host": "gone-host", "started": "2026-01-01T00:00:00", "command": "mirage train"}))
  with caplog.at_level(logging.WARNING, logger="mirage"), lease.hold(tmp_path) as held:
    assert held.held
    assert json.loads((tmp_path / lease.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert "stale lease" in caplog.text and "pid 999999 on gone-host" in caplog.text


def test_killed_holder_leaves_a_takeable_lease(tmp_path):
  code = f"from mirage_jax.train import lease; import os, signal; lease.Lease({str(tmp_path)!r}).acquire(); " \
         "os.kill(os.getpid(), signal.SIGKILL)"
  assert subprocess.run([sys.executable, "-c", code], check=False).returncode == -9
  with lease.hold(tmp_path):
    pass
