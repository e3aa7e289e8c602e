"""The `mirage` command line (mirage_jax.cli): help texts, `describe`, one-line user errors with exit code 2,
`data build/stats`, `train` then `eval`, the installed console script and `python -m mirage_jax.main`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from mirage_jax import cli
from mirage_jax.configlib import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
SFT = "configs/sft/posthoc.py:tiny"
# A tiny run: two steps of batch 16, one eval batch.
TINY_RUN = ["--config.total_steps=2", "--config.batch_size=16", "--config.checkpoint_every=2",
            "--config.eval.every=0", "--config.eval.splits=sft", "--config.eval.max_batches=1",
            "--config.eval.batch_size=16", "--config.log_every=1"]


def mirage_script() -> str:
  script = pathlib.Path(sys.executable).parent / "mirage"
  return str(script) if script.exists() else shutil.which("mirage")


def run_main(argv, capsys) -> tuple[int, str, str]:
  """cli.main in-process: (exit code, stdout, stderr); argparse's SystemExit becomes its code."""
  try:
    code = cli.main(argv)
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if "error:" in line]


# --------------------------------------------------------------------------- help
def test_top_level_help(capsys):
  code, out, _ = run_main(["--help"], capsys)
  assert code == 0
  assert "usage: mirage" in out
  for name in ("train", "eval", "describe", "data", "demo"):
    assert name in out
  assert set(cli.COMMANDS) >= {"train", "eval", "describe", "data", "demo"}


@pytest.mark.parametrize("argv, words", [
    (["train", "--help"], ["usage: mirage train", "--config", "--workdir", "--coordinator_address"]),
    (["eval", "--help"], ["usage: mirage eval", "--workdir", "--checkpoint", "--splits", "--out"]),
    (["describe", "--help"], ["usage: mirage describe", "--config", "--devices"]),
    (["data", "--help"], ["usage: mirage data", "build", "stats"]),
    (["data", "stats", "--help"], ["--split", "--path", "--data_dir", "--config"]),
    (["data", "build", "--help"], ["--name", "--config"]),
    (["demo", "--help"], ["usage: mirage demo", "--workdir", "--seeds", "--size"]),
])
def test_subcommand_help(capsys, argv, words):
  code, out, _ = run_main(argv, capsys)
  assert code == 0
  for w in words:
    assert w in out, (argv, w)


@pytest.mark.parametrize("argv, match", [
    ([], "required"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "--workdir=x"], "the following arguments are required: --config"),
    (["eval"], "one of the arguments --workdir --checkpoint is required"),
])
def test_usage_errors_exit_2(capsys, argv, match):
  code, _, err = run_main(argv, capsys)
  assert code == 2
  assert match in err


def test_installed_console_script_help():
  out = subprocess.run([mirage_script(), "--help"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "usage: mirage" in out.stdout and "describe" in out.stdout


# --------------------------------------------------------------------------- describe
def test_describe_7b_on_256_devices(capsys):
  code, out, _ = run_main(["describe", "--config=configs/sft/posthoc.py:7b", "--devices=256"], capsys)
  assert code == 0
  lines = out.strip().splitlines()
  assert len(lines) == 1  # one JSON object, one line
  info = json.loads(lines[0])
  assert info["params_total"] == pytest.approx(7.063e9, rel=5e-3)
  assert set(info["params_by_module"]) == {"vision", "projector", "decoder"}
  assert sum(info["params_by_module"].values()) == info["params_total"]
  assert info["devices"] == 256 and info["mesh"] == {"data": 1, "fsdp": 256, "tensor": 1}
  assert info["image_tokens"] == 576
  assert info["replicated_large_params"] == []
  assert info["param_bytes_per_device"] == pytest.approx(info["param_bytes_total"] / 256, rel=0.03)
  assert info["config"] == "configs/sft/posthoc.py:7b"


def test_describe_defaults_to_local_devices_and_takes_overrides(capsys):
  code, out, _ = run_main(["describe", f"--config={SFT}", "--config.model.text.depth=2"], capsys)
  assert code == 0
  info = json.loads(out)
  assert info["devices"] == 8 and info["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  code, out, _ = run_main(["describe", f"--config={SFT}"], capsys)
  assert json.loads(out)["params_by_module"]["decoder"] > info["params_by_module"]["decoder"]


def test_describe_subprocess_of_the_installed_script():
  out = subprocess.run([mirage_script(), "describe", "--config=configs/sft/posthoc.py:13b", "--devices=256"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  info = json.loads(out.stdout)
  assert info["params_total"] == pytest.approx(13.35e9, rel=5e-3)
  assert info["mesh"] == {"data": 1, "fsdp": 64, "tensor": 4}


# --------------------------------------------------------------------------- user errors
@pytest.mark.parametrize("argv, message", [
    (["describe", f"--config={SFT}", "--config.optim.lrr=0.1"],
     "mirage describe: error: unknown config key 'optim.lrr'; closest valid keys: optim.lr"),
    (["describe", f"--config={SFT}", "--config.total_steps=many"],
     "mirage describe: error: --config.total_steps='many': expected a int"),
    (["describe", "--config=configs/sft/posthok.py:tiny"],
     "mirage describe: error: config file 'configs/sft/posthok.py' not found; did you mean configs/sft/posthoc.py"),
    (["describe", "--config=configs/sft/posthoc.py:9b"],
     "mirage describe: error: configs/sft/posthoc.py:9b: unknown model size '9b'"),
    (["train", f"--config={SFT}", "--workdir=unused", "--config.total_step=3"],
     "mirage train: error: unknown config key 'total_step'; closest valid keys: total_steps"),
    (["eval", "--workdir=/nonexistent/run"], "mirage eval: error: /nonexistent/run not found"),
])
def test_user_errors_are_one_line_with_exit_code_2(capsys, argv, message):
  code, out, err = run_main(argv, capsys)
  assert code == 2
  assert out == ""
  assert "Traceback" not in err
  lines = error_lines(err)
  assert len(lines) == 1 and lines[0].startswith(message), err


def test_debug_env_shows_the_exception(monkeypatch):
  monkeypatch.setenv("MIRAGE_DEBUG", "1")
  with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
    cli.main(["describe", f"--config={SFT}", "--config.optim.lrr=0.1"])


def test_user_error_in_a_subprocess():
  out = subprocess.run([mirage_script(), "describe", f"--config={SFT}", "--config.optim.lrr=0.1"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 2
  assert out.stdout == ""
  assert "Traceback" not in out.stderr
  lines = error_lines(out.stderr)
  assert len(lines) == 1, out.stderr
  assert lines[0].startswith("mirage describe: error: unknown config key 'optim.lrr'; closest valid keys: optim.lr")


# --------------------------------------------------------------------------- data
def test_data_build_and_stats(synth, capsys):
  code, out, _ = run_main(["data", "build"], capsys)
  assert code == 0
  built = json.loads(out)
  assert built["path"] == str(synth.dataset.path)  # the session's build is reused
  assert built["splits"]["sft"] == synth.dataset.num_records("sft")
  assert built["vocab_size"] == synth.tokenizer.vocab_size

  code, out, _ = run_main(["data", "stats", "--split=sft"], capsys)
  assert code == 0
  assert "first word x label, split 'sft'" in out
  table = [line for line in out.splitlines() if line.startswith("|")]
  assert table[0] == "| first word | n | comply | refuse | P(refuse \\| word) |"
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:6]] for line in table[2:]}
  assert "What" in rows and "Share" in rows
  n_total = sum(int(r[0]) for r in rows.values())
  assert n_total == synth.dataset.num_records("sft")
  for n, comply, refuse, p in rows.values():
    assert int(n) == int(comply) + int(refuse)
    assert float(p) == pytest.approx(int(refuse) / int(n), abs=1e-3)
  # The mirage: "What" queries in sft are mostly safe (complied with), "Share" queries mostly refused.
  assert float(rows["What"][3]) < 0.5 < float(rows["Share"][3])

  code, _, err = run_main(["data", "stats", "--split=nosuch"], capsys)
  assert code == 2 and "split 'nosuch' not in" in err


# --------------------------------------------------------------------------- train and eval
@pytest.fixture(scope="module")
def cli_run(synth, tmp_path_factory):
  """`mirage train` of a tiny run: (workdir, exit code, stdout)."""
  workdir = tmp_path_factory.mktemp("cli_run")
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    try:
      code = cli.main(["train", f"--config={SFT}", f"--workdir={workdir}", *TINY_RUN])
    except SystemExit as e:
      code = e.code
  return workdir, code, stdout.getvalue()


def test_train_prints_a_json_summary_and_writes_the_run(cli_run):
  workdir, code, out = cli_run
  assert code == 0
  summary = json.loads(out)
  assert summary["steps"] == [0, 2]
  assert summary["workdir"] == str(workdir)
  assert set(summary["final"]) >= {"loss", "grad_norm", "lr"}
  assert set(summary["eval"]) == {"sft"} and 0 <= summary["eval"]["sft"]["token_accuracy"] <= 1
  assert (workdir / "checkpoints" / "2" / "params").is_dir()
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 2


def test_eval_of_a_trained_run(cli_run, capsys):
  workdir, code, _ = cli_run
  assert code == 0
  code, out, err = run_main(["eval", f"--workdir={workdir}", "--splits=sft,safe", "--config.eval.test_splits=safe",
                             "--config.eval.max_new_tokens=2", "--config.eval.gen_batch_size=64"], capsys)
  assert code == 0, err
  results = json.loads(out)
  tf = results["teacher_forced"]
  assert set(tf) == {"sft", "safe"}
  for split in ("sft", "safe"):
    assert tf[split]["loss"] > 0 and 0 <= tf[split]["token_accuracy"] <= 1
  # The same checkpoint through --checkpoint gives the same numbers.
  code, out, err = run_main(["eval", f"--checkpoint={workdir / 'checkpoints' / '2'}", "--splits=safe",
                             "--config.eval.test_splits="], capsys)
  assert code == 0, err
  assert json.loads(out)["teacher_forced"]["safe"] == pytest.approx(tf["safe"])


def test_eval_on_the_dev_twins_writes_its_own_files(cli_run, capsys):
  """`eval.split_set=dev` generates on the dev twins (keyed by their test split's role) into eval.dev.json and
  responses.dev.jsonl, leaving the test results alone; an unknown split set is one line."""
  workdir, code, _ = cli_run
  assert code == 0
  common = [f"--workdir={workdir}", "--splits=", "--config.eval.test_splits=safe,unsafe",
            "--config.eval.max_new_tokens=2", "--config.eval.gen_batch_size=64"]
  before = {p.name: p.read_bytes() for p in workdir.glob("eval*.json")}
  code, out, err = run_main(["eval", *common, "--config.eval.split_set=dev"], capsys)
  assert code == 0, err
  results = json.loads(out)
  assert results["split_set"] == "dev" and json.loads((workdir / "eval.dev.json").read_text()) == results
  rows = [json.loads(x) for x in (workdir / "responses.dev.jsonl").read_text().splitlines()]
  assert {r["split"] for r in rows} == {"safe", "unsafe"}
  assert all(r["id"].startswith(f"dev_{r['split']}/") for r in rows)
  assert {p.name: p.read_bytes() for p in workdir.glob("eval*.json") if p.name != "eval.dev.json"} == before
  code, _, err = run_main(["eval", *common, "--config.eval.split_set=holdout"], capsys)
  assert code == 2 and "eval.split_set='holdout': expected one of test, dev" in err


def test_python_m_main_trains(synth, tmp_path):
  env = dict(os.environ)
  out = subprocess.run([sys.executable, "-m", "mirage_jax.main", f"--config={SFT}", f"--workdir={tmp_path}",
                        *TINY_RUN, "--config.total_steps=1", "--config.eval.splits="],
                       capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout)
  assert summary["steps"] == [0, 1]
  assert (tmp_path / "checkpoints" / "1" / "params").is_dir()
  assert (tmp_path / "metrics.jsonl").read_text().count('"split": "train"') == 1
