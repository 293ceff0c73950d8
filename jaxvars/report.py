"""The report of a run: ``report.md`` and PNG figures, side by side with the paper.

  python -m jaxvars.report --workdir=/tmp/jaxvars

(also ``python -m jaxvars.main ... --mode=report``, and written automatically at the end
of every training or evaluation run while ``config.eval.report`` is true).

Reads ``<workdir>/results.json`` and ``<workdir>/artifacts.npz`` (written by
``jaxvars.main``) and writes ``<workdir>/report.md`` and ``<workdir>/figures/*.png``:

* Tables 2/3 layout: HR@5/10/20 and NDCG@5/10/20 for clean / FGSM / PGD x VBPR /
  defended / defended + rand at one eps, with the paper's Amazon Men numbers (VBPR) in
  adjacent columns;
* the eps sweep: HR@10 against eps (Figure 6) and detection accuracy against eps
  (Table 4, with the paper's Amazon Men row);
* detector distances, clean vs adversarial, with the threshold (Figure 8); the ROC curve
  with the operating point (Figure 9); clean / adversarial / amplified perturbation /
  denoised images (Figure 7); a PCA map of detector embeddings of clean, denoised, FGSM
  and PGD images (Figure 11);
* the ablation table (Table 5), with the paper's numbers.

Every number in the tables is read from ``results.json`` and printed with 4 decimals;
figures are drawn with matplotlib's headless Agg backend.
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np

from jaxvars.errors import JaxvarsError

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
METRICS = ("HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20")
SYSTEM_LABELS = {"vbpr": "VBPR", "defended": "OURS", "defended_rand": "OURS-rand",
                 "mostpop": "MostPop"}

# The paper's Amazon Men numbers (Table 2, VBPR block): system -> attack -> metric.
PAPER_TABLE2 = {
    "clean": {"vbpr": (0.3122, 0.4261, 0.5564, 0.1123, 0.1290, 0.1486),
              "defended": (0.3118, 0.4260, 0.5563, 0.1121, 0.1290, 0.1484),
              "defended_rand": (0.3112, 0.4257, 0.5556, 0.1117, 0.1286, 0.1480)},
    "fgsm": {"vbpr": (0.0098, 0.0286, 0.2340, 0.0054, 0.0113, 0.0602),
             "defended": (0.2819, 0.4103, 0.5989, 0.1919, 0.2332, 0.2800),
             "defended_rand": (0.2799, 0.4090, 0.5993, 0.1881, 0.2295, 0.2775)},
    "pgd": {"vbpr": (0.0000, 0.0000, 0.0018, 0.0000, 0.0000, 0.0004),
            "defended": (0.0315, 0.0892, 0.4055, 0.0165, 0.0346, 0.1112),
            "defended_rand": (0.1480, 0.2719, 0.5598, 0.0863, 0.1257, 0.1973)},
}
# Table 4 (Amazon Men, OURS): detection accuracy by eps (1/255).
PAPER_TABLE4 = {8: 0.8826, 16: 0.9461, 32: 0.9660, 64: 0.9406}
# Table 5 (Amazon Men, PGD, with rand): detection accuracy, NDCG@10, HR@10.
PAPER_TABLE5 = {"unmodified architecture": (0.9462, 0.1257, 0.2719),
                "remove detection & contrastive loss": (math.nan, 0.0768, 0.1661),
                "remove perceptual loss": (0.8521, 0.1031, 0.2230)}
PAPER_ABLATION_NAMES = {"no_detector": "remove detection & contrastive loss",
                        "no_perceptual": "remove perceptual loss"}


def fmt(x) -> str:
  """A table cell: 4 decimals, 'NaN' for a missing or NaN value."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "NaN"
  return f"{x:.4f}"


def _md_table(header, rows) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return out


def _conditions(results: dict) -> list[float]:
  """The attacked eps values of ``results['ranking']``, sorted."""
  conds = (k.split("/", 1)[1] for k in results.get("ranking", {}) if "/" in k)
  return sorted({float(c.split("@", 1)[1]) for c in conds if "@" in c})


def report_eps(results: dict) -> float | None:
  """The eps of the main table: the ablation's eps (paper: 8) if swept, else the eps
  closest to 8; None for a clean-only run."""
  eps = _conditions(results)
  if not eps:
    return None
  want = float(results.get("config", {}).get("ablation", {}).get("eps", 8.0))
  return min(eps, key=lambda e: (abs(e - want), e))


def _systems(results: dict) -> list[str]:
  present = {k.split("/", 1)[0] for k in results.get("ranking", {})}
  return [s for s in ("vbpr", "defended", "defended_rand") if s in present]


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------

def main_table(results: dict, eps: float | None) -> list[str]:
  """Tables 2/3 layout at ``eps``: ours, then the paper's Amazon Men numbers."""
  ranking = results["ranking"]
  header = (["attack", "system"] + list(METRICS) + [f"paper {m}" for m in METRICS])
  rows = []
  attacks = [("clean", "clean")] + ([] if eps is None else
                                    [("fgsm", f"fgsm@{eps:g}"), ("pgd", f"pgd@{eps:g}")])
  for attack, cond in attacks:
    for sys_name in _systems(results):
      row = ranking.get(f"{sys_name}/{cond}")
      if row is None:
        continue
      paper = PAPER_TABLE2[attack][sys_name]
      rows.append([cond, SYSTEM_LABELS[sys_name]] + [fmt(row[m]) for m in METRICS]
                  + [fmt(p) for p in paper])
  if "mostpop/clean" in ranking:
    rows.append(["clean", "MostPop"] + [fmt(ranking["mostpop/clean"][m]) for m in METRICS]
                + ["" for _ in METRICS])
  return _md_table(header, rows)


def sweep_table(results: dict, metric: str = "HR@10") -> list[str]:
  """``metric`` of every system under every attack, by eps (the numbers of Figure 6)."""
  ranking, eps = results["ranking"], _conditions(results)
  header = ["system", "attack", "clean"] + [f"eps={e:g}" for e in eps]
  rows = []
  for sys_name in _systems(results):
    for kind in ("fgsm", "pgd"):
      cells = [ranking.get(f"{sys_name}/{kind}@{e:g}", {}).get(metric) for e in eps]
      if all(c is None for c in cells):
        continue
      rows.append([SYSTEM_LABELS[sys_name], kind.upper(),
                   fmt(ranking[f"{sys_name}/clean"][metric])] + [fmt(c) for c in cells])
  return _md_table(header, rows)


def detection_table(results: dict) -> list[str]:
  """Table 4 layout: detection accuracy (and ROC AUC) by eps, with the paper's row."""
  det, eps = results.get("detection", {}), _conditions(results)
  header = ["attack", "metric"] + [f"eps={e:g}" for e in eps]
  rows = []
  for kind in ("fgsm", "pgd"):
    for metric in ("accuracy", "roc_auc"):
      rows.append([kind.upper(), metric]
                  + [fmt(det.get(f"{kind}@{e:g}", {}).get(metric)) for e in eps])
  rows.append(["paper (Amazon Men, OURS)", "accuracy"] + [fmt(PAPER_TABLE4.get(int(e)))
                                                          if int(e) in PAPER_TABLE4 else ""
                                                          for e in eps])
  return _md_table(header, rows)


def confusion_table(results: dict, eps: float) -> list[str]:
  """Figure 10 as a table: the detector's confusion matrix at the calibrated threshold
  (held-out items, each clean and attacked)."""
  rows = []
  for kind in ("fgsm", "pgd"):
    d = results.get("detection", {}).get(f"{kind}@{eps:g}")
    if not d:
      continue
    n = int(d["items"])
    tp, fp = round(d["tpr_at_threshold"] * n), round(d["fpr_at_threshold"] * n)
    rows.append([f"{kind.upper()}@{eps:g}", n - fp, fp, n - tp, tp])
  header = ["attack", "clean -> clean", "clean -> flagged", "attacked -> clean",
            "attacked -> flagged"]
  return _md_table(header, rows)


def attack_table(results: dict) -> list[str]:
  header = ["condition", "mean L-inf (1/255)", "mean L2 ([0,1] pixels)", "crafting time (s)"]
  rows = [[cond, fmt(a["linf_255"]), fmt(a["l2"]), f"{a['time_s']:.0f}"]
          for cond, a in results.get("attack", {}).items()]
  return _md_table(header, rows)


def ablation_rows(results: dict) -> list[tuple[str, str, dict]]:
  """(label, paper label, row) for the unmodified system and every ablation: the row has
  'accuracy' (detection of the ablation's attack), and OURS / OURS-rand HR@10, NDCG@10."""
  abl = results.get("ablations") or {}
  if not abl:
    return []
  cfg = results.get("config", {}).get("ablation", {})
  eps = float(cfg.get("eps", 8.0))
  kind = tuple(cfg.get("attacks", ("pgd",)))[-1]
  cond = f"{kind}@{eps:g}"

  def row(ranking, detection):
    out = {"accuracy": detection.get(cond, {}).get("accuracy", math.nan)}
    for sys_name in ("defended", "defended_rand"):
      for m in ("HR@10", "NDCG@10"):
        out[f"{sys_name}/{m}"] = ranking.get(f"{sys_name}/{cond}", {}).get(m, math.nan)
    return out

  rows = [("unmodified", "unmodified architecture",
           row(results["ranking"], results.get("detection", {})))]
  for name, res in abl.items():
    rows.append((name, PAPER_ABLATION_NAMES.get(name, ""), row(res["ranking"],
                                                                res.get("detection", {}))))
  return rows


def ablation_table(results: dict) -> list[str]:
  """Table 5 layout: detection accuracy, NDCG@10, HR@10 under the ablation's attack."""
  rows = []
  for label, paper_label, r in ablation_rows(results):
    paper = PAPER_TABLE5.get(paper_label, (None, None, None))
    rows.append([label, fmt(r["accuracy"]), fmt(r["defended_rand/NDCG@10"]),
                 fmt(r["defended_rand/HR@10"]), fmt(r["defended/NDCG@10"]),
                 fmt(r["defended/HR@10"])]
                + ([fmt(p) for p in paper] if paper_label else ["", "", ""]))
  header = ["variant", "accuracy", "NDCG@10 (rand)", "HR@10 (rand)", "NDCG@10", "HR@10",
            "paper accuracy", "paper NDCG@10", "paper HR@10"]
  return _md_table(header, rows)


def claims(results: dict, eps: float | None) -> list[str]:
  """The paper's claims at ``eps``, checked on this run (the targets of the full recipe)."""
  if eps is None:
    return []
  r, det = results["ranking"], results.get("detection", {})
  out = []
  clean = r.get("vbpr/clean", {}).get("HR@10")

  def ratio(key, need, what):
    if key in r and clean:
      v = r[key]["HR@10"] / clean
      out.append(f"* {what}: {r[key]['HR@10']:.4f} = {100 * v:.1f}% of VBPR's clean HR@10 "
                 f"{clean:.4f} (target >= {100 * need:.0f}%): **{'met' if v >= need else 'missed'}**")

  ratio(f"defended/fgsm@{eps:g}", 0.90, f"defended HR@10 under FGSM@{eps:g}")
  ratio(f"defended_rand/pgd@{eps:g}", 0.64, f"defended + rand HR@10 under PGD@{eps:g}")
  big = [(c, d["accuracy"]) for c, d in det.items() if float(c.split("@")[1]) >= 16]
  if big:
    worst = min(big, key=lambda x: x[1])
    out.append(f"* detection accuracy for eps >= 16: minimum {worst[1]:.4f} ({worst[0]}) "
               f"(target >= 0.90): **{'met' if worst[1] >= 0.90 else 'missed'}**")
  rows = ablation_rows(results)
  if rows:
    base = rows[0][2]
    for label, _, row in rows[1:]:
      d_hr = round(row["defended_rand/HR@10"] - base["defended_rand/HR@10"], 6)
      d_acc = round(row["accuracy"] - base["accuracy"], 6)
      hurt = d_hr < 0 or (not math.isnan(d_acc) and d_acc < 0)
      out.append(f"* ablation {label}: HR@10 (rand) {d_hr:+.4f}, detection accuracy "
                 f"{'n/a' if math.isnan(d_acc) else f'{d_acc:+.4f}'} vs unmodified: "
                 f"**{'hurts' if hurt else 'does not hurt'}**")
  return out


# ---------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------

def _plt():
  import matplotlib
  matplotlib.use("Agg")  # Headless: no display needed.
  import matplotlib.pyplot as plt
  return plt


def figure_hr_vs_eps(results: dict, path: str) -> None:
  """Figure 6: HR@10 against eps, one panel per attack."""
  plt = _plt()
  eps, ranking = _conditions(results), results["ranking"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, kind in zip(axes, ("fgsm", "pgd")):
    for sys_name in _systems(results):
      ys = [ranking.get(f"{sys_name}/{kind}@{e:g}", {}).get("HR@10", np.nan) for e in eps]
      line, = ax.plot(eps, ys, marker="o", label=SYSTEM_LABELS[sys_name])
      ax.axhline(ranking[f"{sys_name}/clean"]["HR@10"], color=line.get_color(), ls=":",
                 lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel("attack budget eps (L-inf, 1/255 pixel units)")
    ax.set_title(f"{kind.upper()} (dotted: clean images)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("HR@10 (fraction of test users)")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def figure_detection_vs_eps(results: dict, path: str) -> None:
  """Table 4 as a figure: detection accuracy against eps, with the paper's points."""
  plt = _plt()
  eps, det = _conditions(results), results.get("detection", {})
  fig, ax = plt.subplots(figsize=(6, 4))
  for kind in ("fgsm", "pgd"):
    ax.plot(eps, [det.get(f"{kind}@{e:g}", {}).get("accuracy", np.nan) for e in eps],
            marker="o", label=f"{kind.upper()} (this run)")
  pe = sorted(PAPER_TABLE4)
  ax.plot(pe, [PAPER_TABLE4[e] for e in pe], marker="s", ls="--", color="gray",
          label="paper, Amazon Men")
  ax.set_xscale("log", base=2)
  ticks = sorted(set(eps) | set(pe))
  ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
  ax.set_xlabel("attack budget eps (L-inf, 1/255 pixel units)")
  ax.set_ylabel("detection accuracy (balanced set, fraction)")
  ax.set_ylim(0.4, 1.01)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def figure_distances(results: dict, art, eps: float, path: str) -> None:
  """Figure 8: histograms of detector distances, clean vs FGSM / PGD, with the threshold."""
  plt = _plt()
  det = results["detection"]
  fig, ax = plt.subplots(figsize=(7, 4))
  series = [("clean", art["detector/clean"])] + [
      (f"{k.upper()}@{eps:g}", art[f"detector/{k}@{eps:g}"]) for k in ("fgsm", "pgd")
      if f"detector/{k}@{eps:g}" in art]
  hi = max(float(np.max(s)) for _, s in series)
  bins = np.linspace(0.0, hi * 1.02 + 1e-9, 50)
  for label, s in series:
    ax.hist(s, bins=bins, alpha=0.5, label=f"{label} (n={len(s)})")
  thr = next(iter(det.values()))["threshold"]
  ax.axvline(thr, color="k", ls="--", label=f"threshold {thr:.3f}")
  ax.set_xlabel("detector distance ||z(x) - z(D(x))|| (L2 in embedding space, unitless)")
  ax.set_ylabel("held-out items (count)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def roc_curve(clean: np.ndarray, adversarial: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(FPR, TPR) [n + 2] of the score threshold sweep (adversarial = positive, score above)."""
  thresholds = np.unique(np.concatenate([clean, adversarial]))[::-1]
  fpr = np.concatenate([[0.0], [(clean >= t).mean() for t in thresholds], [1.0]])
  tpr = np.concatenate([[0.0], [(adversarial >= t).mean() for t in thresholds], [1.0]])
  return fpr, tpr


def figure_roc(results: dict, art, eps: float, path: str) -> None:
  """Figure 9: ROC curves with the calibrated operating point."""
  plt = _plt()
  det = results["detection"]
  fig, ax = plt.subplots(figsize=(5, 5))
  for kind in ("fgsm", "pgd"):
    cond = f"{kind}@{eps:g}"
    if f"detector/{cond}" not in art:
      continue
    fpr, tpr = roc_curve(art["detector/clean"], art[f"detector/{cond}"])
    line, = ax.plot(fpr, tpr, label=f"{kind.upper()}@{eps:g} (AUC {det[cond]['roc_auc']:.3f})")
    ax.plot(det[cond]["fpr_at_threshold"], det[cond]["tpr_at_threshold"], "o",
            color=line.get_color(), ms=8)
  ax.plot([0, 1], [0, 1], ls=":", color="gray")
  ax.set_xlabel("false-positive rate (clean flagged)")
  ax.set_ylabel("true-positive rate (attacked flagged)")
  ax.set_title("ROC; dots: operating point of the threshold")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def figure_images(art, eps: float, path: str, *, items: int = 4, amplify: float = 10.0) -> None:
  """Figure 7: clean, denoised clean, and per attack: adversarial, perturbation (x amplify,
  around mid-grey) and denoised."""
  plt = _plt()
  clean = art["images/clean"][:items]
  cols = [("clean", clean), ("D(clean)", art["images/clean/denoised"][:items])]
  for kind in ("fgsm", "pgd"):
    key = f"images/{kind}@{eps:g}"
    if key not in art:
      continue
    adv = art[key][:items]
    pert = np.clip(128 + amplify * (adv.astype(np.float32) - clean), 0, 255).astype(np.uint8)
    cols += [(f"{kind.upper()}@{eps:g}", adv), (f"perturbation x{amplify:g}", pert),
             (f"D({kind.upper()})", art[key + "/denoised"][:items])]
  n = len(clean)
  fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.7 * n + 0.4),
                           squeeze=False)
  for j, (title, imgs) in enumerate(cols):
    for i in range(n):
      ax = axes[i, j]
      ax.imshow(imgs[i], interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(title, fontsize=8)
  fig.suptitle(f"held-out items; pixels 0-255; perturbations amplified x{amplify:g} around 128",
               fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def pca_2d(x: np.ndarray) -> np.ndarray:
  """Projection [N, 2] of ``x`` [N, D] on its first two principal components."""
  x = np.asarray(x, np.float64) - np.mean(x, axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  return x @ vt[:2].T


def figure_embeddings(art, eps: float, path: str) -> None:
  """Figure 11: PCA of detector embeddings of clean, denoised, FGSM and PGD images."""
  plt = _plt()
  groups = [("clean", art["embeddings/clean"]), ("denoised", art["embeddings/clean/denoised"])]
  groups += [(f"{k.upper()}@{eps:g}", art[f"embeddings/{k}@{eps:g}"]) for k in ("fgsm", "pgd")
             if f"embeddings/{k}@{eps:g}" in art]
  xy = pca_2d(np.concatenate([g for _, g in groups]))
  fig, ax = plt.subplots(figsize=(6, 5))
  start = 0
  for (label, g), color in zip(groups, ("green", "red", "blue", "purple")):
    ax.scatter(xy[start:start + len(g), 0], xy[start:start + len(g), 1], s=8, alpha=0.6,
               color=color, label=f"{label} (n={len(g)})")
    start += len(g)
  ax.set_xlabel("principal component 1 (detector embedding, unitless)")
  ax.set_ylabel("principal component 2 (detector embedding, unitless)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------
# The report.
# ---------------------------------------------------------------------------

def write_report(workdir: str) -> str:
  """Writes ``<workdir>/report.md`` and ``<workdir>/figures/*.png``; returns the report path.

  Figures whose inputs are absent (a clean-only run, no detector, no artifacts.npz) are
  left out and the report says so. Files are written to temporary names and renamed.

  Raises:
    JaxvarsError: ``<workdir>/results.json`` is missing or not valid JSON.
  """
  import json

  path = os.path.join(workdir, "results.json")
  try:
    with open(path) as f:
      results = json.load(f)
  except FileNotFoundError:
    raise JaxvarsError(f"{path} does not exist; run python -m jaxvars.main --workdir={workdir} "
                       "first") from None
  except json.JSONDecodeError as e:
    raise JaxvarsError(f"{path} is not valid JSON ({e})") from None
  if "ranking" not in results:
    raise JaxvarsError(f"{path} has no 'ranking' section; it is not a results file of "
                       "configs/joint.py")
  art_path = os.path.join(workdir, "artifacts.npz")
  art = dict(np.load(art_path)) if os.path.exists(art_path) else {}
  fig_dir = os.path.join(workdir, FIGURES_DIR)
  os.makedirs(fig_dir, exist_ok=True)
  eps = report_eps(results)
  sweep = _conditions(results)
  data = results.get("data", {})
  cfg = results.get("config", {})

  lines = ["# jaxvars report", ""]
  lines.append(f"Workdir `{os.path.abspath(workdir)}`; presets `{cfg.get('presets', '?')}`; "
               f"data `{data.get('name', '?')}`: {data.get('users', '?')} users, "
               f"{data.get('items', '?')} items, {data.get('image_size', '?')} px images, "
               f"{data.get('eval_negatives_per_user', '?')} sampled negatives per test user "
               "(leave-one-out).")
  total = results.get("timing", {}).get("total_s")
  if total:
    lines.append(f"Wall time of the run: {total / 60:.1f} min.")
  lines += ["", "Systems: VBPR (undefended), OURS (denoiser D in front of the frozen ResNet), "
            "OURS-rand (random resize + pad, then D). Attacks (FGSM, PGD) perturb every item "
            "photo of the catalogue against VBPR (paper eq. 3); eps in 1/255 pixel units. "
            "Paper columns: Amazon Men, VBPR block of Table 2 (a different dataset: compare "
            "shapes, not values).", ""]

  figures = []

  def add_figure(name, fn, *args, caption):
    p = os.path.join(fig_dir, name)
    tmp = p + ".tmp.png"
    fn(*args, tmp)
    os.replace(tmp, p)
    figures.append(name)
    lines.extend([f"![{caption}]({FIGURES_DIR}/{name})", "", f"*{caption}*", ""])

  lines += [f"## Ranking (Tables 2/3 layout{f', eps = {eps:g}' if eps is not None else ''})", ""]
  lines += main_table(results, eps) + [""]
  checked = claims(results, eps)
  if checked:
    lines += ["### The paper's claims on this run", ""] + checked + [""]
  if sweep:
    lines += ["## The eps sweep (Figure 6)", "", "HR@10 by attack budget:", ""]
    lines += sweep_table(results) + [""]
    add_figure("fig6_hr10_vs_eps.png", figure_hr_vs_eps, results,
               caption="Figure 6: HR@10 against eps; dotted lines: the same system on clean images")
    lines += ["### Attack size", ""] + attack_table(results) + [""]
  if results.get("detection"):
    lines += ["## Detection (Table 4)", ""] + detection_table(results) + [""]
    add_figure("table4_detection_vs_eps.png", figure_detection_vs_eps, results,
               caption="Table 4: detection accuracy against eps (threshold at "
                       f"{cfg.get('detector', {}).get('fpr', 0.05):g} FPR on clean items)")
    if eps is not None:
      lines += [f"Confusion matrix at the threshold, eps = {eps:g} (Figure 10; item counts):", ""]
      lines += confusion_table(results, eps) + [""]
    if art and eps is not None and f"detector/pgd@{eps:g}" in art:
      add_figure("fig8_detector_distances.png", figure_distances, results, art, eps,
                 caption=f"Figure 8: detector distances of held-out items, clean vs attacked "
                         f"(eps = {eps:g}), with the threshold")
      add_figure("fig9_roc.png", figure_roc, results, art, eps,
                 caption=f"Figure 9: ROC of the detector (eps = {eps:g}) with the operating point")
  if art and eps is not None and f"images/pgd@{eps:g}" in art:
    lines += ["## Images and embeddings", ""]
    add_figure("fig7_images.png", figure_images, art, eps,
               caption=f"Figure 7: clean, adversarial (eps = {eps:g}), perturbation and denoised "
                       "images")
    if "embeddings/clean/denoised" in art and f"embeddings/pgd@{eps:g}" in art:
      add_figure("fig11_embeddings_pca.png", figure_embeddings, art, eps,
                 caption="Figure 11: PCA of detector embeddings of clean, denoised, FGSM and "
                         f"PGD (eps = {eps:g}) images")
  if results.get("ablations"):
    ab = cfg.get("ablation", {})
    lines += [f"## Ablations (Table 5: {', '.join(a.upper() for a in ab.get('attacks', []))} "
              f"at eps = {float(ab.get('eps', 8)):g})", ""]
    lines += ablation_table(results) + [""]
    for name, res in results["ablations"].items():
      lines.append(f"* `{name}`: " + ", ".join(f"`{o}`" for o in res.get("overrides", [])))
    lines.append("")
  missing = []
  if not art:
    missing.append("artifacts.npz is missing: no histogram, ROC, image or embedding figure")
  if not results.get("detection"):
    missing.append("no detection results (no detector trained or no attack evaluated)")
  if missing:
    lines += ["## Not shown", ""] + [f"* {m}" for m in missing] + [""]
  out = os.path.join(workdir, REPORT_FILE)
  tmp = out + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(lines))
  os.replace(tmp, out)
  return out


def main(argv=None) -> None:
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "A workdir of python -m jaxvars.main (holds results.json).")
  flags.mark_flag_as_required("workdir")

  def run(args):
    if len(args) > 1:
      raise app.UsageError(f"unexpected arguments: {args[1:]}")
    try:
      path = write_report(flags.FLAGS.workdir)
    except JaxvarsError as e:
      print(f"jaxvars: error: {e}", file=sys.stderr)
      sys.exit(2)
    print(f"report written to {path}")

  app.run(run, argv=argv)


if __name__ == "__main__":
  main()
