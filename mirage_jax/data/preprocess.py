"""Record -> model arrays: chat template, `<image>` expansion, loss mask on answer tokens, image normalisation.

Training rows are `[BOS] prompt answer [EOS] pad...` (right-padded) with `loss_mask` = 1 exactly on the
answer tokens and the EOS; the prompt's single `<image>` token is expanded to one token per image feature.
Generation prompts are left-padded so that every row's next token lands in the same KV-cache slot.

Text is encoded jointly, as one string, the way HF processors do: the templated prompt (system text, question,
role markers) in one call, and prompt + " " + answer in one call for training. Subword tokenizers (LLaMA's
sentencepiece-BPE, byte-level BPE) tokenize a piece differently alone than inside its context (a word after
a newline has no leading-space marker, one after a space does), so the question's and the answer's token spans
are found from the character offsets of the joint encoding, never by encoding them separately.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mirage_jax.data import images
from mirage_jax.data.records import text as _text
from mirage_jax.data.tokenizer import IMAGE, Tokenizer
from mirage_jax.errors import ConfigError, DataError


# LLaVA-1.5's `llava_v1` conversation template (the official safety evaluation's; training used `vicuna_v1`,
# which says "user" for "human"): system prompt, "USER: <image>\n{question} ASSISTANT:", answer, "</s>".
LLAVA_V1_TEMPLATE = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                     "helpful, detailed, and polite answers to the human's questions. USER: <image>\n{question} "
                     "ASSISTANT:")
ANSWER_SEPARATOR = " "  # between the prompt and the answer (LLaVA's `sep`)


class Overflow(str, enum.Enum):
  ERROR = "error"  # a sequence longer than max_len is a data error
  TRUNCATE = "truncate"  # cut the answer's tail (the prompt is never cut); counted


class SequenceTooLong(DataError):
  pass


@dataclasses.dataclass(frozen=True)
class TextFormat:
  """How a (question, answer) pair becomes tokens."""

  prompt_template: str  # must contain "<image>" and "{question}"
  max_len: int
  num_image_tokens: int
  overflow: str = Overflow.ERROR.value
  image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

  def __post_init__(self):
    if IMAGE not in self.prompt_template or "{question}" not in self.prompt_template:
      raise ConfigError(f"data.prompt_template must contain {IMAGE!r} and '{{question}}', got "
                       f"{self.prompt_template!r}")
    if self.overflow not in {o.value for o in Overflow}:
      raise ConfigError(f"data.overflow={self.overflow!r}: valid values: {', '.join(repr(o.value) for o in Overflow)}")

  @classmethod
  def from_config(cls, data: Mapping[str, Any], *, num_image_tokens: int) -> "TextFormat":
    return cls(prompt_template=data["prompt_template"], max_len=int(data["max_len"]),
               num_image_tokens=num_image_tokens, overflow=data.get("overflow", "error"),
               image_mean=tuple(data.get("image_mean", (0.5,) * 3)), image_std=tuple(data.get("image_std", (0.5,) * 3)))


def check_template(tok: Tokenizer, fmt: TextFormat) -> None:
  """The prompt template must tokenize without unknown words (a typo there would silently become <unk>)."""
  unk = tok.tok.token_to_id("<unk>")
  probe = fmt.prompt_template.replace("{question}", "")
  if unk is not None and unk in tok.encode(probe):
    words = [w for w in probe.split() if tok.tok.token_to_id(w) is None and w != IMAGE]
    raise ConfigError(f"data.prompt_template {fmt.prompt_template!r}: the tokenizer does not know {words}")


@dataclasses.dataclass(frozen=True)
class Prompt:
  ids: list[int]  # [BOS] + template with the question, `<image>` expanded
  question: tuple[int, int]  # [start, end) of the question's own tokens in `ids`
  text: str = ""  # the templated prompt text (before `<image>` expansion)
  raw: tuple[int, ...] = ()  # the prompt text's ids, without BOS and before `<image>` expansion


def encode_prompt(question: str, tok: Tokenizer, fmt: TextFormat) -> Prompt:
  """The templated prompt, encoded jointly; the question's span comes from the character offsets."""
  before, after = fmt.prompt_template.split("{question}", 1)
  text = before + question + after
  ids, offsets = tok.encode_with_offsets(text)
  q0, q1 = len(before), len(before) + len(question)
  images = [i for i, t in enumerate(ids) if t == tok.image_id]
  in_question = [i for i in images if q0 <= offsets[i][0] < q1]
  if len(images) != 1 or in_question:
    raise DataError(f"the prompt must contain exactly one {IMAGE} token (in the template, not the question), "
                     f"found {len(images)}: {question!r}")
  inside = [i for i, (start, end) in enumerate(offsets) if start < q1 and end > q0 and ids[i] != tok.image_id]
  if inside:
    q_start, q_end = inside[0], inside[-1] + 1
  else:  # an empty question: an empty span where it would start
    q_start = q_end = next((i for i, (start, _) in enumerate(offsets) if start >= q1), len(ids))
  shift = 1 + (fmt.num_image_tokens - 1 if images[0] < q_start else 0)  # BOS + the expanded image
  img = images[0]
  expanded = [tok.bos_id] + ids[:img] + [tok.image_id] * fmt.num_image_tokens + ids[img + 1:]
  return Prompt(ids=expanded, question=(q_start + shift, q_end + shift), text=text, raw=tuple(ids))


def encode_answer(prompt: Prompt, answer: str, tok: Tokenizer) -> list[int]:
  """The answer's ids as they tokenize after the prompt (prompt + " " + answer encoded jointly).

  If the joint encoding does not start with the prompt's own ids (a token straddles the boundary, which
  whitespace-splitting tokenizers never do), the answer is encoded alone, so that training prompts always
  equal generation prompts.
  """
  ids, _ = tok.encode_with_offsets(prompt.text + ANSWER_SEPARATOR + answer)
  n = len(prompt.raw)
  return ids[n:] if tuple(ids[:n]) == prompt.raw else tok.encode(answer)


def prompt_ids(question: str, tok: Tokenizer, fmt: TextFormat) -> list[int]:
  """[BOS] + the templated prompt, with `<image>` expanded to `num_image_tokens` image tokens."""
  return encode_prompt(question, tok, fmt).ids


def normalize_image(image_hwc: np.ndarray, fmt: TextFormat) -> np.ndarray:
  return images.normalize(image_hwc, fmt.image_mean, fmt.image_std)


def training_example(rec: Mapping[str, Any], tok: Tokenizer, fmt: TextFormat) -> dict[str, np.ndarray]:
  """tokens / mask / loss_mask (answer + EOS) / query_mask (the question's tokens) [max_len] and the
  normalised image; `truncated` counts cut answers."""
  encoded = encode_prompt(_text(rec["question"]), tok, fmt)
  prompt = encoded.ids
  answer = encode_answer(encoded, _text(rec["answer"]), tok) + [tok.eos_id]
  n = len(prompt) + len(answer)
  truncated = 0
  if n > fmt.max_len:
    if Overflow(fmt.overflow) == Overflow.ERROR or len(prompt) >= fmt.max_len:
      raise SequenceTooLong(f"record {_text(rec.get('id', '?'))}: {n} tokens (prompt {len(prompt)}) exceed "
                            f"data.max_len={fmt.max_len}; raise max_len or set data.overflow=truncate")
    answer = answer[:fmt.max_len - len(prompt)]
    truncated = 1
  ids = prompt + answer
  tokens = np.full((fmt.max_len,), tok.pad_id, np.int32)
  tokens[:len(ids)] = ids
  mask = np.zeros((fmt.max_len,), np.int32)
  mask[:len(ids)] = 1
  loss_mask = np.zeros((fmt.max_len,), np.int32)
  loss_mask[len(prompt):len(ids)] = 1
  query_mask = np.zeros((fmt.max_len,), np.int32)
  query_mask[encoded.question[0]:encoded.question[1]] = 1
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "query_mask": query_mask,
          "images": normalize_image(rec["image"], fmt), "truncated": np.int32(truncated)}


def prompt_with_prefill(question: str, prefill: str, tok: Tokenizer, fmt: TextFormat) -> list[int]:
  """`prompt_ids`, then the opening `prefill` of the answer as it tokenizes there (a prefill attack forces it;
  "" = the plain prompt)."""
  encoded = encode_prompt(question, tok, fmt)
  return encoded.ids + (encode_answer(encoded, prefill, tok) if prefill else [])


def generation_prompts(records: Sequence[Mapping[str, Any]], tok: Tokenizer, fmt: TextFormat,
                       length: int | None = None, prefills: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Left-padded prompts (tokens, mask, images) for a batch of records; `prefills` (one per record) are forced
  openings of the answers (`prompt_with_prefill`)."""
  prefills = [""] * len(records) if prefills is None else prefills
  prompts = [prompt_with_prefill(_text(r["question"]), p, tok, fmt) for r, p in zip(records, prefills, strict=True)]
  length = max(map(len, prompts)) if length is None else length
  tokens = np.full((len(prompts), length), tok.pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    if len(p) > length:
      raise SequenceTooLong(f"prompt of {len(p)} tokens exceeds the prompt length {length}")
    tokens[i, length - len(p):] = p
    mask[i, length - len(p):] = 1
  images = np.stack([normalize_image(r["image"], fmt) for r in records])
  return {"tokens": tokens, "mask": mask, "images": images}
