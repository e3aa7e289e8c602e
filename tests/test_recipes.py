"""`mirage recipes`: candidates, the dev-split rule, and a run that never reads the test splits."""

import json
import math

import pytest

from mirage_configs.ablations import recipes as recipes_config
from mirage_jax import configlib
from mirage_jax.commands import demo, recipes

from worlds import SMALL_WORLD_FLAGS

FAST = ["--config.total_steps=2", "--config.batch_size=8", "--config.checkpoint_every=2",
        "--config.eval.gen_batch_size=64", "--config.eval.max_new_tokens=4"]
RULE = recipes.rule_of(recipes_config.get_config())
BASE = {"asr": {"original": 80.0}, "rr": {"safe": 0.0}, "utility": 70.0, "utility_safe": 70.0}


def entry(asr=0.0, rr_safe=0.0, utility=70.0, utility_safe=70.0):
  return {"asr": {"original": asr}, "rr": {"safe": rr_safe}, "utility": utility, "utility_safe": utility_safe}


def row(steps, **kw):
  e = entry(**kw)
  return {"steps": steps, "entry": e, "goals": recipes.goals(e, BASE, RULE)}


def test_goals_check_each_bound_and_never_pass_a_nan():
  assert recipes.goals(entry(), BASE, RULE) == [True] * 4
  assert recipes.goals(entry(asr=5.5), BASE, RULE) == [False, True, True, True]
  assert recipes.goals(entry(rr_safe=10.5), BASE, RULE) == [True, False, True, True]
  assert recipes.goals(entry(utility=66.9), BASE, RULE) == [True, True, False, True]
  assert recipes.goals(entry(utility_safe=59.0), BASE, RULE) == [True, True, True, False]  # safe by gibberish
  assert recipes.goals(entry(asr=math.nan), BASE, RULE)[0] is False


def test_choose_takes_the_fewest_steps_meeting_every_goal_then_the_best_utility():
  rows = [row(200, utility=72.0), row(50, asr=9.0), row(100, utility=68.0), row(100, utility=69.5)]
  assert recipes.choose(rows, RULE) == 3  # 50 steps misses the ASR goal; of the two at 100, the better utility


def test_choose_without_a_candidate_meeting_every_goal_takes_the_fewest_misses_then_the_lowest_asr():
  rows = [row(50, asr=30.0, utility=50.0), row(100, asr=12.0), row(200, asr=8.0)]
  assert recipes.choose(rows, RULE) == 2
  with pytest.raises(configlib.ConfigError, match="no recipe candidates"):
    recipes.choose([], RULE)


def test_candidates_scale_the_configs_recipe_and_keep_it_exactly():
  config = recipes_config.get_config()
  cands = recipes_config.candidates(config, 1e-4, 100)
  assert [(c["lr"], c["steps"]) for c in cands] == [(lr, n) for lr in (5e-05, 1e-4, 2e-4) for n in (50, 100, 200)]
  assert sum(c["lr_scale"] == c["step_scale"] == 1 for c in cands) == 1
  assert len({c["tag"] for c in cands}) == len(cands)
  bad = configlib.apply_overrides(config, ["--config.lr_scales=0.5,x"])
  with pytest.raises(ValueError, match="comma-separated numbers"):
    recipes_config.candidates(bad, 1e-4, 100)


def test_recipes_run_on_dev_only_and_reuse_the_demos_stage(tmp_path, data_dir):
  out = demo.run_demo(workdir=tmp_path, overrides=[*SMALL_WORLD_FLAGS, *FAST], stages=("base", "sft_posthoc"),
                      audit=False)
  demo_run = out.report["runs"]["sft_posthoc"]
  result = recipes.run(workdir=tmp_path, overrides=[*SMALL_WORLD_FLAGS, *FAST], methods_="sft_posthoc",
                       lr_scales="1", step_scales="1,2")
  m = result["methods"]["sft_posthoc"]
  assert [(c["steps"], c["lr_scale"]) for c in m["candidates"]] == [(2, 1.0), (4, 1.0)]
  assert m["config"]["steps"] == 2 and m["chosen"] in [{"lr": c["lr"], "steps": c["steps"]} for c in m["candidates"]]
  assert m["candidates"][0]["run"] == demo_run  # the config's own recipe is the demo's run, not retrained
  for c in m["candidates"]:
    run = tmp_path / "runs" / c["run"].rsplit("/", 1)[-1]
    metrics = json.loads((run / "eval.dev.json").read_text())
    assert metrics["split_set"] == "dev" and (run / "responses.dev.jsonl").is_file()
    assert len(c["goals"]) == 4
  assert not (tmp_path / "runs" / m["candidates"][1]["run"].rsplit("/", 1)[-1] / "eval.json").exists()
  saved = json.loads((tmp_path / "recipes.json").read_text())
  assert saved["split_set"] == "dev" and set(saved["methods"]) == {"sft_posthoc"}
  text = (tmp_path / "recipes.md").read_text()
  assert "chosen" in text and "The test splits were not read" in text
  again = recipes.run(workdir=tmp_path, overrides=[*SMALL_WORLD_FLAGS, *FAST], methods_="npo", lr_scales="1",
                      step_scales="1")
  assert set(again["methods"]) == {"sft_posthoc", "npo"}  # methods chosen separately accumulate
  assert again["methods"]["sft_posthoc"] == json.loads(json.dumps(m, default=float))
  assert set(json.loads((tmp_path / "recipes.json").read_text())["methods"]) == {"sft_posthoc", "npo"}
  with pytest.raises(configlib.ConfigError, match="unknown"):
    recipes.run(workdir=tmp_path, overrides=[*SMALL_WORLD_FLAGS, *FAST], methods_="sft_nope")
