"""Batched greedy generation over dataset splits (one jitted KV-cache decoder, one compile per run).

Every batch has the same shape — prompts left-padded to one length for all splits, the last batch padded
with copies — so the decoder compiles once and every device of the mesh gets an equal share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mirage_jax import sharding
from mirage_jax.data import preprocess
from mirage_jax.data.pipeline import to_global
from mirage_jax.data.records import decode_record, load_records  # noqa: F401  (re-exported here)
from mirage_jax.models import decode


class Generator:
  def __init__(self, setup, *, batch_size: int, max_new_tokens: int, prompt_len: int):
    self.setup = setup
    self.tok = setup.data.tokenizer
    divisor = sharding.batch_divisor(setup.mesh)
    self.batch_size = -(-batch_size // divisor) * divisor
    self.prompt_len = prompt_len
    cfg = decode.GenerateConfig(max_new_tokens=max_new_tokens, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
    spec = setup.spec
    self._fn = jax.jit(lambda params, prompts: decode.generate(spec.merge(params), prompts=prompts, config=cfg))

  def __call__(self, params, records: Sequence[Mapping[str, Any]]) -> list[str]:
    responses: list[str] = []
    for start in range(0, len(records), self.batch_size):
      chunk = list(records[start:start + self.batch_size])
      n = len(chunk)
      chunk += [chunk[-1]] * (self.batch_size - n)
      prompts = preprocess.generation_prompts(chunk, self.tok, self.setup.fmt, self.prompt_len)
      with jax.set_mesh(self.setup.mesh):
        out = np.asarray(jax.device_get(self._fn(params, to_global(prompts, self.setup.mesh))))
      responses += [self.tok.decode(row) for row in out[:n]]
    return responses


def prompt_length(records: Sequence[Mapping[str, Any]], tok, fmt, *, multiple: int = 8) -> int:
  """The longest prompt among `records`, rounded up (one decoder shape for every split)."""
  longest = max(len(preprocess.prompt_ids(r["question"], tok, fmt)) for r in records)
  return -(-longest // multiple) * multiple
