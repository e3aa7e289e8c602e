"""Block sizes of the fused token log-prob kernels: a dataclass, a small table keyed by shape buckets, checks.

Shapes use one letter per axis: N tokens (flattened batch), D model width, V vocabulary (of one shard).
A block is `block_tokens` rows of `h` by `block_vocab` columns of `w`; both kernels loop over the vocabulary
in blocks with an online logsumexp, so the largest float32 array they hold is one [block_tokens, block_vocab]
tile. Blocks larger than the array are clamped to it (a block then covers the whole axis); blocks that do
not divide the axis are masked, never padded (no copy of `w`).

The table is keyed by stable buckets (width for the Pallas TPU kernel, which keeps a full-width row block and
a full-width column block of `w` in VMEM; platform and token count for chunked XLA, whose tile lives in
HBM on accelerators and should stay in cache on a CPU), not by exact shapes.
"""

from __future__ import annotations

import dataclasses

MiB = 2**20

# Pallas TPU: a block of `h` [bt, D] and of `w` [D, bv] stay in VMEM (double-buffered) with f32 accumulators,
# so the blocks shrink as the width grows. (max width, block_tokens, block_vocab)
_PALLAS_TPU_TABLE = ((1024, 512, 1024), (2048, 512, 512), (4096, 256, 512), (8192, 256, 256))
# Chunked XLA on an accelerator: the [bt, bv] float32 tiles of a step live in HBM; keep them near 16-32 MiB
# (few, large matmuls). (max tokens, block_tokens, block_vocab)
_CHUNKED_XLA_TABLE = ((2048, 2048, 4096), (8192, 8192, 1024), (32768, 8192, 1024), (None, 16384, 512))
# Chunked XLA on a CPU: small tiles that stay in cache beat large ones by ~2x, and beat the materialised
# reference (benchmarks/token_logprob.py: N=2048, D=512, V=8192 on a 2-core host).
_CHUNKED_XLA_CPU = (256, 512)
# The most VMEM a Pallas TPU kernel may ask for: v5p and v7 have 64 MiB per core (v5e / v6e 128 MiB).
PALLAS_TPU_VMEM_CAP = 60 * MiB
PALLAS_TPU_MAX_WIDTH = 8192
LANES, SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile of one kernel step: `block_tokens` rows of h by `block_vocab` columns of w."""

  block_tokens: int
  block_vocab: int

  def __post_init__(self):
    for name in ("block_tokens", "block_vocab"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got {value!r}")

  def clamp(self, *, tokens: int, vocab: int) -> "BlockSizes":
    """The same blocks, each cut to the axis it tiles."""
    return BlockSizes(block_tokens=min(self.block_tokens, tokens), block_vocab=min(self.block_vocab, vocab))


def default_block_sizes(implementation: str, *, tokens: int, width: int, vocab: int,
                        platform: str) -> BlockSizes:
  """The table's blocks for one shard of shape h [tokens, width], w [width, vocab] (before clamping), for
  `platform` ("cpu", "gpu" or "tpu": the platform the computation is compiled for)."""
  del vocab
  if implementation == "chunked_xla" and platform == "cpu":
    return BlockSizes(*_CHUNKED_XLA_CPU)
  if implementation == "pallas_tpu":
    for max_width, bt, bv in _PALLAS_TPU_TABLE:
      if width <= max_width:
        return BlockSizes(block_tokens=bt, block_vocab=bv)
    raise ValueError(f"pallas_tpu supports widths up to {PALLAS_TPU_MAX_WIDTH}, got {width}")
  if implementation == "chunked_xla":
    for max_tokens, bt, bv in _CHUNKED_XLA_TABLE:
      if max_tokens is None or tokens <= max_tokens:
        return BlockSizes(block_tokens=bt, block_vocab=bv)
  raise ValueError(f"no block-size table for implementation {implementation!r}")


def pallas_tpu_vmem_bytes(blocks: BlockSizes, *, width: int, itemsize: int) -> int:
  """VMEM the largest of the three Pallas TPU kernels needs (double-buffered inputs and outputs, f32
  accumulators and a few [bt, bv] f32 temporaries)."""
  bt, bv = blocks.block_tokens, blocks.block_vocab
  inputs = 2 * (bt * width + width * bv) * itemsize + 8 * bt * 4
  tile = 4 * bt * bv * 4
  dh = 2 * bt * width * itemsize + bt * width * 4
  dw = 2 * width * bv * itemsize + width * bv * 4
  return inputs + tile + max(dh, dw)


def validate(blocks: BlockSizes, implementation: str, *, tokens: int, width: int, vocab: int,
             itemsize: int) -> BlockSizes:
  """Clamp `blocks` to the shard and check them for `implementation`; a bad choice is a ValueError."""
  blocks = blocks.clamp(tokens=tokens, vocab=vocab)
  if implementation != "pallas_tpu":
    return blocks
  # Mosaic tiles the last two dims by (8 sublanes, 128 lanes); the 1-D per-token vectors (labels, logsumexp)
  # need a block that is a power of two >= 128 or a multiple of 8 * 128. A block covering its axis is fine.
  bt = blocks.block_tokens
  if bt != tokens and not (bt % (SUBLANES * LANES) == 0 or (bt >= LANES and bt & (bt - 1) == 0)):
    raise ValueError(f"pallas_tpu: block_tokens={bt} must be a power of two >= {LANES} or a multiple of "
                     f"{SUBLANES * LANES} (or cover all {tokens} tokens)")
  if blocks.block_vocab != vocab and blocks.block_vocab % LANES:
    raise ValueError(f"pallas_tpu: block_vocab={blocks.block_vocab} must be a multiple of {LANES} "
                     f"(or cover the whole vocabulary shard of {vocab})")
  if width > PALLAS_TPU_MAX_WIDTH:
    raise ValueError(f"pallas_tpu keeps full-width blocks in VMEM: width {width} > {PALLAS_TPU_MAX_WIDTH}")
  need = pallas_tpu_vmem_bytes(blocks, width=width, itemsize=itemsize)
  if need > PALLAS_TPU_VMEM_CAP:
    raise ValueError(f"pallas_tpu: blocks {blocks} at width {width} need ~{need / MiB:.0f} MiB of VMEM "
                     f"(> {PALLAS_TPU_VMEM_CAP / MiB:.0f} MiB); use smaller blocks")
  return blocks
