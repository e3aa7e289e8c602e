"""benchmarks/profile_ops.py: the per-op table read from a real `jax.profiler` trace of a jitted function."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "profile_ops.py"


def _profile_ops():
  spec = importlib.util.spec_from_file_location("profile_ops", _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_op_table_sums_xla_ops_per_call_and_leaves_out_runtime_events():
  ops = _profile_ops()
  events = [{"ph": "X", "name": "fusion.1", "dur": 3000}, {"ph": "X", "name": "fusion.2", "dur": 1000},
            {"ph": "X", "name": "dot.7", "dur": 4000}, {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6},
            {"ph": "X", "name": "PjitFunction(f)", "dur": 9e6}, {"ph": "X", "name": "$profile.py:12 f", "dur": 9e6}]
  table = ops.op_table(events, calls=2, top=5)
  assert table["op_ms_per_call"] == 4.0 and table["ops"] == 3
  assert table["top_ops"][0] == {"op": "dot.7", "ms_per_call": 2.0, "share": 0.5}
  assert [(r["op"], r["ms_per_call"]) for r in table["top_kinds"]] == [("fusion", 2.0), ("dot", 2.0)]
  assert ops.op_kind("loop_add_fusion") == "loop_add_fusion" and ops.op_kind("copy_bitcast_fusion.23") == \
      "copy_bitcast_fusion"


def test_profile_reads_the_ops_of_a_traced_jitted_function(tmp_path):
  ops = _profile_ops()
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
  x = jnp.ones((64, 64))
  out = ops.profile(lambda: f(x), steps=2, warmup=1, trace_dir=tmp_path / "trace", top=4)
  assert out["wall_s_per_call"] > 0 and out["ops"] >= 1 and out["op_ms_per_call"] > 0
  # each share is rounded to 3 decimals, so the top kinds may sum past 1 by at most half a unit of the last place each
  kinds = out["top_kinds"]
  assert sum(r["share"] for r in kinds) <= 1.0 + 0.0005 * len(kinds) + 1e-9
