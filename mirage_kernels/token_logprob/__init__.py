"""Per-token log-probabilities from hidden states and the LM head (fused unlearning loss).

This package is callable, so the API reads as the issue states it while its modules stay importable:

  import mirage_kernels
  logp = mirage_kernels.token_logprob(h, w, labels)           # = token_logprob.api.token_logprob
  from mirage_kernels.token_logprob import api, chunked_xla, pallas_tpu, reference, config

See `api` for implementations, fallback and sharding; `config` for block sizes.
"""

import sys
import types

from mirage_kernels.token_logprob.api import (DEFAULT_ORDER, IMPLEMENTATIONS, Layout, LogProbs, UnsupportedError,
                                              token_logprob, token_logprob_and_lse)
from mirage_kernels.token_logprob.config import BlockSizes

__all__ = ["BlockSizes", "DEFAULT_ORDER", "IMPLEMENTATIONS", "Layout", "LogProbs", "UnsupportedError",
           "token_logprob", "token_logprob_and_lse"]


class _CallableModule(types.ModuleType):
  """`mirage_kernels.token_logprob(...)` calls `api.token_logprob`."""

  def __call__(self, h, w, labels, **kwargs):
    return token_logprob(h, w, labels, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
