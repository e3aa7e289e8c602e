"""NPO's inverse temperature beta: one base per (size, seed), one NPO run per beta from it.

  mirage sweep --config=configs/ablations/npo_beta.py:cpu --workdir=runs/npo_beta
  mirage sweep --config=configs/ablations/npo_beta.py:pod --config.seeds=0,1,2 --launcher=slurm --dry-run

Knobs: --config.betas=0.1,0.5,1,2 and those of configs/ablations/__init__.py (sizes, seeds, overrides).
"""

from mirage_configs import common
from mirage_configs.ablations import grid, knob_list, sweep_config

_SIZES = {"cpu": "tiny", "pod": "1b"}


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, preset="cpu")
  if a.preset not in _SIZES:
    raise ValueError(f"unknown preset {a.preset!r}; valid: {', '.join(_SIZES)}")
  return sweep_config(sizes=_SIZES[a.preset], methods="npo", seeds="0", betas="0.1,0.5,1.0,2.0")


def sweep(config=None):
  config = config or get_config()
  betas = knob_list(config, "betas")
  for b in betas:
    try:
      float(b)
    except ValueError:
      raise ValueError(f"sweep config: betas must be numbers, got {b!r}") from None
  return grid(config, {f"beta{b}": [f"--config.loss.beta={float(b)}"] for b in betas})
