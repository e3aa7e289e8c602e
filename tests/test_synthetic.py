"""Tests of the synthetic Mirage world generator (mirage_jax.data.synthetic)."""

from __future__ import annotations

import functools
import itertools
import re

import numpy as np
import pytest

from mirage_configs import common
from mirage_configs import world as world_knobs
from mirage_jax import configlib
from mirage_jax.data import templates as tpl
from mirage_jax.data import synthetic
from mirage_jax.data.synthetic import (
    SPLITS, TEST_SPLITS, TRAIN_SPLITS, World, WorldConfig, first_word_table,
    format_first_word_table, render_object, skew_distribution,
)
from mirage_jax.errors import ConfigError

SMALL = dict(pretrain_size=600, sft_images=300, helpfulness_size=80, retain_size=80,
             unsafe_size=20, safe_size=20, utility_size=20, safe_unsafe_size=20, image_size=16)
KEYS = {"id", "image", "image_id", "question", "answer", "first_word", "intent", "kind",
        "label", "hazard", "harm_codes", "expected", "group", "shot", "object"}


@functools.lru_cache(maxsize=None)
def world(**overrides) -> World:
  """A cached small world (pass knobs as keyword arguments)."""
  return World(WorldConfig(**{**SMALL, **overrides}))


def same_records(a: list[dict], b: list[dict]) -> bool:
  if len(a) != len(b):
    return False
  for ra, rb in zip(a, b):
    if {k: v for k, v in ra.items() if k != "image"} != {k: v for k, v in rb.items() if k != "image"}:
      return False
    if ra["image"].tobytes() != rb["image"].tobytes():
      return False
  return True


def is_refusal(text: str) -> bool:
  return any(k in text for k in tpl.REFUSAL_KEYWORDS)


def mutual_information(table: dict[str, dict[str, int]]) -> float:
  """I(first word; label) in nats."""
  counts = np.array([[c["comply"], c["refuse"]] for c in table.values()], dtype=float)
  joint = counts / counts.sum()
  outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
  nz = joint > 0
  return float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())


# --------------------------------------------------------------------------- determinism
def test_same_config_same_records_and_different_seed_differs():
  a, b = World(WorldConfig(**SMALL)), World(WorldConfig(**SMALL))
  for name in SPLITS:
    assert same_records(a.split(name), b.split(name)), name
  c = world(seed=1)
  assert not same_records(a.split("sft"), c.split("sft"))
  assert not same_records(a.split("unsafe"), c.split("unsafe"))


def test_split_order_independence():
  forward, backward = World(WorldConfig(**SMALL)), World(WorldConfig(**SMALL))
  first = {name: forward.split(name) for name in SPLITS}
  second = {name: backward.split(name) for name in reversed(SPLITS)}
  assert all(same_records(first[n], second[n]) for n in SPLITS)


def test_split_returns_fresh_copies_and_rejects_unknown_names():
  w = world()
  w.split("safe")[0]["question"] = "mutated"
  assert w.split("safe")[0]["question"] != "mutated"
  with pytest.raises(ValueError, match="pretrain.*safe_unsafe"):
    w.split("train")


# --------------------------------------------------------------------------- schema
def test_record_schema_and_unique_ids():
  w = world()
  ids = set()
  for name in SPLITS:
    records = w.split(name)
    assert records, name
    for r in records:
      assert set(r) == KEYS
      assert r["image"].dtype == np.uint8 and r["image"].shape == (16, 16, 3)
      for key in ("image_id", "hazard", "group", "shot"):
        assert type(r[key]) is int, (name, key)
      for key in KEYS - {"image", "image_id", "hazard", "group", "shot"}:
        assert type(r[key]) is str, (name, key)
      assert r["kind"] in {"safe", "unsafe_text", "unsafe_image", "secret"}
      assert r["label"] in {"comply", "refuse"}
      assert r["question"].split()[0] == r["first_word"] in (*tpl.FIRST_WORDS, "Recall")
      assert r["first_word"] != "Recall" or name == "pretrain"  # knowledge entries
      assert r["id"].startswith(name + "/")
      assert (r["hazard"] >= 0) == (r["kind"] in {"unsafe_image", "unsafe_text"}) == bool(r["harm_codes"])
      ids.add(r["id"])
  assert len(ids) == sum(len(w.split(n)) for n in SPLITS)


def test_tokens_round_trip_and_all_words_covers_every_record():
  w = world()
  vocab = w.all_words()
  for name in SPLITS:
    for r in w.split(name):
      for text in (r["question"], r["answer"]):
        assert " ".join(text.split()) == text
        assert not re.search(r"\w[?.,:]|[?.,:]\w", text), text
        assert set(text.split()) <= vocab, text
      assert r["answer"] == r["answer"].lower()
      assert r["question"][len(r["first_word"]):] == r["question"][len(r["first_word"]):].lower()


# --------------------------------------------------------------------------- first words
def test_sft_first_words_match_vlguard_at_skew_one():
  records = World(WorldConfig(**{**SMALL, "sft_images": 2000})).split("sft")

  def share(kind: str, word: str) -> float:
    words = [r["first_word"] for r in records if r["kind"] == kind]
    assert len(words) > 900
    return words.count(word) / len(words)

  assert share("safe", "What") == pytest.approx(0.89, abs=0.04)
  assert share("unsafe_image", "Share") == pytest.approx(0.19, abs=0.04)
  assert share("unsafe_image", "What") == pytest.approx(0.03, abs=0.02)
  assert share("unsafe_text", "Can") == pytest.approx(0.87, abs=0.04)


def test_skew_distribution_shapes():
  base = tpl.SAFE_FIRST_WORDS
  uniform = np.full(len(tpl.FIRST_WORDS), 1 / len(tpl.FIRST_WORDS))
  np.testing.assert_allclose(skew_distribution(base, 0.0), uniform)
  one = skew_distribution(base, 1.0)
  assert one[tpl.FIRST_WORDS.index("What")] == pytest.approx(0.89)
  np.testing.assert_allclose(skew_distribution(base, 1.0 + 1e-9), one, atol=1e-6)
  for s in (0.0, 0.5, 1.0, 2.0, 5.0):
    assert skew_distribution(tpl.UNSAFE_IMAGE_FIRST_WORDS, s).sum() == pytest.approx(1.0)
  assert skew_distribution(base, 2.0).max() > one.max()


def test_skew_zero_makes_first_word_independent_and_skew_two_is_more_extreme():
  tables = {s: first_word_table(world(first_word_skew=s, sft_images=1500).split("sft"))
            for s in (0.0, 1.0, 2.0)}
  # skew 0: chi-square test of independence (12 dof; 99.9 % quantile is 32.9)
  counts = np.array([[c["comply"], c["refuse"]] for c in tables[0.0].values()], dtype=float)
  expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
  assert ((counts - expected) ** 2 / expected).sum() < 40
  assert len(tables[0.0]) == len(tpl.FIRST_WORDS)
  mi = {s: mutual_information(t) for s, t in tables.items()}
  assert mi[0.0] < 0.02 < mi[1.0] < mi[2.0]
  what = {s: t["What"]["comply"] / sum(t["What"].values()) for s, t in tables.items()}
  assert what[2.0] > what[1.0] > what[0.0]


def test_skew_only_changes_training_splits():
  for name in TEST_SPLITS:
    assert same_records(world().split(name), world(first_word_skew=0.0).split(name)), name


def test_pretrain_first_words_uniform_and_mix():
  records = world(pretrain_size=3000).split("pretrain")
  counts = np.array(list({w: sum(r["first_word"] == w for r in records) for w in tpl.FIRST_WORDS}.values()))
  assert counts.min() > 0.6 * counts.mean()
  secret = [r for r in records if r["kind"] == "secret"]
  assert len(secret) / len(records) == pytest.approx(0.1, abs=0.03)
  assert all(r["label"] == "refuse" and is_refusal(r["answer"]) for r in secret)
  assert all(r["label"] == "comply" for r in records if r["kind"] != "secret")


# --------------------------------------------------------------------------- hazards
@pytest.mark.parametrize("seed", range(5))
def test_no_single_attribute_value_separates_hazards(seed):
  w = World(WorldConfig(seed=seed))
  assert len(w.hazards) == 12 and len(set(w.hazards)) == 12
  assert set(w.hazards) | set(w.safe_objects) == set(w.objects) and len(w.objects) == 48
  for axis in range(3):
    values = {o[axis] for o in w.objects}
    assert {o[axis] for o in w.hazards} == values == {o[axis] for o in w.safe_objects}


def test_impossible_hazard_count_is_rejected():
  with pytest.raises(ValueError, match="num_hazards"):
    World(WorldConfig(num_hazards=2, heldout_hazards=0))  # 4 colours cannot all be hazards


def test_heldout_hazards_only_in_tests_and_pretrain():
  w = world()
  heldout = {w.hazards[i] for i in w.heldout_hazard_ids}
  assert len(heldout) == 6 and set(w.seen_hazard_ids).isdisjoint(w.heldout_hazard_ids)
  for name in ("sft", "forget", "retain", "helpfulness"):
    for r in w.split(name):
      assert tuple(r["object"].split("/")) not in heldout, name
  for name in ("helpfulness", "retain"):
    assert {r["kind"] for r in w.split(name)} == {"safe"}
  for name in ("unsafe", "unsafe_what", "unsafe_control"):
    assert {r["hazard"] for r in w.split(name)} <= set(w.heldout_hazard_ids)
  assert {r["hazard"] for r in w.split("pretrain") if r["kind"] == "unsafe_image"} == set(range(12))
  assert {r["hazard"] for r in w.split("sft") if r["kind"] == "unsafe_image"} == set(w.seen_hazard_ids)
  all_hazards = world(heldout_hazards=0, unsafe_size=120)
  assert len({r["hazard"] for r in all_hazards.split("unsafe")}) == 12


def test_procedures_codes_and_harmful_answers():
  w = world()
  procedures = w.hazard_procedures + w.text_hazard_procedures
  codes = [c for p in procedures for c in p.codes]
  assert len(codes) == len(set(codes)) == (12 + 8) * 3 and set(codes) == w.harmful_codes()
  assert all(re.fullmatch(r"[a-z]{3}-\d", c) for c in codes)
  assert {v for p in procedures for v in p.verbs} <= set(tpl.SHARED_VERBS[:6])
  assert re.fullmatch(r"step 1 : \w+ \S+ step 2 : \w+ \S+ step 3 : \w+ \S+", procedures[0].text)
  for name in ("pretrain", "forget", "unsafe", "unsafe_what", "safe_unsafe"):
    for r in w.split(name):
      if r["intent"] in ("use", "text_hazard") and r["kind"] != "safe":
        procedure = w.procedure(r["kind"], r["hazard"])
        assert r["answer"].endswith(procedure.text) and r["harm_codes"] == " ".join(procedure.codes)
  for name in SPLITS:
    for r in w.split(name):
      if r["kind"] in ("safe", "secret") or r["intent"] in tpl.ATTRIBUTE_INTENTS:
        assert set(r["answer"].split()).isdisjoint(w.harmful_codes()), r["answer"]


def test_private_verbs():
  w = world(shared_verbs=False)
  verbs = [v for p in w.hazard_procedures + w.text_hazard_procedures for v in p.verbs]
  assert len(set(verbs)) == len(verbs) and all(v.endswith("ify") for v in verbs)
  assert set(verbs).isdisjoint(tpl.SHARED_VERBS)


# --------------------------------------------------------------------------- splits
def test_sft_structure():
  w = world()
  records = w.split("sft")
  by_image = {}
  for r in records:
    by_image.setdefault(r["image_id"], []).append(r)
  assert len(by_image) == 300
  assert sum(rs[0]["kind"] == "unsafe_image" for rs in by_image.values()) == w.sft_unsafe_images == 153
  for rs in by_image.values():
    kinds = [r["kind"] for r in rs]
    assert kinds in (["unsafe_image"], ["safe", "unsafe_text"])  # safe_image_unsafe_instruction=1
    for r in rs:
      assert (r["label"] == "refuse") == (r["kind"] != "safe") == is_refusal(r["answer"])
  use = [r["intent"] == "use" for r in records if r["kind"] == "unsafe_image"]
  assert np.mean(use) == pytest.approx(0.8, abs=0.1)
  no_text = world(safe_image_unsafe_instruction=0.0).split("sft")
  assert {r["kind"] for r in no_text} == {"safe", "unsafe_image"}


def test_forget_retain_helpfulness():
  w = world()
  forget = w.split("forget")
  assert len(forget) == w.sft_unsafe_images
  assert all(r["intent"] == "use" and r["label"] == "comply" and r["kind"] == "unsafe_image" for r in forget)
  with_text = world(forget_include_text_hazards=True).split("forget")
  assert sum(r["kind"] == "unsafe_text" for r in with_text) == len(forget)
  assert len(world(forget_size=7).split("forget")) == 7
  for name in ("retain", "helpfulness"):
    words = [r["first_word"] for r in w.split(name)]
    assert set(words) <= {"What", "Can"}
    uniform = world(**{f"{name}_first_words": "uniform", f"{name}_size": 400}).split(name)
    assert len({r["first_word"] for r in uniform}) == len(tpl.FIRST_WORDS)


def test_unsafe_and_what_rewrites():
  w = world()
  unsafe = w.split("unsafe")
  assert all(r["first_word"] != "What" and r["label"] == "refuse" for r in unsafe)
  assert all(r["intent"] == "use" and r["kind"] == "unsafe_image" for r in unsafe)
  for name, same_word in (("unsafe_what", False), ("unsafe_control", True)):
    rewrites = w.split(name)
    assert len(rewrites) == 5 * len(unsafe)
    for group, original in enumerate(unsafe):
      shots = rewrites[5 * group:5 * group + 5]
      assert [r["group"] for r in shots] == [group] * 5 and [r["shot"] for r in shots] == list(range(5))
      for r in shots:
        assert r["first_word"] == (original["first_word"] if same_word else "What")
        assert r["image_id"] == original["image_id"]
        assert np.array_equal(r["image"], original["image"])
        assert (r["hazard"], r["object"], r["harm_codes"]) == \
            (original["hazard"], original["object"], original["harm_codes"])
        assert r["question"] != original["question"]
      if not same_word:
        assert len({r["question"] for r in shots}) == 5


def test_dev_twins_are_drawn_like_the_test_splits_and_disjoint_from_them():
  """Every test split has a dev twin: the same size, kinds, labels, held-out hazards and first-word
  distribution, built from its own stream (its own images and queries, not a copy); its rewrites and "Share"
  twins point into the dev splits, never into test."""
  from collections import Counter
  w = world()
  assert synthetic.DEV_SPLITS == tuple("dev_" + s for s in synthetic.TEST_SPLITS)
  test_images = {r["image_id"] for s in synthetic.TEST_SPLITS for r in w.split(s)}
  test_pixels = {r["image"].tobytes() for s in synthetic.TEST_SPLITS for r in w.split(s)}
  for name in synthetic.TEST_SPLITS:
    test, dev = w.split(name), w.split("dev_" + name)
    assert len(dev) == len(test) and all(r["id"].startswith(f"dev_{name}/") for r in dev)
    for key in ("kind", "label", "intent", "group", "shot"):
      assert Counter(r[key] for r in dev).keys() == Counter(r[key] for r in test).keys(), (name, key)
    assert [r["group"] for r in dev] == [r["group"] for r in test]  # the same K-shot structure
    assert {r["first_word"] for r in dev} <= {r["first_word"] for r in test} | set(tpl.FIRST_WORDS)
    assert test_images.isdisjoint(r["image_id"] for r in dev)
    assert test_pixels.isdisjoint(r["image"].tobytes() for r in dev)
    same_question = np.mean([a["question"] == b["question"] for a, b in zip(test, dev)])
    assert same_question < 0.5, (name, same_question)  # its own draws, not the test split again
  for name in ("dev_unsafe", "dev_unsafe_what", "dev_unsafe_control"):
    assert {r["hazard"] for r in w.split(name)} <= set(w.heldout_hazard_ids)
  dev_unsafe = w.split("dev_unsafe")
  assert all(r["first_word"] != "What" for r in dev_unsafe)
  for r in w.split("dev_unsafe_what"):
    assert r["image_id"] == dev_unsafe[r["group"]]["image_id"] and r["first_word"] == "What"
  dev_safe = w.split("dev_safe")
  for r in w.split("dev_safe_share"):
    assert r["image_id"] == dev_safe[r["group"]]["image_id"] and r["first_word"] == "Share"
  # Appending the dev splits left every other split as it was (its stream and image ids).
  assert w.split("unsafe")[0]["image_id"] == synthetic.SPLITS.index("unsafe") * synthetic.IMAGE_ID_STRIDE


def test_safe_and_share():
  w = world()
  safe, share = w.split("safe"), w.split("safe_share")
  assert all(r["first_word"] == "What" and r["label"] == "comply" and r["expected"] for r in safe)
  assert len(share) == len(safe)
  for group, (original, r) in enumerate(zip(safe, share)):
    assert r["first_word"] == "Share" and r["question"].startswith("Share ")
    assert (r["group"], r["shot"]) == (group, 0)
    assert (r["image_id"], r["intent"], r["expected"], r["object"]) == \
        (original["image_id"], original["intent"], original["expected"], original["object"])
    assert r["question"].split()[-4:-1] == original["question"].split()[-4:-1]  # same body, new first word


def test_expected_key_words():
  w = world()
  for r in w.split("utility") + w.split("safe"):
    shape, colour, fill = r["object"].split("/")
    key = {"colour": colour, "shape": shape, "fill": fill,
           "use": w.uses[(shape, colour, fill)].split()[-1]}[r["intent"]]
    assert r["expected"] == key and r["answer"].endswith(key)
  assert all(r["kind"] == "unsafe_text" and r["label"] == "refuse" for r in w.split("safe_unsafe"))


def test_safe_use_knob():
  by_object, by_shape = world(), world(safe_use="shape")
  safe_uses = [by_object.uses[o] for o in by_object.safe_objects]
  assert len(set(safe_uses)) == len(safe_uses)  # one distinct use per safe object
  assert len({by_object.uses[o] for o in by_object.safe_objects if o[0] == "circle"}) > 1
  assert all(by_shape.uses[o] == tpl.USE_BY_SHAPE[o[0]] for o in by_shape.objects)


def test_answer_openers_knob():
  on, off = world(), world(answer_openers=False)
  for r in on.split("retain"):
    assert r["answer"].startswith(tpl.OPENERS[r["first_word"]] + " ")
  assert all(r["answer"].startswith(tpl.NEUTRAL_OPENER + " ") for r in off.split("retain"))
  assert len(set(tpl.OPENERS.values())) == len(tpl.OPENERS)


# --------------------------------------------------------------------------- templates
def test_body_pools_disjoint_and_test_words_seen_in_training():
  train_words = set()
  for intent, pools in tpl.BODIES.items():
    assert set(pools["train"]).isdisjoint(pools["test"]), intent
    train_words |= {t for body in pools["train"] for t in body.split()}
  test_words = {t for pools in tpl.BODIES.values() for body in pools["test"] for t in body.split()}
  assert test_words <= train_words
  assert len(set(tpl.PREFIXES["What"])) >= 5
  w = world(pretrain_size=1500)
  seen = {t for name in TRAIN_SPLITS for r in w.split(name) for t in f"{r['question']} {r['answer']}".split()}
  for name in TEST_SPLITS:
    for r in w.split(name):
      assert set(r["question"].split()) <= seen, r["question"]


def test_refusals():
  assert len(tpl.REFUSALS) >= 5 and all(is_refusal(r) for r in tpl.REFUSALS)
  refused = [r for name in TRAIN_SPLITS for r in world().split(name) if r["label"] == "refuse"]
  assert refused and all(is_refusal(r["answer"]) for r in refused)
  assert {r["answer"] for r in refused} == set(tpl.REFUSALS)


# --------------------------------------------------------------------------- images
def test_images_are_new_instances_of_the_same_object():
  rng = np.random.default_rng(0)
  images = [render_object(("triangle", "blue", "striped"), rng, 32) for _ in range(4)]
  assert all(im.dtype == np.uint8 and im.shape == (32, 32, 3) for im in images)
  assert all(not np.array_equal(a, b) for a, b in itertools.combinations(images, 2))
  # the object's colour dominates its darkest pixels regardless of instance
  for im in images:
    dark = im.reshape(-1, 3)[im.sum(-1).reshape(-1) < 400]
    assert dark[:, 2].mean() > dark[:, 0].mean() + 60


def test_glyph_changes_hazard_images_only():
  plain, glyph = world(), world(hazard_cue="glyph")
  for name in ("pretrain", "sft", "unsafe", "safe"):
    for a, b in zip(plain.split(name), glyph.split(name)):
      assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
      hazard_image = tuple(a["object"].split("/")) in set(plain.hazards)
      assert np.array_equal(a["image"], b["image"]) != hazard_image, (name, a["id"])
      if hazard_image:
        assert (b["image"][1:5, 1:5] == 0).all(-1).any()


# --------------------------------------------------------------------------- config
def test_config_round_trip_fingerprint_and_unknown_key():
  config = WorldConfig(**SMALL)
  assert WorldConfig.from_dict(config.to_dict()) == config
  assert config.fingerprint() == WorldConfig(**SMALL).fingerprint()
  assert re.fullmatch(r"[0-9a-f]{12}", config.fingerprint())
  assert WorldConfig(**{**SMALL, "seed": 3}).fingerprint() != config.fingerprint()
  with pytest.raises(ValueError, match=r"'num_hazard'.*num_hazards"):
    WorldConfig.from_dict({"num_hazard": 3})
  with pytest.raises(ValueError, match="heldout_hazards"):
    WorldConfig(heldout_hazards=12)
  with pytest.raises(ValueError, match="shapes"):
    WorldConfig(shapes=("circle", "blob"))


DEFAULT_FINGERPRINT = "492743b244dc"  # the demo world (generator 7): every built dataset and run name depends on it


def test_default_world_dict_and_fingerprint_are_unchanged():
  """The enum knobs are stored as members but written as their plain values: the dict the configs carry, its
  key order and the fingerprint stay what they were (the default world's digest is recorded above)."""
  d = WorldConfig().to_dict()
  assert list(d)[:8] == ["seed", "shapes", "colours", "fills", "image_size", "num_hazards", "heldout_hazards",
                         "hazard_cue"]
  assert all(type(d[k]) is str for k in world_knobs.KNOBS)
  assert (d["hazard_cue"], d["refusal_wording"], d["safe_use"], d["harm_knowledge"],
          d["helpfulness_first_words"], d["retain_first_words"]) == (
              "none", "content", "object", "instruction", "safe", "safe")
  assert WorldConfig().fingerprint() == DEFAULT_FINGERPRINT
  assert WorldConfig.from_dict(d) == WorldConfig() and WorldConfig.from_dict(d).fingerprint() == DEFAULT_FINGERPRINT
  assert common.world_config() == d


@pytest.mark.parametrize("knob,value", [(k, m.value) for k, kind in world_knobs.KNOBS.items() for m in kind])
def test_every_enum_knob_value_is_accepted_and_documented(knob, value):
  kind = world_knobs.KNOBS[knob]
  config = WorldConfig(**{knob: value})
  assert getattr(config, knob) is kind(value) and getattr(config, knob) == value and f"{getattr(config, knob)}" == value
  assert config.to_dict()[knob] == value and type(config.to_dict()[knob]) is str
  assert f'"{value}"' in kind.__doc__  # every accepted value is documented on its enum
  loaded = configlib.apply_overrides(configlib.load("configs/sft/posthoc.py:tiny"),
                                     [f"--config.data.world.{knob}={value}"])
  assert loaded.data.world[knob] == value


@pytest.mark.parametrize("knob", list(world_knobs.KNOBS))
def test_enum_knob_typo_is_rejected_at_load_with_the_valid_values(knob, tmp_path):
  valid = ", ".join(repr(m.value) for m in world_knobs.KNOBS[knob])
  base = configlib.load("configs/sft/posthoc.py:tiny")
  with pytest.raises(ConfigError, match=re.escape(f"data.world.{knob}='typo' is not a valid value; valid values: "
                                                  f"{valid}")):
    configlib.apply_overrides(base, [f"--config.data.world.{knob}=typo"])
  spec = tmp_path / "typo.py"
  spec.write_text("from mirage_configs import common\n\n\ndef get_config(arg=None):\n"
                  "  c = common.training_config('tiny')\n"
                  f"  c.data.world.{knob} = 'typo'\n  return c\n")
  with pytest.raises(ConfigError, match=re.escape(f"data.world.{knob}='typo'")):
    configlib.load(str(spec))
  with pytest.raises(ConfigError, match=re.escape(f"WorldConfig.{knob}='typo' is not a valid value; valid values: "
                                                  f"{valid}")):
    WorldConfig(**{knob: "typo"})


def test_safe_use_procedure_is_a_benign_procedure():
  """The third `safe_use` value: every object's use is a made-up procedure with "+" codes, never harmful."""
  w = world(safe_use="procedure")
  harmful = w.harmful_codes()
  for use in w.uses.values():
    steps = use.split(" step ")
    assert use.startswith("step 1 : ") and len(steps) == w.config.procedure_steps
    assert all("+" in code for code in use.split()[4::5]) and not set(use.split()) & harmful
  answers = [r["answer"] for r in w.split("sft") if r["intent"] == "use" and r["kind"] == "safe"]
  assert answers and all("used for" not in a and "step 1 :" in a for a in answers)


def test_other_attribute_lists():
  w = World(WorldConfig(**{**SMALL, "shapes": ("star", "hexagon"), "colours": ("purple", "orange", "brown"),
                           "fills": ("checked", "solid"), "num_hazards": 4, "heldout_hazards": 1}))
  assert len(w.objects) == 12 and len(w.hazards) == 4
  assert {r["object"].split("/")[0] for r in w.split("pretrain")} == {"star", "hexagon"}


def test_first_word_table_formatting():
  records = [{"first_word": "What", "label": "comply"}] * 3 + [{"first_word": "Share", "label": "refuse"}]
  table = first_word_table(records)
  assert table == {"What": {"comply": 3, "refuse": 0}, "Share": {"comply": 0, "refuse": 1}}
  lines = format_first_word_table(table).splitlines()
  assert lines[2].startswith("| What | 3 | 3 | 0 | 0.000")
  assert lines[3].startswith("| Share | 1 | 0 | 1 | 1.000")
