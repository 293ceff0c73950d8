"""The report's figures (matplotlib, headless Agg backend; every axis labelled with its
unit), driven by the attacks and systems found in results.json and artifacts.npz."""

from __future__ import annotations

import numpy as np

from jaxvars.conditions import condition_key
from jaxvars.evaluation.detection import roc_curve
from jaxvars.report import paper
from jaxvars.report.tables import attacks, label, sweep_eps, systems

EPS_AXIS = "attack budget eps (L-inf, 1/255 pixel units)"


def _plt():
  import matplotlib
  matplotlib.use("Agg")  # Headless: no display needed.
  import matplotlib.pyplot as plt
  return plt


def _save(fig, plt, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120, format="png")
  plt.close(fig)


def hr_vs_eps(results: dict, path: str) -> None:
  """Figure 6: HR@10 against eps, one panel per attack."""
  plt = _plt()
  eps, ranking = sweep_eps(results, paper_only=True), results["ranking"]
  names = attacks(results, paper_only=True)
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), sharey=True,
                           squeeze=False)
  for ax, attack in zip(axes[0], names):
    for name in systems(results):
      ys = [ranking.get(f"{name}/{condition_key(attack, e)}", {}).get("HR@10", np.nan)
            for e in eps]
      line, = ax.plot(eps, ys, marker="o", label=label(results, name))
      if f"{name}/clean" in ranking:
        ax.axhline(ranking[f"{name}/clean"]["HR@10"], color=line.get_color(), ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel(EPS_AXIS)
    ax.set_title(f"{attack.upper()} (dotted: clean images)")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("HR@10 (fraction of test users)")
  axes[0][0].legend()
  _save(fig, plt, path)


def detection_vs_eps(results: dict, path: str) -> None:
  """Table 4 as a figure: detection accuracy against eps, with the paper's points."""
  plt = _plt()
  eps, det = sweep_eps(results), results.get("detection", {})
  fig, ax = plt.subplots(figsize=(6, 4))
  for attack in attacks(results):
    ax.plot(eps, [det.get(condition_key(attack, e), {}).get("accuracy", np.nan) for e in eps],
            marker="o", label=f"{attack.upper()} (this run)")
  pe = sorted(paper.TABLE4)
  ax.plot(pe, [paper.TABLE4[e] for e in pe], marker="s", ls="--", color="gray",
          label="paper, Amazon Men")
  ax.set_xscale("log", base=2)
  ticks = sorted(set(eps) | set(pe))
  ax.set_xticks(ticks, [f"{e:g}" for e in ticks])
  ax.set_xlabel(EPS_AXIS)
  ax.set_ylabel("detection accuracy (balanced set, fraction)")
  ax.set_ylim(0.4, 1.01)
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, plt, path)


def distances(results: dict, art, eps: float, path: str) -> None:
  """Figure 8: histograms of detector distances, clean vs each attack, with the threshold."""
  plt = _plt()
  det = results["detection"]
  fig, ax = plt.subplots(figsize=(7, 4))
  series = [("clean", art["detector/clean"])] + [
      (f"{a.upper()}@{eps:g}", art[f"detector/{condition_key(a, eps)}"])
      for a in attacks(results) if f"detector/{condition_key(a, eps)}" in art]
  hi = max(float(np.max(s)) for _, s in series)
  bins = np.linspace(0.0, hi * 1.02 + 1e-9, 50)
  for name, s in series:
    ax.hist(s, bins=bins, alpha=0.5, label=f"{name} (n={len(s)})")
  thr = next(iter(det.values()))["threshold"]
  ax.axvline(thr, color="k", ls="--", label=f"threshold {thr:.3f}")
  ax.set_xlabel("detector distance ||z(x) - z(D(x))|| (L2 in embedding space, unitless)")
  ax.set_ylabel("held-out items (count)")
  ax.legend()
  _save(fig, plt, path)


def roc(results: dict, art, eps: float, path: str) -> None:
  """Figure 9: ROC curves with the calibrated operating point."""
  plt = _plt()
  det = results["detection"]
  fig, ax = plt.subplots(figsize=(5, 5))
  for attack in attacks(results):
    cond = condition_key(attack, eps)
    if f"detector/{cond}" not in art or cond not in det:
      continue
    fpr, tpr = roc_curve(art["detector/clean"], art[f"detector/{cond}"])
    line, = ax.plot(fpr, tpr, label=f"{attack.upper()}@{eps:g} (AUC {det[cond]['roc_auc']:.3f})")
    ax.plot(det[cond]["fpr_at_threshold"], det[cond]["tpr_at_threshold"], "o",
            color=line.get_color(), ms=8)
  ax.plot([0, 1], [0, 1], ls=":", color="gray")
  ax.set_xlabel("false-positive rate (clean flagged)")
  ax.set_ylabel("true-positive rate (attacked flagged)")
  ax.set_title("ROC; dots: operating point of the threshold")
  ax.legend(loc="lower right")
  _save(fig, plt, path)


def images(results: dict, art, eps: float, path: str, *, items: int = 4,
           amplify: float = 10.0) -> None:
  """Figure 7: clean, denoised clean, and per attack: adversarial, perturbation (x amplify,
  around mid-grey) and denoised."""
  plt = _plt()
  clean = art["images/clean"][:items]
  cols = [("clean", clean), ("D(clean)", art["images/clean/denoised"][:items])]
  for attack in attacks(results):
    key = f"images/{condition_key(attack, eps)}"
    if key not in art:
      continue
    adv = art[key][:items]
    pert = np.clip(128 + amplify * (adv.astype(np.float32) - clean), 0, 255).astype(np.uint8)
    cols += [(f"{attack.upper()}@{eps:g}", adv), (f"perturbation x{amplify:g}", pert),
             (f"D({attack.upper()})", art[key + "/denoised"][:items])]
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
  _save(fig, plt, path)


def pca_2d(x: np.ndarray) -> np.ndarray:
  """Projection [N, 2] of ``x`` [N, D] on its first two principal components."""
  x = np.asarray(x, np.float64) - np.mean(x, axis=0)
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  return x @ vt[:2].T


def embeddings(results: dict, art, eps: float, path: str) -> None:
  """Figure 11: PCA of detector embeddings of clean, denoised and attacked images."""
  plt = _plt()
  groups = [("clean", art["embeddings/clean"]), ("denoised", art["embeddings/clean/denoised"])]
  groups += [(f"{a.upper()}@{eps:g}", art[f"embeddings/{condition_key(a, eps)}"])
             for a in attacks(results) if f"embeddings/{condition_key(a, eps)}" in art]
  xy = pca_2d(np.concatenate([g for _, g in groups]))
  fig, ax = plt.subplots(figsize=(6, 5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  start = 0
  for k, (name, g) in enumerate(groups):
    ax.scatter(xy[start:start + len(g), 0], xy[start:start + len(g), 1], s=8, alpha=0.6,
               color=colors[k % len(colors)], label=f"{name} (n={len(g)})")
    start += len(g)
  ax.set_xlabel("principal component 1 (detector embedding, unitless)")
  ax.set_ylabel("principal component 2 (detector embedding, unitless)")
  ax.legend()
  _save(fig, plt, path)


def loss_curves(results: dict, path: str) -> None:
  """The attacks' objective over their iterations, on their first batch (Carlini et al.:
  loss curves saved and plotted): mean per-photo loss at each PGD iterate."""
  plt = _plt()
  curves = {k: v["loss_curve"] for k, v in results.get("attack", {}).items()
            if len(v.get("loss_curve", [])) > 2}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key, curve in curves.items():
    ax.plot(range(len(curve)), curve, marker=".", label=key)
  ax.set_xlabel("PGD iterate (0 = the random start)")
  ax.set_ylabel("attack objective, mean over the first batch (objective's units)")
  ax.set_yscale("symlog")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  _save(fig, plt, path)


def targeted_images(art, path: str, *, items: int = 4) -> None:
  """The targeted attacks' photos: the clean targets, then each attack's version."""
  plt = _plt()
  keys = [k for k in art if k.startswith("targeted/") and k not in ("targeted/items",)]
  cols = [("clean", art["targeted/clean"][:items])] + [
      (k.removeprefix("targeted/"), art[k][:items]) for k in keys if k != "targeted/clean"]
  n = len(cols[0][1])
  fig, axes = plt.subplots(n, len(cols), figsize=(1.6 * len(cols), 1.7 * n + 0.4), squeeze=False)
  for j, (title, imgs) in enumerate(cols):
    for i in range(n):
      axes[i, j].imshow(imgs[i], interpolation="nearest")
      axes[i, j].set_xticks([])
      axes[i, j].set_yticks([])
      if i == 0:
        axes[i, j].set_title(title, fontsize=7)
  fig.suptitle("promoted items: clean photo and each targeted attack's (pixels 0-255)", fontsize=8)
  _save(fig, plt, path)
