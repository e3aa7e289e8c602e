"""Data: the word tokenizer, the TFDS build of the synthetic world, preprocessing (chat template, `<image>`
expansion, loss masks, padding) and the grain streams (determinism, checkpointable state, mixtures,
multi-process slicing).

The default world is built once per session (`synth` fixture in conftest); a small world is built into a
temporary directory to compare every record against the generator.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from mirage_jax import configlib, sharding
from mirage_jax.data import pipeline, preprocess, synthetic, tfds_builders
from mirage_jax.data import tokenizer as tokenizer_lib
from mirage_jax.data.records import text
from mirage_jax.data.tokenizer import Tokenizer
from mirage_jax.errors import ConfigError, DataError

from worlds import SMALL_WORLD

NUM_IMAGE_TOKENS = 16  # the tiny model: 32 px images, 8 px patches


@pytest.fixture(scope="module")
def config():
  return configlib.load("configs/sft/posthoc.py:tiny")


@pytest.fixture(scope="module")
def tok(synth) -> Tokenizer:
  return synth.tokenizer


@pytest.fixture(scope="module")
def fmt(config) -> preprocess.TextFormat:
  return preprocess.TextFormat.from_config(config.data, num_image_tokens=NUM_IMAGE_TOKENS)


@pytest.fixture(scope="module")
def splits(synth, tok, fmt) -> pipeline.SplitCache:
  return pipeline.SplitCache(synth.dataset, tok, fmt)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """(WorldConfig, World, BuiltDataset) of a small world built into its own directory."""
  world_cfg = synthetic.WorldConfig(**SMALL_WORLD)
  built = tfds_builders.build_synth(world_cfg, tmp_path_factory.mktemp("small_data"))
  return world_cfg, synthetic.World(world_cfg), built


def records(source, limit: int | None = None) -> list[dict]:
  n = len(source) if limit is None else min(limit, len(source))
  return [source[i] for i in range(n)]


# --------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("split", ["pretrain", "sft", "unsafe_what", "utility", "safe_share"])
def test_tokenizer_round_trips_every_record(synth, tok, split):
  src = synth.dataset.source(split)
  unk = tok.tok.token_to_id(tokenizer_lib.UNK)
  for rec in records(src):
    for field in ("question", "answer"):
      s = text(rec[field])
      ids = tok.encode(s)
      assert unk not in ids, s
      assert len(ids) == len(s.split())  # one id per word
      assert tok.decode(ids) == s


def test_special_tokens(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, 4)
  for i, name in enumerate(tokenizer_lib.SPECIALS):
    assert tok.tok.token_to_id(name) == i
  assert tok.encode("<image>") == [tok.image_id]
  assert tok.encode("USER: <image> ASSISTANT:") == [tok.tok.token_to_id("USER:"), 4,
                                                   tok.tok.token_to_id("ASSISTANT:")]
  # decode stops at EOS and drops specials.
  ids = tok.encode("What is this ?")
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, *tok.encode("red")]) == "What is this ?"
  assert tok.decode([tok.pad_id, tok.image_id, *ids]) == "What is this ?"
  # An unknown word becomes <unk>.
  assert tok.encode("zzzqqq") == [tok.tok.token_to_id("<unk>")]


def test_vocabulary_is_the_worlds(synth, tok, config):
  world = synthetic.World(synthetic.WorldConfig.from_dict(dict(config.data.world)))
  words = world.all_words()
  vocab = tok.tok.get_vocab()
  assert words <= set(vocab)
  assert tok.vocab_size == len(vocab) == len(set(words) | set(tokenizer_lib.SPECIALS) |
                                              set(tokenizer_lib.ROLE_WORDS))
  assert tok.vocab_size <= config.model.text.vocab_size


def test_transformers_autotokenizer_matches(synth, tok):
  transformers = pytest.importorskip("transformers")
  hf = transformers.AutoTokenizer.from_pretrained(str(synth.dataset.tokenizer_dir))
  assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
  assert hf.convert_tokens_to_ids("<image>") == tok.image_id
  assert len(hf) == tok.vocab_size
  src = synth.dataset.source("sft")
  texts = [text(r[f]) for r in records(src, limit=200) for f in ("question", "answer")]
  texts.append("USER: <image> What is this ? ASSISTANT:")
  for s in texts:
    ids = hf.encode(s, add_special_tokens=False)
    assert ids == tok.encode(s), s
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_tokenizer_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    Tokenizer.load(tmp_path)
  built = tokenizer_lib.build_word_tokenizer(["a", "b", "a"], tmp_path / "t")
  assert built.vocab_size == len(tokenizer_lib.SPECIALS) + len(tokenizer_lib.ROLE_WORDS) + 2
  assert built.decode(built.encode("a b ASSISTANT:")) == "a b ASSISTANT:"
  # A tokenizer.json without the specials is rejected by name.
  import tokenizers
  from tokenizers import models, pre_tokenizers
  bare = tokenizers.Tokenizer(models.WordLevel(vocab={"<unk>": 0, "x": 1}, unk_token="<unk>"))
  bare.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  (tmp_path / "bare").mkdir()
  bare.save(str(tmp_path / "bare" / "tokenizer.json"))
  with pytest.raises(ValueError, match="no '<pad>' token"):
    Tokenizer.load(tmp_path / "bare")


# --------------------------------------------------------------------------- TFDS build
def test_default_build_has_every_split_with_the_configured_sizes(synth, config):
  ds = synth.dataset
  assert set(ds.splits()) == set(synthetic.SPLITS)
  w = config.data.world
  expected = {"pretrain": w.pretrain_size, "helpfulness": w.helpfulness_size, "retain": w.retain_size,
              "unsafe": w.unsafe_size, "unsafe_what": w.unsafe_size * w.k_max,
              "unsafe_control": w.unsafe_size * w.k_max, "safe": w.safe_size, "utility": w.utility_size,
              "safe_unsafe": w.safe_unsafe_size}
  for split, n in expected.items():
    assert ds.num_records(split) == n, split
    assert len(ds.source(split)) == n
  assert ds.num_records("sft") >= w.sft_images
  info = ds.world_info
  assert info["name"] == "mirage_synth"
  assert info["world"] == dict(config.data.world)
  assert info["harmful_codes"] and all(isinstance(c, str) for c in info["harmful_codes"])
  assert os.environ["MIRAGE_DATA_DIR"] in str(ds.path)
  assert ds.path.parts[-3:] == ("mirage_synth", synthetic.WorldConfig.from_dict(dict(w)).fingerprint(), "1.0.0")


def test_built_records_equal_the_generator(small):
  world_cfg, world, built = small
  assert set(built.splits()) == set(synthetic.SPLITS)
  for split in synthetic.SPLITS:
    generated = {r["id"]: r for r in world.split(split)}
    src = built.source(split)
    assert built.num_records(split) == len(src) == len(generated), split
    seen = set()
    for rec in records(src):
      rid = text(rec["id"])
      seen.add(rid)
      ref = generated[rid]
      assert rec["image"].dtype == np.uint8 and rec["image"].shape == (world_cfg.image_size,) * 2 + (3,)
      np.testing.assert_array_equal(rec["image"], ref["image"])  # PNG is lossless
      for k in tfds_builders._TEXT_FIELDS:
        assert text(rec[k]) == str(ref[k]), (split, rid, k)
      for k in tfds_builders._INT_FIELDS:
        assert int(rec[k]) == int(ref[k]), (split, rid, k)
    assert seen == set(generated)


def _digest_in_memory(world: synthetic.World, split: str) -> str:
  """The split digest computed from the generator, written out (the formula the ablation used)."""
  h = hashlib.sha256(" ".join(sorted(world.all_words())).encode())
  for r in world.split(split):
    h.update(f"{r['question']}|{r['answer']}".encode())
    h.update(np.ascontiguousarray(r["image"]).tobytes())
  return h.hexdigest()


def test_recorded_split_digests_equal_the_in_memory_ones(small, config):
  world_cfg, world, built = small
  info = built.world_info
  assert info["vocabulary"] == sorted(world.all_words())
  assert set(info["split_digests"]) == set(synthetic.SPLITS)
  for split in synthetic.SPLITS:
    assert built.split_digest(split) == info["split_digests"][split] == _digest_in_memory(world, split), split
    stored = records(built.source(split))  # shuffled by the TFDS build; the digest follows the ids
    assert tfds_builders.split_digest(stored, info["vocabulary"]) == built.split_digest(split), split
  data_cfg = {**config.data.to_dict(), "world": world_cfg.to_dict(), "data_dir": str(built.path.parents[2])}
  assert pipeline.split_digest(data_cfg, "pretrain") == _digest_in_memory(world, "pretrain")
  with pytest.raises(DataError, match="no recorded digest of split 'nope'"):
    built.split_digest("nope")


def test_build_without_recorded_digests_gets_them_on_open(small, tmp_path):
  """A dataset built before the digests were recorded: the next open adds them (same path, same digests)."""
  world_cfg, _, built = small
  root = tmp_path / "old"
  shutil.copytree(built.path.parents[2], root)
  old = tfds_builders.synth_path(world_cfg, root)
  info = json.loads((old / "extra" / "world.json").read_text())
  recorded = info.pop("split_digests")
  del info["vocabulary"]
  (old / "extra" / "world.json").write_text(json.dumps(info))
  again = tfds_builders.build_synth(world_cfg, root)
  assert again.path == old and again.world_info == built.world_info
  assert again.world_info["split_digests"] == recorded


def test_build_is_content_addressed_and_reused(small, tmp_path):
  world_cfg, _, built = small
  root = built.path.parents[2]
  stamp = (built.path / "dataset_info.json").stat().st_mtime_ns
  again = tfds_builders.build_synth(world_cfg, root)
  assert again.path == built.path
  assert (built.path / "dataset_info.json").stat().st_mtime_ns == stamp  # not rebuilt
  assert tfds_builders.synth_path(world_cfg, root) == built.path
  other = synthetic.WorldConfig(**{**SMALL_WORLD, "seed": 1})
  assert tfds_builders.synth_path(other, root) != built.path
  assert tfds_builders.open_dataset(built.path).path == built.path
  with pytest.raises(FileNotFoundError, match="no built dataset"):
    tfds_builders.open_dataset(tmp_path)
  with pytest.raises(ValueError, match=r"split 'nope' not in .*available: \['dev_safe'"):
    built.source("nope")


def test_open_data_by_path_and_errors(small, config):
  _, _, built = small
  data = pipeline.open_data({**config.data.to_dict(), "path": str(built.path)})
  assert data.dataset.path == built.path
  assert data.tokenizer.image_id == 4
  with pytest.raises(ValueError, match="set data.path"):
    pipeline.open_data({**config.data.to_dict(), "name": "vlguard"})
  with pytest.raises(ValueError, match="unknown WorldConfig key 'pretrain_sise'"):
    pipeline.open_data({**config.data.to_dict(), "world": {**config.data.world.to_dict(), "pretrain_sise": 3}})


# --------------------------------------------------------------------------- preprocessing
def test_training_example_layout(synth, tok, fmt):
  src = synth.dataset.source("sft")
  role_user, role_asst = tok.tok.token_to_id("USER:"), tok.tok.token_to_id("ASSISTANT:")
  for rec in records(src, limit=300):
    ex = preprocess.training_example(rec, tok, fmt)
    q, a = text(rec["question"]), text(rec["answer"])
    tokens, mask, loss_mask = ex["tokens"], ex["mask"], ex["loss_mask"]
    assert tokens.shape == mask.shape == loss_mask.shape == (fmt.max_len,)
    assert tokens.dtype == np.int32
    n = int(mask.sum())
    assert (mask[:n] == 1).all() and (mask[n:] == 0).all()  # right padding
    assert (tokens[n:] == tok.pad_id).all()
    assert tokens[0] == tok.bos_id and (tokens[1:n] != tok.bos_id).all()
    # [BOS] USER: <image> x 16 question ASSISTANT: answer EOS
    assert tokens[1] == role_user
    img = np.flatnonzero(tokens == tok.image_id)
    np.testing.assert_array_equal(img, np.arange(2, 2 + NUM_IMAGE_TOKENS))
    answer_ids = tok.encode(a) + [tok.eos_id]
    np.testing.assert_array_equal(tokens[loss_mask == 1], answer_ids)
    start = int(np.argmax(loss_mask))
    assert start == n - len(answer_ids) and loss_mask[start:n].all() and not loss_mask[n:].any()
    assert tokens[start - 1] == role_asst
    np.testing.assert_array_equal(tokens[2 + NUM_IMAGE_TOKENS:start - 1], tok.encode(q))
    if "query_mask" in ex:  # the question's own tokens
      np.testing.assert_array_equal(tokens[ex["query_mask"] == 1], tok.encode(q))
    assert int(ex["truncated"]) == 0
    img = ex["images"]
    assert img.shape == (32, 32, 3) and img.dtype == np.float32
    np.testing.assert_allclose(img, (rec["image"] / 255.0 - 0.5) / 0.5, atol=1e-6)
    assert img.min() >= -1 and img.max() <= 1


def test_image_normalisation_uses_the_format():
  fmt = preprocess.TextFormat(prompt_template="<image> {question}", max_len=8, num_image_tokens=1,
                              image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 0.125))
  image = np.full((2, 2, 3), 255, np.uint8)
  np.testing.assert_allclose(preprocess.normalize_image(image, fmt)[0, 0], [1.8, 3.2, 5.6], rtol=1e-6)


def test_overflow_error_and_truncate(synth, tok, fmt):
  rec = max(records(synth.dataset.source("pretrain"), limit=400), key=lambda r: len(text(r["answer"]).split()))
  prompt_len = len(preprocess.prompt_ids(text(rec["question"]), tok, fmt))
  answer_len = len(tok.encode(text(rec["answer"]))) + 1
  max_len = prompt_len + answer_len - 3  # 3 tokens too short
  short = preprocess.TextFormat(**{**fmt.__dict__, "max_len": max_len})
  with pytest.raises(preprocess.SequenceTooLong, match=f"exceed data.max_len={max_len}"):
    preprocess.training_example(rec, tok, short)
  cut = preprocess.TextFormat(**{**fmt.__dict__, "max_len": max_len, "overflow": "truncate"})
  ex = preprocess.training_example(rec, tok, cut)
  assert int(ex["truncated"]) == 1
  assert ex["mask"].all()  # exactly full
  full = preprocess.training_example(rec, tok, fmt)
  np.testing.assert_array_equal(ex["tokens"], full["tokens"][:max_len])  # the answer's tail is cut
  assert int(ex["loss_mask"].sum()) == answer_len - 3
  assert tok.eos_id not in ex["tokens"]
  # The prompt is never cut: a max_len inside the prompt is an error even with truncation.
  tiny = preprocess.TextFormat(**{**fmt.__dict__, "max_len": prompt_len, "overflow": "truncate"})
  with pytest.raises(preprocess.SequenceTooLong):
    preprocess.training_example(rec, tok, tiny)


def test_split_cache_counts_truncation(synth, tok, fmt, caplog):
  short = preprocess.TextFormat(**{**fmt.__dict__, "max_len": 40, "overflow": "truncate"})
  cache = pipeline.SplitCache(synth.dataset, tok, short)
  with caplog.at_level("WARNING"):
    ex = cache.examples("safe")
  assert len(ex) == 200
  assert "answers truncated to data.max_len=40" in caplog.text
  assert ex[0]["tokens"].shape == (40,)
  with pytest.raises(preprocess.SequenceTooLong):
    pipeline.SplitCache(synth.dataset, tok, preprocess.TextFormat(**{**fmt.__dict__, "max_len": 40})).examples(
        "safe")


def test_text_format_and_template_checks(tok, fmt):
  with pytest.raises(ValueError, match="must contain"):
    preprocess.TextFormat(prompt_template="USER: {question} ASSISTANT:", max_len=8, num_image_tokens=1)
  with pytest.raises(ValueError, match="must contain"):
    preprocess.TextFormat(prompt_template="USER: <image> ASSISTANT:", max_len=8, num_image_tokens=1)
  with pytest.raises(ValueError):
    preprocess.TextFormat(prompt_template="<image> {question}", max_len=8, num_image_tokens=1, overflow="drop")
  preprocess.check_template(tok, fmt)
  typo = preprocess.TextFormat(**{**fmt.__dict__, "prompt_template": "USR: <image> {question} ASSISTANT:"})
  with pytest.raises(ValueError, match=r"does not know \['USR:'\]"):
    preprocess.check_template(tok, typo)
  with pytest.raises(ValueError, match="exactly one <image>"):
    preprocess.prompt_ids("What is <image> ?", tok, fmt)


def test_generation_prompts_left_pad(synth, tok, fmt):
  recs = records(synth.dataset.source("unsafe_what"), limit=12)
  lengths = [len(preprocess.prompt_ids(text(r["question"]), tok, fmt)) for r in recs]
  assert len(set(lengths)) > 1  # different lengths, so padding differs per row
  out = preprocess.generation_prompts(recs, tok, fmt)
  t = max(lengths)
  assert out["tokens"].shape == out["mask"].shape == (12, t)
  assert out["images"].shape == (12, 32, 32, 3)
  asst = tok.tok.token_to_id("ASSISTANT:")
  for i, (rec, n) in enumerate(zip(recs, lengths)):
    assert (out["mask"][i, :t - n] == 0).all() and (out["mask"][i, t - n:] == 1).all()
    assert (out["tokens"][i, :t - n] == tok.pad_id).all()
    np.testing.assert_array_equal(out["tokens"][i, t - n:], preprocess.prompt_ids(text(rec["question"]), tok, fmt))
    assert out["tokens"][i, -1] == asst  # every row ends where the answer starts
    np.testing.assert_allclose(out["images"][i], preprocess.normalize_image(rec["image"], fmt))
  longer = preprocess.generation_prompts(recs, tok, fmt, length=t + 5)
  np.testing.assert_array_equal(longer["tokens"][:, 5:], out["tokens"])
  assert (longer["mask"][:, :5] == 0).all()
  with pytest.raises(preprocess.SequenceTooLong):
    preprocess.generation_prompts(recs, tok, fmt, length=t - 1)


# --------------------------------------------------------------------------- mixtures
def test_parse_mixture():
  E = pipeline.MixtureEntry
  assert pipeline.parse_mixture("pretrain") == (E("pretrain", None),)
  assert pipeline.parse_mixture("sft,helpfulness") == (E("sft", None), E("helpfulness", None))
  assert pipeline.parse_mixture(" sft : 0.7 , helpfulness:0.3 ,") == (E("sft", 0.7), E("helpfulness", 0.3))
  assert pipeline.parse_mixture("a:2") == (E("a", 2.0),)


@pytest.mark.parametrize("spec, match", [
    ("", "empty mixture"),
    (" , ", "empty mixture"),
    ("sft:x", "weight must be a number"),
    ("sft:0", "weight must be positive"),
    ("sft:-1", "weight must be positive"),
    ("sft:0.5,helpfulness", "give a weight to every split or to none"),
])
def test_parse_mixture_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    pipeline.parse_mixture(spec)


# --------------------------------------------------------------------------- streams
def row_keys(split_examples) -> dict[bytes, int]:
  """Content hash -> count for every example of a split (tokens + image identify a record)."""
  return collections.Counter(_key(split_examples[i]) for i in range(len(split_examples)))


def _key(ex) -> bytes:
  return hashlib.sha1(np.asarray(ex["tokens"]).tobytes() + np.asarray(ex["images"]).tobytes()).digest()


def batch_keys(batch) -> list[bytes]:
  return [_key({"tokens": batch["tokens"][i], "images": batch["images"][i]}) for i in range(len(batch["tokens"]))]


def stream(splits, mixture="sft,helpfulness", batch=16, seed=0, **kw):
  return pipeline.Stream(name="train", mixture=mixture, splits=splits, global_batch=batch, seed=seed, **kw)


def take(s, n):
  return [next(s) for _ in range(n)]


def same_batches(a, b) -> bool:
  return all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_stream_batches_are_model_arrays(splits, fmt):
  b = next(stream(splits, batch=8))
  for k in ("tokens", "mask", "loss_mask", "images"):
    assert k in b and b[k].shape[0] == 8
  assert b["tokens"].shape == (8, fmt.max_len) and b["images"].shape == (8, 32, 32, 3)
  assert "truncated" not in b


def test_stream_deterministic_per_seed(splits):
  a, b = take(stream(splits, seed=3), 4), take(stream(splits, seed=3), 4)
  assert same_batches(a, b)
  c = take(stream(splits, seed=4), 4)
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])
  assert not same_batches(a, c)


def test_stream_state_resumes_exactly(splits):
  s = stream(splits, seed=1)
  take(s, 3)
  state = s.get_state()
  assert state  # something to checkpoint (JSON-able)
  import json
  state = json.loads(json.dumps(state))
  expected = take(s, 4)
  fresh = stream(splits, seed=1)
  fresh.set_state(state)
  assert same_batches(take(fresh, 4), expected)
  # Restoring the initial state replays from the start.
  t = stream(splits, seed=1)
  first = take(t, 2)
  t.set_state(stream(splits, seed=1).get_state())
  assert same_batches(take(t, 2), first)


@pytest.mark.parametrize("prefetch,threads", [(0, 0), (3, 2)])
def test_stream_prefetch_is_bounded_gives_the_same_batches_and_closes(splits, prefetch, threads):
  """Batches assembled ahead (grain's prefetch, bounded by `data.prefetch_batches`) are the same batches in
  the same order, resume the same, and `close` stops the threads that assemble them."""
  import threading
  import time
  read = pipeline.read_options({"prefetch_batches": prefetch, "read_threads": threads})
  assert (read.prefetch_buffer_size, read.num_threads) == ((3, 2) if prefetch else (0, 0))
  s = stream(splits, seed=2, read=read)
  plain = stream(splits, seed=2)
  first = take(s, 3)
  assert same_batches(first, take(plain, 3))
  fresh = stream(splits, seed=2, read=read)
  fresh.set_state(s.get_state())
  assert same_batches(take(fresh, 2), take(plain, 2))
  for st in (s, fresh, plain):
    st.close()
  deadline = time.time() + 10
  while any(t.name.startswith("grain-prefetch") for t in threading.enumerate()) and time.time() < deadline:
    time.sleep(0.05)
  assert not [t.name for t in threading.enumerate() if t.name.startswith("grain-prefetch")]


@pytest.mark.parametrize("bad", [{"prefetch_batches": -1}, {"read_threads": 1.5}, {"prefetch_batches": True}])
def test_stream_prefetch_settings_are_checked(bad):
  with pytest.raises(ConfigError, match="expected an integer >= 0"):
    pipeline.read_options({"prefetch_batches": 4, "read_threads": 2, **bad})


def test_stream_never_runs_dry_and_shuffles_per_epoch(splits):
  safe = splits.examples("safe")
  n = len(safe)
  assert n == 200
  keys = row_keys(safe)
  s = stream(splits, mixture="safe", batch=40, seed=0)
  rows = [k for b in take(s, 15) for k in batch_keys(b)]  # 600 rows = 3 epochs
  assert len(rows) == 3 * n
  epochs = [rows[i * n:(i + 1) * n] for i in range(3)]
  for e in epochs:
    assert collections.Counter(e) == keys  # every epoch is the whole split
  assert epochs[0] != epochs[1]  # reshuffled
  assert epochs[0] != [_key(safe[i]) for i in range(n)]  # not in file order


def test_stream_mixture_weights(splits):
  sft, helpful = row_keys(splits.examples("sft")), row_keys(splits.examples("helpfulness"))
  assert not set(sft) & set(helpful)
  for mixture, want in [("sft:0.8,helpfulness:0.2", 0.8), ("sft:1,helpfulness:3", 0.25),
                        ("sft,helpfulness", len(splits.examples("sft")) / (len(splits.examples("sft")) +
                                                                           len(splits.examples("helpfulness"))))]:
    rows = [k for b in take(stream(splits, mixture=mixture, batch=64, seed=2), 25) for k in batch_keys(b)]
    assert all(k in sft or k in helpful for k in rows)
    frac = sum(k in sft for k in rows) / len(rows)
    assert abs(frac - want) < 0.04, (mixture, frac, want)


def test_two_processes_cover_the_same_rows(splits):
  one = take(stream(splits, batch=16, seed=5), 6)
  p0 = take(stream(splits, batch=16, seed=5, process_index=0, process_count=2), 6)
  p1 = take(stream(splits, batch=16, seed=5, process_index=1, process_count=2), 6)
  for g, a, b in zip(one, p0, p1):
    assert a["tokens"].shape[0] == b["tokens"].shape[0] == 8
    assert collections.Counter(batch_keys(a) + batch_keys(b)) == collections.Counter(batch_keys(g))
    assert not np.array_equal(a["tokens"], b["tokens"])
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    stream(splits, batch=16, process_index=0, process_count=3)


def test_stream_unknown_split(splits):
  with pytest.raises(ValueError, match="split 'nosuch' not in"):
    stream(splits, mixture="sft,nosuch")


def test_uncached_examples_equal_cached(synth, tok, fmt, splits):
  lazy = pipeline.SplitCache(synth.dataset, tok, fmt, cache=False).examples("safe")
  cached = splits.examples("safe")
  assert len(lazy) == len(cached)
  for i in (0, 7, 199):
    for k in ("tokens", "mask", "loss_mask", "images"):
      np.testing.assert_array_equal(lazy[i][k], cached[i][k])


def test_eval_batches_pad_the_last_batch(splits):
  ex = splits.examples("safe")
  batches = list(pipeline.eval_batches(ex, 64))
  assert len(batches) == 4  # 200 = 3 x 64 + 8
  assert all(b["tokens"].shape[0] == 64 for b in batches)
  np.testing.assert_array_equal(batches[-1]["weight"], [1] * 8 + [0] * 56)
  assert all(b["weight"].all() for b in batches[:-1])
  np.testing.assert_array_equal(batches[1]["tokens"][0], ex[64]["tokens"])  # sequential, in order
  assert len(list(pipeline.eval_batches(ex, 64, max_batches=2))) == 2
  assert sum(float(b["weight"].sum()) for b in pipeline.eval_batches(ex, 64, max_batches=10)) == 200


def test_to_global_shards_the_batch(splits):
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  local = next(stream(splits, batch=8))
  out = pipeline.to_global(local, mesh)
  assert jax.process_count() == 1
  for k, v in local.items():
    assert out[k].shape == v.shape
    assert out[k].sharding == sharding.batch_sharding(mesh, v.ndim)
    np.testing.assert_array_equal(np.asarray(out[k]), v)
