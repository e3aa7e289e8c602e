"""Size ablation: post-hoc SFT, NPO and RMU at several model sizes, each from its own base run.

  mirage sweep --config=configs/ablations/sizes.py:cpu --workdir=runs/sizes           # tiny family, CPU
  mirage sweep --config=configs/ablations/sizes.py:pod --workdir=/mnt/runs/sizes --launcher=tpu_vm
  mirage report --runs=runs/sizes --out=runs/sizes/report

`cpu` sweeps the tiny family (configs/models.py TINY_VARIANTS: tiny_xs < tiny < tiny_l), `pod` the size
table's small, 1b, 7b and 13b. Knobs: --config.sizes=..., --config.methods=..., --config.seeds=0,1,2,
--config.overrides="total_steps=4 ..." (every run).
"""

from mirage_configs import common
from mirage_configs.ablations import grid, sweep_config

_PRESETS = {"cpu": "tiny_xs,tiny,tiny_l", "pod": "small,1b,7b,13b"}


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, preset="cpu")
  if a.preset not in _PRESETS:
    raise ValueError(f"unknown preset {a.preset!r}; valid: {', '.join(_PRESETS)}")
  return sweep_config(sizes=_PRESETS[a.preset], methods="sft_posthoc,npo,rmu", seeds="0")


def sweep(config=None):
  return grid(config or get_config())
