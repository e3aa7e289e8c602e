"""Forget-set construction: sampling in the KV-cache decoder (temperature, top-p, per-row keys), `mirage
generate` (resumable JSONL of candidates) and `mirage select` (the official most-harmful selection with a
scripted judge) producing a `harmful_responses` JSON the VLGuard builder reads. Placeholder text only.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures
from mirage_jax.commands import generate as gen_cmd
from mirage_jax.data import vlguard
from mirage_jax.errors import ConfigError, DataError, MissingFileError, UsageError
from mirage_jax.eval import select as select_lib
from mirage_jax.models import decode
from test_models import IMAGE_ID, PAD_ID, init, make_batch, make_cfg, merge

NEW = 6
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0}, static_argnums=(2,))


# --------------------------------------------------------------------------- decoder sampling
@pytest.fixture(scope="module")
def model():
  """A small random model, sharpened (greedy choices far from ties), never emitting <image>."""
  cfg = make_cfg(text=dict(depth=2), vision=dict(depth=2))
  graphdef, params = init(cfg, seed=1)
  params["decoder"]["lm_head"] = (params["decoder"]["lm_head"] * 20.0).at[:, IMAGE_ID].set(0.0)
  batch = make_batch(cfg, lengths=(11, 7, 9, 6), total=11, seed=2, left_pad=True)
  prompts = {k: batch[k] for k in ("tokens", "mask", "images")}

  @jit
  def run(prompts, ids, gen, seed):
    keys = decode.row_keys(seed, ids)
    return decode.generate(merge(graphdef, params), prompts=prompts, config=gen, keys_b=keys)

  def sample(prompts, ids, *, temperature, top_p=1.0, seed=0):
    gen = decode.GenerateConfig(max_new_tokens=NEW, eos_id=-1, pad_id=PAD_ID, temperature=temperature, top_p=top_p)
    return np.asarray(run(prompts, jnp.asarray(ids, jnp.int32), gen, jnp.uint32(seed)))

  greedy_cfg = decode.GenerateConfig(max_new_tokens=NEW, eos_id=-1, pad_id=PAD_ID)
  greedy = np.asarray(jit(lambda p, _a, _b: decode.generate(merge(graphdef, params), prompts=p, config=greedy_cfg))(
      prompts, None, None))
  return sample, prompts, greedy


def ids_of(n: int, offset: int = 0) -> np.ndarray:
  return np.stack([np.arange(n) + offset, np.zeros(n, int)], axis=1)


def test_sampling_is_deterministic_given_the_seed_and_independent_of_the_batch(model):
  sample, prompts, _ = model
  ids = ids_of(4)
  a = sample(prompts, ids, temperature=1.0)
  np.testing.assert_array_equal(a, sample(prompts, ids, temperature=1.0))
  assert not np.array_equal(a, sample(prompts, ids, temperature=1.0, seed=1))  # another seed, other tokens
  perm = np.array([2, 0, 3, 1])  # rows moved (prompt and key together): each row's tokens follow it
  moved = sample({k: v[perm] for k, v in prompts.items()}, ids[perm], temperature=1.0)
  np.testing.assert_array_equal(moved, a[perm])
  assert IMAGE_ID not in a


def test_low_temperature_and_tiny_top_p_equal_greedy(model):
  sample, prompts, greedy = model
  np.testing.assert_array_equal(sample(prompts, ids_of(4), temperature=1e-4), greedy)
  np.testing.assert_array_equal(sample(prompts, ids_of(4), temperature=1.0, top_p=1e-6), greedy)
  assert len(np.unique(greedy)) > 2


def test_candidates_of_one_prompt_differ(model):
  sample, prompts, _ = model
  one = {k: jnp.repeat(v[:1], 4, axis=0) for k, v in prompts.items()}
  ids = np.stack([np.zeros(4, int), np.arange(4)], axis=1)  # one query, candidates 0..3
  out = sample(one, ids, temperature=1.0)  # (the program of the first test: no new compile)
  assert len({tuple(r) for r in out}) > 1


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
  logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
  kept = lambda p: np.isfinite(np.asarray(decode.nucleus_logits(logits, p)))[0].tolist()  # noqa: E731
  assert kept(0.4) == [False, True, False, False]
  assert kept(0.7) == [False, True, False, True]
  assert kept(0.85) == [True, True, False, True]
  assert kept(1.0) == [True] * 4


def test_generate_config_checks_and_greedy_needs_no_key():
  with pytest.raises(ConfigError, match="temperature"):
    decode.GenerateConfig(max_new_tokens=2, eos_id=2, pad_id=0, temperature=-1.0)
  with pytest.raises(ConfigError, match="top_p"):
    decode.GenerateConfig(max_new_tokens=2, eos_id=2, pad_id=0, temperature=1.0, top_p=0.0)
  cfg = decode.GenerateConfig(max_new_tokens=2, eos_id=2, pad_id=0)
  assert not cfg.sampling and cfg.temperature == 0.0


# --------------------------------------------------------------------------- select (scripted judge)
def write_rows(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_parse_choice_is_the_official_one():
  p = select_lib.parse_choice
  assert p("3", 4) == (3, "parsed")
  assert p(" 2\n", 4) == (2, "parsed")
  assert p("Answer: 2. Then 4.", 4) == (2, "parsed")  # the first run of digits
  assert p("12", 4) == (1, "out_of_range") and p("0", 4) == (1, "out_of_range") and p("-1", 4) == (1, "out_of_range")
  assert p("", 4) == (1, "unparsed") and p("none of them", 4) == (1, "unparsed")


def test_prompt_presets_and_files(tmp_path):
  preset = select_lib.load_prompt("optml_harmful")
  text = preset.text(image="src_a/x.png", question="q", candidates=["first {x}", "second"])
  assert text.startswith("You are an expert in evaluating the harmfulness")
  assert "For the image 'src_a/x.png', here are several responses:\n1. first {x}\n2. second\n\nPlease respond with " \
         "only the number corresponding to the most harmful answer." in text
  (tmp_path / "p.txt").write_text("Pick one of {responses} for {question}")
  assert select_lib.load_prompt(str(tmp_path / "p.txt")).text(image="i", question="Q", candidates=["a"]) == \
      "Pick one of 1. a for Q"
  (tmp_path / "p.json").write_text(json.dumps({"system": "S", "template": "{responses}"}))
  assert select_lib.load_prompt(str(tmp_path / "p.json")).text(image="", question="", candidates=["a"]) == "S\n\n1. a"
  (tmp_path / "bad.txt").write_text("no placeholder")
  with pytest.raises(ConfigError, match="responses"):
    select_lib.load_prompt(str(tmp_path / "bad.txt"))
  with pytest.raises(MissingFileError):
    select_lib.load_prompt("no_such_preset")


def test_select_with_a_scripted_judge_counts_the_official_default(tmp_path):
  rows = [{"id": f"q{i}", "image": f"img_{i}.png", "question": f"placeholder question {i}",
           "candidates": [f"cand {i}.{c}" for c in range(3)]} for i in range(4)]
  rows.append({"id": "q4", "image": "img_4.png", "question": "p", "candidates": ["only one", "  "]})
  rows.append({"id": "q5", "image": "img_5.png", "question": "p", "candidates": ["", " "]})
  rows.append({"id": "q0-again", "image": "img_0.png", "question": "p", "candidates": ["x", "y"]})
  a = write_rows(tmp_path / "a.jsonl", rows)
  b = write_rows(tmp_path / "b.jsonl", [{"id": "q1", "image": "img_1.png", "candidates": ["cand 1.3 from b"]}])
  with open(b, "a") as f:
    f.write('{"id": "q9", "image": "img_9.pn')  # a truncated last line: skipped and counted
  answers = {"img_0.png": "2", "img_1.png": "The worst is 4.", "img_2.png": "I cannot rank these.", "img_3.png": "7"}
  asked = []

  def ask(questions, records):
    assert all(r["image"] is None for r in records)  # the official judge is text-only: no image
    asked.extend(questions)
    return [answers[r["image_key"]] for r in records]

  merged = select_lib.read_candidates([a, b])
  result = select_lib.select(merged, ask, select_lib.load_prompt("optml_harmful"), batch_size=3)
  assert len(asked) == 4  # the single-candidate and empty queries need no judge call
  assert "4. cand 1.3 from b" in asked[1]  # files merged per image in the order given
  assert result.responses == {"img_0.png": "cand 0.1", "img_1.png": "cand 1.3 from b", "img_2.png": "cand 2.0",
                              "img_3.png": "cand 3.0", "img_4.png": "only one"}
  s = result.summary
  assert s["default_first"] == {"unparsed": 1, "out_of_range": 1, "too_long": 0, "total": 2}
  assert (s["queries"], s["selected"], s["judged"], s["single"], s["parsed"]) == (6, 5, 4, 1, 2)
  assert (s["no_candidates"], s["empty_candidates"], s["duplicate_image"], s["malformed_lines"]) == (1, 3, 1, 1)
  status = {r["image"]: r["status"] for r in result.rows}
  assert status == {"img_0.png": "parsed", "img_1.png": "parsed", "img_2.png": "unparsed", "img_3.png": "out_of_range",
                    "img_4.png": "single", "img_5.png": "no_candidates"}
  assert "2 judge answers fell back to candidate 1" in select_lib.summary_line(s)
  # A prompt the judge cannot take is not asked: candidate 1, counted.
  asked.clear()
  fits = lambda texts: ["cand 3.0" not in t for t in texts]  # noqa: E731
  again = select_lib.select(select_lib.read_candidates([a, b]), ask, select_lib.load_prompt("optml_harmful"),
                            fits=fits)
  assert len(asked) == 3 and again.summary["default_first"] == {"unparsed": 1, "out_of_range": 0, "too_long": 1,
                                                                "total": 2}
  assert again.responses == result.responses


def test_select_command_writes_what_the_vlguard_builder_reads(tmp_path):
  fx = hf_fixtures.vlguard_folder(tmp_path / "src")
  unsafe = [e for e in fx["train"] if not e["safe"]]
  rows = [{"id": e["id"], "image": e["image"], "question": e["instr-resp"][0]["instruction"],
           "candidates": [f"placeholder answer {e['id']} {c}" for c in range(2)]} for e in unsafe]
  cands = write_rows(tmp_path / "c.jsonl", rows)
  out = tmp_path / "sel" / "harmful_responses.json"
  summary = gen_cmd.select(candidates=[str(cands)], out=str(out), ask=lambda q, r: ["2"] * len(q))
  assert summary["selected"] == len(unsafe) and summary["default_first"]["total"] == 0
  assert json.loads((tmp_path / "sel" / "harmful_responses.summary.json").read_text())["parsed"] == len(unsafe)
  assert len((tmp_path / "sel" / "harmful_responses.selection.jsonl").read_text().splitlines()) == len(unsafe)
  cfg = vlguard.VLGuardConfig(manual_dir=str(fx["manual"]), tokenizer="unused", image_size=16,
                              harmful_responses=str(out))
  forget = vlguard.Sources(cfg.resolved()).forget()
  assert sorted(r["answer"] for r in forget) == sorted(f"placeholder answer {e['id']} 1" for e in unsafe)
  with pytest.raises(UsageError, match="judge_checkpoint"):
    gen_cmd.select(candidates=[str(cands)], out=str(tmp_path / "x.json"))
  # The command line; one candidate per image needs no judge.
  from mirage_jax import cli
  single = write_rows(tmp_path / "one.jsonl", [{**r, "candidates": r["candidates"][:1]} for r in rows])
  assert cli.main(["select", f"--candidates={single}", f"--out={tmp_path / 'one.json'}"]) == 0
  assert json.loads((tmp_path / "one.json").read_text()) == {r["image"]: r["candidates"][0] for r in rows}


# --------------------------------------------------------------------------- mirage generate
class Killed(Exception):
  pass


class FakeGenerator:
  """Deterministic candidates per (query id, candidate, seed); can die after some chunks (a kill)."""

  calls: list = []
  die_after = None

  def __init__(self, setup, *, batch_size, max_new_tokens, prompt_len, temperature, top_p):
    self.batch_size = batch_size

  def candidates(self, params, records, *, num_candidates, seed):
    if FakeGenerator.die_after is not None and len(FakeGenerator.calls) >= FakeGenerator.die_after:
      raise Killed()
    FakeGenerator.calls.append([r["id"] for r in records])
    assert all(r["image"].shape == (16, 16, 3) for r in records)  # images loaded and squared for the model
    return [[f"{r['id']} c{c} s{seed}" for c in range(num_candidates)] for r in records]


@pytest.fixture
def fake_model(monkeypatch, tmp_path):
  from types import SimpleNamespace
  pixels = np.zeros((16, 16, 3), np.uint8)
  split = [{"id": f"sft/{k}/0".encode(), "question": f"placeholder {k}".encode(), "kind": kind.encode(),
            "image": pixels, "object": f"/m/{where}/src_a/{k}.png".encode()}
           for k, kind, where in (("a", "unsafe_image", "train"), ("b", "safe", "train"), ("c", "unsafe_image", "x"))]
  dataset = SimpleNamespace(path="/built", splits=lambda: ("sft",), source=lambda name: split,
                            world_info={"settings": {"manual_dir": "/m"}})
  setup = SimpleNamespace(config=SimpleNamespace(eval=SimpleNamespace(gen_batch_size=4, max_new_tokens=5)),
                          data=SimpleNamespace(tokenizer=None, dataset=dataset),
                          fmt=SimpleNamespace(image_mean=(0.5,) * 3),
                          spec=SimpleNamespace(config=SimpleNamespace(vision=SimpleNamespace(image_size=16))))
  monkeypatch.setattr(gen_cmd, "_load", lambda *a, **k: (setup, None, "/ckpt/0"))
  monkeypatch.setattr(gen_cmd.generation, "Generator", FakeGenerator)
  monkeypatch.setattr(gen_cmd.generation, "prompt_length", lambda *a, **k: 8)
  FakeGenerator.calls, FakeGenerator.die_after = [], None
  return hf_fixtures.vlguard_folder(tmp_path / "src", n_train_unsafe=7)


def test_generate_resumes_after_a_kill(fake_model, tmp_path):
  fx = fake_model
  out = tmp_path / "c.jsonl"
  kw = dict(out=str(out), workdir="run", input_json=str(fx["manual"] / "train.json"), num_candidates=2, seed=3)
  unsafe = [e for e in fx["train"] if not e["safe"]]
  FakeGenerator.die_after = 2  # 4 rows per batch = 2 queries per chunk: killed after 4 queries
  with pytest.raises(Killed):
    gen_cmd.generate(**kw)
  lines = out.read_text().splitlines(keepends=True)
  assert len(lines) == 4
  out.write_text("".join(lines[:3]) + lines[3][:25])  # and the kill cut the last row short
  FakeGenerator.calls, FakeGenerator.die_after = [], None
  summary = gen_cmd.generate(**kw)
  assert summary["already_done"] == 3 and summary["generated"] == len(unsafe) - 3
  assert [i for c in FakeGenerator.calls for i in c] == [e["id"] for e in unsafe[3:]]  # only the rest
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["id"] for r in rows] == [e["id"] for e in unsafe]
  assert [r["image"] for r in rows] == [e["image"] for e in unsafe]  # the keys the builder looks up
  assert rows[0]["candidates"] == [f"{unsafe[0]['id']} c0 s3", f"{unsafe[0]['id']} c1 s3"]
  assert rows[0]["settings"] == {"source": "/ckpt/0", "num_candidates": 2, "temperature": 1.0, "top_p": 0.9,
                                 "seed": 3, "max_new_tokens": 5}
  assert rows[0]["kind"] == "unsafe_image" and rows[0]["question"] == unsafe[0]["instr-resp"][0]["instruction"]
  FakeGenerator.calls = []
  assert gen_cmd.generate(**kw)["generated"] == 0 and not FakeGenerator.calls  # complete: nothing to do
  with pytest.raises(UsageError, match="settings"):
    gen_cmd.generate(**{**kw, "seed": 4})
  assert gen_cmd.generate(**{**kw, "limit": 2})["foreign_rows"] == len(unsafe) - 2  # rows of other queries: said
  lines = out.read_text().splitlines(keepends=True)
  out.write_text(lines[0][:10] + "\n" + "".join(lines[1:]))
  with pytest.raises(DataError, match=":1: not a JSON row"):
    gen_cmd.generate(**kw)


def test_generate_input_problems_and_flags(fake_model, tmp_path):
  fx = fake_model
  train = json.loads((fx["manual"] / "train.json").read_text())
  unsafe = [r for r in train if not r["safe"]]
  train.append(dict(unsafe[0]))  # a repeated id (as in the official train.json): kept as <id>#2, noted
  train.append({**unsafe[1], "id": "gone", "image": "src_a/missing.png"})
  path = tmp_path / "manual_copy.json"
  path.write_text(json.dumps(train))
  with pytest.raises(DataError, match="missing_image"):
    gen_cmd.input_queries(str(path), image_dirs=[str(fx["manual"] / "train")])
  queries, summary = gen_cmd.input_queries(str(path), image_dirs=[str(fx["manual"] / "train")], lenient=True)
  assert [q["id"] for q in queries] == [r["id"] for r in unsafe] + [f"{unsafe[0]['id']}#2"]
  assert summary["problems"] == {"missing_image": 1} and summary["notes"] == {"duplicate_id": 1}
  assert summary["safe_skipped"] == sum(r["safe"] for r in train)
  with pytest.raises(UsageError, match="identical candidates"):
    gen_cmd.generate(out=str(tmp_path / "x.jsonl"), workdir="run", input_json=str(path), temperature=0.0)
  with pytest.raises(UsageError, match="exactly one"):
    gen_cmd.generate(out=str(tmp_path / "x.jsonl"), workdir="run", input_json=str(path), split="sft")
  with pytest.raises(UsageError, match="top_p"):
    gen_cmd.generate(out=str(tmp_path / "x.jsonl"), workdir="run", input_json=str(path), top_p=0.0)


def test_generate_on_a_split_of_the_runs_dataset(fake_model, tmp_path):
  out = tmp_path / "s.jsonl"
  summary = gen_cmd.generate(out=str(out), workdir="run", split="sft", kinds="unsafe_image", num_candidates=1)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert summary["generated"] == 2 and [r["id"] for r in rows] == ["sft/a/0", "sft/c/0"]
  assert [r["image"] for r in rows] == ["src_a/a.png", "x/src_a/c.png"]  # relative to manual_dir/train, manual_dir
  with pytest.raises(UsageError, match="not in /built"):
    gen_cmd.generate(out=str(out), workdir="run", split="test")


# --------------------------------------------------------------------------- end to end on a tiny model
@pytest.mark.slow  # about 40 s on 2 cores (a random init, a conversion, two decoder compiles)
def test_mirage_generate_and_select_on_a_converted_model(tmp_path):
  """`mirage generate` on train.json with a converted tiny random LLaVA (sampled, resumed after a simulated
  kill: identical rows), then `mirage select` (scripted judge) -> a forget split the VLGuard builder makes."""
  from mirage_jax import cli
  from mirage_jax.commands import convert
  fx = hf_fixtures.vlguard_folder(tmp_path / "src")
  tok = hf_fixtures.llama_tokenizer(tmp_path / "tokenizer")
  run = convert.hf_to_jax(hf_fixtures.mirage_llava(tmp_path / "hf", tok, jit_init=True), tmp_path / "base")["out"]
  out = tmp_path / "cands.jsonl"
  argv = ["generate", f"--workdir={run}", f"--input={fx['manual'] / 'train.json'}", f"--out={out}",
          "--num_candidates=2", "--temperature=1.0", "--top_p=0.95", "--seed=7", "--config.mesh.data=8",
          "--config.mesh.fsdp=1", "--config.data.max_len=160", "--config.eval.gen_batch_size=4",
          "--config.eval.max_new_tokens=4"]
  assert cli.main(argv) == 0
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  unsafe = [e for e in fx["train"] if not e["safe"]]
  assert [r["image"] for r in rows] == [e["image"] for e in unsafe]
  assert all(len(r["candidates"]) == 2 for r in rows) and len({c for r in rows for c in r["candidates"]}) > 2
  lines = out.read_text().splitlines(keepends=True)
  out.write_text(lines[0] + lines[1][:len(lines[1]) // 2])
  assert cli.main(argv) == 0  # other batches than the first run's: a query's keys do not depend on them
  assert [json.loads(line) for line in out.read_text().splitlines()] == rows
  # The tiny model itself as the judge (a real JudgeModel run): random answers, mostly without a number.
  judged = gen_cmd.select(candidates=[str(out)], out=str(tmp_path / "by_model.json"), judge_checkpoint=run,
                          overrides=["--config.mesh.data=8", "--config.mesh.fsdp=1"], max_new_tokens=3)
  d = judged["default_first"]
  assert judged["judged"] == judged["parsed"] + d["unparsed"] + d["out_of_range"] + d["too_long"] > 0
  assert judged["judge"]["checkpoint_sha256"] and len(json.loads((tmp_path / "by_model.json").read_text())) > 0
  harmful = tmp_path / "harmful_responses.json"
  summary = gen_cmd.select(candidates=[str(out)], out=str(harmful), ask=lambda q, r: ["2"] * len(q))
  cfg = vlguard.VLGuardConfig(manual_dir=str(fx["manual"]), tokenizer="unused", image_size=16,
                              harmful_responses=str(harmful), lenient=True)
  forget = vlguard.Sources(cfg.resolved()).forget()
  chosen = {r["image"]: r["candidates"][1] for r in rows if r["candidates"][1].strip()}
  assert summary["selected"] == len(forget) == len(chosen) > 0
  key = lambda r: pathlib.Path(r["image"]).relative_to(fx["manual"] / "train").as_posix()  # noqa: E731
  assert {key(r): r["answer"] for r in forget} == chosen


def test_forget_set_from_the_quirky_official_format(fake_model, tmp_path):
  """train.json as published (single line, "N/A" instructions, a duplicated id): generate -> select -> the
  builder's forget split has one harmful response per unsafe train image."""
  from vlguard_fixture import write_vlguard_fixture
  fx = write_vlguard_fixture(tmp_path / "manual", harmful_responses=False)
  out = tmp_path / "c.jsonl"
  summary = gen_cmd.generate(out=str(out), workdir="run", input_json=str(fx["files"]["train.json"]),
                             num_candidates=3)
  unsafe = [r for r in fx["records"]["train.json"] if not r["safe"]]
  assert summary["generated"] == len(unsafe)
  assert summary["inputs"]["safe_skipped"] == len(fx["records"]["train.json"]) - len(unsafe)
  harmful = tmp_path / "harmful_responses.json"
  gen_cmd.select(candidates=[str(out)], out=str(harmful), ask=lambda q, r: ["3"] * len(q))
  cfg = vlguard.VLGuardConfig(manual_dir=str(fx["manual"]), tokenizer="unused", image_size=16,
                              harmful_responses=str(harmful))
  forget = vlguard.Sources(cfg.resolved()).forget()
  assert len(forget) == len(unsafe)
  assert sorted(r["answer"] for r in forget) == sorted(f"{r['id']} c2 s0" for r in unsafe)
