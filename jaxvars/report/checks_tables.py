"""The report's tables of the defence's checks: detection by eps (Table 4) with intervals,
the detector against the detection baselines (feature squeezing) in Table 4's layout, the
confusion matrix at the deployed threshold (Figure 10), false alarms on benign noise, and the
denoiser's image fidelity."""

from __future__ import annotations

from jaxvars.conditions import UNBOUNDED, condition_key
from jaxvars.report import paper
from jaxvars.report.tables import attacks, cell, fmt, md_table, sweep_eps


def detection_table(results: dict) -> list[str]:
  """Table 4 layout: detection accuracy and ROC AUC (95% intervals over items) by eps, the
  deployed threshold's TPR and FPR, the oracle TPR, and the paper's row."""
  det, eps = results.get("detection", {}), sweep_eps(results, paper_only=True)
  fpr = results.get("config", {}).get("detector", {}).get("fpr", 0.05)
  header = ["attack", "metric"] + ["unbounded" if e == UNBOUNDED else f"eps={e:g}" for e in eps]
  rows = []
  for attack in attacks(results, paper_only=True):
    for metric, name in (("accuracy", "accuracy (deployed threshold)"), ("roc_auc", "ROC AUC"),
                         ("tpr_at_threshold", "TPR (deployed threshold)"),
                         ("fpr_at_threshold", "FPR (deployed threshold)"),
                         (f"oracle_tpr@fpr={fpr:g}", f"TPR at FPR {fpr:g} (oracle threshold)")):
      cells = [det.get(condition_key(attack, e)) for e in eps]
      if all(c is None or metric not in c for c in cells):
        continue
      rows.append([attack.upper(), name] + [cell(c, metric) for c in cells])
  rows.append(["paper (Amazon Men, OURS)", "accuracy"]
              + [fmt(paper.TABLE4[int(e)]) if e == int(e) and int(e) in paper.TABLE4 else ""
                 for e in eps])
  return md_table(header, rows)


OURS_DETECTOR = "OURS (contrastive detector)"


def _detectors(results: dict) -> list[tuple[str, dict, dict]]:
  """(label, detection rows by condition, noise rows) of the paper's detector, then of each
  detection baseline of results.json's ``detection_baselines``."""
  out = [(OURS_DETECTOR, results.get("detection", {}), results.get("detection_noise", {}))]
  for name, b in (results.get("detection_baselines") or {}).items():
    out.append((b.get("label", name), b.get("detection", {}), b.get("noise", {})))
  return out


def baselines_table(results: dict) -> list[str]:
  """The paper's Table 4 layout with a row per detector: detection accuracy at the deployed
  threshold and ROC AUC (95% intervals over items) of the paper's detector and of each
  detection baseline (feature squeezing), by eps, on the same held-out photos; [] without
  baselines."""
  if not results.get("detection_baselines"):
    return []
  eps = sweep_eps(results, paper_only=True)
  header = ["detector", "attack", "metric"] + [f"eps={e:g}" for e in eps]
  rows = []
  for attack in attacks(results, paper_only=True):
    for metric, name in (("accuracy", "accuracy (deployed threshold)"), ("roc_auc", "ROC AUC")):
      for label, det, _ in _detectors(results):
        cells = [det.get(condition_key(attack, e)) for e in eps]
        if all(c is None for c in cells):
          continue
        rows.append([label, attack.upper(), name] + [cell(c, metric) for c in cells])
  return md_table(header, rows)


def baselines_noise_table(results: dict) -> list[str]:
  """False alarms at each detector's deployed threshold on the same clean and benign-noise
  photos (95% intervals over items): a column per detector; [] without baselines."""
  if not results.get("detection_baselines"):
    return []
  detectors = _detectors(results)
  inputs = list(dict.fromkeys(k for _, _, noise in detectors for k in noise))
  rows = [[name.replace("sigma=", "clean + N(0, ") + ("/255)" if name != "clean" else "")]
          + [cell(noise.get(name), "fpr") for _, _, noise in detectors] for name in inputs]
  header = ["input"] + [f"{label}: flagged" for label, _, _ in detectors]
  return md_table(header, rows) if rows else []


def confusion_table(results: dict, eps: float) -> list[str]:
  """Figure 10 as a table: the detector's confusion matrix at the calibrated threshold
  (held-out items, each clean and attacked)."""
  rows = []
  for attack in attacks(results, paper_only=True):
    d = results.get("detection", {}).get(condition_key(attack, eps))
    if not d:
      continue
    n = int(d["items"])
    tp, fp = round(d["tpr_at_threshold"] * n), round(d["fpr_at_threshold"] * n)
    rows.append([f"{attack.upper()}@{eps:g}", n - fp, fp, n - tp, tp])
  header = ["attack", "clean -> clean", "clean -> flagged", "attacked -> clean",
            "attacked -> flagged"]
  return md_table(header, rows)


def noise_table(results: dict) -> list[str]:
  """False alarms at the deployed threshold on clean photos with benign Gaussian noise (the
  paper claims they are not flagged), with 95% intervals over items."""
  noise = results.get("detection_noise", {})
  rows = [[name.replace("sigma=", "clean + N(0, ") + ("/255)" if name != "clean" else ""),
           cell(row, "fpr"), row["items"]] for name, row in noise.items()]
  return md_table(["input", "flagged (false-positive rate)", "items"], rows) if rows else []


def fidelity_table(results: dict) -> list[str]:
  """How close D(x) is to the clean photo (PSNR, SSIM; L2 of normalised backbone features),
  for clean and attacked inputs, with the attacked input's own PSNR for reference; where the
  run evaluated the gated system, also the share of photos it passes unchanged and the PSNR
  of its output (from the mean squared error over the items)."""
  fid = results.get("fidelity", {})
  gated = any("gated_psnr" in row for row in fid.values())
  rows = [[cond, cell(row, "psnr"), cell(row, "ssim"), cell(row, "psnr_input"),
           cell(row, "feature_l2")]
          + ([cell(row, "gated_unchanged"), cell(row, "gated_psnr")] if gated else [])
          + [row["items"]] for cond, row in fid.items()]
  header = (["input x", "PSNR(D(x), clean) dB", "SSIM(D(x), clean)", "PSNR(x, clean) dB",
             "feature L2(D(x), clean)"]
            + (["OURS-gated: share unchanged", "OURS-gated: PSNR(output, clean) dB"] if gated
               else []) + ["items"])
  return md_table(header, rows) if rows else []
