"""The seven methods of the experiment: the one table of their names, training configs and display names.

`mirage demo` (its stages), the ablation sweeps (`configs/ablations/`) and the reports (`mirage_jax.report`,
its tables and `mirage report`'s method column) all read this table. Pure data: no jax.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
  name: str  # stage name, run-directory prefix, report key
  config: str  # training config file; the size is appended as ":<size>"
  from_base: bool  # initialised from the base run of its size and seed (every method but the base)
  label: str  # display name in the report's tables


METHODS = (
    Method(name="base", config="configs/pretrain/base.py", from_base=False, label="Base (LLaVA analogue)"),
    Method(name="sft_mixed", config="configs/sft/mixed.py", from_base=True, label="+ Mixed-SFT"),
    Method(name="sft_posthoc", config="configs/sft/posthoc.py", from_base=True, label="+ Posthoc-SFT"),
    Method(name="npo", config="configs/unlearn/npo.py", from_base=True, label="+ NPO"),
    Method(name="rmu", config="configs/unlearn/rmu.py", from_base=True, label="+ RMU"),
    Method(name="graddiff", config="configs/unlearn/graddiff.py", from_base=True, label="+ GradDiff"),
    Method(name="simnpo", config="configs/unlearn/simnpo.py", from_base=True, label="+ SimNPO"),
)
BY_NAME = {m.name: m for m in METHODS}
NAMES = tuple(m.name for m in METHODS)  # the demo's stage order
BASE = next(m.name for m in METHODS if not m.from_base)
FROM_BASE = tuple(m.name for m in METHODS if m.from_base)
