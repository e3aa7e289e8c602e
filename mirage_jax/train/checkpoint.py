"""The only Orbax user: periodic async checkpoints, keep-N, resume from the latest step, params-only init.

A checkpoint step directory holds four items:
  params  the model parameters (a pure nested dict; restored alone by `--config.init_from`)
  train   step, optimizer state, PRNG key data and method extras (e.g. the RMU control vector)
  data    every data stream's iterator state (JSON), so a resumed run sees the same batches
  meta    the run's config and bookkeeping (JSON)
With LoRA on, `params` holds only the trainable tree (adapters, plus the projector with
`lora.train_projector`): an adapter-only checkpoint. Its `meta` names the base it was trained on
(`meta["lora"]["base"]`, see `base_identity`: the `init_from` step directory, or the seed of a random base,
with a sha256 over that description); restoring it over another base is a CheckpointError (`check_base`).
Saves are asynchronous; a save runs when the step is a multiple of `save_every`, when forced (end of run,
SIGTERM), or when Orbax reports a preemption (`reached_preemption`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from mirage_jax.errors import CheckpointError, MissingFileError, drop_package_frames
from mirage_jax.train import faults
from mirage_jax.train.optim import path_str
from mirage_jax.train.state import TrainState

ITEMS = ("params", "train", "data", "meta")
CHECKPOINT_DIR = "checkpoints"


@dataclasses.dataclass
class Restored:
  state: TrainState
  data: dict
  meta: dict


class Checkpointer:
  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(max(int(save_every), 1)),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(max(int(keep), 1)),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._started: list[int] = []  # steps whose save was started by this run, oldest first
    self._identity = _identity(self.directory)  # to tell a directory removed and re-created under the run
    self._failed: CheckpointError | None = None

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mgr.all_steps())

  def should_save(self, step: int) -> bool:
    return self._mgr.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    return self._mgr.reached_preemption(step)

  def save(self, step: int, state: TrainState, *, data: dict, meta: dict, force: bool = False) -> bool:
    """Start an asynchronous save of `step`. A storage failure (full disk, read-only or vanished directory)
    of this save or of the one before it is a `CheckpointError`; committed steps are never touched."""
    if not self.directory.is_dir():
      raise self._failure("the checkpoint directory was removed while the run was using it", also=step)
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng, "extras": state.extras}
    args = ocp.args.Composite(params=ocp.args.StandardSave(state.params), train=ocp.args.StandardSave(train),
                              data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta))
    started = self._guarded(step, lambda: self._mgr.save(step, args=args, force=force))
    if started:
      self._started.append(step)
      self._identity = self._identity or _identity(self.directory)
      faults.trigger("save_started", step=step)  # the save is in flight: its temporary directory exists
    return started

  def restore(self, step: int, *, target: TrainState) -> Restored:
    """Restore onto `target` (a TrainState of ShapeDtypeStructs carrying the shardings to restore into)."""
    train_target = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng,
                    "extras": target.extras}
    out = self._mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target.params), train=ocp.args.StandardRestore(train_target),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    t = out["train"]
    state = TrainState(step=t["step"], params=out["params"], opt_state=t["opt_state"], rng=t["rng"],
                       extras=t["extras"])
    return Restored(state=state, data=dict(out["data"] or {}), meta=dict(out["meta"] or {}))

  def restore_latest_good(self, *, target: TrainState) -> Restored | None:
    """Restore the newest checkpoint that reads back. A partial or corrupted one (missing or truncated
    files) is renamed to `<step>.corrupt-<time>` (kept for inspection, out of Orbax's way) with a warning, and the
    previous good step is used. None when no step reads back."""
    for step in sorted(self.all_steps(), reverse=True):
      _refuse_other_shapes(self.directory / str(step) / "params", target.params)
      try:
        return self.restore(step, target=target)
      except Exception as e:  # noqa: BLE001 - any read failure means this step is unusable
        quarantine = self.directory / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        logging.warning("checkpoint step %d in %s is unreadable (%s: %s); moved to %s, trying the previous "
                        "one", step, self.directory, type(e).__name__, str(e).splitlines()[0][:200],
                        quarantine.name)
        (self.directory / str(step)).rename(quarantine)
        self._mgr.reload()
    return None

  def wait(self) -> None:
    self._guarded(None, self._mgr.wait_until_finished)

  def close(self) -> None:
    """Finish the save in flight and close. After a failure already raised, nothing more is waited for:
    Orbax's writers on a broken filesystem may never finish, and the process is abandoned right after the
    error line (`UserError.abandon_process`)."""
    if self._failed is not None:
      return
    try:
      self.wait()
    except CheckpointError as e:
      if self._failed is None:
        raise
      logging.warning("while closing: %s", e)
    finally:
      with contextlib.suppress(Exception):
        self._mgr.close()

  def _guarded(self, step: int | None, fn):
    """Run `fn` (a save or a wait); a storage failure of any save in flight becomes one `CheckpointError`.

    Which saves failed is read from the disk, not from the error text: an asynchronous save's error surfaces
    in the next call (or Orbax only logs it and the next save fails instead), so every save this run started
    after the last step committed on disk is named."""
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - storage errors become one user-facing message, others re-raise
      # removed (and maybe re-created by a writer still running)
      replaced = self._identity is not None and _identity(self.directory) != self._identity
      gone = replaced or self._vanished_paths(e)
      storage = gone or _storage_error(e)
      refused = None if storage else _refused_write(self.directory)
      if not storage and refused is None:
        raise
      # An error that does not say why (a library's wrapper of it): the disk says it.
      text = str(refused) if refused is not None else " ".join(str(c) for c in _chain(e))
      reason = _STORAGE_ERRORS.search(text)
      why = reason.group(0) if reason else text.strip().splitlines()[-1][:200]
      if replaced:
        why = "the checkpoint directory was removed while the run was using it"
      elif (gone and not reason) or why.startswith("NOT_FOUND"):
        why = "files of the checkpoint being written vanished (was its directory removed?)"
      drop_package_frames(e)
      raise self._failure(why, also=step) from e

  def _vanished_paths(self, e: BaseException) -> bool:
    """Whether the error names a path inside the checkpoint directory that no longer exists (Orbax and
    tensorstore report a removed directory in many ways, not all of them an OSError)."""
    root = str(self.directory)
    for c in _chain(e):
      for m in re.finditer(re.escape(root) + r"[^\s\"':,]*", str(c)):
        if not os.path.exists(m.group(0).rstrip("/.")):
          return True
    return False

  def _failure(self, reason: str, *, also: int | None = None) -> CheckpointError:
    """The one error for a failed save: every save this run started after the last committed step (an
    asynchronous save's failure surfaces in a later call, or Orbax only logs it and a later save fails), and
    what is left on disk to resume from."""
    try:
      on_disk = latest_step_on_disk(self.directory) if self.directory.is_dir() else None
    except OSError:  # the directory went away while it was read
      on_disk = None
    known = self._last_committed()  # what this run saw committed; more than on disk if files were removed
    good = max((s for s in (on_disk, known) if s is not None), default=None)
    steps = sorted({s for s in [*self._started, *([also] if also is not None else [])] if good is None or s > good})
    which = (f"step {steps[0]}" if len(steps) == 1 else f"steps {', '.join(map(str, steps))}") if steps else "a step"
    if good is None:
      kept = "no step was committed, so a rerun starts over"
    elif on_disk == good:
      kept = f"the last committed checkpoint, step {good}, is intact and a rerun resumes from it"
    else:
      kept = (f"the last committed checkpoint, step {good}, is no longer on disk (was the directory removed?): "
              "put it back and a rerun resumes from it, otherwise a rerun "
              + (f"resumes from step {on_disk}" if on_disk is not None else "starts over"))
    self._failed = CheckpointError(f"saving checkpoint {which} in {self.directory} failed: {reason}; {kept}")
    self._failed.abandon_process = True  # Orbax's failed writers would print again at interpreter exit
    self._join_writers()
    return self._failed

  def _last_committed(self) -> int | None:
    """The newest step Orbax saw committed in this run (when the directory itself is gone)."""
    try:
      return self._mgr.latest_step()
    except Exception:  # noqa: BLE001 - a manager that cannot answer knows nothing committed
      return None

  @staticmethod
  def _join_writers(timeout: float = 30.0) -> None:
    """Let Orbax's writer threads finish failing (they log their own errors; bounded), so that the one-line
    error the command prints is the last thing the user reads. Orbax's thread classes re-raise their target's
    exception from `join` (here already classified): the base class's `join` only waits."""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
      if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
        threading.Thread.join(t, max(deadline - time.monotonic(), 0.0))


_STORAGE_ERRORS = re.compile(r"No space left on device|Read-only file system|Permission denied|"
                             r"No such file or directory|Disk quota exceeded|Input/output error|"
                             r"NOT_FOUND: Error (?:writing|reading)")  # tensorstore: a file vanished mid-save


def _refused_write(directory: pathlib.Path) -> OSError | None:
  """The OSError of writing (and syncing) a small file in `directory`, None when the write goes through."""
  probe = directory / f".mirage-write-probe-{os.getpid()}"
  try:
    with probe.open("wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
  except OSError as e:
    return e
  finally:
    with contextlib.suppress(OSError):
      probe.unlink()
  return None


def _identity(path: pathlib.Path) -> tuple[int, int] | None:
  """(device, inode) of a directory, None when it does not exist."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_dev, st.st_ino


def _chain(e: BaseException | None) -> list[BaseException]:
  out = []
  while e is not None and len(out) < 16:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def _storage_error(e: BaseException) -> bool:
  """Whether `e` (or what caused it) is the filesystem refusing a write: full, read-only, gone."""
  return any(isinstance(c, OSError) or _STORAGE_ERRORS.search(str(c)) for c in _chain(e))


def latest_step_on_disk(directory: str | os.PathLike) -> int | None:
  """The newest committed step under a checkpoint directory, without opening a manager."""
  directory = pathlib.Path(directory)
  steps = [int(p.name) for p in directory.glob("*") if p.name.isdigit() and (p / "commit_success.txt").exists()]
  return max(steps) if steps else None


def find_params_dir(path: str | os.PathLike) -> pathlib.Path:
  """`path` may be a run workdir, its `checkpoints/` dir, or one step dir; returns the `params` item dir."""
  path = pathlib.Path(path).absolute()
  if (path / "params").is_dir():
    return path / "params"
  ckpt = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
  steps = sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit() and (p / "params").is_dir())
  if not steps:
    raise MissingFileError(f"no checkpoint with params under {path} (expected a run directory, its "
                            f"{CHECKPOINT_DIR}/ folder, or a step directory)")
  return ckpt / str(steps[-1]) / "params"


def read_meta(params_dir: pathlib.Path) -> dict:
  """The `meta` item (config, step, tokenizer fingerprint) saved beside a `params` item ({} if absent)."""
  meta = params_dir.parent / "meta" / "metadata"
  return json.loads(meta.read_text()) if meta.exists() else {}


def restore_params(path: str | os.PathLike, target: Any, *, tokenizer: str | None = None) -> Any:
  """Params only (for `init_from` and reference models), restored into `target`'s shapes and shardings.

  With `tokenizer` (the current tokenizer's fingerprint), a checkpoint trained with another vocabulary is
  refused: its embedding rows would silently mean different tokens.
  """
  params_dir = find_params_dir(path)
  _refuse_other_shapes(params_dir, target)
  saved = read_meta(params_dir).get("tokenizer")
  if tokenizer and saved and saved != tokenizer:
    raise CheckpointError(f"{params_dir.parent} was trained with a different tokenizer (vocabulary {saved}, this "
                     f"run's is {tokenizer}): token ids would not match. Was the dataset or world changed?")
  with ocp.StandardCheckpointer() as ckptr:
    try:
      return ckptr.restore(params_dir, target)
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"parameters in {params_dir} do not match this model config: {e}") from None


def shape_mismatches(params_dir: pathlib.Path, target: Any) -> list[str]:
  """`path: saved (..), this model (..)` for each parameter stored under `params_dir` with another shape than
  `target`'s; [] when the stored metadata cannot be read (then the restore itself says what is wrong)."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(pathlib.Path(params_dir))
  except Exception:  # noqa: BLE001 - unreadable metadata is the restore's to report (or quarantine)
    return []
  finally:
    handler.close()
  saved = {path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(meta) if hasattr(m, "shape")}
  want = {path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_leaves_with_path(target)}
  return [f"{k}: saved {saved[k]}, this model {want[k]}" for k in sorted(saved.keys() & want.keys())
          if saved[k] != want[k]]


def _refuse_other_shapes(params_dir: pathlib.Path, target: Any) -> None:
  """A checkpoint of another model (another config, or adapters saved in an older layout) is a
  CheckpointError naming the parameters, not a corrupt checkpoint to set aside."""
  bad = shape_mismatches(params_dir, target)
  if bad:
    raise CheckpointError(f"{params_dir} holds parameters of other shapes than this model's ({len(bad)}: "
                          f"{'; '.join(bad[:4])}{'; ...' if len(bad) > 4 else ''}). It was written by another "
                          "config or an older layout (LoRA adapters before 2026-12-07 kept the kernel's axes: "
                          "lora_b [r, heads, head_dim], now [r, heads x head_dim]); it is left in place. Use "
                          "the config and mirage_jax version that wrote it, or another workdir.")


def host_params(params: Any) -> Any:
  """A numpy copy of (possibly sharded) params, for comparisons and checksums."""
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)


def params_sha256(params: Any) -> str:
  """SHA-256 over every parameter's path, dtype, shape and bytes (bitwise identity of two runs)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(host_params(params))[0]:
    arr = np.ascontiguousarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def checksum(workdir: str | os.PathLike) -> dict:
  """`mirage checksum`: the latest committed checkpoint's step and params hash (restored on the host)."""
  params_dir = find_params_dir(workdir)
  return {"step": int(params_dir.parent.name), "params_sha256": params_sha256(load_on_host(params_dir))}


def load_on_host(params_dir: str | os.PathLike) -> Any:
  """A `params` item restored onto one local device, whatever mesh it was saved from."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(params_dir).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    return ckptr.restore(params_dir, target)


# --------------------------------------------------------------------------- LoRA: the base a checkpoint needs
def base_identity(*, init_from: str, seed: int, model: dict) -> dict:
  """What a LoRA run's frozen base is: the `init_from` checkpoint (its resolved step directory and step, and
  that checkpoint's own base when it is itself a LoRA run), or a random base (the seed and the model config),
  with `sha256` over the canonical JSON of that description."""
  if init_from:
    params_dir = find_params_dir(init_from)
    ident = {"init_from": str(params_dir.parent), "step": int(params_dir.parent.name)}
    parent = read_meta(params_dir).get("lora")
    if parent:
      ident["init_from_base"] = parent["base"]["sha256"]
  else:
    ident = {"seed": int(seed), "model": model}
  ident["sha256"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
  return ident


def check_base(saved: dict | None, current: dict, *, where: str | os.PathLike) -> None:
  """Refuse adapters trained on another base than `current` (CheckpointError naming both)."""
  if not saved:
    raise CheckpointError(f"{where} is not a LoRA checkpoint (its meta names no base), but config.lora.rank > 0: "
                          "set --config.lora.rank=0 to use it as a full model")
  if saved.get("sha256") != current["sha256"]:
    describe = lambda d: (f"init_from {d['init_from']} (step {d['step']})" if "init_from" in d  # noqa: E731
                          else f"a random base (seed {d.get('seed')})")
    raise CheckpointError(f"the LoRA adapters in {where} were trained on {describe(saved)}, but this run's base "
                          f"is {describe(current)}: set --config.init_from (or --config.seed) to the base they "
                          "were trained on")
