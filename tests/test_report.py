"""The full recipe's sweep, ablations and report (issue 5).

The slow test trains a tiny synthetic run with a 2-eps sweep and both ablations, then
checks the report against results.json number by number and the figures as PNG files.
"""

import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import INTERIM_RESULTS, TINY_RUN_ROWS, tiny_config
from jaxvars import configuration, report, run
from jaxvars.attacks.spec import attack_spec
from jaxvars.overrides import apply_overrides
from jaxvars.evaluation import detection
from jaxvars.report import checks_tables, figures, paper
from jaxvars.errors import ConfigError, JaxvarsError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tables(markdown: str) -> dict[str, list[list[str]]]:
  """Markdown tables of ``markdown`` by the heading above them: heading -> rows of cells
  (header row first, separator dropped); a second table under one heading is
  '<heading> #2'."""
  tables, heading, current = {}, None, None
  for line in markdown.splitlines():
    if line.startswith("#"):
      heading, current = line.lstrip("# ").strip(), None
    elif line.startswith("|"):
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if set("".join(cells)) <= {"-"}:
        continue
      if current is None:
        key, n = heading, 1
        while key in tables:
          n += 1
          key = f"{heading} #{n}"
        current = tables[key] = []
      current.append(cells)
    else:
      current = None
  return tables


def _num(cell: str) -> float:
  """The value of a cell ('0.1667' or '0.1667 [0.0833, 0.2667]')."""
  cell = cell.split(" [")[0]
  return math.nan if cell == "NaN" else float(cell)


def _ci(cell: str) -> list[float]:
  """The 95% interval of a cell '0.1667 [0.0833, 0.2667]'."""
  inside = cell.split(" [", 1)[1].rstrip("]")
  return [float(x) for x in inside.split(", ")]


def _section_table(markdown: str, heading_start: str) -> list[list[str]]:
  return next(t for h, t in _tables(markdown).items() if h.startswith(heading_start))


@pytest.fixture(scope="module")
def full_run(tiny_run):
  return tiny_run


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # One worker computes the shared run (--dist=loadgroup).
def test_sweep_and_ablations_results(full_run):
  config, workdir, results = full_run
  conds = {"clean", "fgsm@4", "pgd@4", "fgsm@8", "pgd@8"}
  assert set(results["ranking"]) == TINY_RUN_ROWS
  assert set(results["detection"]) == conds - {"clean"}
  # Every attacked catalogue was crafted once and kept for reuse.
  for cond in conds - {"clean"}:
    assert os.path.exists(os.path.join(workdir, "attacks", f"{cond}.npy"))
    assert results["attack"][cond]["linf_255"] <= float(cond.split("@")[1]) + 1e-4
  ab = dict(results["ablations"])
  assert set(ab) == {"no_detector", "no_perceptual", "diverges"}
  # A diverged variant is a row saying so (naming the stage and the loss); the main run's
  # results and the other variants are all there.
  diverged = ab.pop("diverges")
  assert set(diverged) == {"overrides", "diverged", "timing"}
  assert diverged["diverged"].startswith("non-finite stage 'denoiser_fgsm' loss (inf) at step 1")
  with open(os.path.join(workdir, "ablations", "diverges", "results.json")) as f:
    saved = json.load(f)
  assert saved["diverged"] == diverged["diverged"]
  for name, row in ab.items():
    # Defended systems on clean and PGD@8 only (VBPR and the attack are shared).
    assert set(row["ranking"]) == {f"{s}/{c}" for s in ("defended", "defended_rand")
                                   for c in ("clean", "pgd@8")}
    assert os.path.exists(os.path.join(workdir, "ablations", name, "results.json"))
  assert ab["no_detector"]["detection"] == {}  # No detector was trained: no detection.
  assert "detector" not in ab["no_detector"]["stages"]
  # no_detector's denoiser stages never read the contrastive weight: taken from the main run
  # (defense.adopt_stages; tests/test_ablation_reuse.py), with the main run's histories.
  assert ab["no_detector"]["adopted_stages"] == ["denoiser_fgsm", "denoiser_mix"]
  for stage in ("denoiser_fgsm", "denoiser_mix"):
    assert ab["no_detector"]["stages"][stage] == results["training"]["stages"][stage]
  assert ab["no_perceptual"]["adopted_stages"] == []
  assert set(ab["no_perceptual"]["detection"]) == {"pgd@8"}
  # The perceptual term is gone from the ablation's losses, present in the main run's.
  assert "perceptual" not in ab["no_perceptual"]["stages"]["denoiser_fgsm"][0]
  assert "perceptual" in results["training"]["stages"]["denoiser_fgsm"][0]
  # The ablation's denoiser differs from the main one: different defended metrics or not,
  # its checkpoints exist apart from the main run's.
  assert os.path.isdir(os.path.join(workdir, "ablations", "no_perceptual", "checkpoints",
                                    "denoiser_fgsm"))


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # One worker computes the shared run (--dist=loadgroup).
def test_main_results_reach_disk_before_the_ablation_study(full_run, tmp_path):
  """results.json holds the main run's numbers, marked incomplete, while the ablations run
  (a crash or kill there loses none of them); the finished file replaces it."""
  _, workdir, results = full_run
  with open(os.path.join(os.path.dirname(workdir), INTERIM_RESULTS)) as f:
    interim = json.load(f)
  assert "ablation study had not finished" in interim["incomplete"]
  assert "incomplete" not in results and "ablations" not in interim
  for key in ("ranking", "ranking_unseen", "detection", "fidelity", "attack", "training"):
    assert run.without_timing(interim[key]) == run.without_timing(results[key]), key
  assert 0 < interim["timing"]["total_s"] < results["timing"]["total_s"]
  # The report of such a file says it is incomplete.
  with open(tmp_path / "results.json", "w") as f:
    json.dump(interim, f)
  with open(report.write_report(str(tmp_path))) as f:
    assert "**Incomplete results:** the ablation study had not finished" in f.read()


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # One worker computes the shared run (--dist=loadgroup).
def test_evaluate_mode_reproduces_sweep_and_ablations(full_run):
  config, workdir, results = full_run
  again = run.evaluate(config, workdir)
  assert again["ranking"] == results["ranking"]
  assert again["detection"] == results["detection"]
  # The other recommenders (AMR, BPR-MF) restored from their own checkpoints.
  assert again["recommenders"]["rows"] == results["recommenders"]["rows"]
  assert again["recommenders"]["comparisons"] == results["recommenders"]["comparisons"]
  for name, row in results["ablations"].items():
    if "diverged" in row:  # Carried over from the variant's results.json.
      assert again["ablations"][name]["diverged"] == row["diverged"]
      continue
    assert again["ablations"][name]["ranking"] == row["ranking"]
    assert again["ablations"][name]["detection"] == row["detection"]
    assert again["ablations"][name]["fidelity"] == row["fidelity"]
  # Attacks (transferred and white-box) came from the cache this time.
  assert all(a["cached"] for a in again["attack"].values()), {
      k: a["cached"] for k, a in again["attack"].items()}


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")  # One worker computes the shared run (--dist=loadgroup).
def test_report_tables_equal_results_and_figures_are_pngs(full_run):
  _, workdir, _ = full_run
  path = report.write_report(workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with open(path) as f:
    text = f.read()
  tables = _tables(text)

  main = _section_table(text, "All test users")
  header = main[0]
  assert header[:8] == ["attack", "system", *paper.METRICS]
  assert header[8] == "paper HR@5 (eps not stated)"
  labels = {info["label"]: key for key, info in results["systems"].items()}
  labels["MostPop"] = "mostpop"
  seen = 0
  for row in main[1:]:
    cond, system = row[0], labels[row[1]]
    ours = results["ranking"][f"{system}/{cond}"]
    for j, metric in enumerate(paper.METRICS):
      assert _num(row[2 + j]) == round(ours[metric], 4)
      assert _ci(row[2 + j]) == [round(x, 4) for x in ours["ci95"][metric]]
    attack = cond.split("@")[0]
    if system in paper.TABLE2[attack]:  # The paper's three systems have paper columns.
      ref = [_num(c) for c in row[8:14]]
      assert ref == list(paper.TABLE2[attack][system])
    else:
      assert row[8:14] == [""] * 6
    seen += 1
  assert seen == 16  # 3 conditions x 5 systems + MostPop.
  unseen = _section_table(text, "Users whose held-out item the defence never trained on")
  for row in unseen[1:]:
    ours = results["ranking_unseen"][f"{labels[row[1]]}/{row[0]}"]
    assert _num(row[3]) == round(ours["HR@10"], 4) and len(row) == 8  # No paper columns.
  # Carlini's more-steps check, end to end: the pair carries the paired mean rank, and the
  # report prints it (its value, from results.json) beside HR@10.
  steps = results["comparisons"]["defended/pgd-wb-2xsteps@8 - defended/pgd-wb@8"]["all"]
  assert {"HR@10", "mean_rank"} <= set(steps)
  assert (f"mean rank (0 = top) {steps['mean_rank']['diff']:+.2f} "
          f"[{steps['mean_rank']['ci95'][0]:+.2f}, {steps['mean_rank']['ci95'][1]:+.2f}]"
          in text)
  fidelity = _section_table(text, "Images, fidelity and embeddings")
  assert [r[0] for r in fidelity[1:]] == list(results["fidelity"])
  for row in fidelity[1:]:
    assert _num(row[1]) == round(results["fidelity"][row[0]]["psnr"], 4)

  sweep = tables["The eps sweep (Figure 6)"]
  assert sweep[0] == ["system", "attack", "clean", "eps=4", "eps=8"]
  for row in sweep[1:]:
    system, kind = labels[row[0]], row[1].lower()
    assert _num(row[2]) == round(results["ranking"][f"{system}/clean"]["HR@10"], 4)
    for cell, eps in zip(row[3:], (4, 8)):
      assert _num(cell) == round(results["ranking"][f"{system}/{kind}@{eps}"]["HR@10"], 4)
  assert len(sweep) == 1 + 10  # 5 systems x 2 attacks.

  det = tables["Detection (Table 4)"]
  keys = {"accuracy (deployed threshold)": "accuracy", "ROC AUC": "roc_auc",
          "TPR (deployed threshold)": "tpr_at_threshold",
          "FPR (deployed threshold)": "fpr_at_threshold",
          "TPR at FPR 0.05 (oracle threshold)": "oracle_tpr@fpr=0.05"}
  assert {r[1] for r in det[1:-1]} == set(keys)
  for row in det[1:]:
    if row[0].startswith("paper"):
      assert row[2:] == ["", "0.8826"]
      continue
    for cell, eps in zip(row[2:], (4, 8)):
      assert _num(cell) == round(results["detection"][f"{row[0].lower()}@{eps}"][keys[row[1]]], 4)

  confusion = tables["Detection (Table 4) #2"]
  for row in confusion[1:]:
    d = results["detection"][row[0].lower()]
    n = d["items"]
    assert [int(c) for c in row[1:]] == [
        n - round(d["fpr_at_threshold"] * n), round(d["fpr_at_threshold"] * n),
        n - round(d["tpr_at_threshold"] * n), round(d["tpr_at_threshold"] * n)]
  assert len(confusion) == 3

  # Feature squeezing beside the detector (issue 37): a row per detector, by eps.
  versus = tables["Detection baselines (Table 4 layout)"]
  assert versus[0] == ["detector", "attack", "metric", "eps=4", "eps=8"]
  fs = results["detection_baselines"]["feature_squeezing"]
  sources = {"OURS (contrastive detector)": results["detection"], "Feature squeezing": fs["detection"]}
  assert {r[0] for r in versus[1:]} == set(sources) and len(versus) == 1 + 2 * 2 * 2
  for row in versus[1:]:
    metric = "accuracy" if row[2].startswith("accuracy") else "roc_auc"
    for cell, eps in zip(row[3:], (4, 8)):
      assert _num(cell) == round(sources[row[0]][f"{row[1].lower()}@{eps}"][metric], 4)
  assert set(fs["noise"]) == set(results["detection_noise"])

  abl = tables["Ablations (Table 5: PGD at eps = 8)"]
  by_name = {r[0]: r for r in abl[1:]}
  assert [r[0] for r in abl[1:]] == ["unmodified", *results["ablations"]]
  assert set(by_name) == {"unmodified", "no_detector", "no_perceptual", "diverges"}
  assert by_name.pop("diverges")[1:] == ["training diverged (no defence to evaluate)"] + [""] * 9
  assert "* ablation diverges: **training diverged**" in text
  sources = {"unmodified": results, **results["ablations"]}
  for row in by_name.values():
    src = sources[row[0]]
    acc = src["detection"].get("pgd@8", {}).get("accuracy", math.nan)
    if math.isnan(acc):
      assert row[1] == "NaN"
    else:
      assert _num(row[1]) == round(acc, 4)
    assert _num(row[2]) == round(src["ranking"]["defended_rand/pgd@8"]["NDCG@10"], 4)
    assert _num(row[3]) == round(src["ranking"]["defended_rand/pgd@8"]["HR@10"], 4)
    assert _num(row[4]) == round(src["ranking"]["defended/pgd@8"]["NDCG@10"], 4)
    assert _num(row[5]) == round(src["ranking"]["defended/pgd@8"]["HR@10"], 4)
    # The denoiser's fidelity (PSNR of D(clean photo)) of each variant.
    assert _num(row[7]) == round(src["fidelity"]["clean"]["psnr"], 4)
  assert by_name["no_detector"][8:] == ["NaN", "0.0768", "0.1661"]
  for name in ("no_detector", "no_perceptual"):  # Each against the unmodified, paired.
    row = by_name[name]
    diff = results["ablations"][row[0]]["comparisons"]["defended_rand/pgd@8"]["HR@10"]
    assert row[6].startswith(f"{diff['diff']:+.4f} [")

  figures = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
  assert set(os.path.basename(f) for f in figures) == {
      "fig6_hr10_vs_eps.png", "table4_detection_vs_eps.png", "fig8_detector_distances.png",
      "fig9_roc.png", "fig7_images.png", "fig11_embeddings_pca.png", "attack_loss_curves.png",
      "targeted_images.png"}
  for rel in figures:
    fig = os.path.join(workdir, rel)
    with open(fig, "rb") as f:
      assert f.read(8) == PNG_SIGNATURE
    with Image.open(fig) as im:
      im.verify()
    with Image.open(fig) as im:
      assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200
      assert np.asarray(im.convert("L")).std() > 1.0  # Not a blank canvas.
  assert not [f for f in os.listdir(os.path.join(workdir, "figures")) if ".tmp" in f]


def test_report_without_results_is_a_clear_error(tmp_path):
  with pytest.raises(JaxvarsError, match=r"results.json does not exist; run python -m "
                                         r"jaxvars.main"):
    report.write_report(str(tmp_path))
  (tmp_path / "results.json").write_text("{not json")
  with pytest.raises(JaxvarsError, match="is not valid JSON"):
    report.write_report(str(tmp_path))
  assert not (tmp_path / "report.md").exists()


def test_report_of_a_clean_only_run(tmp_path):
  ranking = {f"{s}/clean": {m: 0.1 * (i + 1) for i, m in enumerate(paper.METRICS)}
             for s in ("mostpop", "vbpr")}
  (tmp_path / "results.json").write_text(json.dumps({"ranking": ranking, "detection": {}}))
  text = open(report.write_report(str(tmp_path))).read()
  rows = _section_table(text, "All test users")
  assert [r[:2] for r in rows[1:]] == [["clean", "MostPop"], ["clean", "VBPR"]]
  assert rows[2][2:8] == ["0.1000", "0.2000", "0.3000", "0.4000", "0.5000", "0.6000"]
  assert "artifacts.npz is missing" in text and "![" not in text


def test_roc_curve_area_equals_roc_auc():
  rng = np.random.default_rng(0)
  clean = np.round(rng.normal(0, 1, 300), 1)  # Rounded: ties across classes.
  adv = np.round(rng.normal(1, 1, 200), 1)
  fpr, tpr = detection.roc_curve(clean, adv)
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # Trapezoids: ties count 1/2.
  assert area == pytest.approx(detection.roc_auc(clean, adv), abs=1e-12)


def test_pca_matches_covariance_eigenvectors():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 5)) @ np.diag([5.0, 3.0, 1.0, 0.5, 0.1]) + 7.0
  xy = figures.pca_2d(x)
  w, v = np.linalg.eigh(np.cov(x.T))
  ref = (x - x.mean(0)) @ v[:, ::-1][:, :2]
  for j in range(2):  # Equal up to the sign of each component.
    assert np.allclose(np.abs(xy[:, j]), np.abs(ref[:, j]), atol=1e-8)
  assert xy[:, 0].var() > xy[:, 1].var()


def test_pgd_step_size_scales_with_eps():
  from configs import joint
  a = joint.get_config("tiny").attack
  assert attack_spec(a, "pgd", 8).step() == 2.0 and attack_spec(a, "pgd", 64).step() == 16.0
  a.pgd_alpha_ratio = 0.0
  assert attack_spec(a, "pgd", 64).step() == a.pgd_alpha


def test_ablation_overrides_are_validated(tfds_dir):
  config = tiny_config(tfds_dir)
  new = apply_overrides(config, ("loss.perceptual=0", "stages.joint.terms="
                                               "('content', 'bpr')"), where="test")
  assert new.loss.perceptual == 0.0 and isinstance(new.loss.perceptual, float)
  assert tuple(new.stages.joint.terms) == ("content", "bpr")
  assert config.loss.perceptual == 1.0  # The original is untouched.
  config.ablation.variants.bad = ("loss.perceptul=0",)
  with pytest.raises(ConfigError, match=r"config.ablation.variants.bad: override "
                                        r"'loss.perceptul=0' names no field"):
    configuration.validate(config)
  config.ablation.variants.bad = ("recommender.factors=4",)
  with pytest.raises(ConfigError, match="shares with the main run"):
    configuration.validate(config)
  config.ablation.variants.bad = ("loss.perceptual",)
  with pytest.raises(ConfigError, match="not of the form 'path.to.field=value'"):
    configuration.validate(config)
  config.ablation.variants.bad = ("loss.perceptual=-1",)
  with pytest.raises(ConfigError, match=r"config.loss.perceptual=-1.0 must be a number >= 0"):
    configuration.validate(config)


def test_confusion_table_counts():
  results = {"detection": {"pgd@8": {"items": 200, "tpr_at_threshold": 0.9,
                                     "fpr_at_threshold": 0.05}}}
  rows = checks_tables.confusion_table(results, 8.0)
  assert rows[2] == "| PGD@8 | 190 | 10 | 20 | 180 |"


def _row(hr, lo, hi):
  return {"HR@10": hr, "ci95": {"HR@10": [lo, hi]}}


def test_eps_sanity_check_says_when_it_did_not_run_and_flags_a_violation():
  """Carlini's 'larger eps never helps' check: with one eps per attack it reports that it did
  not run (not a vacuous pass); a larger eps scoring higher beyond both intervals is flagged."""
  from jaxvars.report.robustness import sanity_checks
  one = {"ranking": {"vbpr/clean": _row(0.3, 0.27, 0.33), "vbpr/pgd@8": _row(0.2, 0.17, 0.23)}}
  lines = sanity_checks(one, 8.0)
  assert any("did not run" in line for line in lines)
  assert not any("never scored" in line for line in lines)
  ok = {"ranking": {"vbpr/pgd@8": _row(0.2, 0.17, 0.23), "vbpr/pgd@16": _row(0.15, 0.12, 0.18)}}
  assert any("never scored measurably higher" in line and "(1 pairs" in line
             for line in sanity_checks(ok, 8.0))
  bad = {"ranking": {"vbpr/pgd@8": _row(0.2, 0.17, 0.23), "vbpr/pgd@16": _row(0.3, 0.27, 0.33)}}
  assert any("**violated**" in line for line in sanity_checks(bad, 8.0))


# ---- Row and condition records (issue 34): the report reads what a row is from
# results['rows'] / results['conditions'], never from its name; full-ranking protocol. ----

def _rank_row(hr, width=0.05, **extra):
  return {"HR@10": hr, "NDCG@10": hr / 2, "MRR": hr / 3,
          "ci95": {"HR@10": [hr - width, hr + width], "NDCG@10": [hr / 2 - width, hr / 2 + width],
                   "MRR": [hr / 3 - width, hr / 3 + width]}, "users": 100, **extra}


def _pair(diff, lo, hi):
  effect = "higher" if lo > 0 else "lower" if hi < 0 else "none"
  return {"all": {"HR@10": {"diff": diff, "ci95": [lo, hi], "effect": effect}},
          "unseen": {"HR@10": {"diff": diff, "ci95": [lo, hi], "effect": effect}}}


def _recorded_results(*, full_disagrees=True) -> dict:
  """A run with the record sections, its rows and conditions named as jaxvars names them."""
  wb = "white-box adaptive through defended"
  conditions = [
      {"name": "clean", "kind": "clean", "attack": None, "objective": None, "eps": None,
       "through": None, "threat": "", "threat_model": "", "items": "all", "gated": False,
       "compare_with": None, "rows": ["mostpop/clean", "vbpr/clean", "defended/clean"]},
      {"name": "pgd@8", "kind": "transfer", "attack": "pgd", "objective": "bpr", "eps": 8.0,
       "through": None, "threat": "transfer", "threat_model": "transfer, every system",
       "items": "all", "gated": False, "compare_with": None,
       "rows": ["vbpr/pgd@8", "defended/pgd@8"]},
      {"name": "no_visual", "kind": "floor", "attack": None, "objective": None, "eps": None,
       "through": None, "threat": "", "threat_model": "", "items": "all", "gated": False,
       "compare_with": None, "rows": ["vbpr/no_visual"]},
      {"name": "pgd-wb@8", "kind": "whitebox", "attack": "pgd", "objective": "bpr", "eps": 8.0,
       "through": "defended", "threat": "white-box: defended", "threat_model": wb,
       "items": "subset", "gated": False, "compare_with": None, "rows": ["defended/pgd-wb@8"]},
      {"name": "pgd-wb-det1@8", "kind": "whitebox", "attack": "pgd", "objective": "bpr",
       "eps": 8.0, "through": "defended", "threat": "white-box: defended, detector-aware",
       "threat_model": wb + ", detector-aware", "items": "subset", "gated": True,
       "compare_with": None,
       "rows": ["defended/pgd-wb-det1@8", "defended+gate/pgd-wb-det1@8"]},
      {"name": "pgd-wb-2xsteps@8", "kind": "sanity", "attack": "pgd", "objective": "bpr",
       "eps": 8.0, "through": "defended", "threat": "white-box: defended", "threat_model": wb,
       "items": "subset", "gated": False, "compare_with": "pgd-wb@8",
       "rows": ["defended/pgd-wb-2xsteps@8"]},
      {"name": "pgd-demote-wb@64", "kind": "sanity", "attack": "pgd", "objective": "demote",
       "eps": 64.0, "through": "defended", "threat": "white-box: defended", "threat_model": wb,
       "items": "subset", "gated": False, "compare_with": None,
       "rows": ["defended/pgd-demote-wb@64"]},
  ]
  hr = {"mostpop/clean": 0.20, "vbpr/clean": 0.50, "vbpr/pgd@8": 0.10, "vbpr/no_visual": 0.15,
        "defended/clean": 0.45, "defended/pgd@8": 0.30, "defended/pgd-wb@8": 0.12,
        "defended/pgd-wb-det1@8": 0.11, "defended+gate/pgd-wb-det1@8": 0.40,
        "defended/pgd-wb-2xsteps@8": 0.09, "defended/pgd-demote-wb@64": 0.14}
  rows = {}
  for c in conditions:
    for key in c["rows"]:
      system = key.split("/")[0]
      rows[key] = {"system": system, "condition": c["name"],
                   "gate_of": "defended" if system == "defended+gate" else None}
  rows = {key: rows[key] for key in hr}  # Table order.
  full_hr = {"vbpr/clean": 0.06, "defended/clean": 0.05, "vbpr/pgd@8": 0.05,
             "defended/pgd@8": 0.02 if full_disagrees else 0.07}
  size = {"linf_255": 8.0, "l2": 3.0, "time_s": 10.0}
  attack = {"pgd@8": {"items_attacked": 500, "threat": "transfer",
                      "threat_model": "transfer, every system", **size}}
  for c in conditions[3:]:
    attack[f"{c['name']}@defended"] = {"items_attacked": 50, "threat": c["threat"], **size,
                                       "threat_model": c["threat_model"], "systems": ["defended"],
                                       **({"pass_rate": 0.625} if c["gated"] else {})}
  return {
      "data": {"users": 100, "items": 500, "eval_negatives_per_user": 100},
      "config": {"ablation": {"eps": 8.0}, "eval": {"bootstrap_resamples": 100}},
      "systems": {"vbpr": {"system": "undefended", "label": "VBPR"},
                  "defended": {"system": "defended", "label": "OURS"}},
      "ranking": {key: _rank_row(v) for key, v in hr.items()},
      "ranking_full": {key: _rank_row(v, 0.01) for key, v in full_hr.items()},
      "comparisons": {"defended/pgd@8 - defended/clean": _pair(-0.15, -0.2, -0.1),
                      "defended/pgd@8 - vbpr/pgd@8": _pair(0.2, 0.15, 0.25),
                      "defended+gate/pgd-wb-det1@8 - defended/pgd-wb-det1@8":
                          _pair(0.29, 0.2, 0.35),
                      "defended/pgd-wb-2xsteps@8 - defended/pgd-wb@8": _pair(-0.03, -0.05, -0.01)},
      "comparisons_full": {"defended/pgd@8 - vbpr/pgd@8": _pair(-0.03, -0.05, 0.01)},
      "robust": {"vbpr": _rank_row(0.1), "defended": _rank_row(0.08)},
      "detection": {},
      "attack": attack,
      "rows": rows,
      "conditions": conditions,
  }


# Names a producer could give the same rows: none says what the row is.
_OPAQUE = {"defended+gate": "gatekeeper", "pgd-wb-2xsteps@8": "longer@8",
           "pgd-demote-wb@64": "strong@64", "pgd-wb-det1@8": "sneaky@8", "pgd-wb@8": "adapt@8",
           "no_visual": "blank"}


def _rename(text: str) -> str:
  for old, new in _OPAQUE.items():
    text = text.replace(old, new)
  return text


def _legacy(results: dict) -> dict:
  return {k: v for k, v in results.items() if k not in ("rows", "conditions")}


def _report_text(tmp_path, results: dict, name: str) -> str:
  workdir = tmp_path / name
  workdir.mkdir()
  (workdir / "results.json").write_text(json.dumps(results))
  text = open(report.write_report(str(workdir))).read()
  return "\n".join(line for line in text.splitlines() if not line.startswith("Workdir `"))


def test_report_reads_row_kinds_from_the_records_not_the_names(tmp_path, monkeypatch):
  """Rows and conditions renamed so that no name says what it is (a gated row not ending in
  '+gate', a floor not named 'no_visual', a more-steps check without '2xsteps', a large-eps
  white-box check without '-wb'): the report reads their kinds from the records and says
  the same as for jaxvars's own names, without deriving anything from a name."""
  from jaxvars.report import robustness, rows
  named = _recorded_results()
  opaque = json.loads(_rename(json.dumps(named)))
  assert "gatekeeper/sneaky@8" in opaque["ranking"] and "+gate" not in json.dumps(opaque)
  expected = _rename(_report_text(tmp_path, named, "named"))

  def no_parsing(*args, **kwargs):
    raise AssertionError(f"a name was parsed: {args}")
  for fn in ("legacy_row", "legacy_condition", "legacy_targeted_budgets", "parse_condition",
             "parse_row_key"):
    monkeypatch.setattr(rows, fn, no_parsing)
  text = _report_text(tmp_path, opaque, "opaque")
  assert text == expected
  # The gated row is read as gated: its own table row, labelled after the ungated system.
  gated = robustness.gated_table(opaque)
  assert gated[2] == ("| sneaky@8 | OURS | 0.6250 | 0.1100 [0.0600, 0.1600] | "
                      "0.4000 [0.3500, 0.4500] | 0.4500 [0.4000, 0.5000] |")
  assert "OURS + gate" not in "\n".join(robustness.worst_case_table(opaque, 8.0))
  sanity = "\n".join(robustness.sanity_checks(opaque, 8.0))
  assert "twice the PGD steps: gatekeeper" not in sanity
  assert "* twice the PGD steps: defended/longer@8 - defended/adapt@8: HR@10 -0.0300" in sanity
  assert ("* white-box strong@64 on OURS: HR@10 0.1400 [0.0900, 0.1900] vs the no-visual level "
          "0.1500 [0.1000, 0.2000]") in sanity
  monkeypatch.undo()
  # Read from the names instead (an older results.json), the opaque rows are misread.
  legacy = _report_text(tmp_path, _legacy(opaque), "opaque_legacy")
  assert legacy != expected and "OURS + gate" not in legacy and "longer@8 -" not in legacy


def test_an_older_results_json_gives_the_same_report_from_its_names(tmp_path):
  """Without the record sections the records are derived from jaxvars's names: the same
  report as with them (and the committed runs' pages stay as they were:
  tests/test_results_pages.py)."""
  from jaxvars.report import rows
  named = _recorded_results()
  text = _report_text(tmp_path, named, "records")
  assert _report_text(tmp_path, _legacy(named), "legacy") == text
  for part in ("| pgd-wb-det1@8 | OURS | 0.6250 |", "* twice the PGD steps: defended/pgd-wb-2xsteps@8",
               "* white-box pgd-demote-wb@64 on OURS", "| clean | MostPop |"):
    assert part in text
  derived, recorded = rows.records(_legacy(named)), rows.records(named)
  assert derived.legacy and not recorded.legacy
  for key in named["ranking"]:
    assert derived.row(key) == recorded.row(key)
    a, b = derived.condition_of(key), recorded.condition_of(key)
    assert (a.name, a.kind, a.eps, a.through, a.gated, a.compare_with, a.family) == (
        b.name, b.kind, b.eps, b.through, b.gated, b.compare_with, b.family), key
  # Only the records module parses a name.
  report_dir = os.path.dirname(rows.__file__)
  for name in os.listdir(report_dir):
    if name.endswith(".py") and name != "rows.py":
      source = open(os.path.join(report_dir, name)).read()
      assert not re.search(r"parse_row_key|parse_condition|\+gate|2xsteps|no_visual", source), name


def test_full_ranking_table_and_where_the_protocols_disagree(tmp_path):
  results = _recorded_results(full_disagrees=True)
  text = _report_text(tmp_path, results, "disagree")
  assert "Krichene & Rendle, KDD 2020" in text and "did not buy in training" in text
  full = _section_table(text, "Full ranking")
  assert full[0] == ["condition", "system", "users", "HR@10 (sampled)", "HR@10 (full)",
                     "NDCG@10 (full)", "MRR (full)"]
  assert full[4] == ["pgd@8", "OURS", "100", "0.3000 [0.2500, 0.3500]", "0.0200 [0.0100, 0.0300]",
                     "0.0100 [0.0000, 0.0200]", "0.0067 [-0.0033, 0.0167]"]
  lines = [line for line in text.splitlines() if "sampled HR@10 ranks" in line]
  assert lines == [
      "* pgd@8: sampled HR@10 ranks OURS above VBPR (0.3000 vs 0.1000), the full ranking the "
      "reverse (0.0200 vs 0.0500); paired, sampled: `defended/pgd@8 - vbpr/pgd@8` +0.2000 "
      "[+0.1500, +0.2500] (excludes 0); full: `defended/pgd@8 - vbpr/pgd@8` -0.0300 "
      "[-0.0500, +0.0100] (includes 0)"]
  assert "order every pair of systems" not in text
  agree = _report_text(tmp_path, _recorded_results(full_disagrees=False), "agree")
  assert "sampled HR@10 ranks" not in agree
  assert ("* The two protocols order every pair of systems under the same condition the same "
          "way by HR@10 (2 pairs; a tie in either is not a reversal).") in agree
  del results["ranking_full"]
  assert "Full ranking" not in _report_text(tmp_path, results, "sampled_only")
