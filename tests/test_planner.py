"""The run planner (jaxvars/planner.py; issue 36 item 6): compile, not run, a config's steps.

* its step counts equal the ones a run takes (recommender steps per epoch x epochs from
  ``Experiment.rec_steps_per_epoch``, each defence stage's steps from
  ``training.defense.stage_plan`` split by the stage's input mix, attack batches x
  (1 per FGSM, k + 1 per PGD-k));
* XLA's FLOP counts agree with what the computations are: an FGSM batch (a forward and a
  backward pass through the backbone) costs 2-4 times the feature pass per photo, and a
  VBPR step at least the visual projection's 2 B F K;
* the roofline estimate, its utilisation and the memory check, on a plan written by hand;
* ``--mode=plan`` writes ``<workdir>/plan.json`` and prints the tables.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from jaxvars import planner
from jaxvars.errors import ConfigError
from jaxvars.experiment import build
from jaxvars.training import defense

pytestmark = pytest.mark.slow


def test_counts_and_flops_of_the_tiny_plan(tfds_dir, tmp_path):
  config = tiny_config(tfds_dir)
  exp = build(config, str(tmp_path))
  out = planner.plan(config, data=exp.data)
  steps = {s["name"]: s for s in out["steps"]}
  rc = config.recommender
  assert steps["recommender vbpr (bpr)"]["count"] == exp.rec_steps_per_epoch * rc.epochs
  for name in defense.stage_names(config):
    stage = config.stages[name]
    total = defense.stage_plan(exp, stage)[1]
    mix = [m / sum(stage.mix) for m in stage.mix]
    planned = {k: steps[f"defence {name} ({k} inputs)"]["count"]
               for k in ("clean", "fgsm", "pgd") if f"defence {name} ({k} inputs)" in steps}
    assert sum(planned.values()) == pytest.approx(total)
    for k, p in zip(("clean", "fgsm", "pgd"), mix):
      assert planned.get(k, 0.0) == pytest.approx(total * p)
  batches = math.ceil(exp.data.num_items / config.attack.batch_size)
  per_eps = sum(1 if m == "fgsm" else config.attack.pgd_steps + 1 for m in config.attack.methods)
  fgsm = steps["FGSM batch against vbpr (PGD-k as k + 1)"]
  assert fgsm["count"] == batches * per_eps * len(config.attack.eval_eps)
  feat = steps["feature pass (clean catalogue)"]
  assert feat["count"] == math.ceil(exp.data.num_items / config.backbone.feature_batch_size)
  # Per photo, FGSM is a forward and a backward pass (about 3 forwards; 2-4 with the BPR
  # objective's small share and XLA's own accounting).
  ratio = (fgsm["flops"] / config.attack.batch_size) / (
      feat["flops"] / config.backbone.feature_batch_size)
  assert 2.0 <= ratio <= 4.0, ratio
  f, k, b = out["sizes"]["feature_dim"], rc.factors, rc.batch_size
  assert steps["recommender vbpr (bpr)"]["flops"] >= 2 * b * f * k
  assert out["totals"]["flops"] == pytest.approx(sum(s["flops"] * s["count"]
                                                     for s in out["steps"]))
  assert out["totals"]["max_memory"] > 0


def test_roofline_estimate():
  plan = {"steps": [{"name": "a", "count": 10, "flops": 4e12, "bytes": 1e9, "memory": 2e9},
                    {"name": "b", "count": 2, "flops": 1e9, "bytes": 8e11, "memory": 5e9}],
          "totals": {"max_memory": 5e9}}
  acc = planner.Accelerator("test", flops=1e12, flops_bf16=2e12, bandwidth=1e11, memory=4e9)
  est = planner.estimate(plan, acc, utilization=0.5)
  # a: compute-bound, 4e12 / (1e12 * 0.5) = 8 s, x 10; b: memory-bound, 8e11 / 5e10 = 16 s, x 2.
  assert est["seconds"] == pytest.approx(80 + 32)
  assert est["fits"] is False  # 5 GB > 4 GB.
  assert planner.estimate(plan, acc, utilization=0.5, dtype="bfloat16")["seconds"] == \
      pytest.approx(40 + 32)
  # Measured here (an achieved rate): FLOPs / FLOP/s only, no utilisation, no bandwidth.
  measured = planner.Accelerator("here", 1e12, 1e12, 1e11, 0.0, measured=True)
  est = planner.estimate(plan, measured, utilization=0.5)
  assert est["seconds"] == pytest.approx(10 * 4 + 2 * 1e-3) and est["fits"] is None
  with pytest.raises(ValueError, match="utilization"):
    planner.estimate(plan, acc, utilization=1.5)
  with pytest.raises(ConfigError, match="tpu_v9"):
    planner.plan_and_estimate(None, accelerators=("tpu_v9",))


def test_mode_plan_writes_plan_json(tfds_dir, tmp_path):
  workdir = tmp_path / "plan"
  cmd = [sys.executable, "-m", "jaxvars.main", "--config=configs/joint.py:tiny",
         f"--config.data.tfds_dir={tfds_dir}", f"--workdir={workdir}", "--mode=plan"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "estimated wall time" in done.stdout and "NVIDIA H100" in done.stdout
  with open(workdir / "plan.json") as fh:
    saved = json.load(fh)
  assert set(saved["estimates"]) == {"cpu"} | set(planner.ACCELERATORS)
  assert saved["estimates"]["h100"]["fits"] is True
  assert os.listdir(workdir) == ["plan.json"]  # Nothing else is written.
