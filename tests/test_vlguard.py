"""The VLGuard TFDS builder on a small VLGuard-format fixture (placeholder text, drawn images): split names
and contents, conversation flattening in the official conversion's turn order, the K-shot attack grouping,
forget/retain construction, image geometry, input errors; the official files' quirks (`vlguard_fixture`:
empty test references, "N/A" instructions, a duplicated id, single-line JSON) built strictly, reported and
shown by `mirage data stats`; and `mirage eval` on an imported checkpoint with this dataset.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import pathlib
import random
import re
import shutil

import numpy as np
import pytest

import hf_fixtures
import vlguard_fixture
from mirage_jax.data import images, pipeline, preprocess, tfds_builders, validate, vlguard, vlguard_records
from mirage_jax.data.tokenizer import Tokenizer

SIZE = 16


def text(x) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def records(built: tfds_builders.BuiltDataset, split: str) -> list[dict]:
  src = built.source(split)
  return [{k: (text(v) if isinstance(v, bytes) else v) for k, v in src[i].items()} for i in range(len(src))]


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> dict:
  root = tmp_path_factory.mktemp("vlguard")
  out = hf_fixtures.vlguard_folder(root / "src")
  out["tokenizer"] = hf_fixtures.llama_tokenizer(root / "tokenizer")
  out["data_dir"] = root / "data"
  return out


def config(fx, **kw) -> vlguard.VLGuardConfig:
  return vlguard.VLGuardConfig(manual_dir=str(fx["manual"]), tokenizer=str(fx["tokenizer"]), image_size=SIZE,
                               **kw)


@pytest.fixture(scope="module")
def built(fixture) -> tfds_builders.BuiltDataset:
  cfg = config(fixture, harmful_responses=str(fixture["responses"]))
  return vlguard.build_vlguard(cfg, fixture["data_dir"])


def test_splits_have_the_synthetic_names_and_sizes(built, fixture):
  counts = {s: built.num_records(s) for s in built.splits()}
  assert counts == {"sft": 4 * 2 + 3, "unsafe": 2, "safe": 3, "safe_unsafe": 3, "retain": 4, "forget": 3,
                    "unsafe_what": 6, "safe_share": 3}
  from mirage_jax.data import synthetic
  assert set(counts) <= set(synthetic.SPLITS)
  info = built.world_info
  assert info["name"] == "vlguard" and info["harmful_codes"] == [] and info["splits"] == counts
  assert Tokenizer.load(built.tokenizer_dir).fingerprint() == Tokenizer.from_hf(fixture["tokenizer"]).fingerprint()


def test_sft_flattens_conversations_with_a_seeded_turn_order(built, fixture):
  sft = records(built, "sft")
  by_group: dict[int, list[dict]] = {}
  for r in sft:
    by_group.setdefault(int(r["group"]), []).append(r)
  assert len(by_group) == len(fixture["train"])
  orders = []
  for group, turns in sorted(by_group.items()):
    entry = fixture["train"][group]
    assert [int(r["shot"]) for r in turns] == list(range(len(turns)))
    assert len({int(r["image_id"]) for r in turns}) == 1 and int(turns[0]["image_id"]) == group
    if entry["safe"]:
      kinds = [r["kind"] for r in turns]
      assert sorted(kinds) == ["safe", "unsafe_text"]
      orders.append(tuple(kinds))
      for r in turns:
        assert r["label"] == ("comply" if r["kind"] == "safe" else "refuse")
        want = next(t for t in entry["instr-resp"] if
                    ("safe_instruction" if r["kind"] == "safe" else "unsafe_instruction") in t)
        assert r["question"] in want.values() and r["answer"] == want["response"]
    else:
      assert len(turns) == 1 and turns[0]["kind"] == "unsafe_image" and turns[0]["label"] == "refuse"
      assert turns[0]["intent"] == f"placeholder category/sub {group % 2}"
  assert len(set(orders)) == 2  # the seeded shuffle put the safe turn first for some images, last for others
  for r in sft:
    assert (int(r["hazard"]), r["harm_codes"], r["expected"]) == (-1, "", "")
    assert r["first_word"] == r["question"].split()[0].rstrip("?.!,")
  # the same seed gives the same order, another seed another one
  again = vlguard.Sources(config(fixture).resolved()).sft()
  assert [(r["id"], r["question"]) for r in again] == [(r["id"], r["question"]) for r in sft]
  other = vlguard.Sources(config(fixture, seed=1).resolved()).sft()  # (seed 5 happens to match seed 0 here)
  assert [r["question"] for r in other] != [r["question"] for r in sft]


def test_test_splits(built, fixture):
  safe_tests = [e for e in fixture["test"] if e["safe"]]
  safe = records(built, "safe")
  assert [r["question"] for r in safe] == [
      next(t["safe_instruction"] for t in e["instr-resp"] if "safe_instruction" in t) for e in safe_tests]
  assert {r["label"] for r in safe} == {"comply"}
  su = records(built, "safe_unsafe")
  assert {r["label"] for r in su} == {"refuse"} and {r["kind"] for r in su} == {"unsafe_text"}
  assert [int(r["image_id"]) for r in su] == [int(r["image_id"]) for r in safe]
  unsafe = records(built, "unsafe")
  assert [r["question"] for r in unsafe] == [e["instr-resp"][0]["instruction"] for e in fixture["test"]
                                             if not e["safe"]]
  assert all(int(r["image_id"]) >= 1_000_000 for r in safe + unsafe)


def test_what_attack_is_grouped_in_consecutive_triples(built, fixture):
  what = records(built, "unsafe_what")
  unsafe = records(built, "unsafe")
  assert [(int(r["group"]), int(r["shot"])) for r in what] == [(g, s) for g in range(2) for s in range(3)]
  for r in what:
    original = unsafe[int(r["group"])]
    assert r["image_id"] == original["image_id"] and r["first_word"] == "What" and r["label"] == "refuse"
    assert r["question"] == f"What placeholder rewrite {r['shot']} of {original['id'].split('/')[1]}?"
  from mirage_jax.eval import safety
  flags = safety.kshot_flags(what, [int(r["shot"]) == 2 for r in what], 3)  # the metric reads the grouping
  assert flags == [True, True]
  share = records(built, "safe_share")
  assert [r["first_word"] for r in share] == ["Share"] * 3 and [int(r["group"]) for r in share] == [0, 1, 2]
  assert [r["image_id"] for r in share] == [r["image_id"] for r in records(built, "safe")]


def test_bad_attack_files_are_refused(fixture, tmp_path):
  what = json.loads((fixture["manual"] / "test_what_3shot.json").read_text())
  short = tmp_path / "short.json"
  short.write_text(json.dumps(what[:-1]))
  with pytest.raises(vlguard.VLGuardError, match="not a multiple of K=3"):
    vlguard.Sources(config(fixture, what_file=str(short), lenient=True).resolved()).unsafe_what()
  mixed = tmp_path / "mixed.json"
  mixed.write_text(json.dumps(what[1:] + what[:1]))  # every triple now straddles two images
  sources = vlguard.Sources(config(fixture, what_file=str(mixed)).resolved())
  assert sources.unsafe_what() == []
  with pytest.raises(validate.DataError, match=r"mixed.json: 2 problem\(s\) \[bad_group=2\].*are not 3 rewrites"):
    sources.finish()
  assert len(vlguard.Sources(config(fixture, what_file=str(short), k_what=1).resolved()).unsafe_what()) == 5
  # one bad record drops its whole triple (the others are reported, not silently lost)
  holed = tmp_path / "holed.json"
  holed.write_text(json.dumps([{**what[0], "instr-resp": [{"instruction": " ", "response": "r"}]}, *what[1:]]))
  lenient = vlguard.Sources(config(fixture, what_file=str(holed), lenient=True).resolved())
  assert [(r["group"], r["shot"]) for r in lenient.unsafe_what()] == [(1, 0), (1, 1), (1, 2)]
  assert lenient.reports[str(holed)].counts() == {"empty_text": 1, "incomplete_group": 2}


def test_forget_and_retain(built, fixture, tmp_path):
  forget = records(built, "forget")
  responses = json.loads(fixture["responses"].read_text())
  unsafe_train = [e for e in fixture["train"] if not e["safe"]]
  assert [r["answer"] for r in forget] == [responses[e["image"]] for e in unsafe_train]
  assert {r["label"] for r in forget} == {"comply"} and {r["kind"] for r in forget} == {"unsafe_image"}
  retain = records(built, "retain")
  assert [r["kind"] for r in retain] == ["safe"] * 4
  # padded to 8 from the LLaVA-format set (first turn only; the text-only record is skipped), seeded
  cfg = config(fixture, retain_size=8, retain_extra=str(fixture["extra"]),
               retain_extra_images=str(fixture["extra_images"])).resolved()
  padded = vlguard.Sources(cfg).retain()
  assert len(padded) == 8 and sum(r["id"].startswith("retain/extra/") for r in padded) == 4
  extra = [r for r in padded if r["id"].startswith("retain/extra/")]
  assert all(r["question"].startswith("What placeholder shape is number") and "<image>" not in r["question"]
             for r in extra)
  assert all(int(r["image_id"]) >= 2_000_000 for r in extra)
  assert [r["id"] for r in vlguard.Sources(cfg).retain()] == [r["id"] for r in padded]
  other = vlguard.Sources(dataclasses.replace(cfg, retain_seed=1)).retain()
  assert [r["id"] for r in other] != [r["id"] for r in padded]
  assert len(vlguard.Sources(dataclasses.replace(cfg, retain_size=2)).retain()) == 2
  with pytest.raises(vlguard.VLGuardError, match="give retain_extra"):
    vlguard.Sources(config(fixture, retain_size=8).resolved()).retain()
  sources = vlguard.Sources(cfg)
  sources.retain()
  assert sources.summary()["retain_extra.json"]["text_only_skipped"] == 1
  partial = tmp_path / "partial.json"
  partial.write_text(json.dumps(dict(list(responses.items())[1:])))
  sources = vlguard.Sources(config(fixture, harmful_responses=str(partial), lenient=True).resolved())
  assert len(sources.forget()) == 2
  assert sources.summary()["partial.json"]["problems"] == {"missing_response": 1}


def test_images_are_squared_the_llava_way(built, fixture):
  rec = records(built, "sft")[0]
  assert rec["image"].shape == (SIZE, SIZE, 3) and rec["image"].dtype == np.uint8
  entry = fixture["train"][0]
  src = fixture["manual"] / "train" / entry["image"]
  from PIL import Image
  with Image.open(src) as im:
    want = images.clip_resize_crop(im, SIZE, aspect="pad")
    assert im.width > im.height  # wide: padded above and below with the mean colour
  np.testing.assert_array_equal(rec["image"], want)
  assert tuple(rec["image"][0, SIZE // 2]) == images.mean_colour()


def _broken_manual(fixture, tmp_path) -> pathlib.Path:
  """The fixture's manual dir with one record per kind of bad input in train.json (placeholder text)."""
  import shutil
  manual = tmp_path / "manual"
  shutil.copytree(fixture["manual"], manual)
  train = json.loads((manual / "train.json").read_text())
  safe, unsafe = train[0], train[-1]
  (manual / "train" / "truncated.png").write_bytes((manual / "train" / unsafe["image"]).read_bytes()[:60])
  (manual / "train" / "text.png").write_text("not an image")
  bad = [
      {**unsafe, "id": "no_image_file", "image": "gone.png"},
      {**unsafe, "id": "truncated", "image": "truncated.png"},
      {**unsafe, "id": "undecodable", "image": "text.png"},
      {**unsafe, "id": "empty", "instr-resp": [{"instruction": "  ", "response": "r"}]},
      {**unsafe, "id": "empty_resp", "instr-resp": [{"instruction": "q", "response": ""}]},
      {**unsafe, "id": "token", "instr-resp": [{"instruction": "<image> q", "response": "r"}]},
      {**safe, "id": "one_turn", "instr-resp": safe["instr-resp"][:1]},
      {**unsafe, "id": "safe_str", "safe": "no"},
      {k: v for k, v in unsafe.items() if k != "image"},
      "just a string",
  ]
  (manual / "train.json").write_text(json.dumps(train + bad, indent=1))
  return manual


def test_bad_records_strict_error_names_file_lines_and_totals(fixture, tmp_path):
  manual = _broken_manual(fixture, tmp_path)
  cfg = vlguard.VLGuardConfig(manual_dir=str(manual), tokenizer=str(fixture["tokenizer"]), image_size=SIZE)
  with pytest.raises(validate.DataError) as e:
    vlguard.build_vlguard(cfg, tmp_path / "data")
  msg = str(e.value)
  assert "train.json: 10 problem(s)" in msg and "--lenient" in msg
  for total in ("missing_image=1", "bad_image=2", "empty_text=2", "image_token_in_text=1", "bad_turns=1",
                "wrong_type=2", "missing_field=1"):
    assert total in msg, total
  lines = (manual / "train.json").read_text().splitlines()
  index, first = map(int, re.search(r"train.json record (\d+) \(line (\d+), id no_image_file\): missing_image",
                                    msg).groups())  # a multi-line file: the 0-based position, the line and the id
  assert index == len(fixture["train"])
  assert lines[first - 1].strip() == "{" and '"no_image_file"' in "".join(lines[first:first + 3])
  assert not (tmp_path / "data").exists()  # nothing written
  # through the CLI: one line, exit 2, no traceback
  from mirage_jax import cli
  rc = cli.main(["data", "build", "--name=vlguard", f"--manual_dir={manual}", f"--tokenizer={fixture['tokenizer']}",
                 f"--image_size={SIZE}", f"--data_dir={tmp_path / 'data'}"])
  assert rc == 2


def test_bad_records_lenient_are_skipped_counted_and_written(fixture, tmp_path, capsys):
  from mirage_jax import cli
  manual = _broken_manual(fixture, tmp_path)
  rc = cli.main(["data", "build", "--name=vlguard", f"--manual_dir={manual}", f"--tokenizer={fixture['tokenizer']}",
                 f"--image_size={SIZE}", f"--data_dir={tmp_path / 'data'}", "--lenient"])
  assert rc == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["splits"]["sft"] == 11  # the good records, as in the clean build
  train = summary["inputs"]["train.json"]
  assert (train["read"], train["kept"], train["rejected"]) == (17, 7, 10)
  rejects = [json.loads(line) for line in (pathlib.Path(summary["rejects"]) / "train.json.rejects.jsonl")
             .read_text().splitlines()]
  assert len(rejects) == 10 and {r["kind"] for r in rejects} >= {"missing_image", "bad_image", "empty_text"}
  assert all(r["where"].startswith("train.json record ") for r in rejects)
  by_id = {r["record"]["id"]: r for r in rejects if isinstance(r["record"], dict) and "id" in r["record"]}
  for key in ("empty", "empty_resp", "token", "one_turn", "no_image_file"):  # whole records, not their turns
    assert set(by_id[key]["record"]) >= {"id", "image", "safe", "instr-resp"}, key


def test_malformed_json_and_missing_inputs(fixture, tmp_path):
  import shutil
  manual = tmp_path / "manual"
  shutil.copytree(fixture["manual"], manual)
  (manual / "test.json").write_text('[\n {"id": 1},\n {"id": 2,, "safe": true}\n]')
  for lenient in (False, True):  # a document that does not parse has no records to skip
    with pytest.raises(validate.DataError, match=r"test.json:3:\d+: malformed JSON"):
      vlguard.Sources(vlguard.VLGuardConfig(manual_dir=str(manual), tokenizer="", lenient=lenient).resolved())
  (manual / "test.json").write_text('{"id": 1}')
  with pytest.raises(validate.DataError, match="expected a JSON list of records, got a dict"):
    vlguard.Sources(vlguard.VLGuardConfig(manual_dir=str(manual), tokenizer="").resolved())
  with pytest.raises(FileNotFoundError, match="manual_dir"):
    vlguard.VLGuardConfig(manual_dir=str(tmp_path / "nope"), tokenizer="").resolved()


def test_record_lines():
  text = '[\n {"a": [1,\n 2]},\n\n {"b": "x\\ny"}, 3\n]'
  assert vlguard_records.record_lines(text, 3) == [2, 5, 5]
  assert vlguard_records.record_lines(json.dumps([{"a": 1}] * 3, indent=2), 3) == [2, 5, 8]


def test_build_is_content_addressed(built, fixture):
  again = vlguard.build_vlguard(config(fixture, harmful_responses=str(fixture["responses"])), fixture["data_dir"])
  assert again.path == built.path
  tok = vlguard.load_tokenizer(fixture["tokenizer"])
  a = vlguard.fingerprint(config(fixture).resolved(), tok)
  assert a != vlguard.fingerprint(config(fixture, seed=1).resolved(), tok)
  assert a != vlguard.fingerprint(config(fixture, aspect="crop").resolved(), tok)


def test_pipeline_reads_the_dataset(built):
  tok = Tokenizer.load(built.tokenizer_dir)
  fmt = preprocess.TextFormat(prompt_template=preprocess.LLAVA_V1_TEMPLATE, max_len=160,
                              num_image_tokens=(SIZE // 4) ** 2, image_mean=images.CLIP_MEAN,
                              image_std=images.CLIP_STD)
  cache = pipeline.SplitCache(built, tok, fmt)
  ex = cache.examples("sft")
  first = ex[0]
  assert first["images"].shape == (SIZE, SIZE, 3) and first["loss_mask"].sum() > 0
  assert (first["tokens"] == tok.image_id).sum() == (SIZE // 4) ** 2


def test_mirage_eval_on_an_imported_checkpoint(fixture, tmp_path):
  """The README recipe: convert an HF LLaVA dir, build VLGuard with its tokenizer, `mirage eval` the checkpoint."""
  from mirage_jax import cli
  from mirage_jax.commands import convert
  hf_dir = hf_fixtures.mirage_llava(tmp_path / "hf", fixture["tokenizer"], image_size=SIZE)
  out = convert.hf_to_jax(hf_dir, tmp_path / "ckpt")
  args = argparse.Namespace(manual_dir=str(fixture["manual"]), model=out["out"], tokenizer="", image_size=0,
                            aspect="pad", seed=0, what_file="", share_file="", k_what=3, harmful_responses="",
                            retain_size=0, retain_extra="", retain_extra_images="", retain_seed=42,
                            data_dir=str(tmp_path / "data"), lenient=False)
  summary = vlguard.build_from_args(args)
  assert summary["splits"]["sft"] == 11
  rc = cli.main(["eval", f"--checkpoint={out['checkpoint']}", f"--out={tmp_path / 'eval'}",
                 f"--config.data.path={summary['path']}", "--config.data.max_len=160",
                 "--config.eval.gen_batch_size=8", "--config.eval.max_new_tokens=3", "--config.eval.batch_size=8",
                 "--config.mesh.data=8", "--config.mesh.fsdp=1"])
  assert rc == 0
  results = json.loads((tmp_path / "eval" / "eval.json").read_text())
  assert set(results["rr"]) == {"safe", "share", "safe_unsafe"} and "what_k" in results["asr"]
  assert results["counts"] == {"unsafe": 2, "unsafe_what": 6, "safe": 3, "safe_share": 3, "safe_unsafe": 3}
  # No placeholder codes on real data and no eval.judge: ASR is VLGuard's keyword metric, labelled so (a random
  # model never refuses: every answer is an attack success), never a silent 0.
  assert results["judge"]["name"] == "keyword" and results["asr"] == results["keyword_asr"]
  assert results["asr"]["original"] == 100.0
  assert np.isfinite(results["teacher_forced"]["sft"]["loss"])
  rows = [json.loads(line) for line in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
  assert len(rows) == 17


# --------------------------------------------------------------------------- the official files' quirks
def official_llava_conversion(train_data: list[dict], seed: int = 0) -> list[dict]:
  """ys-zong/VLGuard `convert_to_llava_format.py` as published (its file reading and writing left out)."""
  random.seed(seed)

  def format_conversation(instruction_key, response, from_human="human", from_gpt="gpt", prepend_image=False):
    human_value = f"<image>{response[instruction_key]}" if prepend_image else response[instruction_key]
    return [{"from": from_human, "value": human_value}, {"from": from_gpt, "value": response["response"]}]

  for item in train_data:
    item["conversations"] = []
    instruction_responses = item["instr-resp"]
    if len(instruction_responses) > 1:
      random.shuffle(instruction_responses)
      item["conversations"].extend(format_conversation(list(instruction_responses[0].keys())[0],
                                                       instruction_responses[0], prepend_image=True))
      item["conversations"].extend(format_conversation(list(instruction_responses[1].keys())[0],
                                                       instruction_responses[1], prepend_image=False))
    else:
      item["conversations"].extend(format_conversation("instruction", instruction_responses[0], prepend_image=True))
    item.pop("instr-resp")
  return train_data


@pytest.fixture(scope="module")
def quirky(tmp_path_factory, fixture) -> dict:
  """The quirky fixture built strictly through the CLI; `summary` is the JSON `mirage data build` printed."""
  root = tmp_path_factory.mktemp("vlguard_quirky")
  fx = vlguard_fixture.write_vlguard_fixture(root / "manual")
  fx.update(tokenizer=fixture["tokenizer"], data_dir=root / "data")
  from mirage_jax import cli
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = cli.main(["data", "build", "--name=vlguard", f"--manual_dir={fx['manual']}",
                   f"--tokenizer={fx['tokenizer']}", f"--image_size={SIZE}", f"--data_dir={fx['data_dir']}"])
  assert rc == 0
  fx["summary"] = json.loads(out.getvalue())
  fx["built"] = tfds_builders.BuiltDataset(pathlib.Path(fx["summary"]["path"]))
  return fx


def test_official_quirks_build_strictly_and_are_reported(quirky):
  summary, built = quirky["summary"], quirky["built"]
  assert summary["splits"] == quirky["splits"] == {s: built.num_records(s) for s in built.splits()}
  assert summary["notes"] == quirky["notes"]  # counted, not fatal
  inputs = built.world_info["inputs"]
  assert inputs == summary["inputs"]
  for name, report in inputs.items():
    assert report["problems"] == {} and report["rejected"] == 0 and report.get("notes", {}) == quirky["notes"].get(
        name, {}), name
  assert summary["rejects"] is None
  # the records with an empty reference are kept, with an empty answer
  safe = {r["id"]: r for r in records(built, "safe")}
  assert safe["safe/fx_test_1"]["answer"] == safe["safe/fx_test_3"]["answer"] == ""
  assert {r["id"] for r in records(built, "safe_share")} >= {"safe_share/fx_test_1", "safe_share/fx_test_3"}
  # "N/A" instructions are kept (the image carries the request), labelled refuse
  unsafe = {r["question"]: r for r in records(built, "unsafe")}
  assert unsafe["N/A"]["label"] == "refuse"
  # lenient drops nothing either
  cfg = vlguard.VLGuardConfig(manual_dir=str(quirky["manual"]), tokenizer="", lenient=True).resolved()
  assert {s: len(r) for s, r in vlguard.Sources(cfg).splits().items()} == quirky["splits"]


def test_duplicate_ids_become_unique_and_locations_name_index_and_id(quirky):
  built, (dup, renamed) = quirky["built"], quirky["duplicate_id"]
  for split in built.splits():
    ids = [r["id"] for r in records(built, split)]
    assert len(set(ids)) == len(ids), split
  sft_ids = [r["id"] for r in records(built, "sft")]
  assert {f"sft/{dup}/0", f"sft/{dup}/1", f"sft/{renamed}/0", f"sft/{renamed}/1"} <= set(sft_ids)
  assert f"retain/{renamed}" in [r["id"] for r in records(built, "retain")]
  train_ids = [r["id"] for r in quirky["records"]["train.json"]]
  first, second = [i for i, x in enumerate(train_ids) if x == dup]
  examples = quirky["summary"]["inputs"]["train.json"]["note_examples"]
  # single-line files: the position and the id, no line number
  assert examples["duplicate_id"] == [f"train.json record {second} (id {dup}): id {dup!r} already used by "
                                      f"train.json record {first} (id {dup}); this record's id is {renamed!r}"]
  assert examples["placeholder_instruction"][0].startswith("train.json record ")
  test_examples = quirky["summary"]["inputs"]["test.json"]["note_examples"]
  assert test_examples["empty_reference"][0].startswith("test.json record 1 (id fx_test_1): ")
  share = quirky["summary"]["inputs"]["test_share_1shot.json"]["note_examples"]["empty_reference"][0]
  assert re.match(r"test_share_1shot.json record 0 \(line \d+, id fx_test_1\): ", share)  # an indented file


def test_problems_in_single_line_files_name_the_record(quirky, tmp_path):
  manual = tmp_path / "manual"
  shutil.copytree(quirky["manual"], manual)
  test = json.loads((manual / "test.json").read_text())
  test[6]["instr-resp"][0]["instruction"] = "  "  # an empty question cannot be evaluated: still a problem
  (manual / "test.json").write_text(json.dumps(test))
  train = json.loads((manual / "train.json").read_text())
  train[0]["instr-resp"][1]["response"] = ""  # an empty training target: still a problem in train.json
  (manual / "train.json").write_text(json.dumps(train))
  cfg = vlguard.VLGuardConfig(manual_dir=str(manual), tokenizer=str(quirky["tokenizer"]), image_size=SIZE)
  with pytest.raises(validate.DataError) as e:
    vlguard.build_vlguard(cfg, tmp_path / "data")
  msg = str(e.value)
  assert f"test.json record 6 (id {test[6]['id']}): empty_text" in msg
  assert f"train.json record 0 (id {train[0]['id']}): empty_text" in msg
  assert "test.json:1" not in msg and "train.json:1" not in msg
  # lenient: the whole conversation is dropped and its rejects line holds the whole record
  sources = vlguard.Sources(dataclasses.replace(cfg, lenient=True).resolved())
  assert len(sources.sft()) == quirky["splits"]["sft"] - 2
  sources.splits()
  sources.finish(tmp_path / "rejects")
  (reject,) = [json.loads(x) for x in (tmp_path / "rejects" / "train.json.rejects.jsonl").read_text().splitlines()]
  assert reject["record"] == train[0] and reject["where"] == f"train.json record 0 (id {train[0]['id']})"
  (reject,) = [json.loads(x) for x in (tmp_path / "rejects" / "test.json.rejects.jsonl").read_text().splitlines()]
  assert reject["record"] == test[6]


@pytest.mark.parametrize("which", ["quirky", "fixture"])
def test_sft_turn_order_is_the_official_conversion(which, quirky, fixture):
  manual = pathlib.Path(quirky["manual"] if which == "quirky" else fixture["manual"])
  train = json.loads((manual / "train.json").read_text())
  official = official_llava_conversion(json.loads((manual / "train.json").read_text()))
  sft = vlguard.Sources(vlguard.VLGuardConfig(manual_dir=str(manual), tokenizer="").resolved()).sft()
  by_group: dict[int, list[str]] = {}
  for r in sft:
    by_group.setdefault(r["group"], []).append(r["question"])
  assert len(by_group) == len(official) == len(train)
  for group, conv in enumerate(official):
    want = [t["value"].replace("<image>", "") for t in conv["conversations"][::2]]
    assert by_group[group] == want, group
  firsts = {by_group[g][0] == r["instr-resp"][0].get("safe_instruction") for g, r in enumerate(train) if r["safe"]}
  assert firsts == {True, False}  # not the file order, not one fixed order


def test_vlguard_flags_without_name_are_an_error(quirky, capsys):
  from mirage_jax import cli
  from mirage_jax.commands import data
  from mirage_jax.errors import UsageError
  rc = cli.main(["data", "build", f"--manual_dir={quirky['manual']}", f"--tokenizer={quirky['tokenizer']}"])
  err = capsys.readouterr().err
  assert rc == 2 and "--manual_dir, --tokenizer are flags of the VLGuard builder: add --name=vlguard" in err
  args = argparse.Namespace(name="mirage_synth", manual_dir="", model="", tokenizer="", image_size=0, aspect="pad",
                            seed=0, what_file="", share_file="", k_what=3, harmful_responses="", retain_size=0,
                            retain_extra="", retain_extra_images="", retain_seed=42)
  for flag, value in (("manual_dir", "x"), ("seed", 1), ("harmful_responses", "r.json")):
    with pytest.raises(UsageError, match=f"--{flag} is a flag of the VLGuard builder: add --name=vlguard"):
      data.build(argparse.Namespace(**{**vars(args), flag: value}))
  rc = cli.main(["data", "build", "--name=vlguard", f"--tokenizer={quirky['tokenizer']}"])
  assert rc == 2 and "--manual_dir is required for --name=vlguard" in capsys.readouterr().err


def test_data_stats_of_a_vlguard_build(quirky, capsys):
  from mirage_jax import cli
  rc = cli.main(["data", "stats", "--name=vlguard", f"--data_dir={quirky['data_dir']}"])
  out = capsys.readouterr().out
  assert rc == 0
  lines = out.strip().splitlines()
  summary = json.loads(lines[-1])  # the closing JSON line
  assert summary["splits"] == quirky["splits"] and summary["notes"] == quirky["notes"]
  assert summary["path"] == str(quirky["built"].path) and summary["split"] == "sft"
  assert f"| sft | {quirky['splits']['sft']} |" in lines
  assert "notes (kept) in test.json: empty_reference=2, placeholder_instruction=1" in lines
  sft = records(quirky["built"], "sft")
  tables = summary["first_words"]
  assert set(tables) == {"safe", "unsafe_text", "unsafe_image"}
  for kind, table in tables.items():
    want: dict[str, dict[str, int]] = {}
    for r in (r for r in sft if r["kind"] == kind):
      want.setdefault(r["first_word"], {"comply": 0, "refuse": 0})[r["label"]] += 1
    assert table == want, kind
    assert f"first word x label, split 'sft', kind '{kind}' ({sum(map(sum, (c.values() for c in want.values())))} " \
           "records)" in lines
  assert tables["safe"]["What"]["comply"] > 0 and tables["unsafe_image"]["N"] == {"comply": 0, "refuse": 1}
  assert tables["unsafe_image"]["NA"] == {"comply": 0, "refuse": 1}
  # a --path to a VLGuard build needs no --name; another split
  rc = cli.main(["data", "stats", f"--path={quirky['built'].path}", "--split=unsafe_what"])
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert rc == 0 and summary["first_words"] == {"unsafe_image": {"What": {"comply": 0, "refuse": 12}}}
  rc = cli.main(["data", "stats", "--name=vlguard", f"--data_dir={quirky['data_dir'] / 'nothing'}"])
  assert rc == 2 and "no complete VLGuard" in capsys.readouterr().err
