"""Tokenizers: a word-level HF `tokenizers` model built from the synthetic world's vocabulary, saved with
the data, or a pretrained tokenizer read with `transformers` (`Tokenizer.from_hf`, e.g. LLaVA-1.5's LLaMA
sentencepiece-BPE), plus the special-token contract every tokenizer in mirage_jax meets (pad, BOS, EOS,
`<image>`).

The synthetic corpus is space-separated (punctuation is its own word), so a whitespace word-level tokenizer
round-trips exactly and keeps sequences short. A saved tokenizer directory holds `tokenizer.json` (the
`tokenizers` pipeline), `mirage_tokenizer.json` (which tokens are pad/BOS/EOS/`<image>`) and the
`transformers` files (`tokenizer_config.json`), so `transformers.AutoTokenizer.from_pretrained(dir)` loads
the same tokenizer.
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

from mirage_jax.errors import DataError, MissingFileError

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

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each token's [start, end) character span in `text` (for spans of jointly encoded text)."""
    enc = self.tok.encode(text, add_special_tokens=False)
    return enc.ids, [tuple(o) for o in enc.offsets]

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

  def save(self, directory: str | os.PathLike) -> None:
    """Write the tokenizer so that `Tokenizer.load` (and `transformers.AutoTokenizer`) read it back."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    self.tok.save(str(directory / "tokenizer.json"))
    names = {k: self.tok.id_to_token(getattr(self, f"{k}_id")) for k in ("pad", "bos", "eos", "image")}
    (directory / _META).write_text(json.dumps(names))
    unk = UNK if self.tok.token_to_id(UNK) is not None else None
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": names["bos"], "eos_token": names["eos"],
        "pad_token": names["pad"], "unk_token": unk, "extra_special_tokens": [names["image"]],
        "model_max_length": 1 << 20,
    }, indent=1))

  @classmethod
  def from_hf(cls, directory: str | os.PathLike, *, image_token: str = IMAGE) -> "Tokenizer":
    """A pretrained tokenizer directory read with `transformers.AutoTokenizer` (offline).

    The encoding pipeline is the one transformers builds (its `backend_tokenizer`), so ids match the HF
    processor's. The pad id falls back to the unknown token (LLaVA-1.5 pads with `<unk>`); `image_token`
    must be one token of the vocabulary (LLaVA-1.5-hf adds `<image>` as id 32000).
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
      raise MissingFileError(f"tokenizer directory {directory} not found")
    from transformers import AutoTokenizer  # imported lazily: slow, and only needed here
    try:
      hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as e:
      raise DataError(f"cannot load a transformers tokenizer from {directory}: {e}") from None
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, tokenizers.Tokenizer):
      raise DataError(f"the tokenizer in {directory} ({type(hf).__name__}) has no `tokenizers` backend")
    image_id = backend.token_to_id(image_token)
    if image_id is None:
      raise DataError(f"tokenizer in {directory} has no {image_token!r} token (LLaVA tokenizers add it)")
    pad_id = hf.pad_token_id if hf.pad_token_id is not None else hf.unk_token_id
    ids = {"pad_id": pad_id, "bos_id": hf.bos_token_id, "eos_id": hf.eos_token_id}
    missing = [k for k, v in ids.items() if v is None]
    if missing:
      raise DataError(f"tokenizer in {directory} lacks special tokens for {missing}")
    backend = tokenizers.Tokenizer.from_str(backend.to_str())  # our own copy, never padding or truncating
    backend.no_padding()
    backend.no_truncation()
    return cls(tok=backend, image_id=image_id, **ids)

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "Tokenizer":
    directory = pathlib.Path(directory)
    path = directory / "tokenizer.json"
    if not path.exists():
      raise MissingFileError(f"no tokenizer.json in {directory}")
    tok = tokenizers.Tokenizer.from_file(str(path))
    meta = json.loads((directory / _META).read_text()) if (directory / _META).exists() else {}
    names = {"pad_id": meta.get("pad", PAD), "bos_id": meta.get("bos", BOS), "eos_id": meta.get("eos", EOS),
             "image_id": meta.get("image", IMAGE)}
    ids = {}
    for field, token in names.items():
      tid = tok.token_to_id(token)
      if tid is None:
        raise DataError(f"tokenizer in {directory} has no {token!r} token (needed as {field})")
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
  ids = {f"{name}_id": tok.token_to_id(t) for name, t in (("pad", PAD), ("bos", BOS), ("eos", EOS),
                                                          ("image", IMAGE))}
  Tokenizer(tok=tok, **ids).save(out_dir)
  return Tokenizer.load(out_dir)
