"""The paper configs on real weights (configs/vlguard/): official hyper-parameters, inheritance from a
converted checkpoint, and (tpu_aot, slow) each 7B / 13B train step AOT-compiled for a TPU pod."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from mirage_jax import configlib
from mirage_jax.errors import ConfigError
from mirage_jax.train import runtime

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("posthoc_sft", "mixed_sft", "npo", "rmu")


def load(method: str, size: str = "7b", *overrides: str):
  return configlib.apply_overrides(configlib.load(f"configs/vlguard/{method}.py:{size}"), overrides)


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_official_values(size):
  npo, rmu, posthoc, mixed = (load(m, size) for m in ("npo", "rmu", "posthoc_sft", "mixed_sft"))
  # scripts/finetune_unlearn_npo.sh
  assert (npo.optim.lr, npo.loss.beta, npo.loss.alpha, npo.loss.ft_weight, npo.batch_size, npo.total_steps) == (
      5e-7, 0.9, 1.0, 1.0, 8, 250)
  # scripts/finetune_unlearn.sh (full parameters): layer 7, layers 5-7 down_proj + projector, c = 10
  assert (rmu.loss.layer, rmu.loss.steering, rmu.loss.mask, rmu.optim.lr) == (7, 10.0, "all", 1e-6)
  assert rmu.optim.trainable == "projector/.*,decoder/layers/mlp/down/kernel"
  # LLaVA stage 2 (scripts/v1_5/finetune.sh): lr 2e-5, global batch 128, vision frozen
  for c in (posthoc, mixed):
    assert (c.optim.lr, c.batch_size, c.optim.frozen) == (2e-5, 128, "vision/.*")
  assert posthoc.total_steps == 187 and mixed.total_steps == 5221
  for c in (npo, rmu, posthoc, mixed):
    assert c.optim.schedule == "cosine" and c.optim.end_lr_ratio == 0.0 and c.optim.weight_decay == 0.0
    assert c.optim.warmup_steps == -(-c.total_steps * 3 // 100)  # warmup_ratio 0.03, rounded up like HF
    assert c.data.name == "vlguard" and c.data.max_len == 2048 and c.init_inherit.startswith("model,")
  assert load("npo", "13b").mesh.preset == "tpu_tp"


def _converted_run(tmp_path: pathlib.Path, **model) -> pathlib.Path:
  """A run directory whose config.json is a converted model's (only the config matters here)."""
  source = configlib.load("configs/sft/posthoc.py:tiny")
  source.unlock()
  for key, value in model.items():
    source.model.text[key] = value
  source.data.prompt_template = "SYSTEM USER: <image> {question} ASSISTANT:"
  run = tmp_path / "converted"
  run.mkdir()
  (run / "config.json").write_text(configlib.to_json(source))
  return run


def test_init_inherit_copies_the_converted_architecture(tmp_path):
  run = _converted_run(tmp_path, width=80, depth=2)
  c = load("npo", "tiny", f"--config.init_from={run}")
  got = runtime.inherit_from_init(c)
  assert (got.model.text.width, got.model.text.depth) == (80, 2)
  assert got.data.prompt_template == "SYSTEM USER: <image> {question} ASSISTANT:"
  assert got.optim.lr == c.optim.lr and got.loss.beta == c.loss.beta  # nothing else moves
  assert json.loads(configlib.to_json(got))["model"]["text"]["width"] == 80
  same = load("npo", "tiny", f"--config.init_from={run}", "--config.init_inherit=")
  assert runtime.inherit_from_init(same) is same


def test_init_inherit_errors_name_the_fix(tmp_path):
  with pytest.raises(ConfigError, match="set --config.init_from"):
    runtime.inherit_from_init(load("npo", "tiny"))
  run = _converted_run(tmp_path)
  with pytest.raises(ConfigError, match="'model.nope' is not a key"):
    runtime.inherit_from_init(load("npo", "tiny", f"--config.init_from={run}", "--config.init_inherit=model.nope"))


needs_libtpu = pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import libtpu"], capture_output=True).returncode != 0,
    reason="needs libtpu (pip install -e '.[tpu]')")


@needs_libtpu
@pytest.mark.tpu_aot
@pytest.mark.slow
@pytest.mark.parametrize("size,topology,mesh", [("7b", "v5e:16x16", "fsdp:-1,tensor:4"),
                                                ("13b", "v5p:4x4x4", "fsdp:-1,tensor:4")])
@pytest.mark.parametrize("method", METHODS)
def test_paper_configs_compile_for_a_pod(method, size, topology, mesh):
  """Each paper config's real train step lowers and compiles for a TPU pod (minutes each on a CPU host)."""
  batch = [] if method.endswith("_sft") else ["--batch=64"]  # 8 rows do not split over the pod's 64 batch shards
  proc = subprocess.run([sys.executable, "-m", "mirage_jax.cli", "compile", f"--config=configs/vlguard/{method}.py:{size}",
                         f"--topology={topology}", f"--mesh={mesh}", *batch], capture_output=True, text=True,
                        cwd=REPO, timeout=3000)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert proc.returncode == 0 and out["fits"], proc.stderr[-3000:]
