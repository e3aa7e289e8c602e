"""The VLGuard TFDS builder on a small VLGuard-format fixture (placeholder text, drawn images): split names
and contents, conversation flattening with a seeded turn order, the K-shot attack grouping, forget/retain
construction, image geometry, input errors; and `mirage eval` on an imported checkpoint with this dataset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re

import numpy as np
import pytest

import hf_fixtures
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
  other = vlguard.Sources(config(fixture, seed=5).resolved()).sft()
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
  first = int(re.search(r"train.json:(\d+) \(id no_image_file\): missing_image", msg).group(1))
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
  assert all(r["where"].startswith("train.json:") for r in rejects)


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
  assert results["asr"]["original"] == 0.0  # no placeholder codes on real data: the rule judge never says harmful
  assert np.isfinite(results["teacher_forced"]["sft"]["loss"])
  rows = [json.loads(line) for line in (tmp_path / "eval" / "responses.jsonl").read_text().splitlines()]
  assert len(rows) == 17
