"""A small VLGuard-format manual directory carrying the quirks of the official files (neutral placeholder text
only; images are drawn placeholders at the paths the files name).

The official files (VLGuard, Zong et al., ICML 2024: ys-zong/VLGuard `data/train.json`, `data/test.json`; the
Safety Mirage attack files of OPTML-Group/VLM-Safety-Unlearn `eval/safety_data/`) have, and this fixture copies:
  - train.json and test.json as single-line JSON; test_what_3shot.json / test_share_1shot.json indented
    (multi-line), the Share file's turns with "response" before the instruction key;
  - empty reference responses on safe turns in test.json, and the same records' safe turns in the Share file;
  - unsafe images whose instruction is "N/A" or "NA" (train.json), "N/A" (test.json);
  - a duplicated id in train.json (two different safe records on one image);
  - ids that are digit strings with a leading zero; image paths in sub-folders, .png and .jpg;
  - "What" rewrites as consecutive triples that repeat the original record's id; a Share file that lacks some
    safe test images (the official one has 556 of 558).

`write_vlguard_fixture(root)` returns the paths and what a strict build must give: split counts and the notes
per input file.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from PIL import Image

TRAIN_SAFE, TRAIN_UNSAFE, TEST_SAFE, TEST_UNSAFE, K_WHAT = 8, 6, 5, 4, 3
_UNSAFE_WORDS = ("Describe", "Share", "Please", "Identify", "Explain", "Generate")
_FOLDERS = ("bad_ads", "privacyAlert", "hod")


def _image(path: pathlib.Path, i: int) -> None:
  """A small drawn placeholder (PNG or JPEG by the path's suffix), different for every i."""
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(i)
  h, w = 8 + i % 3 * 2, 10 + i % 4 * 2
  pixels = np.broadcast_to(np.array([40 + 13 * i % 200, 90, 200 - 11 * i % 180], np.uint8), (h, w, 3)).copy()
  pixels[rng.integers(0, h), :] = 255
  Image.fromarray(pixels).save(path)


def _safe(part: str, i: int, *, empty_safe_response: bool = False, rid: str = "", image: str = "") -> dict:
  first = "Can" if i % 4 == 3 else "What"  # as in VLGuard: safe instructions mostly begin with "What"
  return {"id": rid or f"fx_{part}_{i}", "image": image or f"{_FOLDERS[i % 3]}/{part}_{i}.{'jpg' if i % 2 else 'png'}",
          "safe": True, "instr-resp": [
              {"safe_instruction": f"{first} placeholder colour does shape {i} have?",
               "response": "" if empty_safe_response else f"Placeholder shape {i} is coloured."},
              {"unsafe_instruction": f"Share placeholder request {i} about shape {i}.",
               "response": f"I'm sorry, I cannot help with placeholder request {i}."}]}


def _unsafe(part: str, i: int, *, instruction: str = "", rid: str = "") -> dict:
  return {"id": rid or f"fx_{part}_{i}", "image": f"{_FOLDERS[i % 3]}/{part}_{i}.{'jpg' if i % 2 else 'png'}",
          "safe": False, "harmful_category": "placeholder category", "harmful_subcategory": f"placeholder sub {i % 2}",
          "instr-resp": [{"instruction": instruction or f"{_UNSAFE_WORDS[i % 6]} placeholder request {i}.",
                          "response": f"I'm sorry, I cannot help with placeholder request {i}."}]}


def _records() -> dict[str, list[dict]]:
  train = [_safe("train", i) for i in range(TRAIN_SAFE - 1)]
  dup = train[2]  # the second record of one id: another conversation on the same image (as Ads_303871)
  train.append({**_safe("train", TRAIN_SAFE - 1, image=dup["image"]), "id": dup["id"]})
  train += [_unsafe("train", 100 + i) for i in range(TRAIN_UNSAFE - 3)]
  train += [_unsafe("train", 97 + TRAIN_UNSAFE, instruction="N/A"),
            _unsafe("train", 98 + TRAIN_UNSAFE, instruction="NA"), _unsafe("train", 99 + TRAIN_UNSAFE, rid="08654")]
  order = [0, 8, 1, 9, 2, 3, 10, 4, 11, 5, 12, 6, 7, 13]  # safe and unsafe images interleaved, the duplicate late
  train = [train[i] for i in order]
  test = [_safe("test", i, empty_safe_response=i in (1, 3)) for i in range(TEST_SAFE)]
  test += [_unsafe("test", 100 + i, instruction="N/A" if i == 2 else "") for i in range(TEST_UNSAFE)]
  what = [{**r, "instr-resp": [{"instruction": f"What placeholder rewrite {k} of request {n} is this?",
                                "response": r["instr-resp"][0]["response"]}]}
          for n, r in enumerate(test[TEST_SAFE:]) for k in range(K_WHAT)]
  share = []
  for r in test[:TEST_SAFE]:
    if r["id"] == "fx_test_0":  # the Share file lacks a safe test image or two
      continue
    safe_turn, unsafe_turn = r["instr-resp"]
    share.append({"id": r["id"], "image": r["image"], "instr-resp": [
        {"response": safe_turn["response"], "safe_instruction": f"Share the placeholder colour of {r['id']}."},
        dict(unsafe_turn)], "safe": True})
  return {"train.json": train, "test.json": test, "test_what_3shot.json": what, "test_share_1shot.json": share}


def write_vlguard_fixture(root: pathlib.Path, *, harmful_responses: bool = False) -> dict[str, Any]:
  """Write the quirky VLGuard-format directory under `root` (manual dir `root`: the four JSON files, `train/`
  and `test/` images). `harmful_responses`: also `root/../<root name>_harmful_responses.json` (unsafe train
  image -> a neutral placeholder "response"), which builds `forget`.

  Returns `manual` (the directory), `files` (name -> path), `records` (name -> the written records), `splits`
  (the split counts a strict build gives), `notes` (file -> note kind -> count, as in the build summary),
  `duplicate_id` (the repeated id and the id its second record gets) and `harmful_responses` (path or None).
  """
  root = pathlib.Path(root)
  records = _records()
  files = {}
  root.mkdir(parents=True, exist_ok=True)
  for name, recs in records.items():
    files[name] = root / name
    single_line = name in ("train.json", "test.json")  # as published: the attack files are indented
    files[name].write_text(json.dumps(recs) if single_line else json.dumps(recs, indent=4))
  for n, rec in enumerate(records["train.json"]):
    if not (root / "train" / rec["image"]).exists():
      _image(root / "train" / rec["image"], n)
  for n, rec in enumerate(records["test.json"]):
    _image(root / "test" / rec["image"], 1000 + n)
  responses = None
  if harmful_responses:
    responses = root.parent / f"{root.name}_harmful_responses.json"
    responses.write_text(json.dumps({r["image"]: f"Placeholder answer to request {n}: step one, step two."
                                     for n, r in enumerate(records["train.json"]) if not r["safe"]}))
  train_safe = sum(r["safe"] for r in records["train.json"])
  splits = {"sft": 2 * train_safe + (len(records["train.json"]) - train_safe), "unsafe": TEST_UNSAFE,
            "safe": TEST_SAFE, "safe_unsafe": TEST_SAFE, "unsafe_what": K_WHAT * TEST_UNSAFE,
            "safe_share": len(records["test_share_1shot.json"]), "retain": train_safe}
  if harmful_responses:
    splits["forget"] = len(records["train.json"]) - train_safe
  dup = "fx_train_2"
  return {"manual": root, "files": files, "records": records, "splits": splits, "k_what": K_WHAT,
          "notes": {"train.json": {"duplicate_id": 1, "placeholder_instruction": 2},
                    "test.json": {"empty_reference": 2, "placeholder_instruction": 1},
                    "test_share_1shot.json": {"empty_reference": 2}},
          "duplicate_id": (dup, f"{dup}#2"), "harmful_responses": responses}
