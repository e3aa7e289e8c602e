"""Multi-host initialisation: `jax.distributed.initialize` from explicit flags or the environment.

On a Cloud TPU VM slice and under SLURM, JAX detects the cluster itself; `MIRAGE_DISTRIBUTED=1` (set by
`launch/run_on_host.sh`) asks for that auto-detection. Explicit `--coordinator_address --num_processes
--process_id` flags win. A single process with none of these does nothing.
"""

from __future__ import annotations

import logging
import os

import jax

from mirage_jax.errors import UsageError

_initialized = False


def initialize(*, coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  global _initialized
  if _initialized:
    return
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  auto = os.environ.get("MIRAGE_DISTRIBUTED") == "1" or "SLURM_JOB_ID" in os.environ and int(
      os.environ.get("SLURM_NTASKS", "1")) > 1
  if not (explicit or auto):
    return
  if explicit and not (coordinator_address and num_processes > 0 and process_id >= 0):
    raise UsageError("multi-host: give all of --coordinator_address, --num_processes and --process_id")
  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id) if explicit else {}
  jax.distributed.initialize(**kwargs)
  _initialized = True
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
