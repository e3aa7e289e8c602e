"""mirage_kernels: fused kernels for mirage_jax (the `mirage_kernels/` folder).

  import mirage_kernels
  logp = mirage_kernels.token_logprob(h, w, labels)            # float32 per-token log p(label)
  out = mirage_kernels.token_logprob_and_lse(h, w, labels)     # LogProbs(logp, lse)

`mirage_kernels.token_logprob` is the kernel's package, made callable (see its `__init__`).
"""

from mirage_kernels import token_logprob
from mirage_kernels.token_logprob import BlockSizes, Layout, LogProbs, UnsupportedError, token_logprob_and_lse

__all__ = ["BlockSizes", "Layout", "LogProbs", "UnsupportedError", "token_logprob", "token_logprob_and_lse"]
