"""Launch scripts: syntax (bash -n, shellcheck when installed), usage errors, and the commands --dry-run prints."""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parent.parent / "launch"
SCRIPTS = ("lib.sh", "run_on_host.sh", "tpu_vm.sh", "slurm_gpu.sbatch", "local.sh", "paper.sh")
TPU = ["--name=mirage-v5e", "--zone=us-west4-a", "--dry-run"]
TRAIN = ["train", "--config=configs/unlearn/npo.py:7b", "--workdir=/mnt/runs/npo dir"]


def sh(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TPU_")) and k not in ("ZONE", "PROJECT", "MIRAGE_DISTRIBUTED",
                                                                "XLA_FLAGS", "JAX_PLATFORMS")}
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, check=False,
                        env={**clean, **env}, timeout=30)


def lines(result: subprocess.CompletedProcess) -> list[str]:
  assert result.returncode == 0, result.stderr
  return result.stdout.strip().splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
  if script != "lib.sh":
    assert "set -euo pipefail" in (LAUNCH / script).read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
  result = subprocess.run(["shellcheck", "-x", *(f"launch/{s}" for s in SCRIPTS)], cwd=LAUNCH.parent,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


def test_tpu_vm_create_direct_and_queued():
  assert lines(sh("tpu_vm.sh", "create", *TPU, "--accelerator=v5litepod-64", "--spot")) == [
      "gcloud compute tpus tpu-vm create mirage-v5e --accelerator-type=v5litepod-64 "
      "--version=v2-alpha-tpuv5-lite --spot --zone=us-west4-a"]
  out = lines(sh("tpu_vm.sh", "create", *TPU, "--queued", "--project=lab"))
  assert out[0] == ("gcloud compute tpus queued-resources create mirage-v5e --node-id=mirage-v5e "
                    "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --zone=us-west4-a "
                    "--project=lab")
  assert out[1].startswith("gcloud compute tpus queued-resources describe mirage-v5e")
  assert "ACTIVE" in out[2]


def test_tpu_vm_setup_scp_and_git():
  scp = lines(sh("tpu_vm.sh", "setup", *TPU))
  assert scp[0].startswith("tar czf ") and "--exclude=.git" in scp[0]
  assert scp[1].startswith("gcloud compute tpus tpu-vm scp ") and "mirage-v5e:mirage_jax.tgz --worker=all" in scp[1]
  assert all(" --worker=all " in line for line in scp[1:])
  assert "tar xzf mirage_jax.tgz -C mirage_jax" in scp[2]
  assert "python3 -m venv .venv" in scp[3] and "pip install --quiet -e '\\''.[tpu]'\\''" in scp[3]
  git = lines(sh("tpu_vm.sh", "setup", *TPU, "--code=git", "--repo=https://example.org/mirage_jax.git",
                 "--ref=v1", "--python=python3.11"))
  assert git[0].startswith("gcloud compute tpus tpu-vm ssh mirage-v5e --worker=all --command='")
  assert "git clone --quiet https://example.org/mirage_jax.git mirage_jax" in git[0]
  assert "checkout --quiet v1" in git[0]
  assert "python3.11 -m venv .venv" in git[1]


def test_tpu_vm_run_logs_stop_delete():
  run = lines(sh("tpu_vm.sh", "run", *TPU, "--run_name=npo", "--", *TRAIN))
  assert len(run) == 1
  argv = shlex.split(run[0])  # the printed line is a runnable command: it splits back into the arguments
  assert argv[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mirage-v5e", "--worker=all"]
  assert argv[8:] == ["--zone=us-west4-a"] and argv[7].startswith("--command=")
  remote = argv[7].removeprefix("--command=")
  assert remote.startswith("cd mirage_jax && ")
  assert shlex.split(remote.removeprefix("cd mirage_jax && ")) == [
      "bash", "launch/run_on_host.sh", "--log_dir=logs", "--run_name=npo", "--", *TRAIN]
  detached = lines(sh("tpu_vm.sh", "run", *TPU, "--detach", "--", *TRAIN))[0]
  assert "nohup bash launch/run_on_host.sh" in detached and "</dev/null &" in detached
  logs = lines(sh("tpu_vm.sh", "logs", *TPU, "--run_name=npo", "--lines=20", "--follow", "--worker=0"))[0]
  assert "--worker=0" in logs and "tail -n 20 -F logs/npo-worker*.log" in logs
  stop = lines(sh("tpu_vm.sh", "stop", *TPU, "--run_name=npo"))[0]
  assert "--worker=all" in stop and "kill -TERM" in stop and "logs/npo-worker*.pid" in stop
  assert lines(sh("tpu_vm.sh", "delete", *TPU)) == [
      "gcloud compute tpus tpu-vm delete mirage-v5e --quiet --zone=us-west4-a"]
  assert lines(sh("tpu_vm.sh", "delete", *TPU, "--queued")) == [
      "gcloud compute tpus queued-resources delete mirage-v5e --force --quiet --zone=us-west4-a"]


def test_tpu_vm_defaults_from_environment():
  out = lines(sh("tpu_vm.sh", "delete", "--dry-run", TPU_NAME="envpod", ZONE="europe-west4-a", PROJECT="p1"))
  assert out == ["gcloud compute tpus tpu-vm delete envpod --quiet --zone=europe-west4-a --project=p1"]


@pytest.mark.parametrize("args, message", [
    ((), "no command given"),
    (("launch",), "unknown command 'launch'"),
    (("create", "--zone=z"), "--name (or TPU_NAME) is required"),
    (("create", "--name=n"), "--zone (or ZONE) is required"),
    (("run", "--name=n", "--zone=z"), "run needs mirage's arguments after --"),
    (("create", "--name=n", "--zone=z", "--", "train"), "only run takes arguments after --"),
    (("setup", "--name=n", "--zone=z", "--code=rsync"), "--code must be scp or git"),
    (("setup", "--name=n", "--zone=z", "--code=git", "--dry-run"), "--code=git needs --repo=URL"),
    (("create", "--name=n", "--zone=z", "--bogus"), "unknown option --bogus"),
    (("logs", "--name=n", "--zone=z", "--worker=x"), "--worker must be all or a worker number"),
])
def test_tpu_vm_usage_errors(args, message):
  result = sh("tpu_vm.sh", *args)
  assert result.returncode == 2 and result.stdout == ""
  assert message in result.stderr and "Usage: launch/tpu_vm.sh COMMAND" in result.stderr


def test_run_on_host_sets_distributed_and_logs_per_worker():
  out = lines(sh("run_on_host.sh", "--dry-run", "--log_dir=/tmp/mlogs", "--run_name=npo", "--", *TRAIN,
                 TPU_WORKER_ID="3"))
  assert out[:3] == ["mkdir -p /tmp/mlogs", f"cd {LAUNCH.parent}", "export MIRAGE_DISTRIBUTED=1"]
  assert out[3] == f"source {LAUNCH.parent}/.venv/bin/activate"
  assert shlex.split(out[4].partition(" > ")[0]) == ["mirage", *TRAIN]
  assert "tee -a /tmp/mlogs/npo-worker3.log" in out[4]
  slurm = lines(sh("run_on_host.sh", "--dry-run", "--venv=none", "--", "eval", "--workdir=w", SLURM_PROCID="5"))
  assert not any("activate" in line for line in slurm) and "worker5.log" in slurm[-1]
  single = lines(sh("run_on_host.sh", "--dry-run", "--single", "--", "eval", "--workdir=w"))
  assert not any("MIRAGE_DISTRIBUTED" in line for line in single)
  bad = sh("run_on_host.sh", "--dry-run")
  assert bad.returncode == 2 and "no mirage arguments after --" in bad.stderr and "Usage:" in bad.stderr


def test_slurm_one_task_per_node_srun():
  script = (LAUNCH / "slurm_gpu.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=1" in script and "#SBATCH --gpus-per-node=8" in script
  out = lines(sh("slurm_gpu.sbatch", "--dry-run", *TRAIN, SLURM_JOB_ID="777", SLURM_JOB_NAME="npo7b",
                 SLURM_JOB_NUM_NODES="4", SLURM_SUBMIT_DIR=str(LAUNCH.parent)))
  srun = out[-1]
  assert srun.startswith("srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 ")
  assert f"bash {LAUNCH}/run_on_host.sh --venv={LAUNCH.parent}/.venv" in srun
  assert shlex.split(srun)[-5:] == ["--run_name=npo7b-777", "--", *TRAIN]
  outside = sh("slurm_gpu.sbatch", "train", "--config=x")
  assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr
  assert sh("slurm_gpu.sbatch", "--dry-run").returncode == 2


def test_local_fake_devices_single_process():
  out = lines(sh("local.sh", "--dry-run", "--devices=8", "--venv=none", "--", "train", "--config=c", "--workdir=w"))
  assert out[0] == "export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8"
  assert not any("MIRAGE_DISTRIBUTED" in line for line in out)
  assert out[-1].startswith("mirage train --config=c --workdir=w") and "local-worker" in out[-1]
  bad = sh("local.sh", "--devices=many", "--", "train")
  assert bad.returncode == 2 and "--devices must be a number" in bad.stderr


# --------------------------------------------------------------------------- paper.sh: the real-weights pipeline
PAPER = ["--hf=/h/llava", "--vlguard=/v", "--out=/o", "--dry-run"]


def test_paper_pipeline_dry_run_in_order():
  out = lines(sh("paper.sh", *PAPER, "--judge_hf=/h/judge", "--retain_extra=/r/mix.json", "--size=13b",
                 "--rmu_args=--config.loss.layer=5 --config.total_steps=3"))
  verbs = [" ".join(shlex.split(line.split(" > ")[0])[1:3]) for line in out]
  assert verbs == (["convert hf-to-jax"] * 2 + ["generate --workdir=/o/models/base", "select --candidates=/o/forget/candidates.jsonl",
                    "data build"] + ["train --config=configs/vlguard/" + m + ".py:13b" for m in
                                     ("posthoc_sft", "mixed_sft", "npo", "rmu")] +
                   ["eval --workdir=/o/models/base"] + ["eval --workdir=/o/runs/" + m for m in
                                                        ("posthoc_sft", "mixed_sft", "npo", "rmu")] +
                   ["convert jax-to-hf"] * 4), out
  build = next(line for line in out if " data build " in line)
  assert "--harmful_responses=/o/forget/harmful_responses.json --retain_size=2000 --retain_extra=/r/mix.json" in build
  assert build.endswith("> /o/data/build.json")
  rmu = next(line for line in out if "configs/vlguard/rmu.py" in line)
  assert rmu.endswith("--config.init_from=/o/models/base --config.data.path='$DATA_PATH' --config.loss.layer=5 "
                      "--config.total_steps=3")
  assert all("--config.eval.judge=model --config.eval.judge_checkpoint=/o/models/judge" in line
             for line in out if line.startswith("mirage eval"))
  assert not any("''" in line for line in out)  # no empty argument from an unset option


def test_paper_pipeline_released_sft_models_and_given_responses():
  out = lines(sh("paper.sh", *PAPER, "--harmful_responses=/r/h.json", "--retain_size=0", "--posthoc_hf=/h/posthoc",
                 "--mixed_hf=/h/mixed", "--mirage=launch/tpu_vm.sh run --name=x --zone=z --"))
  assert not any(" generate " in line or " select " in line for line in out)
  assert "mirage convert hf-to-jax --hf=/h/posthoc --out=/o/models/posthoc_sft" in out
  trains = [line for line in out if " train " in line]
  assert [line.split("--config=")[1].split()[0] for line in trains] == ["configs/vlguard/npo.py:7b",
                                                                        "configs/vlguard/rmu.py:7b"]
  assert all(line.startswith("launch/tpu_vm.sh run --name=x --zone=z -- train") for line in trains)
  assert "--workdir=/o/models/posthoc_sft" in next(line for line in out if "eval/posthoc_sft" in line)
  assert any("--config.eval.judge=keyword" in line for line in out)  # no judge model: VLGuard's metric
  assert "--harmful_responses=/r/h.json" in next(line for line in out if " data build " in line)


@pytest.mark.parametrize("args,message", [
    ([], "--hf, --vlguard and --out are required"),
    (["--hf=/h", "--vlguard=/v", "--out=/o", "--retain_size=0"], "the select stage needs a judge"),
    (["--hf=/h", "--vlguard=/v", "--out=/o", "--judge_hf=/j"], "needs --retain_extra"),
    (["--hf=/h", "--vlguard=/v", "--out=/o", "--judge_hf=/j", "--retain_size=0", "--judge=file"], "--judge_file"),
    (["--hf=/h", "--vlguard=/v", "--out=/o", "--judge_hf=/j", "--retain_size=0", "--bogus=1"], "unknown option"),
])
def test_paper_pipeline_usage_errors(args, message):
  result = sh("paper.sh", *args, "--dry-run")
  assert result.returncode == 2 and message in result.stderr.splitlines()[0], result.stderr
