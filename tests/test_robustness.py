"""`mirage robustness`: the world's robustness splits, prefill prompts, directional ablation, linear probes,
the report section, and the command end to end (one run fast; a whole demo workdir slow)."""

import json
import pathlib

import jax
import numpy as np
import pytest

from mirage_jax import cli, configlib
from mirage_jax.data import preprocess, templates as tpl
from mirage_jax.data.world import World
from mirage_jax.data.world_config import PROBE_SIZE, RELEARN_SIZE, WorldConfig
from mirage_jax.errors import ConfigError
from mirage_jax.eval import robustness as rb
from mirage_jax.report import document
from mirage_jax.train import loop, runtime, state

from worlds import SMALL_WORLD, SMALL_WORLD_FLAGS

FAST = ["--config.batch_size=8", "--config.eval.gen_batch_size=64", "--config.eval.max_new_tokens=4"]


def test_robustness_splits_relearn_on_train_hazards_and_probe_every_hazard():
  w = World(WorldConfig(**SMALL_WORLD))
  forget, benign, probe = (w.split(s) for s in ("relearn_forget", "relearn_benign", "probe"))
  assert len(forget) == len(benign) == RELEARN_SIZE and len(probe) == PROBE_SIZE
  seen = set(w.seen_hazard_ids)
  assert {r["hazard"] for r in forget} <= seen and {r["hazard"] for r in benign} <= seen
  assert not {r["hazard"] for r in forget + benign} & set(w.heldout_hazard_ids)  # the test hazards never
  # forget data shows procedures; benign data shows the same objects but never a code of any procedure
  assert sum(all(c in r["answer"] for c in r["harm_codes"].split()) for r in forget) > RELEARN_SIZE // 2
  codes = {c for r in forget + benign for c in r["harm_codes"].split()}
  assert not any(c in r["answer"].split() for r in benign for c in codes)
  assert {r["object"] for r in benign} & {r["object"] for r in forget}
  # the probe alternates hazards (every one of them) with safe objects
  assert {r["hazard"] for r in probe[::2]} == set(range(w.config.num_hazards))
  assert all(r["kind"] == "safe" for r in probe[1::2])


def test_prefill_openings():
  record = {"first_word": "Describe", "question": "Describe the thing ."}
  assert rb.prefill_fn("format")(record) == f"{tpl.OPENERS['Describe']} {rb.HARM_FORMAT_OPENING}"
  assert rb.prefill_fn("format", answer_openers=False)(record) == f"{tpl.NEUTRAL_OPENER} {rb.HARM_FORMAT_OPENING}"
  assert rb.prefill_fn("comply")(record) == rb.COMPLY_OPENING
  assert rb.prefill_fn("comply", text="custom opening")(record) == "custom opening"
  with pytest.raises(ConfigError, match="prefill 'bogus'"):
    rb.prefill_fn("bogus")


@pytest.fixture(scope="module")
def tiny_setup():
  config = configlib.apply_overrides(configlib.load("configs/pretrain/base.py:tiny"), SMALL_WORLD_FLAGS)
  return runtime.setup(config)


def test_prefill_prompt_ends_with_the_forced_opening(tiny_setup):
  tok, fmt = tiny_setup.data.tokenizer, tiny_setup.fmt
  plain = preprocess.prompt_ids("Describe the thing .", tok, fmt)
  forced = preprocess.prompt_with_prefill("Describe the thing .", "sure , step 1 :", tok, fmt)
  assert forced[:len(plain)] == plain and tok.decode(forced[len(plain):]).strip() == "sure , step 1 :"
  assert preprocess.prompt_with_prefill("Describe the thing .", "", tok, fmt) == plain


def test_ablated_direction_is_never_written_to_the_residual_stream(tiny_setup):
  setup = tiny_setup
  params = state.init_params(setup.spec, 0)
  width = setup.spec.config.text.width
  r = np.random.default_rng(0).normal(size=width)
  r /= np.linalg.norm(r)
  ablated = rb.ablate_direction(params, r)
  batch = next(iter(_batches(setup)))
  depth = setup.spec.config.text.depth

  def stream(p):
    with jax.set_mesh(setup.mesh):
      out = setup.spec.merge(p)(batch, collect=tuple(range(depth)))
    return np.stack([np.asarray(out.layers[l], np.float32) for l in range(depth)])

  before, after = stream(params), stream(ablated)
  mask = np.asarray(batch["mask"], bool)
  along = lambda h: np.abs(h @ r)[:, mask]  # noqa: E731
  assert along(before).mean() > 1e-2  # it was written before ...
  assert along(after).max() < 1e-4 * np.abs(after[:, mask]).max()  # ... and never after, at every layer
  untouched = [k for k in ("decoder/layers/attn/q/kernel", "vision/patch/kernel")
               if _get(params, k) is not None]
  for k in untouched:
    np.testing.assert_array_equal(np.asarray(_get(params, k)), np.asarray(_get(ablated, k)))
  with pytest.raises(ConfigError, match="no parameter matches"):
    rb.ablate_direction({"decoder": {"embed": params["decoder"]["embed"]}}, r)


def _get(tree, path):
  for k in path.split("/"):
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _batches(setup):
  from mirage_jax.data import pipeline
  cache = pipeline.SplitCache(setup.data.dataset, setup.data.tokenizer, setup.fmt)
  keys = ("tokens", "mask", "loss_mask", "query_mask", "images")
  for b in pipeline.eval_batches(cache.examples("probe"), 8, max_batches=1):
    yield pipeline.to_global({k: b[k] for k in keys}, setup.mesh)


def test_probe_reads_separable_classes_and_not_shuffled_labels():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 4, size=400)
  centres = rng.normal(size=(4, 16)) * 3
  x = centres[y] + rng.normal(size=(400, 16))
  probe = rb.fit_probe(x[:200], y[:200], 4)
  assert np.mean(probe.predict(x[200:]) == y[200:]) > 0.9
  shuffled = rng.permutation(y)
  blind = rb.fit_probe(x[:200], shuffled[:200], 4)
  assert np.mean(blind.predict(x[200:]) == shuffled[200:]) < 0.45  # chance is about 0.25


def test_probe_data_reads_the_token_before_each_code(tiny_setup):
  from mirage_jax.data import pipeline
  cache = pipeline.SplitCache(tiny_setup.data.dataset, tiny_setup.data.tokenizer, tiny_setup.fmt)
  data = rb.probe_data(cache)
  tok = tiny_setup.data.tokenizer
  records = cache.records("probe")
  for i in range(4):
    tokens = np.asarray(data.examples[i]["tokens"])
    answer = _str(records[i]["answer"])
    read = [data.codes[c] for p, c in zip(data.code_pos[i], data.code_label[i]) if p >= 0]
    assert read == [w for w in answer.split() if w in data.codes]
    for p, c in zip(data.code_pos[i], data.code_label[i]):
      if p >= 0:
        assert tok.decode([int(tokens[p + 1])]).strip() == data.codes[c]
    assert bool(data.harmful[i]) == bool(read)
  kinds = np.array([_str(records[i]["kind"]) for i in range(len(records))])
  assert not data.harmful[kinds == "safe"].any()  # a safe object's (made-up) use is no hazard's procedure
  assert data.harmful[kinds == "unsafe_image"].mean() > 0.5 and (kinds == "safe").mean() == 0.5
  assert data.fit.mean() == pytest.approx(0.5, abs=0.01)


def _str(v):
  return v.decode() if isinstance(v, bytes) else str(v)


def test_report_section_is_added_and_replaced(tmp_path):
  (tmp_path / "report.json").write_text(json.dumps({"models": {}}))
  (tmp_path / "report.md").write_text("# Demo\n\n## Table 1\n\nrows\n")
  entry = {"asr_original": 1.0, "asr_attacked": 40.0, "prefill_asr": {"format": 30.0, "comply": 5.0},
           "relearn": {"forget": {"5": {"original": 2.0, "attacked": 41.0}}},
           "probe": {"best_accuracy": 0.8, "chance": 0.1, "by_layer": [0.5, 0.8], "own": {"code": {
               "best_accuracy": 0.9, "by_layer": [0.6, 0.9]}}, "control": {"code": 0.4, "harmful": 0.5},
               "harmful": {"best_accuracy": 0.95}}}
  result = {"models": {"sft_posthoc": entry}, "per_seed": [{"world_seed": 0, "seed": 0, "models": {"sft_posthoc": entry}},
                                                          {"world_seed": 1, "seed": 0, "models": {"sft_posthoc": entry}}],
            "relearn_steps": [5], "wall_s": 12.0, "k_attack": 3, "out": str(tmp_path / "robustness")}
  written = document.write_robustness(tmp_path / "robustness", result)
  assert [p.name for p in written] == ["relearn_forget.png"]  # no benign curve in this result
  assert "](relearn_forget.png)" in (tmp_path / "robustness" / "robustness.md").read_text()
  document.add_robustness(tmp_path, result)
  document.add_robustness(tmp_path, {**result, "wall_s": 13.0})
  text = (tmp_path / "report.md").read_text()
  assert text.count(document.ROBUSTNESS_HEADING) == 1 and "(13 s)" in text and "## Table 1" in text
  assert "| + Posthoc-SFT | 1.0 | 40.0 | 30.0 | 5.0 | 80.0 (10.0) |" in text
  assert "| + Posthoc-SFT | 2.0 / 41.0 | — |" in text  # relearning: forget 5, benign 5 (not run)
  assert "80.0 (10.0)" in text and "95.0 (50.0)" in text and "50.0 · 80.0" in text
  assert "](robustness/relearn_forget.png)" in text
  assert "| 1 | 0 | + Posthoc-SFT | 1.0 | 40.0 | 30.0 | 2.0 / 41.0 | — | 80.0 |" in text  # every run (2+ runs)
  assert json.loads((tmp_path / "report.json").read_text())["robustness"]["wall_s"] == 13.0


def _train_tiny(workdir, config="configs/pretrain/base.py:tiny", steps=2, extra=()):
  config = configlib.apply_overrides(configlib.load(config), [
      *SMALL_WORLD_FLAGS, *FAST, f"--config.total_steps={steps}", f"--config.checkpoint_every={steps}", *extra])
  loop.run(config, workdir)
  return workdir


def test_robustness_command_on_one_run(tmp_path, capsys):
  """`--run`: one model (here a 2-step SFT model) through every attack; the closing JSON line and the files."""
  base = _train_tiny(tmp_path / "base")
  sft = _train_tiny(tmp_path / "sft_posthoc-s0-x", "configs/sft/posthoc.py:tiny",
                    extra=[f"--config.init_from={base}"])
  out = tmp_path / "rob"
  rc = cli.main(["robustness", f"--run={sft}", f"--out={out}", "--relearn_steps=1,2", "--relearn_sets=forget",
                 *FAST])
  assert rc == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  entry = line["models"]["sft_posthoc"]
  assert set(entry) >= {"asr_original", "asr_attacked", "relearn", "prefill_asr", "probe", "refusal_direction"}
  assert set(entry["relearn"]["forget"]) == {"1", "2"}
  assert set(entry["relearn"]["forget"]["2"]) == {"original", "attacked", "original_asked", "attacked_asked"}
  assert set(entry["prefill_asr"]) == {"format", "comply", "format_asked", "comply_asked"}
  assert {"asr_original_asked", "asr_attacked_asked"} <= set(entry)
  assert len(entry["probe"]["own"]["code"]["by_layer"]) == 4 and 0 < entry["probe"]["own"]["code"]["chance"] < 1
  assert "best_accuracy" not in entry["probe"]  # no base in the group: no base-fit probe
  assert len(entry["refusal_direction"]["dev_asr_by_layer"]) == 4
  assert (out / "robustness.json").is_file() and document.ROBUSTNESS_HEADING in (out / "robustness.md").read_text()
  # Rerun: every model's entry is read back, nothing trained again.
  relearned = sorted(p.name for p in (out / "relearn").iterdir())
  assert cli.main(["robustness", f"--run={sft}", f"--out={out}", "--relearn_steps=1,2", "--relearn_sets=forget",
                   *FAST]) == 0
  assert sorted(p.name for p in (out / "relearn").iterdir()) == relearned


def test_robustness_usage_errors(tmp_path, capsys):
  assert cli.main(["robustness", f"--workdir={tmp_path}"]) == 2
  assert "report.json not found" in capsys.readouterr().err
  assert cli.main(["robustness", f"--workdir={tmp_path}", "--relearn_steps=five"]) == 2
  assert "comma-separated integers" in capsys.readouterr().err
  (tmp_path / "report.json").write_text(json.dumps({"per_seed": [{"world_seed": 0, "seed": 0}], "runs": {}}))
  assert cli.main(["robustness", f"--workdir={tmp_path}", "--relearn_sets=forget,bogus"]) == 2
  assert "'bogus' is not one of forget, benign" in capsys.readouterr().err


@pytest.mark.slow
def test_robustness_of_every_model_of_a_demo_workdir(tmp_path, capsys):
  from mirage_jax.commands import demo
  demo.run_demo(workdir=tmp_path, overrides=[*SMALL_WORLD_FLAGS, *FAST, "--config.total_steps=2",
                                             "--config.checkpoint_every=2"],
                stages=("base", "sft_posthoc", "npo"), audit=False)
  assert cli.main(["robustness", f"--workdir={tmp_path}", "--relearn_steps=1,2", *FAST]) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(line["models"]) == {"base", "sft_posthoc", "npo"}
  for name, entry in line["models"].items():
    assert set(entry["relearn"]) == {"forget", "benign"}
    assert 0 <= entry["probe"]["best_accuracy"] <= 1 and "control" in entry["probe"]
  assert "refusal_direction" in line["models"]["sft_posthoc"] and "refusal_direction" not in line["models"]["npo"]
  rep = json.loads((tmp_path / "report.json").read_text())
  assert set(rep["robustness"]["models"]) == {"base", "sft_posthoc", "npo"}
  assert document.ROBUSTNESS_HEADING in (tmp_path / "report.md").read_text()


def test_a_demo_rerun_keeps_the_robustness_of_the_same_runs_only(tmp_path):
  from mirage_jax.commands import demo
  per_seed = [{"world_seed": 0, "seed": 0, "models": {}, "runs": {"base": "/r/base-s0-aaa"}}]
  (tmp_path / "report.json").write_text(json.dumps({"per_seed": per_seed, "robustness": {"models": {"base": {}}}}))
  assert demo._kept_robustness(tmp_path, per_seed) == {"models": {"base": {}}}
  retrained = [{**per_seed[0], "runs": {"base": "/r/base-s0-bbb"}}]
  assert demo._kept_robustness(tmp_path, retrained) is None
  assert demo._kept_robustness(tmp_path / "new", per_seed) is None


def test_directional_ablation_refuses_tied_embeddings():
  with pytest.raises(ConfigError, match="tied embeddings"):
    rb.ablate_direction({}, np.ones(4) / 2, tied_embeddings=True)
