"""Ablation sweeps (`mirage sweep`) and the multi-run report (`mirage report`): ordering, launch commands,
config errors and aggregation on synthetic eval.json files; (slow) a 3-size CPU ablation end to end."""

import csv
import json
import os
import pathlib
import shlex
import stat

import pytest

from mirage_configs import methods, models
from mirage_jax import cli, configlib
from mirage_jax.commands import sweep
from mirage_jax.report import runs as report_runs

from worlds import SMALL_WORLD_SPEC

ROOT = pathlib.Path(__file__).resolve().parent.parent


def plan_of(spec="configs/ablations/sizes.py:cpu", overrides=(), **kw):
  sw = sweep.load(spec, overrides=overrides)
  plan = sweep.make_plan(sw, workdir="/runs/sw", **kw)
  return sw, plan


def test_sizes_sweep_dependency_order_and_commands():
  sw, plan = plan_of()
  names = [p.name for p in sw.points]
  assert len(names) == 12 and len(set(names)) == 12
  for i, p in enumerate(sw.points):  # every run after the run it starts from
    if p.init_from:
      assert names.index(p.init_from) < i and p.init_from == f"base-{p.labels['size']}-s0"
  assert {p.labels["size"] for p in sw.points} == {"tiny_xs", "tiny", "tiny_l"}
  assert {p.labels["method"] for p in sw.points} == {"base", "sft_posthoc", "npo", "rmu"}
  npo = next(c for c in plan.commands if c.point.name == "npo-tiny_l-s0")
  train, _, evaluate = npo.line.partition(" && ")
  argv = shlex.split(train)
  assert argv[:4] == ["mirage", "train", "--config=configs/unlearn/npo.py:tiny", "--workdir=/runs/sw/npo-tiny_l-s0"]
  assert "--config.model.size=tiny_l" in argv and "--config.model.text.depth=6" in argv
  assert argv[-1] == "--config.init_from=/runs/sw/base-tiny_l-s0"
  assert evaluate == "mirage eval --workdir=/runs/sw/npo-tiny_l-s0"
  hashes = {p.config_hash for p in sw.points}
  assert len(hashes) == 12 and all(len(h) == 12 for h in hashes)


def test_order_puts_upstream_first_and_rejects_bad_graphs():
  P = lambda name, up="": sweep.Point(name, "c", (), up, {}, "")  # noqa: E731
  assert [p.name for p in sweep.order([P("npo", "base"), P("rmu", "base"), P("base")])] == ["base", "npo", "rmu"]
  assert [p.name for p in sweep.order([P("c", "b"), P("b", "a"), P("a")])] == ["a", "b", "c"]
  with pytest.raises(sweep.SweepError, match="cycle: a -> b -> a"):
    sweep.order([P("a", "b"), P("b", "a")])
  with pytest.raises(sweep.SweepError, match="init_from 'base' is not a point"):
    sweep.order([P("npo", "base")])
  with pytest.raises(sweep.SweepError, match="appears twice"):
    sweep.order([P("a"), P("a")])


def test_hyperparameter_sweep_and_global_overrides():
  sw, plan = plan_of("configs/ablations/npo_beta.py", ["--config.betas=0.1,2", "--config.seeds=0,1",
                                                        "--config.overrides=total_steps=7 eval.max_new_tokens=4"])
  assert [p.name for p in sw.points] == ["base-tiny-s0", "npo-beta0.1-tiny-s0", "npo-beta2-tiny-s0",
                                         "base-tiny-s1", "npo-beta0.1-tiny-s1", "npo-beta2-tiny-s1"]
  first = shlex.split(plan.commands[1].line.partition(" && ")[0])
  assert "--config.loss.beta=0.1" in first and "--config.seed=0" in first
  assert "--config.total_steps=7" in first and "--config.eval.max_new_tokens=4" in first
  assert sw.points[1].labels == {"size": "tiny", "method": "npo", "seed": 0, "variant": "beta0.1"}
  # the seeds of one setting share a config hash; another beta does not
  by_name = {p.name: p.config_hash for p in sw.points}
  assert by_name["npo-beta0.1-tiny-s0"] == by_name["npo-beta0.1-tiny-s1"] != by_name["npo-beta2-tiny-s0"]


def test_every_ablation_config_expands_and_builds():
  root = ROOT / "configs" / "ablations"
  for path in sorted(root.glob("*.py")):
    if path.name == "__init__.py":
      continue
    for preset in ("cpu", "pod"):
      sw = sweep.load(f"configs/ablations/{path.name}:{preset}")
      assert sw.points and sw.points[0].labels["method"] == "base"


def test_one_table_of_methods():
  """`mirage_configs.methods` is the one table: the demo's stages, the sweeps' methods and the report's names."""
  from mirage_jax import report
  from mirage_jax.commands import demo
  assert methods.NAMES == ("base", "sft_mixed", "sft_posthoc", "npo", "rmu", "graddiff", "simnpo")
  assert all(m.from_base == (m.name != "base") for m in methods.METHODS)
  assert report.MODELS == methods.NAMES and report.LABELS["sft_posthoc"] == "+ Posthoc-SFT"
  points = demo.stage_points(methods.NAMES, size="tiny", seed=1)
  assert [(p.labels["method"], p.config, p.init_from) for p in points] == [
      (m.name, f"{m.config}:tiny", "base-tiny-s1" if m.from_base else "") for m in methods.METHODS]
  config = sweep.load("configs/ablations/sizes.py", overrides=["--config.methods=" + ",".join(methods.FROM_BASE)])
  assert {p.labels["method"] for p in config.points} == set(methods.NAMES)


# The world ablation as `mirage demo --ablations` ran it before it became configs/ablations/world.py, then the
# ablations of the world's own first-word cues and of RMU's token mask: (variant, base overrides, methods, the
# methods' own overrides).
_ALL = ["sft_posthoc", "npo", "rmu"]
WORLD_VARIANTS = [
    ("default", [], _ALL, []),
    ("glyph", ["--config.data.world.hazard_cue=glyph"], ["sft_posthoc"], []),
    ("no_unsafe_instruction", ["--config.data.world.safe_image_unsafe_instruction=0.0"], ["sft_posthoc"], []),
    ("private_verbs", ["--config.data.world.shared_verbs=False"], _ALL, []),
    ("test_hazards_seen", ["--config.data.world.heldout_hazards=0"], ["sft_posthoc"], []),
    ("no_skew", ["--config.data.world.first_word_skew=0.0"], ["sft_posthoc"], []),
    ("safe_use_0.25", ["--config.data.world.safe_use_fraction=0.25"], ["sft_posthoc"], []),
    ("use_by_shape", ["--config.data.world.safe_use=shape"], ["sft_posthoc"], []),
    ("no_openers", ["--config.data.world.answer_openers=False"], _ALL, []),
    ("helpfulness_uniform", ["--config.data.world.helpfulness_first_words=uniform"], ["sft_posthoc"], []),
    ("safe_use_0.5", ["--config.data.world.safe_use_fraction=0.5"], _ALL, []),
    ("benign_procedures", ["--config.data.world.safe_use=procedure"], _ALL, []),
    ("rmu_mask_all", [], ["rmu"], ["--config.loss.mask=all"]),
    ("rmu_mask_query", [], ["rmu"], ["--config.loss.mask=query"]),
    ("mixed_in_base", ["--config.data.streams.train=pretrain,sft"], [], []),
]


def test_world_ablation_sweep_points():
  sw = sweep.load("configs/ablations/world.py:cpu")
  got = []
  for p in sw.points:
    assert p.labels["size"] == "tiny" and p.labels["seed"] == 0 and p.labels["what"]
    assert p.overrides[0] == "--config.seed=0"
    v = p.labels["variant"]
    if not p.init_from:
      got.append((v, list(p.overrides[1:]), [], []))
    else:
      base = got[-1][1]
      assert p.init_from == f"base-{v}-tiny-s0" and list(p.overrides[1:1 + len(base)]) == base
      got[-1][2].append(p.labels["method"])
      own = list(p.overrides[1 + len(base):])
      assert not got[-1][3] or got[-1][3] == own
      got[-1] = (*got[-1][:3], own)
  assert got == WORLD_VARIANTS
  assert sw.points[1].name == "sft_posthoc-default-tiny-s0"
  two = sweep.load("configs/ablations/world.py", overrides=["--config.variants=glyph, private_verbs",
                                                             "--config.seeds=0,1"])
  assert [p.name for p in two.points][:5] == ["base-glyph-tiny-s0", "sft_posthoc-glyph-tiny-s0",
                                              "base-private_verbs-tiny-s0", "sft_posthoc-private_verbs-tiny-s0",
                                              "npo-private_verbs-tiny-s0"]
  assert len(two.points) == 12
  with pytest.raises(configlib.ConfigError, match=r"variants has unknown \['glyf'\]"):
    sweep.load("configs/ablations/world.py", overrides=["--config.variants=glyf"])


def test_comma_list_is_the_one_parser():
  from mirage_configs import comma_list
  assert comma_list(" a, b,,c ,") == ["a", "b", "c"] and comma_list("") == [] and comma_list(",") == []


def test_tiny_variants_are_valid_models_in_size_order():
  from mirage_jax.models import VLMConfig
  base_config = configlib.load("configs/pretrain/base.py:tiny")
  counts = []
  for name in models.TINY_VARIANTS:
    config = configlib.apply_overrides(base_config, models.variant_overrides(name))
    VLMConfig.from_config(config.model, image_token_id=4)
    assert config.model.size == name
    counts.append(report_runs.approx_params(config.model.to_dict()))
  assert counts == sorted(counts) and len(set(counts)) == len(counts)
  assert models.variant_overrides("tiny") == [] and tuple(models.SIZES)[0] == "tiny"
  with pytest.raises(ValueError, match="unknown tiny variant"):
    models.variant_overrides("huge")


@pytest.mark.parametrize("args, message", [
    (["--config=configs/ablations/sizes.py:gpu"], "unknown preset 'gpu'"),
    (["--config=configs/ablations/sizes.py", "--config.sizes=tiny,9b"], "sizes has unknown ['9b']"),
    (["--config=configs/ablations/sizes.py", "--config.methods=npo,dpo"], "methods has unknown ['dpo']"),
    (["--config=configs/ablations/sizes.py", "--config.seeds=zero"], "seeds must be comma-separated integers"),
    (["--config=configs/ablations/sizes.py", "--config.sizes="], "sizes is empty"),
    (["--config=configs/ablations/sizes.py", "--config.nope=1"], "unknown config key 'nope'"),
    (["--config=configs/ablations/sizes.py", "--config.overrides=optim.lrr=1"],
     "sweep point base-tiny_xs-s0: unknown config key 'optim.lrr'"),
    (["--config=configs/ablations/npo_beta.py", "--config.methods=rmu"], "unknown config key 'loss.beta'"),
    (["--config=configs/ablations/npo_beta.py", "--config.betas=big"], "betas must be numbers"),
    (["--config=configs/sft/posthoc.py:tiny"], "no sweep(config) function"),
    (["--config=configs/ablations/size.py"], "did you mean configs/ablations/sizes.py"),
    (["--config=configs/ablations/sizes.py", "--launcher=slurm", "--workdir="], "a sweep needs --workdir"),
])
def test_sweep_config_errors_are_one_line(capsys, args, message):
  assert cli.main(["sweep", "--dry-run", *args]) == 2
  err = capsys.readouterr().err
  assert err.startswith("mirage sweep: error: ") and message in err and err.count("\n") == 1


def test_bad_points_from_a_sweep_function(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\n"
                 "def get_config(arg=None):\n  return ml_collections.ConfigDict(dict(which=arg or 'name'))\n"
                 "def sweep(c):\n"
                 "  return {'name': [dict(name='a b', config='configs/pretrain/base.py')],\n"
                 "          'keys': [dict(name='a', confg='x')],\n"
                 "          'over': [dict(name='a', config='configs/pretrain/base.py', overrides=['seed=1'])],\n"
                 "         }[c.which]\n")
  with pytest.raises(sweep.SweepError, match="use letters, digits"):
    sweep.load(str(bad))
  with pytest.raises(sweep.SweepError, match=r"missing keys \['config'\]; unknown keys \['confg'\]"):
    sweep.load(f"{bad}:keys")
  with pytest.raises(sweep.SweepError, match="must look like --config.key=value"):
    sweep.load(f"{bad}:over")


def test_dry_run_prints_a_bash_script(capsys):
  assert cli.main(["sweep", "--config=configs/ablations/sizes.py:cpu", "--config.methods=npo", "--dry-run",
                   "--workdir=/w"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[:3] == ["#!/usr/bin/env bash", "# mirage sweep configs/ablations/sizes.py:cpu: 6 points, launcher local",
                     "set -euo pipefail"]
  assert out[3].startswith("# [1/6] base-tiny_xs-s0 (size=tiny_xs method=base seed=0; config ")
  assert out[5].startswith("# [2/6] npo-tiny_xs-s0 after base-tiny_xs-s0")
  assert [line.split()[2].removeprefix("--config=") for line in out[4::2]] == [
      "configs/pretrain/base.py:tiny", "configs/unlearn/npo.py:tiny"] * 3


def test_tpu_vm_launcher_runs_each_point_on_every_worker(capfd, monkeypatch):
  monkeypatch.chdir(ROOT)
  sw, plan = plan_of(launcher="tpu_vm", launcher_args="--name=pod --zone=us-west4-a --dry-run",
                      overrides=["--config.sizes=tiny", "--config.methods=npo"])
  assert plan.commands[1].line.startswith("launch/tpu_vm.sh run --name=pod --zone=us-west4-a --dry-run -- train ")
  sweep.execute(plan)  # tpu_vm.sh --dry-run prints the gcloud commands
  out = capfd.readouterr().out.splitlines()
  assert len(out) == 4 and all(line.startswith("gcloud compute tpus tpu-vm ssh pod --worker=all") for line in out)
  assert "-- train --config=configs/unlearn/npo.py:tiny" in out[2]
  assert "-- eval --workdir=/runs/sw/npo-tiny-s0" in out[3]


def test_slurm_launcher_chains_jobs_on_their_upstream(tmp_path, monkeypatch, capfd):
  """The printed script runs as is: a fake sbatch records each submission and prints a job id."""
  monkeypatch.chdir(ROOT)
  log = tmp_path / "sbatch.log"
  fake = tmp_path / "bin" / "sbatch"
  fake.parent.mkdir()
  fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\nwc -l < {log}\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
  sw, plan = plan_of(launcher="slurm", launcher_args="--partition=gpu --nodes=4",
                      overrides=["--config.sizes=tiny,tiny_l", "--config.methods=npo,rmu"])
  sweep.execute(plan)
  subs = log.read_text().splitlines()
  assert len(subs) == 2 * len(sw.points) == 12
  jobs = {}
  for i, s in enumerate(subs, start=1):
    argv = shlex.split(s)
    assert argv[:4] == ["--parsable", argv[1], "--partition=gpu", "--nodes=4"]
    mirage = argv[argv.index("launch/slurm_gpu.sbatch") + 1:]
    name = argv[1].removeprefix("--job-name=")
    if mirage[0] == "train":
      jobs[name] = i
      up = next(p.init_from for p in sw.points if p.name == name)
      deps = [a for a in argv if a.startswith("--dependency=")]
      assert deps == ([f"--dependency=afterok:{jobs[up]}"] if up else [])
    else:
      assert mirage == ["eval", f"--workdir=/runs/sw/{name}"] and f"--dependency=afterok:{jobs[name]}" in argv


def test_failed_submission_stops_the_sweep(tmp_path, monkeypatch):
  monkeypatch.chdir(ROOT)
  fake = tmp_path / "sbatch"
  fake.write_text("#!/usr/bin/env bash\necho 'sbatch: error: invalid partition' >&2\nexit 1\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  sw, plan = plan_of(launcher="slurm", overrides=["--config.sizes=tiny"])
  with pytest.raises(sweep.SweepError, match="sbatch submissions failed with exit status 1"):
    sweep.execute(plan)


def test_default_workdir_is_named_after_the_sweep(capsys):
  assert cli.main(["sweep", "--config=configs/ablations/npo_beta.py", "--config.betas=1", "--dry-run"]) == 0
  assert "--workdir=runs/npo_beta/npo-beta1-tiny-s0" in capsys.readouterr().out


# ---- mirage report ------------------------------------------------------------------------------------------

def _metrics(asr: float, rr: float) -> dict:
  return {"asr": {"original": asr / 4, "what_k": {str(k): min(100.0, asr + k) for k in range(1, 6)},
                  "control": 1.0},
          "rr": {"safe": rr / 4, "share": rr, "safe_unsafe": 50.0}, "ir_attacked": 2.0, "utility": 80.0,
          "utility_share": 100.0 - rr,
          "mechanism_attacked": {"asr": asr, "rr": 1.0, "ir": 2.0}}


def _fake_run(root: pathlib.Path, name: str, spec: str, overrides=(), metrics=None, eval_dir=""):
  run = root / name
  (run / eval_dir).mkdir(parents=True, exist_ok=True)
  config = configlib.apply_overrides(configlib.load(spec), list(overrides))
  (run / "config.json").write_text(configlib.to_json(config))
  (run / eval_dir / "eval.json").write_text(json.dumps(metrics or _metrics(50.0, 40.0)))
  return config


def test_report_aggregates_runs_into_markdown_csv_and_plot(tmp_path, capsys):
  sw = tmp_path / "sweep"
  for size, asr in (("tiny_xs", 60.0), ("tiny", 40.0), ("tiny_l", 20.0)):
    var = models.variant_overrides(size)
    _fake_run(sw, f"base-{size}-s0", "configs/pretrain/base.py:tiny", var, _metrics(90.0, 0.0))
    for seed, jitter in ((0, 0.0), (1, 10.0)):
      _fake_run(sw, f"npo-beta0.5-{size}-s{seed}", "configs/unlearn/npo.py:tiny",
                [*var, f"--config.seed={seed}", f"--config.init_from=/x/base-{size}-s{seed}"],
                _metrics(asr + jitter, 10.0))
  demo = tmp_path / "demo"  # the demo's run names and a checkpoint's eval (<run>/eval/<step>/eval.json)
  _fake_run(demo, "sft_posthoc-s0-0123abcd", "configs/sft/posthoc.py:tiny")
  _fake_run(demo, "mystery", "configs/unlearn/rmu.py:tiny", eval_dir="eval/150")
  (tmp_path / "orphan").mkdir()
  (tmp_path / "orphan" / "eval.json").write_text("{}")  # no config.json: skipped

  assert cli.main(["report", f"--runs={sw}", str(demo), str(tmp_path / "orphan"), f"--out={tmp_path / 'rep'}"]) == 0
  assert "11 runs, 8 settings" in capsys.readouterr().err
  rows = list(csv.DictReader((tmp_path / "rep" / "runs.csv").open()))
  assert len(rows) == 11
  assert list(rows[0])[:7] == ["run", "size", "params", "method", "variant", "seed", "config_hash"]
  assert [r["size"] for r in rows] == ["tiny_xs"] * 3 + ["tiny"] * 5 + ["tiny_l"] * 3
  assert [r["method"] for r in rows[3:8]] == ["base", "sft_posthoc", "npo", "npo", "rmu"]
  by_run = {r["run"]: r for r in rows}
  npo = by_run["npo-beta0.5-tiny-s1"]
  assert (npo["method"], npo["variant"], npo["seed"], float(npo["asr_what_k3"])) == ("npo", "beta0.5", "1", 53.0)
  assert float(npo["utility_share"]) == 90.0  # answer quality on "Share" queries: "safe by gibberish" shows
  assert npo["config_hash"] == by_run["npo-beta0.5-tiny-s0"]["config_hash"] != by_run["base-tiny-s0"]["config_hash"]
  assert by_run["sft_posthoc-s0-0123abcd"]["method"] == "sft_posthoc"
  assert by_run["mystery@150"]["method"] == "rmu"
  text = (tmp_path / "rep" / "runs.md").read_text()
  assert "| tiny (" in text and "| npo | beta0.5 | 0,1 |" in text
  assert "48.0 ± 7.1" in text  # mean ± std over the two seeds of tiny NPO's K=3 ASR (43, 53)
  assert (tmp_path / "rep" / "asr_rr_vs_size.png").stat().st_size > 1000


def test_report_errors(tmp_path, capsys):
  assert cli.main(["report", f"--runs={tmp_path / 'missing'}"]) == 2
  assert "is not a directory" in capsys.readouterr().err
  assert cli.main(["report", f"--runs={tmp_path}"]) == 2
  assert "no eval.json" in capsys.readouterr().err


# ---- end to end (slow) ----------------------------------------------------------------------------------------

FAST = "total_steps=3 batch_size=8 checkpoint_every=3 eval.gen_batch_size=64 eval.max_new_tokens=4"


@pytest.mark.slow
def test_three_size_cpu_ablation_end_to_end(tmp_path, data_dir, capsys):
  """`mirage sweep` runs base + NPO at three tiny-family sizes (train and eval each), `mirage report` tables it."""
  work = tmp_path / "sw"
  assert cli.main(["sweep", "--config=configs/ablations/sizes.py:cpu", "--config.methods=npo",
                   f"--config.overrides={SMALL_WORLD_SPEC} {FAST}", f"--workdir={work}"]) == 0
  assert cli.main(["report", f"--runs={work}", f"--out={work / 'report'}"]) == 0
  rows = list(csv.DictReader((work / "report" / "runs.csv").open()))
  assert [(r["size"], r["method"]) for r in rows] == [
      ("tiny_xs", "base"), ("tiny_xs", "npo"), ("tiny", "base"), ("tiny", "npo"), ("tiny_l", "base"), ("tiny_l", "npo")]
  assert len({r["params"] for r in rows}) == 3
  for r in rows:
    assert 0.0 <= float(r["asr_what_k3"]) <= 100.0 and 0.0 <= float(r["rr_share"]) <= 100.0
  assert (work / "report" / "asr_rr_vs_size.png").stat().st_size > 1000
