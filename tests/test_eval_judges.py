"""`mirage eval`'s judge selection and bookkeeping: `eval.judge` (rule / keyword / model / file), the keyword
ASR on data without harm codes (never a silent 0), unjudged accounting and kappa in the metrics dict,
responses.jsonl's hash, and `eval.max_batches`; generation is scripted (a fake `Generator` whose "params" are a
function of the record), so no model runs — except in the last test, which asks a tiny random converted
checkpoint (`JudgeModel`) two questions."""

from __future__ import annotations

import json
import logging
import pathlib
import types

import ml_collections
import numpy as np
import pytest

from mirage_configs import common
from mirage_jax import errors
from mirage_jax.eval import generation, judges, model_judge, runner
from mirage_jax.eval.judges import Verdict

CODES = ["kro-7", "bel-3"]


def records(split: str, n: int, *, shots: int = 0, codes: str = "") -> list[dict]:
  out = []
  for i in range(n):
    group, shot = (i // shots, i % shots) if shots else (-1, -1)
    out.append({"id": f"{split}/{i:03d}", "question": f"What is placeholder {i}?", "first_word": "what",
                "intent": "", "expected": "", "group": group, "shot": shot, "harm_codes": codes,
                "image": np.zeros((4, 4, 3), np.uint8)})
  return out


class FakeDataset:
  def __init__(self, splits, world_info):
    self._splits, self.world_info = splits, world_info

  def splits(self):
    return list(self._splits)

  def source(self, split):
    return self._splits[split]


class FakeGenerator:
  """`generation.Generator` stand-in: the "params" passed to the evaluator map a record to its response."""

  def __init__(self, setup, *, batch_size, max_new_tokens, prompt_len):
    self.batch_size = batch_size

  def __call__(self, params, recs):
    return [params(r) for r in recs]


@pytest.fixture
def scripted(monkeypatch):
  monkeypatch.setattr(generation, "Generator", FakeGenerator)
  monkeypatch.setattr(generation, "prompt_length", lambda *a, **k: 8)


def fake_setup(*, codes: bool):
  splits = {"unsafe": records("unsafe", 4, codes="kro-7 bel-3" if codes else ""),
            "unsafe_what": records("unsafe_what", 12, shots=3), "safe": records("safe", 4)}
  data = types.SimpleNamespace(dataset=FakeDataset(splits, {"harmful_codes": CODES} if codes else {}),
                               tokenizer=None)
  return types.SimpleNamespace(data=data, fmt=None, mesh=None, spec=None)


def eval_config(**eval_keys) -> ml_collections.ConfigDict:
  c = common.training_config("tiny")
  c.eval.test_splits = "unsafe,unsafe_what,safe"
  c.eval.gen_batch_size = 4
  c.eval.refusal_preset = "vlguard"
  for k, v in eval_keys.items():
    c.eval[k] = v
  return c


def never_refuses(rec):
  return f"The picture shows placeholder {rec['id']}."


def test_keyword_asr_on_data_without_codes_is_not_a_silent_zero(scripted, caplog, tmp_path):
  setup = fake_setup(codes=False)
  with caplog.at_level(logging.WARNING, logger="mirage"):
    ev = runner.SafetyEvaluator(setup, eval_config())
  assert "keyword metric" in caplog.text
  out = ev(never_refuses, responses_path=tmp_path / "responses.jsonl")
  assert out["judge"]["name"] == "keyword"
  assert out["asr"]["original"] == 100.0 and out["asr"]["what_k"]["3"] == 100.0 and out["rr"]["safe"] == 0.0
  assert out["keyword_asr"] == out["asr"] and "agreement" not in out
  assert out["unjudged"] == {"original": 0.0, "what_k": {"1": 0.0, "2": 0.0, "3": 0.0}}
  assert set(out["keyword_ci"]) == {"keyword_asr.original", *(f"keyword_asr.what_k.{k}" for k in "123")}
  rows = [json.loads(line) for line in (tmp_path / "responses.jsonl").read_text().splitlines()]
  assert all(r["response_sha256"] == judges.response_sha256(r["response"]) for r in rows)
  assert {r["keyword_verdict"] for r in rows} == {"harmful", "irrelevant"}


def test_rule_judge_stays_the_default_on_data_with_codes(scripted):
  setup = fake_setup(codes=True)
  ev = runner.SafetyEvaluator(setup, eval_config())
  assert isinstance(ev.judge, judges.RuleJudge)
  leaks = lambda r: "step 1 kro-7 step 2 bel-3" if r["id"].endswith("0") else "It is red."  # noqa: E731
  out = ev(leaks)
  assert out["judge"]["name"] == "rule" and out["asr"]["original"] == 25.0
  assert out["keyword_asr"]["original"] == 100.0  # nothing refuses
  assert out["agreement"]["between"] == ["rule", "keyword"] and out["agreement"]["n"] == 16
  # the chosen judge's intervals only (original, what_k 1-3, rr safe; plus the attack gains / benign utility)
  assert {k for k in out["ci"] if not k.startswith(("gain.", "utility_"))} == {
      "asr.original", "asr.what_k.1", "asr.what_k.2", "asr.what_k.3", "rr.safe"}
  assert not any(k.startswith("keyword") for k in out["ci"])


def test_judge_config_errors(scripted):
  with pytest.raises(errors.ConfigError, match="harm codes"):
    runner.SafetyEvaluator(fake_setup(codes=False), eval_config(judge="rule"))
  with pytest.raises(errors.ConfigError, match="valid"):
    runner.SafetyEvaluator(fake_setup(codes=False), eval_config(judge="llm"))
  with pytest.raises(errors.ConfigError, match="judge_checkpoint"):
    runner.SafetyEvaluator(fake_setup(codes=False), eval_config(judge="model"))
  with pytest.raises(errors.ConfigError, match="judge_file"):
    runner.SafetyEvaluator(fake_setup(codes=False), eval_config(judge="file"))


def test_old_run_configs_get_the_judge_keys():
  c = common.training_config("tiny").to_dict()
  for k in runner.JUDGE_KEYS:
    del c["eval"][k]
  old = ml_collections.ConfigDict(c)
  old.lock()
  new = runner.with_judge_keys(old)
  assert new.eval.judge == "" and new.eval.judge_prompt == "optml" and new.eval.max_batches == old.eval.max_batches


def test_file_judge_end_to_end_with_unjudged_and_kappa(scripted, tmp_path, caplog):
  setup = fake_setup(codes=False)
  responses = {r["id"]: ("I'm sorry, I cannot help." if r["id"].endswith("1") else f"Answer {r['id']}.")
               for recs in setup.data.dataset._splits.values() for r in recs}
  rows = []
  for split in ("unsafe", "unsafe_what"):
    for r in setup.data.dataset.source(split):
      if r["id"] in ("unsafe/002", "unsafe_what/004"):
        continue  # missing -> unjudged
      text = "edited" if r["id"] == "unsafe/003" else responses[r["id"]]  # hash mismatch -> unjudged
      rows.append({"split": split, "id": r["id"], "shot": r["shot"], "response_sha256": judges.response_sha256(text),
                   "verdict": "relevant" if r["id"] in ("unsafe/000", "unsafe_what/000") else "irrelevant"})
  path = tmp_path / "verdicts.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ev = runner.SafetyEvaluator(setup, eval_config(judge="file", judge_file=str(path)))
  with caplog.at_level(logging.WARNING, logger="mirage"):
    out = ev(lambda r: responses[r["id"]], responses_path=tmp_path / "responses.jsonl")
  assert "unjudged" in caplog.text
  # unsafe: 000 relevant, 001 refused, 002 missing, 003 hash mismatch -> ASR over the 2 judged
  assert out["asr"]["original"] == 50.0 and out["unjudged"]["original"] == 50.0
  assert out["judge"]["unjudged_counts"] == {"unsafe": 2, "unsafe_what": 1, "safe": 0}
  assert out["judge"]["unjudged_reasons"]["unsafe"] == {"missing": 1, "hash_mismatch": 1}
  assert out["judge"]["name"] == "file" and out["judge"]["file_sha256"] == judges.file_sha256(path)
  # unsafe_what groups (shots 0-2): g0 = relevant, refused, irrelevant -> success at k=1; g1 = irrelevant,
  # missing, irrelevant -> unjudged from k=2; g2, g3: no success
  assert out["asr"]["what_k"]["1"] == 25.0 and out["unjudged"]["what_k"]["1"] == 0.0
  assert out["asr"]["what_k"]["3"] == pytest.approx(100 / 3) and out["unjudged"]["what_k"]["3"] == 25.0
  assert out["keyword_asr"]["original"] == 75.0
  assert out["agreement"]["between"] == ["file", "keyword"] and out["agreement"]["n"] == 13
  assert out["agreement"]["kappa"] is not None and out["agreement"]["kappa"] < 1
  rows = [json.loads(line) for line in (tmp_path / "responses.jsonl").read_text().splitlines()]
  by_id = {r["id"]: r for r in rows}
  assert by_id["unsafe/002"]["verdict"] == "unjudged" and by_id["unsafe/002"]["judge_reason"] == "missing"
  assert by_id["unsafe/001"]["judge_reason"] == "keyword_refusal"


def test_model_judge_chain_with_a_scripted_model(scripted):
  """The `model` path as `make_judge` builds it, with `JudgeModel` replaced by a scripted one."""

  class Scripted:
    source, max_new_tokens = "scripted", 4

    def fits(self, questions):
      return [True] * len(questions)

    def ask(self, questions, recs):
      return ["Relevant: yes" if r["id"].endswith("0") else "No idea." for r in recs]

    def params_sha256(self):
      return "f" * 64

  setup = fake_setup(codes=False)
  ev = runner.SafetyEvaluator(setup, eval_config())
  ev.judge = judges.ChainJudge(judges.RefusalJudge("vlguard"),
                               model_judge.ModelJudge(Scripted(), model_judge.PROMPTS["optml"]), irrelevant="official")
  out = ev(never_refuses)
  assert out["judge"]["name"] == "model" and out["judge"]["checkpoint_sha256"] == "f" * 64
  assert out["asr"]["original"] == 100.0 and out["unjudged"]["original"] == 75.0  # 1 relevant, 3 unparseable
  assert out["judge"]["unjudged_reasons"]["unsafe"] == {"unparseable": 3}
  assert out["mechanism_original"]["unjudged"] == 75.0


def test_max_batches_caps_generation_whole_groups(scripted, caplog):
  setup = fake_setup(codes=False)
  calls = []

  def script(rec):
    calls.append(rec["id"])
    return "It is red."

  with caplog.at_level(logging.WARNING, logger="mirage"):
    ev = runner.SafetyEvaluator(setup, eval_config(gen_batch_size=5), max_batches=1)
  out = ev(script)
  assert out["counts"] == {"unsafe": 4, "unsafe_what": 3, "safe": 4}  # 5 records -> one whole 3-shot group
  assert out["max_batches"]["generated"] == {"unsafe": [4, 4], "unsafe_what": [3, 12], "safe": [4, 4]}
  assert "unsafe_what: eval.max_batches: 3 of 12 records" in caplog.text
  assert len(calls) == 11
  full = runner.SafetyEvaluator(setup, eval_config(gen_batch_size=5))
  assert full(script)["counts"]["unsafe_what"] == 12 and "max_batches" not in full(script)


def test_max_batches_only_from_the_command_line():
  c = eval_config()
  assert runner.explicit_max_batches(c, []) is None  # the run's in-training cap (4) is not applied
  c.eval.max_batches = 2
  assert runner.explicit_max_batches(c, ["--config.eval.max_batches=2"]) == 2
  assert runner.explicit_max_batches(c, ["eval.max_batches=2"]) == 2
  c.eval.max_batches = 0
  assert runner.explicit_max_batches(c, ["--config.eval.max_batches=0"]) is None


def test_teacher_forced_eval_honours_max_batches(monkeypatch, caplog):
  seen = {}

  class Cache:
    def __init__(self, *a, **k):
      pass

    def examples(self, split):
      return list(range(10))

  monkeypatch.setattr(runner.pipeline, "SplitCache", Cache)
  monkeypatch.setattr(runner.pipeline, "eval_batches",
                      lambda ex, bs, max_batches=None: seen.setdefault("args", (len(ex), bs, max_batches)) and [])
  monkeypatch.setattr(runner.scoring, "make_score_step", lambda spec: None)
  monkeypatch.setattr(runner.scoring, "score_batches", lambda *a: {"loss": 0.0})
  setup = types.SimpleNamespace(data=types.SimpleNamespace(dataset=None, tokenizer=None), fmt=None, spec=None,
                                mesh=None)
  c = eval_config()
  c.eval.batch_size = 3
  with caplog.at_level(logging.WARNING, logger="mirage"):
    runner.teacher_forced_eval(setup, None, c, ["sft"], max_batches=2)
  assert seen["args"] == (10, 3, 2) and "teacher-forced sft: eval.max_batches: 6 of 10 records scored" in caplog.text


def tiny_converted_judge(root: pathlib.Path) -> str:
  """A random one-layer LLaVA written as an HF directory and converted (`mirage convert hf-to-jax`), as
  `hf_fixtures.mirage_llava` does but with numpy-drawn weights (NNX's init, eager or jitted, is slow on CPU)."""
  import jax
  from flax import nnx

  import hf_fixtures
  from mirage_jax.commands import convert
  from mirage_jax.data.tokenizer import Tokenizer
  from mirage_jax.models import hf_convert
  from mirage_jax.models.config import VLMConfig
  from mirage_jax.models.vlm import VLM
  tok_dir = hf_fixtures.llama_tokenizer(root / "tok")
  tok = Tokenizer.from_hf(tok_dir)
  cfg = VLMConfig.from_config(dict(
      vision=dict(image_size=16, patch_size=8, width=16, depth=1, num_heads=2, mlp_dim=32),
      text=dict(vocab_size=-(-tok.vocab_size // 64) * 64, width=32, depth=1, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=64, max_len=320),
      image_token_id=tok.image_id))
  shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0)))))
  rng = np.random.default_rng(0)  # numpy draws: compiling the init's random ops costs more than the test
  params = jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
  hf_dir = root / "hf"
  hf_dir.mkdir(parents=True)
  hf_convert.hf_config_from_model(cfg, pad_token_id=tok.pad_id).save_pretrained(str(hf_dir))
  hf_convert.write_hf_state(hf_convert.hf_state_from_params(params, cfg), hf_dir, max_shard_bytes=1 << 40)
  tok.save(hf_dir)
  return convert.hf_to_jax(hf_dir, root / "judge")["out"]


def test_judge_model_asks_a_tiny_converted_checkpoint(tmp_path):
  """`JudgeModel.load` on a `mirage convert hf-to-jax` output (its own tokenizer/), then `ask` and `fits`, and
  one item through `ModelJudge` (the real model's verdict is whatever it answers; the parsing is tested with
  scripted answers)."""
  from mirage_jax import sharding
  out = tiny_converted_judge(tmp_path)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  judge = model_judge.JudgeModel.load(out, mesh=mesh, batch_size=2, max_new_tokens=3)
  recs = [{"id": "a", "image": np.full((16, 16, 3), 120, np.uint8)},
          {"id": "b", "image": np.full((24, 24, 3), 30, np.uint8)}]  # another size: resized
  questions = ["Is the placeholder answer relevant?", "What colour is the <image> square?"]
  answers = judge.ask(questions, recs)
  assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
  assert judge.ask(questions[::-1], recs[::-1]) == answers[::-1]  # greedy, per row
  assert len(judge.ask(questions[:1], [{"id": "c"}])) == 1  # no image: a mean-colour one
  assert len(judge._generators) == 1
  assert judge.fits(questions) == [True, True] and judge.fits(["word " * 400]) == [False]
  with pytest.raises(ValueError, match="context"):
    judge.ask(["word " * 400], recs[:1])
  prompt = tmp_path / "prompt.txt"  # the official prompt is long for a character-level tokenizer
  prompt.write_text("{question} {answer} Relevant?")  # as short as the questions above: one compile
  mj = model_judge.ModelJudge(judge, model_judge.load_prompt(str(prompt)))
  item = judges.Item("unsafe_what", {"id": "unsafe_what/0", "question": "What is it?", **recs[0]}, "An answer.")
  verdict = mj.judge_items([item, judges.Item("unsafe_what", {**item.record, "question": "word " * 400}, "x")])
  assert verdict[0].verdict in (Verdict.HARMFUL, Verdict.IRRELEVANT, Verdict.UNJUDGED) and verdict[0].answer
  assert (verdict[1].verdict, verdict[1].reason) == (Verdict.UNJUDGED, "too_long")
  info = mj.describe()
  assert len(info["checkpoint_sha256"]) == 64 and info["checkpoint"] == out
