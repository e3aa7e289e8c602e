"""The small synthetic world of the tests that build data and train on it (fast to build and evaluate).

One definition, in three spellings: the knobs (`SMALL_WORLD`, for `WorldConfig(**SMALL_WORLD)`), command-line
overrides (`SMALL_WORLD_FLAGS`, for `mirage train` / `demo.run_demo`) and a sweep's `--config.overrides`
text (`SMALL_WORLD_SPEC`). Not a conftest fixture: tests import it (`from worlds import SMALL_WORLD`).
"""

from __future__ import annotations

from collections.abc import Mapping

SMALL_WORLD: dict[str, int] = dict(
    pretrain_size=400, sft_images=100, helpfulness_size=64, retain_size=64,
    unsafe_size=8, safe_size=8, utility_size=8, safe_unsafe_size=8,
)


def world_overrides(world: Mapping[str, object] = SMALL_WORLD, *, prefix: str = "--config.") -> list[str]:
  """`["--config.data.world.pretrain_size=400", ...]` for `world`'s knobs (`prefix=""`: `data.world.k=v`)."""
  return [f"{prefix}data.world.{k}={v}" for k, v in world.items()]


SMALL_WORLD_FLAGS: list[str] = world_overrides()
SMALL_WORLD_SPEC: str = " ".join(world_overrides(prefix=""))
