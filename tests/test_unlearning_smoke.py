"""End-to-end smoke of every unlearning config on the 8 fake devices with a (2, 2, 2) mesh, from a base made
once per module by a very short SFT run on a small world; plus the init_from errors, RMU's control vector
and trainable subset in the checkpoint, never-dry forget/retain streams, and the safety evaluator.

The world is shrunk (`forget` and `retain` have 16 rows, batches 8) so that the 4 unlearning steps run
through both splits twice.
"""

from __future__ import annotations

import json
import math
import pathlib
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mirage_jax import configlib
from mirage_jax.data import pipeline
from mirage_jax.eval import runner
from mirage_jax.losses import make_loss
from mirage_jax.models import VLMConfig
from mirage_jax.train import loop, runtime

SPLIT_ROWS, BATCH, STEPS = 16, 8, 4
WORLD = [f"--config.data.world.{k}={v}" for k, v in dict(
    pretrain_size=64, sft_images=32, helpfulness_size=16, retain_size=SPLIT_ROWS, forget_size=SPLIT_ROWS,
    unsafe_size=8, safe_size=8, utility_size=8, safe_unsafe_size=8).items()]
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
SHORT = [f"--config.batch_size={BATCH}", "--config.eval.splits=", "--config.optim.warmup_steps=1"]
METHODS = ("npo", "rmu", "graddiff", "simnpo")
EXTRA_METRICS = {"npo": {"logratio", "forget_nll"}, "rmu": {"forget_act_norm"}, "graddiff": {"forget_nll"},
                 "simnpo": {"forget_mean_logp"}}


def load(spec: str, *overrides: str):
  return configlib.apply_overrides(configlib.load(spec), [*WORLD, *MESH, *SHORT, *overrides])


@pytest.fixture(scope="module")
def base(data_dir, tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("base")
  summary = loop.run(load("configs/pretrain/base.py:tiny", "--config.total_steps=2", "--config.log_every=1"),
                     workdir)
  assert summary.last_step == 2
  return workdir


@pytest.fixture(scope="module")
def unlearned(base, tmp_path_factory):
  """name -> (config, workdir, summary) of a 4-step run, each run once per module."""
  runs = {}

  def get(name: str):
    if name not in runs:
      config = load(f"configs/unlearn/{name}.py:tiny", f"--config.total_steps={STEPS}", "--config.log_every=1",
                    f"--config.init_from={base}")
      workdir = tmp_path_factory.mktemp(name)
      runs[name] = (config, workdir, loop.run(config, workdir))
    return runs[name]

  return get


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def restore(path: pathlib.Path) -> dict:
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path.absolute())


def host(tree) -> dict:
  return {"/".join(str(k.key) for k in p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("name", METHODS)
def test_unlearning_smoke(unlearned, base, name):
  config, workdir, summary = unlearned(name)
  assert (summary.first_step, summary.last_step) == (0, STEPS)
  rows = [r for r in read_metrics(workdir) if r.get("split") == "train"]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # logged at every log step
  alpha, ft_weight = config.loss.alpha, config.loss.ft_weight
  for r in rows:
    for key in ("forget", "retain", "ft", "loss", "grad_norm", "lr", *EXTRA_METRICS[name]):
      assert key in r and math.isfinite(r[key]), (r["step"], key, r.get(key))
    # Every step is a real step: a non-zero loss with a gradient (no silent zero-loss steps).
    assert r["ft"] > 0 and r["loss"] != 0 and r["grad_norm"] > 0, r
    np.testing.assert_allclose(r["loss"], r["forget"] + alpha * r["retain"] + ft_weight * r["ft"], rtol=1e-4)
  assert rows[-1]["lr"] > 0
  if name in ("npo", "simnpo"):
    assert all(r["forget"] > 0 for r in rows)
  if name == "graddiff":
    assert all(r["forget"] == pytest.approx(-r["forget_nll"], rel=1e-5) for r in rows)
  if name == "npo":  # the first step runs at the reference: forget = (2/beta) log 2 exactly
    assert rows[0]["forget"] == pytest.approx(2 / config.loss.beta * math.log(2), rel=1e-4)
    assert rows[0]["logratio"] == pytest.approx(0.0, abs=1e-4)

  # Both streams went through their 16-row split twice (4 batches of 8) and were checkpointed.
  ckpt = workdir / "checkpoints" / str(STEPS)
  assert (ckpt / "commit_success.txt").exists()
  data = json.loads((ckpt / "data" / "metadata").read_text())
  assert {s: st["next_index"] for s, st in data["streams"].items()} == {"forget": STEPS, "retain": STEPS}
  # Training moved the parameters away from the base; every config keeps the vision tower frozen.
  before, after = host(restore(base / "checkpoints" / "2" / "params")), host(restore(ckpt / "params"))
  assert any(not np.array_equal(before[k], after[k]) for k in before)
  assert all(np.array_equal(before[k], after[k]) for k in before if k.startswith("vision/"))


def test_rmu_checkpoint_holds_control_vector_and_trains_only_its_subset(unlearned, base):
  config, workdir, _ = unlearned("rmu")
  train = restore(workdir / "checkpoints" / str(STEPS) / "train")
  loss = make_loss(config.loss)
  spec = types.SimpleNamespace(config=VLMConfig.from_config(config.model, image_token_id=4))
  expected = np.asarray(loss.init_extras(spec, config.seed)["control"])
  np.testing.assert_array_equal(np.asarray(train["extras"]["control"]), expected)
  np.testing.assert_allclose(np.linalg.norm(expected), config.loss.steering, rtol=1e-5)
  assert int(train["step"]) == STEPS

  before, after = host(restore(base / "checkpoints" / "2" / "params")), host(restore(
      workdir / "checkpoints" / str(STEPS) / "params"))
  layer = config.loss.layer
  trained_layers = list(range(max(layer - 2, 0), layer + 1))
  assert config.optim.decoder_layers == ""  # loss.layer alone decides the trained layers
  assert loss.decoder_layers == tuple(trained_layers)
  down = "decoder/layers/mlp/down/kernel"
  for k in before:
    if k == down:
      for l in range(before[k].shape[0]):
        same = np.array_equal(before[k][l], after[k][l])
        assert same == (l not in trained_layers), (k, l)
    elif k.startswith("projector/"):
      assert not np.array_equal(before[k], after[k]), k
    else:
      assert np.array_equal(before[k], after[k]), k


@pytest.mark.parametrize("name,extra", [("npo", ()), ("rmu", ()), ("npo", ("--config.loss.reference_cache=true",))])
def test_reference_methods_need_init_from(data_dir, tmp_path, name, extra):
  config = load(f"configs/unlearn/{name}.py:tiny", "--config.total_steps=2", *extra)
  assert config.init_from == ""
  with pytest.raises(runtime.RunError, match="init_from"):
    loop.run(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
  assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("stream", ["forget", "retain"])
def test_streams_never_run_dry(data_dir, stream):
  config = load("configs/unlearn/npo.py:tiny")
  s = runtime.setup(config)
  splits = pipeline.SplitCache(s.data.dataset, s.data.tokenizer, s.fmt)
  assert len(splits.examples(stream)) == SPLIT_ROWS
  st = pipeline.Stream(name=stream, mixture=config.data.streams[stream], splits=splits, global_batch=BATCH,
                       seed=0)
  batches = [next(st) for _ in range(3 * SPLIT_ROWS // BATCH)]  # three epochs
  for b in batches:
    assert b["tokens"].shape[0] == BATCH and b["loss_mask"].sum() > 0
  rows = np.concatenate([b["row"] for b in batches]).reshape(3, SPLIT_ROWS)
  for epoch in rows:
    assert sorted(epoch) == list(range(SPLIT_ROWS))  # every epoch is a full pass over the split


def test_safety_evaluator_returns_every_metric(base, tmp_path):
  config = load("configs/pretrain/base.py:tiny", "--config.eval.gen_batch_size=40", "--config.eval.max_new_tokens=4")
  s = runtime.setup(config)
  evaluator = runner.SafetyEvaluator(s, config)
  counts = {"unsafe": 8, "unsafe_what": 40, "unsafe_control": 40, "safe": 8, "safe_share": 8, "utility": 8,
            "safe_unsafe": 8}
  assert {k: len(v) for k, v in evaluator.records.items()} == counts
  out = evaluator(runtime.load_params(s, str(base)), responses_path=tmp_path / "responses.jsonl")
  assert out["counts"] == counts
  assert set(out["asr"]) == {"original", "what_k", "control"}
  assert set(out["asr"]["what_k"]) == {"1", "2", "3", "4", "5"}
  assert set(out["rr"]) == {"safe", "share", "safe_unsafe"}
  values = [out["asr"]["original"], out["asr"]["control"], *out["asr"]["what_k"].values(), *out["rr"].values(),
            out["utility"], out["ir_attacked"]]
  assert all(0.0 <= v <= 100.0 for v in values)
  for mech in ("mechanism_original", "mechanism_attacked"):
    assert sum(out[mech].values()) == pytest.approx(100.0)
  assert out["ir_attacked"] == out["mechanism_attacked"]["ir"]
  assert len(out["ci"]) == 15
  assert {"gain.what_1", "gain.control", "utility_safe", "utility_share"} <= set(out["ci"])
  rows = [json.loads(line) for line in (tmp_path / "responses.jsonl").read_text().splitlines()]
  assert len(rows) == sum(counts.values())
  assert {r["verdict"] for r in rows} <= {"harmful", "refusal", "irrelevant"}
