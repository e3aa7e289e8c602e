"""Batched generation over dataset splits (one jitted KV-cache decoder, one compile per run): greedy answers
for evaluation, or N sampled candidates per query (temperature, top-p; seeded) for building a forget set.

Every batch has the same shape — prompts left-padded to one length for all splits, the last batch padded
with copies — so the decoder compiles once and every device of the mesh gets an equal share.

Sampling gives every (query, candidate) row its own PRNG key: `seed`, folded with a hash of the query's id
and the candidate index (`decode.row_keys`). A query's candidates therefore do not depend on which other
queries share its batch, nor on where it sits in it: a resumed run (fewer queries) samples what the full run
would have sampled. Temperature 0 is the greedy program of evaluation, unchanged.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mirage_jax import sharding
from mirage_jax.data import preprocess
from mirage_jax.data.pipeline import to_global
from mirage_jax.data.records import decode_record, load_records  # noqa: F401  (re-exported here)
from mirage_jax.data.records import text
from mirage_jax.errors import ConfigError
from mirage_jax.models import decode


def query_key(record_id: Any) -> int:
  """A stable non-negative int32 per query id (CRC-32 of its text): the query's part of its rows' keys."""
  return zlib.crc32(text(record_id).encode("utf-8")) & 0x7FFFFFFF


class Generator:
  """`__call__`: one greedy (or sampled) response per record; `candidates`: N per record.

  `batch_size` counts decoded rows (a query with N candidates takes N rows), rounded up to the mesh's data x
  fsdp devices."""

  def __init__(self, setup, *, batch_size: int, max_new_tokens: int, prompt_len: int, temperature: float = 0.0,
               top_p: float = 1.0):
    self.setup = setup
    self.tok = setup.data.tokenizer
    divisor = sharding.batch_divisor(setup.mesh)
    self.batch_size = -(-batch_size // divisor) * divisor
    self.prompt_len = prompt_len
    cfg = decode.GenerateConfig(max_new_tokens=max_new_tokens, eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                                temperature=temperature, top_p=top_p)
    self.config = cfg
    spec = setup.spec
    if cfg.sampling:
      self._fn = jax.jit(lambda params, prompts, ids, seed: decode.generate(
          spec.merge(params), prompts=prompts, config=cfg, keys_b=decode.row_keys(seed, ids)))
    else:  # the greedy program of evaluation (the toy's numbers depend on it)
      self._fn = jax.jit(lambda params, prompts: decode.generate(spec.merge(params), prompts=prompts, config=cfg))

  def __call__(self, params, records: Sequence[Mapping[str, Any]], *, seed: int = 0,
               prefills: Sequence[str] | None = None) -> list[str]:
    """One response per record. `prefills` (greedy only): a forced opening per record, which the decoder
    continues; each response is its prefill, a space and the continuation (what the user would read)."""
    if prefills is not None:
      if self.config.sampling:
        raise ConfigError("prefills are for greedy decoding (temperature 0)")
      out = self._generate(params, list(records), prefills=list(prefills))
      return [f"{p} {r}".strip() if p else r for p, r in zip(prefills, out, strict=True)]
    if not self.config.sampling:
      return self._generate(params, list(records))
    return [c[0] for c in self.candidates(params, records, num_candidates=1, seed=seed)]

  def candidates(self, params, records: Sequence[Mapping[str, Any]], *, num_candidates: int,
                 seed: int = 0) -> list[list[str]]:
    """`num_candidates` responses per record, sampled with keys from `seed`, the record's id and the
    candidate index (greedy: `num_candidates` must be 1, the candidates would be identical)."""
    if num_candidates < 1:
      raise ConfigError(f"num_candidates={num_candidates} must be >= 1")
    if not self.config.sampling:
      if num_candidates > 1:
        raise ConfigError(f"num_candidates={num_candidates} with temperature 0 (greedy) gives identical "
                          "candidates: set a temperature > 0 or num_candidates=1")
      return [[r] for r in self._generate(params, list(records))]
    if not 0 <= seed < 2**32:
      raise ConfigError(f"seed={seed} must be in [0, 2**32)")
    rows = [r for r in records for _ in range(num_candidates)]
    ids = np.array([(query_key(r["id"]), c) for r in records for c in range(num_candidates)], np.int32)
    flat = self._generate(params, rows, ids.reshape(-1, 2), seed)
    return [flat[i * num_candidates:(i + 1) * num_candidates] for i in range(len(records))]

  def _generate(self, params, rows: list, ids: np.ndarray | None = None, seed: int = 0,
                prefills: list[str] | None = None) -> list[str]:
    responses: list[str] = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      n = len(chunk)
      chunk += [chunk[-1]] * (self.batch_size - n)
      opening = None
      if prefills is not None:
        opening = prefills[start:start + n]
        opening += [opening[-1]] * (self.batch_size - n)
      prompts = preprocess.generation_prompts(chunk, self.tok, self.setup.fmt, self.prompt_len, prefills=opening)
      with jax.set_mesh(self.setup.mesh):
        if ids is None:
          out = self._fn(params, to_global(prompts, self.setup.mesh))
        else:
          ids_b2 = ids[start:start + self.batch_size]
          ids_b2 = np.concatenate([ids_b2, np.repeat(ids_b2[-1:], self.batch_size - n, axis=0)])
          batch = to_global({**prompts, "ids": ids_b2}, self.setup.mesh)
          out = self._fn(params, {k: v for k, v in batch.items() if k != "ids"}, batch["ids"], np.uint32(seed))
        out = np.asarray(jax.device_get(out))
      responses += [self.tok.decode(row) for row in out[:n]]
    return responses


def prompt_length(records: Sequence[Mapping[str, Any]], tok, fmt, *, multiple: int = 8,
                  prefills: Sequence[str] | None = None) -> int:
  """The longest prompt among `records` (with its forced opening, `prefills`), rounded up (one decoder shape
  for every split)."""
  prefills = [""] * len(records) if prefills is None else prefills
  longest = max(len(preprocess.prompt_with_prefill(r["question"], p, tok, fmt))
                for r, p in zip(records, prefills, strict=True))
  return -(-longest // multiple) * multiple
