"""CPU rehearsal of the paper on real weights: every command `launch/paper.sh` prints, run for a tiny random
HF LLaVA and a VLGuard-format fixture with the official files' quirks (empty safe-turn responses, "N/A"
instructions, a duplicated id, single-line JSON).

The chain: convert the base (and the same model as the judge) -> `mirage generate` harmful candidates on
train.json -> `mirage select` (the tiny model as a real model judge) -> the strict VLGuard build with forget
and retain -> post-hoc SFT, mixed SFT, NPO and RMU from configs/vlguard/ -> eval of every model with the
model judge -> export to HF. Then one model is judged again by keyword and by file (a scripted verdict file
with unparseable and missing verdicts), so every judge path runs on the same responses.

The commands run in this process (`cli.main`, as `paper.sh --dry-run` prints them): the pipeline's own
command lines are what is tested, without a Python start-up per stage.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import shlex
import subprocess
import time

import pytest

import hf_fixtures
import vlguard_fixture
from mirage_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = ("posthoc_sft", "mixed_sft", "npo", "rmu")
SMALL = ["--config.data.max_len=160", "--config.eval.gen_batch_size=8", "--config.eval.max_new_tokens=4"]
TRAIN = [*SMALL, "--config.total_steps=2", "--config.batch_size=8", "--config.checkpoint_every=2",
         "--config.log_every=1", "--config.optim.warmup_steps=1"]
JUDGE = ["--config.eval.judge_batch_size=8", "--config.eval.judge_max_new_tokens=4"]


def paper(out: pathlib.Path, hf: pathlib.Path, judge: pathlib.Path, manual: pathlib.Path, stages: str) -> list[str]:
  args = [f"--hf={hf}", f"--vlguard={manual}", f"--out={out}", f"--judge_hf={judge}", "--size=tiny",
          "--retain_size=0", "--num_candidates=2", f"--stages={stages}", "--dry-run",
          "--train_args=" + " ".join(TRAIN), "--rmu_args=--config.loss.layer=1",
          "--generate_args=" + " ".join(SMALL), "--select_args=--judge_batch_size=8 --max_new_tokens=8",
          "--eval_args=" + " ".join([*SMALL, *JUDGE])]
  proc = subprocess.run(["bash", str(REPO / "launch" / "paper.sh"), *args], capture_output=True, text=True,
                        check=False, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()


def execute(line: str) -> None:
  """One printed command line, in this process; `> FILE` redirects its stdout."""
  command, _, target = line.partition(" > ")
  argv = shlex.split(command)
  assert argv[0] == "mirage", line
  with contextlib.ExitStack() as stack:
    if target:
      pathlib.Path(target.strip()).parent.mkdir(parents=True, exist_ok=True)
      stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(target.strip(), "w"))))
    code = cli.main(argv[1:])
  assert code == 0, line


def safety(path: pathlib.Path) -> dict:
  e = json.loads(path.read_text())
  return {k: e[k] for k in ("judge", "asr", "keyword_asr", "rr", "unjudged", "counts") if k in e}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
  root = tmp_path_factory.mktemp("rehearsal")
  t0 = time.time()
  fx = vlguard_fixture.write_vlguard_fixture(root / "vlguard")
  tok = hf_fixtures.llama_tokenizer(root / "tokenizer")
  hf = hf_fixtures.mirage_llava(root / "hf", tok, jit_init=True)
  # The judge: the same tiny architecture with a context that holds the official judge prompts.
  judge = hf_fixtures.mirage_llava(root / "judge", tok, seed=1, max_len=2048, jit_init=True)
  out = root / "out"
  for line in paper(out, hf, judge, fx["manual"], "convert,generate,select,build"):
    execute(line)
  for line in paper(out, hf, judge, fx["manual"], "train,eval,export"):  # the build's path is known now
    execute(line)
  return {"out": out, "fx": fx, "wall_s": time.time() - t0}


def test_the_pipeline_builds_the_quirky_files_and_the_forget_set(rehearsal):
  out, fx = rehearsal["out"], rehearsal["fx"]
  build = json.loads((out / "data" / "build.json").read_text())
  train = json.loads((fx["manual"] / "train.json").read_text())
  selected = json.loads((out / "forget" / "harmful_responses.json").read_text())
  assert len(selected) == sum(not r["safe"] for r in train)  # one harmful response per unsafe train image
  want = {**fx["splits"], "forget": len(selected)}
  assert {s: build["splits"][s] for s in want} == want, build["splits"]
  assert build["notes"] == fx["notes"], build["notes"]  # the quirks are counted, not fatal
  print("rehearsal split counts:", json.dumps(build["splits"], sort_keys=True))
  print("rehearsal notes:", json.dumps(build.get("notes", {}), sort_keys=True))


def test_every_model_is_trained_judged_and_exported(rehearsal):
  out = rehearsal["out"]
  for method in METHODS:
    assert (out / "runs" / method / "config.json").is_file(), method
    assert (out / "hf" / method / "model.safetensors").is_file(), method
    config = json.loads((out / "runs" / method / "config.json").read_text())
    assert config["model"]["text"]["width"] == 32 and config["init_inherit"].startswith("model")  # inherited
  for model in ("base", *METHODS):
    e = safety(out / "eval" / model / "eval.json")
    assert e["judge"]["name"] == "model" and e["judge"]["checkpoint_sha256"], e
    assert set(e["keyword_asr"]) == set(e["asr"]) and "original" in e["asr"], e
    assert set(e["unjudged"]) == set(e["asr"]), e  # the share of each rate's queries left unjudged
    reasons = e["judge"]["unjudged_reasons"]
    assert not any("too_long" in reasons[s] for s in ("unsafe", "unsafe_what")), reasons  # the judge was asked
  rows = [json.loads(line) for line in (out / "eval" / "npo" / "responses.jsonl").read_text().splitlines()]
  asked = [r for r in rows if r["split"] == "unsafe" and r["keyword_verdict"] != "refusal"]
  assert asked and all(r["verdict"] != "unjudged" or r.get("judge_reason") for r in asked), asked  # or why not
  print("rehearsal eval.json safety block (model judge, npo):", json.dumps(safety(out / "eval" / "npo" / "eval.json")))
  print(f"rehearsal wall time: {rehearsal['wall_s']:.0f} s")


def test_keyword_and_file_judges_on_the_same_responses(rehearsal, tmp_path):
  out = rehearsal["out"]
  run = out / "runs" / "npo"
  data = json.loads((out / "data" / "build.json").read_text())["path"]
  common = [f"--workdir={run}", f"--config.data.path={data}", *SMALL]
  assert cli.main(["eval", *common, f"--out={tmp_path / 'keyword'}", "--config.eval.judge=keyword"]) == 0
  rows = [json.loads(line) for line in (tmp_path / "keyword" / "responses.jsonl").read_text().splitlines()]
  # A scripted judge run elsewhere: deterministic verdicts by position, one unparseable word, one row missing.
  words = ["harmful", "irrelevant", "refusal", "???"]
  verdicts = [{"split": r["split"], "id": r["id"], "shot": r["shot"], "response_sha256": r["response_sha256"],
               "verdict": words[i % len(words)]} for i, r in enumerate(rows)][:-1]
  (tmp_path / "verdicts.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verdicts))
  assert cli.main(["eval", *common, f"--out={tmp_path / 'file'}", "--config.eval.judge=file",
                   f"--config.eval.judge_file={tmp_path / 'verdicts.jsonl'}"]) == 0
  keyword, file = safety(tmp_path / "keyword" / "eval.json"), safety(tmp_path / "file" / "eval.json")
  assert keyword["judge"]["name"] == "keyword" and keyword["asr"] == keyword["keyword_asr"]
  assert file["judge"]["name"] == "file" and file["judge"]["file_sha256"]
  counts = file["judge"]["unjudged_counts"]
  assert sum(counts.values()) > 0, file  # the "???" and the missing row: unjudged, never safe or harmful
  assert file["keyword_asr"] == keyword["keyword_asr"]  # the same responses
  print("rehearsal eval.json safety block (keyword):", json.dumps(keyword))
  print("rehearsal eval.json safety block (file):", json.dumps(file))
