"""Experiment configs (`configs/**.py`), `mirage_jax.configlib` (loading, overrides, errors) and
`configs/common.parse_arg`.

Every config file with a `get_config` is discovered by globbing, so a new experiment config is covered by
these tests without editing them.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import ml_collections
import pytest

from mirage_configs import common, models
from mirage_jax import configlib, sharding
from mirage_jax.configlib import ConfigError
from mirage_jax.describe import describe
from mirage_jax.losses import make_loss

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(
    p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.py")
    if p.name not in ("__init__.py", "common.py", "models.py") and "def get_config" in p.read_text()
    and p.parent.name != "ablations")  # sweep configs (their own knobs): tests/test_sweep.py
SIZES = tuple(models.SIZES)
REQUIRED_KEYS = ("total_steps", "batch_size", "seed", "checkpoint_every", "log_every", "mesh", "init_from")
# Parameter counts of the real LLaVA-1.5 models (HF `llava-hf/llava-1.5-{7,13}b-hf`, 32000-token vocabulary).
LLAVA_7B, LLAVA_13B = 7.063e9, 13.35e9


def test_config_files_discovered():
  assert "configs/pretrain/base.py" in CONFIG_FILES
  assert "configs/sft/posthoc.py" in CONFIG_FILES
  assert SIZES == ("tiny", "small", "1b", "7b", "13b")


@pytest.fixture(scope="module")
def described():
  """{(file, size): (config, describe() on 8 devices)} for every config file x size."""
  out = {}
  for file in CONFIG_FILES:
    for size in SIZES:
      config = configlib.load(f"{file}:{size}")
      out[file, size] = config, describe(config, num_devices=8)
  return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("file", CONFIG_FILES)
def test_every_config_loads_locked_with_required_keys_and_builds(described, file, size):
  config, info = described[file, size]
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.not_a_key = 1  # locked: no new keys
  for key in REQUIRED_KEYS:
    assert key in config, f"{file}:{size} lacks {key}"
  assert isinstance(config.total_steps, int) and config.total_steps > 0
  assert isinstance(config.batch_size, int) and config.batch_size > 0
  assert isinstance(config.init_from, str)
  assert config.model.size == size
  # The model was built abstractly (nnx.eval_shape) and laid out on an 8-device mesh.
  assert info["model_size"] == size
  assert set(info["params_by_module"]) == {"vision", "projector", "decoder"}
  assert info["params_total"] == sum(info["params_by_module"].values()) > 0
  assert info["devices"] == 8
  assert sorted(info["mesh"]) == ["data", "fsdp", "tensor"]
  assert info["mesh"]["data"] * info["mesh"]["fsdp"] * info["mesh"]["tensor"] == 8
  assert info["param_bytes_total"] == 4 * info["params_total"]  # float32 params
  assert 0 < info["param_bytes_per_device"] <= info["param_bytes_total"]
  # Its loss block builds (every key one the loss defines) and describe says what trains.
  loss = make_loss(config.loss)
  assert set(config.loss) - {"name"} <= set(loss.keys())
  assert 0 < info["trainable_params"] <= info["params_total"]
  layers = info["trainable_decoder_layers"]
  assert layers == sorted(set(layers)) and set(layers) <= set(range(config.model.text.depth))
  assert layers == (list(loss.decoder_layers) if loss.decoder_layers else list(range(config.model.text.depth)))
  # The configured batch splits over data x fsdp of the 8-device mesh.
  shape = sharding.mesh_shape(config.mesh, 8)
  assert config.batch_size % (shape["data"] * shape["fsdp"]) == 0


@pytest.mark.parametrize("file", CONFIG_FILES)
def test_param_counts_per_size(described, file):
  total = {size: described[file, size][1]["params_total"] for size in SIZES}
  assert total["7b"] == pytest.approx(LLAVA_7B, rel=5e-3)
  assert total["13b"] == pytest.approx(LLAVA_13B, rel=5e-3)
  assert total["tiny"] < 5e6
  assert 5e7 < total["small"] < 2e8
  assert 8e8 < total["1b"] < 1.6e9
  assert total["tiny"] < total["small"] < total["1b"] < total["7b"] < total["13b"]
  # LLaVA-1.5 uses CLIP ViT-L/14-336 (~303 M params, 576 image tokens) at both big sizes.
  for size in ("7b", "13b"):
    info = described[file, size][1]
    assert info["image_tokens"] == 576
    assert info["params_by_module"]["vision"] == pytest.approx(3.035e8, rel=5e-3)


def test_same_size_same_model_in_every_config(described):
  """Experiments differ by training keys, not by architecture: one size = one model everywhere."""
  for size in SIZES:
    counts = {described[f, size][1]["params_total"] for f in CONFIG_FILES}
    assert len(counts) == 1, (size, counts)


def test_configs_import_no_jax():
  code = ("import sys\nfrom mirage_jax import configlib\n"
          f"for f in {CONFIG_FILES!r}:\n  configlib.load(f + ':7b')\n"
          "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax')))\n"
          "assert not bad, bad\nprint('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- loading
def test_load_paths_relative_to_installed_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here: resolved against the installed mirage_configs
  a = configlib.load("configs/sft/posthoc.py:tiny")
  b = configlib.load("sft/posthoc.py:tiny")
  assert a.to_dict() == b.to_dict()
  # No arg = the default size.
  assert configlib.load("configs/sft/posthoc.py").model.size == "tiny"
  assert configlib.load("configs/sft/posthoc.py:size=7b").model.size == "7b"


def test_load_missing_file_suggests_close_names():
  with pytest.raises(ConfigError, match=r"not found.*did you mean .*configs/sft/posthoc\.py"):
    configlib.load("configs/sft/posthok.py:tiny")
  with pytest.raises(ConfigError, match="not found"):
    configlib.load("zzzz/qqqq.py")


def test_load_bad_size_and_bad_arg():
  with pytest.raises(ConfigError, match=r"unknown model size 'huge'.*tiny.*13b"):
    configlib.load("configs/sft/posthoc.py:huge")
  with pytest.raises(ConfigError, match="unknown config argument 'sise'"):
    configlib.load("configs/sft/posthoc.py:sise=7b")


def test_load_file_without_get_config(tmp_path):
  f = tmp_path / "nothing.py"
  f.write_text("x = 1\n")
  with pytest.raises(ConfigError, match="no get_config"):
    configlib.load(str(f))
  g = tmp_path / "wrong.py"
  g.write_text("def get_config(arg):\n  return {'a': 1}\n")
  with pytest.raises(ConfigError, match="must return an ml_collections.ConfigDict"):
    configlib.load(str(g))


def test_config_error_is_a_value_error():
  assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------- overrides
@pytest.fixture
def tiny():
  return configlib.load("configs/sft/posthoc.py:tiny")


def test_overrides_of_every_type(tiny):
  before = tiny.to_dict()
  c = configlib.apply_overrides(tiny, [
      "--config.total_steps=7",  # int
      "--config.optim.lr=3e-4",  # float
      "--config.optim.b1=1",  # int literal for a float key -> float
      "--config.data.cache=false",  # bool
      "--config.model.scan_layers=1",  # bool from 1
      "--config.init_from=/runs/base",  # str (never literal-evaluated)
      "--config.data.prompt_template=Q: <image> {question} A:",  # str with spaces
      "--config.optim.frozen=",  # empty str
      "--config.data.image_mean=(0.1, 0.2, 0.3)",  # tuple
      "--config.data.world.shapes=['circle', 'square']",  # list
      "--config.data.world.forget_size=12",  # None default: any literal
      "mesh.data=2",  # the --config. prefix is optional
  ])
  assert c.total_steps == 7 and type(c.total_steps) is int
  assert c.optim.lr == 3e-4
  assert c.optim.b1 == 1.0 and type(c.optim.b1) is float
  assert c.data.cache is False
  assert c.model.scan_layers is True
  assert c.init_from == "/runs/base"
  assert c.data.prompt_template == "Q: <image> {question} A:"
  assert c.optim.frozen == ""
  assert c.data.image_mean == (0.1, 0.2, 0.3) and isinstance(c.data.image_mean, tuple)
  assert list(c.data.world.shapes) == ["circle", "square"]
  assert c.data.world.forget_size == 12
  assert c.mesh.data == 2
  assert c.is_locked
  # The input config is untouched (overrides apply to a copy).
  assert tiny.to_dict() == before
  assert tiny.total_steps != 7 and tiny.optim.lr != 3e-4 and tiny.optim.frozen == "vision/.*"


def test_override_none_default_takes_a_bare_string(tiny):
  c = configlib.apply_overrides(tiny, ["--config.data.world.forget_size=abc"])
  assert c.data.world.forget_size == "abc"


def test_no_overrides_is_identity(tiny):
  assert configlib.apply_overrides(tiny, []).to_dict() == tiny.to_dict()


@pytest.mark.parametrize("override, close", [
    ("--config.total_step=5", "total_steps"),
    ("--config.optim.lrr=0.1", "optim.lr"),
    ("--config.optim.wamup_steps=3", "optim.warmup_steps"),
    ("--config.data.worl.seed=3", "data.world.seed"),
])
def test_unknown_key_names_close_keys(tiny, override, close):
  with pytest.raises(ConfigError, match="unknown config key") as e:
    configlib.apply_overrides(tiny, [override])
  assert close in str(e.value)
  assert "\n" not in str(e.value)


def test_unknown_key_without_close_match(tiny):
  with pytest.raises(ConfigError, match="unknown config key 'qqqqqqqq'"):
    configlib.apply_overrides(tiny, ["--config.qqqqqqqq=1"])


@pytest.mark.parametrize("override, match", [
    ("--config.total_steps=abc", "expected a int"),
    ("--config.total_steps=1.5", "expected a int, got float"),
    ("--config.optim.lr=fast", "expected a float"),
    ("--config.optim.lr=True", "expected a float, got bool"),
    ("--config.data.cache=maybe", "expected true or false"),
    ("--config.data.image_mean=0.5", "expected a tuple, got float"),
    ("--config.optim=3", "group of settings"),
    ("--config.total_steps", "must look like --config.key=value"),
])
def test_bad_override_values(tiny, override, match):
  with pytest.raises(ConfigError, match=match):
    configlib.apply_overrides(tiny, [override])


def test_json_round_trip_and_fingerprint(tiny):
  back = configlib.from_json(configlib.to_json(tiny))
  assert back.is_locked
  assert configlib.fingerprint(back) == configlib.fingerprint(tiny)
  other = configlib.apply_overrides(tiny, ["--config.seed=1"])
  assert configlib.fingerprint(other) != configlib.fingerprint(tiny)
  assert configlib.fingerprint(other, drop=["seed"]) == configlib.fingerprint(tiny, drop=["seed"])


# --------------------------------------------------------------------------- parse_arg
def test_parse_arg_positional_and_named():
  assert common.parse_arg(None, size="tiny").size == "tiny"
  assert common.parse_arg("", size="tiny").size == "tiny"
  assert common.parse_arg("7b", size="tiny").size == "7b"
  a = common.parse_arg("13b,steps=10,lr=0.5,on=true", size="tiny", steps=1, lr=1.0, on=False)
  assert (a.size, a.steps, a.lr, a.on) == ("13b", 10, 0.5, True)
  assert type(a.steps) is int and type(a.lr) is float
  b = common.parse_arg("steps=3,size=1b", size="tiny", steps=1)
  assert (b.size, b.steps) == ("1b", 3)
  assert common.parse_arg("on=0", on=True).on is False


@pytest.mark.parametrize("arg, match", [
    ("tiny,7b", "needs a name"),
    ("colour=red", r"unknown config argument 'colour'; valid: size, steps"),
    ("on=maybe", "must be true or false"),
])
def test_parse_arg_errors(arg, match):
  with pytest.raises(ValueError, match=match):
    common.parse_arg(arg, size="tiny", steps=1, on=False)


def test_parse_arg_bad_int():
  with pytest.raises(ValueError):
    common.parse_arg("steps=ten", size="tiny", steps=1)


def test_training_config_and_model_config_reject_unknown_size():
  with pytest.raises(ValueError, match="unknown model size"):
    common.training_config("2b")
  with pytest.raises(ValueError, match="unknown model size"):
    models.model_config("2b")
