"""The plan of conditions (jaxvars/evaluation/plan.py): what each preset evaluates, in what
order, and that a new condition or metric is one registration."""

from __future__ import annotations

import re

import numpy as np
import pytest

from configs import joint
from jaxvars.attacks.spec import attack_spec
from jaxvars.evaluate import attack_specs
from jaxvars.evaluation import plan as plan_lib
from jaxvars.evaluation.plan import PLANNERS, Condition, PlanInputs, make_plan, row_order
from jaxvars.evaluation.rank_metrics import RANK_METRICS, metrics_for, per_user

SYSTEMS = ("undefended", "defended", "defended_rand", "jpeg", "bit_depth")


def _plan(preset: str, **inputs):
  config = joint.get_config(preset)
  kw = dict(systems=SYSTEMS, transfer=tuple(attack_specs(config)))
  kw.update(inputs)
  return make_plan(config, PlanInputs(**kw))


def test_cpu_hm_plan_lists_every_condition_in_order_with_its_threat_model():
  plan = _plan("cpu,hm")
  got = [(c.kind, c.name, c.systems if len(c.systems) == 1 else "all", c.gated) for c in plan]
  assert got == [
      ("clean", "clean", "all", False),
      ("transfer", "fgsm@8", "all", False), ("transfer", "pgd@8", "all", False),
      ("adaptive", "pgd-bpr_all@8", "all", False), ("adaptive", "pgd-feature@8", "all", False),
      ("adaptive", "pgd-demote@8", "all", False),
      ("whitebox", "pgd-wb@8", ("defended",), False),
      ("whitebox", "pgd-wb-det1@8", ("defended",), True),
      ("whitebox", "pgd-wb-eot4@8", ("defended_rand",), False),
      ("whitebox", "pgd-wb-eot4-det1@8", ("defended_rand",), True),
      ("sanity", "pgd-wb-2xsteps@8", ("defended",), False),
      ("sanity", "pgd-demote-wb@64", ("defended",), False),
      ("targeted", "fgsm-insa@8", "all", False), ("targeted", "pgd-insa@8", "all", False),
      ("targeted", "fgsm-expa@8", "all", False), ("targeted", "pgd-expa@8", "all", False),
      ("targeted", "fgsm-taamr@8", "all", False), ("targeted", "pgd-taamr@8", "all", False),
      ("targeted", "csema", "all", False),
      ("targeted", "pgd-insa-wb@8@defended", ("defended",), False),
      ("floor", "no_visual", ("undefended",), False)]
  by_name = {c.name: c for c in plan}
  assert by_name["pgd@8"].cache_key == "pgd@8" and not by_name["pgd@8"].subset
  assert by_name["pgd-wb-eot4@8"].cache_key == "pgd-wb-eot4@8@defended_rand"
  assert by_name["pgd-wb-eot4@8"].spec.eot == 4 and by_name["pgd-wb@8"].spec.eot == 1
  assert all(c.subset for c in plan if c.kind in ("adaptive", "whitebox", "sanity", "targeted"))
  assert by_name["pgd-wb-2xsteps@8"].compare_with == "pgd-wb@8"
  assert by_name["pgd-wb-2xsteps@8"].spec.steps == 2 * by_name["pgd-wb@8"].spec.steps
  assert by_name["csema"].cache_key is None and by_name["no_visual"].cache_key is None
  record = by_name["pgd-wb-det1@8"].record(["defended/pgd-wb-det1@8"])
  assert record["kind"] == "whitebox" and record["eps"] == 8.0 and record["gated"]
  assert record["through"] == "defended" and "white-box" in record["threat_model"]
  assert record["items"] == "subset" and record["attack"] == "pgd"
  assert by_name["fgsm@8"].record([])["threat_model"].startswith("transfer")


def test_plan_leaves_out_what_the_run_cannot_evaluate():
  no_det = _plan("cpu,hm", detector=False)
  assert not any(c.gated for c in no_det)
  no_logits = _plan("cpu,hm", has_logits=False)
  assert not any("taamr" in c.name for c in no_logits)
  plain = _plan("cpu,hm", uses_features=False)  # BPR-MF: photos play no part.
  assert {c.kind for c in plain} == {"clean", "transfer", "adaptive", "whitebox", "sanity"}
  only = _plan("cpu,hm", systems=("undefended",))
  assert {c.kind for c in only} == {"clean", "transfer", "adaptive", "targeted", "floor"}


def test_more_steps_check_of_a_randomised_system_keeps_its_eot():
  """Twice the steps through a randomised first target is the same EOT attack with more
  steps (it used to run without EOT and was compared with nothing)."""
  config = joint.get_config("cpu,hm")
  config.attack.adaptive.systems = ("defended_rand", "defended")
  plan = make_plan(config, PlanInputs(systems=SYSTEMS, transfer=()))
  longer = next(c for c in plan if c.kind == "sanity" and c.compare_with)
  assert longer.name == "pgd-wb-eot4-2xsteps@8" and longer.compare_with == "pgd-wb-eot4@8"
  assert longer.compare_with in {c.name for c in plan if c.kind == "whitebox"}


def test_rows_are_grouped_by_system_with_gated_rows_after_each():
  plan = [Condition("clean", "clean", ("undefended", "defended")),
          Condition("pgd-wb-det1@8", "whitebox", ("defended",), gated=True),
          Condition("csema", "targeted", ("undefended",)),
          Condition("no_visual", "floor", ("undefended",))]
  names = {"undefended": "vbpr", "defended": "defended"}
  order = row_order(plan, names, mostpop=True)
  assert order[:3] == ["mostpop/clean", "mostpop/pgd-wb-det1@8", "mostpop/no_visual"]
  assert order.index("defended+gate/clean") == order.index("defended/no_visual") + 1
  assert not any("csema" in k for k in order)  # Targeted attacks have no ranking rows.
  assert plan[1].row_systems(names) == [("defended", "defended", None),
                                        ("defended+gate", "defended", "defended")]


def test_a_registered_planner_adds_its_conditions(monkeypatch):
  entries = dict(PLANNERS._entries)

  def sweep(config, p):
    return [Condition(s.condition, "adaptive", p.systems, spec=s, subset=True)
            for s in (attack_spec(config.attack, "fgsm", e) for e in (2.0, 4.0))]

  monkeypatch.setattr(PLANNERS, "_entries", entries)
  PLANNERS.register("fgsm_sweep", sweep)
  plan = _plan("tiny")
  assert [c.name for c in plan if c.kind == "adaptive"][-2:] == ["fgsm@2", "fgsm@4"]
  assert plan[-1].name == "fgsm@4"  # Registration order is plan order.


def test_the_docs_metric_example_is_one_file(monkeypatch):
  """docs/extending.md's MAP example, run as the file it shows: registered, it joins the
  full protocol's metrics and per_user computes it."""
  import pathlib
  text = pathlib.Path(__file__).parents[1].joinpath("docs", "extending.md").read_text()
  code = re.search(r"```python\n(# jaxvars/evaluation/rank_metrics/.*?)```", text, re.S).group(1)
  monkeypatch.setattr(RANK_METRICS, "_entries", dict(RANK_METRICS._entries))
  exec(compile(code, "map.py", "exec"), {})
  assert metrics_for("full")[-1] == "MAP" and "MAP" not in metrics_for("sampled")
  out = per_user(np.array([0, 3, 12]), (10,), metrics_for("full"))
  np.testing.assert_allclose(out["MAP@10"], [1.0, 0.25, 0.0])
  assert list(out) == ["HR@10", "Recall@10", "NDCG@10", "MAP@10", "MRR"]


def test_mostpop_full_ranks_match_a_loop():
  rng = np.random.default_rng(0)
  pop = rng.integers(0, 4, size=30).astype(np.float64)  # Many ties.
  users = np.repeat(np.arange(6), 4)
  items = rng.integers(0, 30, size=24)
  test = np.array([(items[users == u].max() + 1) % 30 for u in range(6)])
  from jaxvars.evaluation.loop import mostpop_full_ranks
  got = mostpop_full_ranks(pop, test, users, items)
  for u in range(6):
    others = [i for i in range(30) if i != test[u] and i not in set(items[users == u])]
    assert got[u] == sum(pop[i] >= pop[test[u]] for i in others)


def test_results_diff_finds_moved_numbers_and_ignores_wall_clock(tmp_path, capsys):
  import json
  from jaxvars.report import diff
  before = {"ranking": {"vbpr/clean": {"HR@10": 0.25, "ci95": {"HR@10": [0.2, 0.3]}}},
            "timing": {"total_s": 10.0}, "attack": {"pgd@8": {"time_s": 3.0, "linf": 0.03}}}
  after = json.loads(json.dumps(before))
  after["timing"]["total_s"], after["attack"]["pgd@8"]["time_s"] = 99.0, 7.0
  after["ranking_full"] = {"vbpr/clean": {"HR@10": 0.1}}
  d = diff.diff(before, after)
  assert d["moved"] == [] and d["only_after"] == ["ranking_full/vbpr/clean/HR@10"]
  after["ranking"]["vbpr/clean"]["ci95"]["HR@10"][1] = 0.31
  assert diff.diff(before, after)["moved"] == [("ranking/vbpr/clean/ci95/HR@10/1", 0.3, 0.31)]
  assert diff.diff(before, after, tolerance=0.02)["moved"] == []
  a, b = tmp_path / "a.json", tmp_path / "b.json"
  a.write_text(json.dumps(before))
  b.write_text(json.dumps(after))
  assert diff.main([str(a), str(b)]) == 1
  assert "moved  ranking/vbpr/clean/ci95/HR@10/1: 0.3 -> 0.31" in capsys.readouterr().out
  assert diff.main([str(a), str(a)]) == 0
  assert diff.main([str(a), str(tmp_path / "missing.json")]) == 2
