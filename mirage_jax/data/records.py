"""The one conversion of TFDS record values to Python text.

A TFDS data source returns a `Text` feature as `bytes`; everything that reads records (training examples,
generation, judges, the audit, `mirage data stats`) turns them into `str` here. A TFDS build stores a split's
records shuffled (by key): `in_id_order` restores the order the generator made them in. Imports nothing heavy
(no tensorflow_datasets), so every layer above `data` may use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def text(value: Any) -> str:
  """A record value as text: `bytes` decoded as UTF-8, anything else through `str`."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
  """A copy of a TFDS record with every `bytes` value decoded to `str` (arrays and numbers unchanged)."""
  return {k: text(v) if isinstance(v, bytes) else v for k, v in record.items()}


def load_records(source, *, limit: int | None = None) -> list[dict[str, Any]]:
  """The first `limit` (default: all) records of a random-access TFDS source in stored order, decoded."""
  n = len(source) if limit is None else min(limit, len(source))
  return [decode_record(source[i]) for i in range(n)]


def record_index(record: Mapping[str, Any]) -> int:
  """The position of a record in its split as generated: the number after the last "/" of its id
  ("pretrain/000042" -> 42)."""
  return int(text(record["id"]).rpartition("/")[2])


def in_id_order(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """`records` sorted by `record_index`: the generator's order, whatever order they were stored in."""
  return sorted(records, key=record_index)
