"""Tokenizers: a word-level HF `tokenizers` model built from the synthetic world's vocabulary, saved with
the data, plus the special-token contract every tokenizer in mirage_jax meets (pad, BOS, EOS, `<image>`).

The synthetic corpus is space-separated (punctuation is its own word), so a whitespace word-level tokenizer
round-trips exactly and keeps sequences short. The directory also holds the `transformers` files
(`tokenizer_config.json`), so `transformers.AutoTokenizer.from_pretrained(dir)` loads the same tokenizer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIALS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4 in the word-level tokenizer
ROLE_WORDS = ("USER:", "ASSISTANT:")  # the conversation template's role markers
_META = "mirage_tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Text <-> ids with the special ids the data pipeline and decoding need."""

  tok: tokenizers.Tokenizer
  pad_id: int
  bos_id: int
  eos_id: int
  image_id: int

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size()

  def fingerprint(self) -> str:
    """Hash of the token -> id table: parameters trained with one tokenizer are meaningless with another."""
    vocab = sorted(self.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first EOS, without special tokens."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      out.append(i)
    return self.tok.decode(out, skip_special_tokens=True)

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "Tokenizer":
    directory = pathlib.Path(directory)
    path = directory / "tokenizer.json"
    if not path.exists():
      raise FileNotFoundError(f"no tokenizer.json in {directory}")
    tok = tokenizers.Tokenizer.from_file(str(path))
    meta = json.loads((directory / _META).read_text()) if (directory / _META).exists() else {}
    names = {"pad_id": meta.get("pad", PAD), "bos_id": meta.get("bos", BOS), "eos_id": meta.get("eos", EOS),
             "image_id": meta.get("image", IMAGE)}
    ids = {}
    for field, token in names.items():
      tid = tok.token_to_id(token)
      if tid is None:
        raise ValueError(f"tokenizer in {directory} has no {token!r} token (needed as {field})")
      ids[field] = tid
    return cls(tok=tok, **ids)


def build_word_tokenizer(words: Iterable[str], out_dir: str | os.PathLike) -> Tokenizer:
  """Word-level tokenizer over `words` (+ the specials at ids 0..4 and the role words), saved to `out_dir`."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  vocab = {t: i for i, t in enumerate(SPECIALS)}
  for w in (*ROLE_WORDS, *words):
    if w and w not in vocab:
      vocab[w] = len(vocab)
  tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
  tok.add_special_tokens(list(SPECIALS))
  tok.save(str(out_dir / "tokenizer.json"))
  (out_dir / _META).write_text(json.dumps({"pad": PAD, "bos": BOS, "eos": EOS, "image": IMAGE}))
  (out_dir / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
      "unk_token": UNK, "extra_special_tokens": [IMAGE], "model_max_length": 1 << 20,
  }, indent=1))
  return Tokenizer.load(out_dir)
