"""Each bad input stops with one clear message naming the file, field or value, and
leaves no half-written checkpoint or results file behind."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, cli_env, tiny_config
from test_data import folder_config, write_folder_dataset
from jaxvars import configuration, run
from jaxvars.data import pipeline
from jaxvars.errors import ConfigError, DataError, NonFiniteLossError


def test_missing_image(tmp_path):
  item = write_folder_dataset(tmp_path / "ds")[0]["item_id"]
  os.remove(tmp_path / "ds" / "images" / f"{item}.png")
  with pytest.raises(DataError, match=rf"images/{item}\.jpg: image file is missing"):
    pipeline.load(folder_config(tmp_path / "ds", tmp_path / "tfds").data)
  leftovers = [p for p in (tmp_path / "tfds").rglob("*") if "incomplete" in p.name]
  assert not leftovers


def test_missing_image_can_be_dropped(tmp_path):
  item = write_folder_dataset(tmp_path / "ds")[0]["item_id"]
  os.remove(tmp_path / "ds" / "images" / f"{item}.png")
  d = pipeline.load(folder_config(tmp_path / "ds", tmp_path / "tfds",
                                  **{"data.missing_images": "drop"}).data)
  assert item not in set(d.item_ids) and d.num_items > 0


def test_unreadable_image(tmp_path):
  item = write_folder_dataset(tmp_path / "ds")[1]["item_id"]
  (tmp_path / "ds" / "images" / f"{item}.png").write_bytes(b"this is not a PNG")
  with pytest.raises(DataError, match=rf"images/{item}\.png: cannot decode image"):
    pipeline.load(folder_config(tmp_path / "ds", tmp_path / "tfds").data)


def test_csv_without_expected_columns(tmp_path):
  write_folder_dataset(tmp_path / "ds")
  (tmp_path / "ds" / "interactions.csv").write_text("customer,item_id\nu1,it1\n")
  with pytest.raises(DataError, match=r"interactions\.csv: missing column\(s\) \['user_id'\]"):
    pipeline.load(folder_config(tmp_path / "ds", tmp_path / "tfds").data)


def test_hm_csv_without_expected_columns(tmp_path):
  (tmp_path / "hm").mkdir()
  (tmp_path / "hm" / "transactions_train.csv").write_text("t_dat,customer,article_id\n")
  c = tiny_config(tmp_path / "tfds", **{"data.name": "hm", "data.manual_dir": str(tmp_path / "hm")})
  with pytest.raises(DataError, match=r"transactions_train\.csv: missing column\(s\) "
                     r"\['customer_id'\]"):
    pipeline.load(c.data)


def test_missing_manual_dir(tmp_path):
  c = tiny_config(tmp_path / "tfds", **{"data.name": "hm", "data.manual_dir": "/nonexistent/hm"})
  with pytest.raises(DataError, match="'/nonexistent/hm'.*is not a directory"):
    pipeline.load(c.data)


@pytest.mark.parametrize("field,value,message", [
    ("recommender.form", "tangg", r"config.recommender.form='tangg' is not one of \('tang', 'he'\)"),
    ("recommender.name", "dvbprr", r"config.recommender.name='dvbprr' is not a known recommender"),
    ("backbone.arch", "resnet51", r"config.backbone.arch='resnet51' is not a known backbone"),
    ("data.name", "amazon", r"config.data.name='amazon' is not one of"),
    ("recommender.lr", -1.0, r"config.recommender.lr=-1.0 must be a number > 0"),
    ("attack.objective", "bprr", r"config.attack.objective='bprr' is not a known attack objective"),
    ("attack.methods", ("fgsm", "deepfool"), r"config.attack.methods='deepfool' is not a known "
     r"attack method"),
    ("systems.evaluate", ("defended", "jpg"), r"config.systems.evaluate='jpg' is not a known "
     r"defended system"),
    ("eval.ks", (5, 500), r"a cut-off exceeds the 101 ranked candidates"),
    ("denoiser.rand_pad", "edge", r"config.denoiser.rand_pad='edge' is not one of"),
    ("stages.joint.trainable", ("denoiser", "resnet"), r"config.stages.joint.trainable has "
     r"unknown group\(s\) \['resnet'\]"),
    ("stages.detector.mix", (0, 0, 0), r"config.stages.detector.mix=\(0, 0, 0\) must be"),
    ("data.image_size", 36, r"config.data.image_size=36 is not divisible by "
     r"config.denoiser.patch=8"),
    ("attack.eval_eps", (8, 1000), r"config.attack.eval_eps=\(8, 1000\) must hold budgets in "
     r"\(0, 255\]"),
    ("detector.fpr", 1.5, r"config.detector.fpr=1.5 must be in \(0, 1\)"),
    ("defense.eval_fraction", 1.0, r"config.defense.eval_fraction=1.0"),
])
def test_unknown_config_values(field, value, message, tmp_path):
  c = tiny_config(tmp_path, **{field: value})
  with pytest.raises(ConfigError, match=message):
    configuration.validate(c)


def test_non_finite_loss_stops_without_results(tfds_dir, tmp_path):
  workdir = tmp_path / "run"
  c = tiny_config(tfds_dir, **{"recommender.init_scale": 1e30})  # inf - inf = NaN scores.
  with pytest.raises(NonFiniteLossError,
                     match=r"non-finite recommender \(epoch 1\) loss .* at step 1 of"):
    run.train_and_evaluate(c, str(workdir))
  assert not (workdir / "results.json").exists()
  assert not list(workdir.rglob("_CHECKPOINT_METADATA"))  # No checkpoint was written.


def _cli(*args, cwd=REPO):
  env = cli_env()
  return subprocess.run([sys.executable, "-m", "jaxvars.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_reports_bad_value_in_one_line(tmp_path):
  r = _cli("--config=configs/joint.py:tiny", f"--workdir={tmp_path}/w",
           "--config.recommender.form=nope")
  assert r.returncode == 2
  assert "jaxvars: error: config.recommender.form='nope' is not one of ('tang', 'he')" in r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "w" / "results.json")


@pytest.mark.slow
def test_cli_rejects_unknown_field_and_preset(tmp_path):
  r = _cli("--config=configs/joint.py:tiny", f"--workdir={tmp_path}",
           "--config.recommender.fctors=3")
  assert r.returncode != 0 and "fctors" in r.stderr
  r = _cli("--config=configs/joint.py:tiny,amazon", f"--workdir={tmp_path}")
  assert r.returncode != 0 and "unknown or repeated preset 'amazon'" in r.stderr
