"""``write_report(workdir)``: ``report.md`` and its figures from results.json + artifacts.npz."""

from __future__ import annotations

import json
import zipfile

import numpy as np

from jaxvars import atomic, fs, workdir as wd
from jaxvars.conditions import condition_key
from jaxvars.errors import DataError, JaxvarsError
from jaxvars.report import (checks_tables, claims, families, figures, full_ranking, robustness, tables,
                            targeted_tables)

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"


def read_results(path: str) -> dict | None:
  """A run's results.json, or None where it does not exist.

  Raises:
    DataError: naming ``path`` when it cannot be read, is not valid JSON (e.g. truncated)
      or holds no JSON object.
  """
  try:
    with fs.open(path, encoding="utf-8") as f:
      results = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    what = "is not valid JSON" if isinstance(e, json.JSONDecodeError) else "cannot be read"
    raise DataError(f"{path} {what} ({e}; truncated?); delete it (--mode=evaluate writes it "
                    "again from the checkpoints and the stages' records) or restore it") from None
  if not isinstance(results, dict):
    raise DataError(f"{path} holds a JSON {type(results).__name__}, not the object of a results "
                    "file; delete it (--mode=evaluate writes it again) or restore it")
  return results


def read_artifacts(path: str) -> dict:
  """The arrays of a run's artifacts.npz ({} where it does not exist), loaded with
  ``allow_pickle=False``: jaxvars writes only plain arrays, and unpickling a file can run code.

  Raises:
    DataError: naming ``path`` when it is not a readable .npz of plain arrays (truncated,
      or holding pickled objects).
  """
  if not fs.exists(path):
    return {}
  try:
    with fs.np_load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except ValueError as e:
    if "pickle" in str(e):
      raise DataError(f"{path} holds pickled (object) arrays, which jaxvars never writes and "
                      "does not load (unpickling can run code); delete it (--mode=evaluate writes "
                      "it again)") from None
    raise DataError(f"{path} is not a readable .npz file ({e}); delete it (--mode=evaluate "
                    "writes it again)") from None
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise DataError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}); delete it "
                    "(--mode=evaluate writes it again)") from None


def _load(workdir: str) -> tuple[dict, dict]:
  path = wd.results_path(workdir)
  results = read_results(path)
  if results is None:
    raise JaxvarsError(f"{path} does not exist; run python -m jaxvars.main --workdir={workdir} "
                       "first")
  if "ranking" not in results:
    raise JaxvarsError(f"{path} has no 'ranking' section; it is not a results file of "
                       "configs/joint.py")
  return results, read_artifacts(wd.artifacts_path(workdir))


def _header(workdir: str, results: dict) -> list[str]:
  data, cfg = results.get("data", {}), results.get("config", {})
  lines = ["# jaxvars report", ""]
  lines.append(f"Workdir `{fs.abspath(workdir)}`; presets `{cfg.get('presets', '?')}`; "
               f"data `{data.get('name', '?')}`: {data.get('users', '?')} users, "
               f"{data.get('items', '?')} items, {data.get('image_size', '?')} px images, "
               f"{data.get('eval_negatives_per_user', '?')} sampled negatives per test user "
               "(leave-one-out).")
  backbone = results.get("backbone") or cfg.get("backbone", {})
  if backbone:
    random = backbone.get("init") == "random"
    lines.append(f"Backbone `{backbone.get('arch', '?')}`, weights `{backbone.get('init', '?')}`"
                 f"{' (**random: an untrained network**)' if random else ''}, "
                 f"{data.get('image_size', '?')} px.")
    probe = backbone.get("linear_probe")
    if probe:
      lines.append(f"Linear probe of its item features on the item categories: accuracy "
                   f"{probe['accuracy']:.4f} ({probe['classes']} classes, "
                   f"{probe['test_items']} held-out items; always the majority class: "
                   f"{probe['majority_accuracy']:.4f}).")
  if results.get("incomplete"):  # run.py: written before the ablation study finished.
    lines.append(f"**Incomplete results:** {results['incomplete']}.")
  total = results.get("timing", {}).get("total_s")
  if total:
    lines.append(f"Wall time of the run: {total / 60:.1f} min.")
  described = "; ".join(f"{info.get('label', name)}: {info.get('description', '')}"
                        for name, info in results.get("systems", {}).items())
  lines += ["", f"Systems: {described or 'see results.json'}. Attacks perturb every item "
            "photo of the catalogue against the undefended recommender (paper eq. 3 unless "
            "named otherwise); eps in 1/255 pixel units. Paper columns: Amazon Men, VBPR "
            "block of Table 2 (a different dataset: compare shapes, not values).", ""]
  other = _bpr_other_line(cfg)
  if other:
    lines += [other, ""]
  return lines


_BPR_OTHER_TEXT = {  # config.defense.bpr_other -> what the joint loss's BPR term did.
    "clean": "with its clean feature f(x_j), as before issue 35 (`config.defense.bpr_other`)",
    "defended": "through the denoiser, f(D(x_j)), with the gradient through both photos "
                "(the paper's eq. 12; `config.defense.bpr_other`)",
    "defended_frozen": "through the denoiser, f(D(x_j)), without the gradient through x_j "
                       "(`config.defense.bpr_other`)"}


def _bpr_other_line(cfg: dict) -> str | None:
  """One sentence on what the defence's BPR term and the white-box attacks scored the other
  item of each triplet with, for a run that trained a defence stage with the BPR term (None
  for another run, or a results.json from before the options existed)."""
  stages = cfg.get("stages", {})
  with_bpr = any(s.get("epochs") and "bpr" in s.get("terms", ()) for s in stages.values())
  other = cfg.get("defense", {}).get("bpr_other")
  if not with_bpr or other not in _BPR_OTHER_TEXT:
    return None
  line = ("Defence training: the joint loss's BPR term scored the other item j of each "
          f"triplet {_BPR_OTHER_TEXT[other]}.")
  attack = cfg.get("attack", {})
  whitebox = (attack.get("adaptive", {}).get("eps") and attack.get("adaptive", {}).get("systems")
              or cfg.get("targeted", {}).get("num_targets")
              and cfg.get("targeted", {}).get("whitebox_systems"))
  if not whitebox:
    return line
  table = attack.get("whitebox_table", "clean")
  return (line + " White-box attacks read "
          + ("the attacked system's own deployed features of the other items (f(D(x)) for "
             "OURS; " if table == "deployed" else "the clean features f(x) of the other items (")
          + "`config.attack.whitebox_table`).")


def write_report(workdir: str) -> str:
  """Writes ``<workdir>/report.md`` and ``<workdir>/figures/*.png``; returns the report path.

  Figures whose inputs are absent (a clean-only run, no detector, no artifacts.npz) are
  left out and the report says so. Every file is written atomically.

  Raises:
    JaxvarsError: ``<workdir>/results.json`` is missing or not valid JSON.
  """
  workdir = fs.fspath(workdir)  # A str, pathlib.Path or etils.epath.Path (gs://...).
  results, art = _load(workdir)
  fig_dir = fs.join(workdir, FIGURES_DIR)
  fs.makedirs(fig_dir, exist_ok=True)
  eps = tables.report_eps(results)
  cfg = results.get("config", {})
  lines = _header(workdir, results)

  def add_figure(name, fn, *args, caption):
    with atomic.atomic_path(fs.join(fig_dir, name)) as tmp:
      fn(*args, tmp)
    lines.extend([f"![{caption}]({FIGURES_DIR}/{name})", "", f"*{caption}*", ""])

  def in_art(prefix):
    return eps is not None and any(f"{prefix}/{condition_key(a, eps)}" in art
                                   for a in tables.attacks(results))

  where = f", eps = {eps:g}" if eps is not None else ""
  users = results.get("users", {})
  lines += [f"## Ranking (Tables 2/3 layout{where})", "",
            "Each number: the value and its 95% interval (bootstrap over users, "
            f"{cfg.get('eval', {}).get('bootstrap_resamples', 1000)} resamples).", ""]
  for section, what in tables.USER_GROUPS.items():
    if results.get(section):
      n = users.get({"ranking": "all"}.get(section, section.removeprefix("ranking_")))
      lines += [f"### {what[0].upper() + what[1:]} ({n} users)", ""]
      lines += tables.main_table(results, eps, section=section,
                                 paper_columns=section == "ranking") + [""]
  sweep = tables.input_sweep_table(results, eps)
  if sweep:
    lines += ["### Input-defence sweeps (AIP section 7.2)", "",
              "One system per setting of a swept input defence (`config.systems.jpeg_quality`, "
              "`config.systems.bit_depth` given as tuples), all on the same photos and users; "
              "HR@10 with its 95% interval over users:", ""] + sweep + [""]
  spread = tables.draws_table(results, eps)
  if spread:
    lines += ["Randomised systems: the table gives the mean over "
              f"{cfg.get('eval', {}).get('rand_draws', 1)} random draws per item; the spread "
              "of the draws:", ""] + spread + [""]
  family = families.family_table(results)
  if family:
    lines += ["### Recommender families (Tables 2-3: HR@10 and NDCG@10)", "",
              families.caption(results), ""] + family + [""]
    lines += ["Paired differences (HR@10, 95% intervals over users): the defence in front of "
              "each recommender against it undefended, and each other recommender against the "
              "defence recommender undefended and defended:", ""]
    lines += families.comparison_lines(results) + [""]
    fa = families.feature_attack_lines(results)
    if fa:
      lines += fa + [""]
  full = full_ranking.full_table(results)
  if full:
    lines += ["### Full ranking (all items the user did not buy in training)", "",
              full_ranking.caption(results), ""] + full + [""]
    lines += ["Where the two protocols order two systems differently (HR@10 under the same "
              "condition):", ""] + full_ranking.disagreements(results) + [""]
  checked = claims.claims(results, eps)
  if checked:
    lines += ["### What this run shows (paired differences, 95% intervals)", "",
              "A difference is called an effect only when its interval excludes 0.", ""]
    lines += checked + [""]
  if tables.sweep_eps(results, paper_only=True):
    lines += ["## The eps sweep (Figure 6)", "", "HR@10 by attack budget:", ""]
    lines += tables.sweep_table(results) + [""]
    add_figure("fig6_hr10_vs_eps.png", figures.hr_vs_eps, results,
               caption="Figure 6: HR@10 against eps; dotted lines: the same system on clean images")
    lines += ["### Attack size", ""] + tables.attack_table(results) + [""]
  if eps is not None and robustness.attack_rows(results, eps):
    items = {v.get("items_attacked") for v in results.get("attack", {}).values()}
    lines += [f"## Robustness: every attack at eps = {eps:g}, and the worst case", "",
              "HR@10 (95% interval) of each system under each attack; the worst case counts a "
              "user as a hit only if the held-out item stays in the top 10 under every attack "
              "the system was evaluated on (AutoAttack-style). Attacks beyond the paper's "
              "transfer FGSM/PGD perturb a subset of the items (held-out items first): "
              f"{sorted(i for i in items if i)} items."
              + (f" That subset leaves some users' held-out item unattacked, so every number "
                 f"in this section (clean and transfer rows too) is on the "
                 f"{users['attacked']} of {users.get('all')} users whose held-out item it "
                 "contains (`config.eval.max_items`)." if "attacked" in users else ""), ""]
    lines += robustness.worst_case_table(results, eps) + [""]
    adaptive = cfg.get("attack", {}).get("adaptive", {})
    gated = robustness.gated_table(results)
    if gated:
      lines += ["Detector-aware attacks (the detector's deployed threshold is known to the "
                "attacker):", ""] + gated + [""]
    elif adaptive.get("systems") and not any(lam > 0 for lam in adaptive.get("detector_lambdas", ())):
      lines += ["Detector-aware white-box attacks did not run "
                "(`config.attack.adaptive.detector_lambdas` has no weight > 0).", ""]
    sanity = robustness.sanity_checks(results, eps)
    if adaptive.get("systems") and not adaptive.get("sanity", True):
      sanity.append("* the 2x-steps and eps-64 white-box checks did not run "
                    "(`config.attack.adaptive.sanity=False`)")
    if sanity:
      lines += ["### Sanity checks (Carlini et al. 2019)", ""] + sanity + [""]
    if any(len(v.get("loss_curve", [])) > 2 for v in results.get("attack", {}).values()):
      add_figure("attack_loss_curves.png", figures.loss_curves, results,
                 caption="The attacks' objective over PGD iterations (first batch)")
  t = results.get("targeted") or {}
  if t.get("attacks"):
    lines += ["## Targeted item promotion (Table 6; AIP, TAaMR)", "",
              f"{t['targets']} promoted items of the least popular category "
              f"(`{t.get('source_category') or 'all items'}`), cold ones first; "
              f"{t.get('protocol', '')}. Hook (EXPA, c-SEMA): the most popular item"
              + (f"; TAaMR's target class: ImageNet {t['target_class']} (the majority class of "
                 f"the most popular category, `{t.get('popular_category')}`)"
                 if t.get("target_class") is not None else "; no TAaMR (the backbone has no "
                 "classifier head)") + ". Intervals: 95% bootstrap over targets (HR@N, shift) or "
              "users (CHR@K).", ""]
    six = targeted_tables.table6(results)
    if six:
      lines += ["Prediction shift (the paper's Table 6 layout; our AIP rows use PGD in the L-inf "
                "ball, the paper's Adam):", ""] + six + [""]
    for metric in [f"HR@{n}" for n in cfg.get("targeted", {}).get("hr_n", (5,))]:
      lines += [f"Target {metric} (AIP): the share of users whose top {metric[3:]} the promoted "
                "item enters; in brackets the change from its clean photo and its verdict:", ""]
      lines += targeted_tables.hit_table(results, metric) + [""]
    for metric in [f"CHR@{k}" for k in cfg.get("targeted", {}).get("chr_k", (20,))][-1:]:
      lines += [f"{metric} (Anelli et al.): source-category items in a user's top "
                f"{metric[4:]}:", ""] + targeted_tables.hit_table(results, metric) + [""]
    lines += ["The attacked photos (LPIPS is not reported: its network weights cannot be "
              "installed here):", ""] + targeted_tables.photo_table(results) + [""]
    if art and "targeted/clean" in art:
      add_figure("targeted_images.png", figures.targeted_images, art,
                 caption="Targeted attacks: the promoted items' photos")
  if results.get("detection"):
    lines += ["## Detection (Table 4)", "",
              "On items the defence never trained on; the threshold is set on clean "
              "calibration items of the training pool (the deployed threshold). The oracle "
              "row takes its threshold from the held-out clean scores themselves, which a "
              "deployment cannot do.", ""]
    lines += checks_tables.detection_table(results) + [""]
    add_figure("table4_detection_vs_eps.png", figures.detection_vs_eps, results,
               caption="Table 4: detection accuracy against eps (threshold at "
                       f"{cfg.get('detector', {}).get('fpr', 0.05):g} FPR on clean items)")
    if eps is not None:
      lines += [f"Confusion matrix at the threshold, eps = {eps:g} (Figure 10; item counts):", ""]
      lines += checks_tables.confusion_table(results, eps) + [""]
    noise = checks_tables.noise_table(results)
    if noise:
      lines += ["Benign noise (the paper: not flagged):", ""] + noise + [""]
    if art and in_art("detector"):
      add_figure("fig8_detector_distances.png", figures.distances, results, art, eps,
                 caption=f"Figure 8: detector distances of held-out items, clean vs attacked "
                         f"(eps = {eps:g}), with the threshold")
      add_figure("fig9_roc.png", figures.roc, results, art, eps,
                 caption=f"Figure 9: ROC of the detector (eps = {eps:g}) with the operating point")
    versus = checks_tables.baselines_table(results)
    if versus:
      described = "; ".join(
          f"{b.get('label', n)}: {b.get('description', '')} ("
          + ", ".join(f"{k}={v}" for k, v in b.get("settings", {}).items()
                      if not isinstance(v, (list, dict))) + ")"
          for n, b in results["detection_baselines"].items())
      lines += ["### Detection baselines (Table 4 layout)", "",
                "Detectors that need no training, scored on the same held-out clean and "
                "attacked photos, each with its threshold set the same way (on the same clean "
                "calibration photos, at the deployed false-positive rate). " + described + ".",
                ""] + versus + [""]
      lines += ["False alarms on the same clean and benign-noise photos:", ""]
      lines += checks_tables.baselines_noise_table(results) + [""]
  fidelity = checks_tables.fidelity_table(results)
  if fidelity or (art and in_art("images")):
    lines += ["## Images, fidelity and embeddings", ""]
  if fidelity:
    lines += ["Denoiser fidelity on the detection items (never trained on):", ""]
    lines += fidelity + [""]
  if art and in_art("images"):
    add_figure("fig7_images.png", figures.images, results, art, eps,
               caption=f"Figure 7: clean, adversarial (eps = {eps:g}), perturbation and denoised "
                       "images")
    if "embeddings/clean/denoised" in art and in_art("embeddings"):
      add_figure("fig11_embeddings_pca.png", figures.embeddings, results, art, eps,
                 caption="Figure 11: PCA of detector embeddings of clean, denoised and attacked "
                         f"(eps = {eps:g}) images")
  if results.get("ablations"):
    ab = cfg.get("ablation", {})
    lines += [f"## Ablations (Table 5: {', '.join(a.upper() for a in ab.get('attacks', []))} "
              f"at eps = {float(ab.get('eps', 8)):g})", ""]
    lines += claims.ablation_table(results) + [""]
    lines += claims.ablation_claims(results) + [""]
    for name, res in results["ablations"].items():
      adopted = res.get("adopted_stages") or []
      lines.append(f"* `{name}`: " + ", ".join(f"`{o}`" for o in res.get("overrides", []))
                   + (f" (stages {', '.join(adopted)} taken from the main run: the overrides "
                      "cannot change them)" if adopted else ""))
    lines.append("")
  missing = []
  if not art:
    missing.append("artifacts.npz is missing: no histogram, ROC, image or embedding figure")
  if not results.get("detection"):
    missing.append("no detection results (no detector trained or no attack evaluated)")
  if missing:
    lines += ["## Not shown", ""] + [f"* {m}" for m in missing] + [""]
  out = fs.join(workdir, REPORT_FILE)
  atomic.write_text(out, "\n".join(lines))
  return out
