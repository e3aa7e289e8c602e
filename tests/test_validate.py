"""Bad input data: named, counted, never silent (strict errors, lenient rejects files)."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from mirage_jax.data import validate


def test_malformed_json_names_file_line_and_column(tmp_path):
  path = tmp_path / "train.json"
  path.write_text('[\n  {"id": 1},\n  {"id": 2,, }\n]')
  with pytest.raises(validate.DataError, match=r"train.json:3:\d+: malformed JSON"):
    validate.read_json(path)
  with pytest.raises(FileNotFoundError, match="nope.json"):
    validate.read_json(tmp_path / "nope.json")


def _jsonl(tmp_path):
  path = tmp_path / "data.jsonl"
  lines = [json.dumps({"instruction": "What is it ?", "label": "comply"}), "{broken", "[1, 2]",
           json.dumps({"instruction": "", "label": "refuse"}), json.dumps({"instruction": 7, "label": "refuse"}),
           json.dumps({"label": "refuse"}), "", json.dumps({"instruction": "Share it .", "label": "refuse"})]
  path.write_text("\n".join(lines) + "\n")
  return path


def _read(path, lenient):
  report = validate.Report(str(path), lenient=lenient)
  good = validate.kept(
      (obj for where, obj in ((f"{path}:{n}", o) for n, o in validate.read_jsonl(path, report))
       if validate.check_fields(obj, {"instruction": str, "label": str}, where=where, report=report,
                                nonempty=("instruction",))), report)
  return good, report


def test_jsonl_strict_names_records_and_totals(tmp_path):
  path = _jsonl(tmp_path)
  good, report = _read(path, lenient=False)
  assert report.read == 7 and report.kept == len(good) == 2
  with pytest.raises(validate.DataError) as e:
    report.finish()
  msg = str(e.value)
  assert "data.jsonl: 5 problem(s)" in msg and "data.jsonl:2: malformed_json" in msg
  for kind in ("malformed_json=1", "wrong_type=2", "empty_text=1", "missing_field=1"):
    assert kind in msg
  assert "--lenient" in msg


def test_jsonl_lenient_writes_rejects(tmp_path):
  path = _jsonl(tmp_path)
  good, report = _read(path, lenient=True)
  report.finish(tmp_path / "rejects.jsonl")
  rejects = [json.loads(l) for l in (tmp_path / "rejects.jsonl").read_text().splitlines()]
  assert len(rejects) == 5 and {r["kind"] for r in rejects} == {"malformed_json", "wrong_type", "empty_text",
                                                                 "missing_field"}
  assert report.summary() == {"source": str(path), "read": 7, "kept": 2, "rejected": 5, "truncated": 0,
                              "problems": {"malformed_json": 1, "wrong_type": 2, "empty_text": 1,
                                           "missing_field": 1}}
  assert [g["instruction"] for g in good] == ["What is it ?", "Share it ."]


def test_images_missing_truncated_undecodable(tmp_path):
  buf = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(buf, format="PNG")
  (tmp_path / "ok.png").write_bytes(buf.getvalue())
  (tmp_path / "cut.png").write_bytes(buf.getvalue()[:30])
  (tmp_path / "text.png").write_text("not an image")
  report = validate.Report("images")
  assert validate.load_image(tmp_path / "ok.png", where="r0", report=report).shape == (8, 8, 3)
  for name in ("cut.png", "text.png", "gone.png"):
    assert validate.load_image(tmp_path / name, where=name, report=report) is None
  assert report.counts() == {"bad_image": 2, "missing_image": 1}
