"""The report's targeted-promotion section: the paper's Table 6 layout (prediction shift with
and without the defence), AIP's target HR@N, Anelli et al.'s CHR@K / SR / FL, and the
attacked photos' distances and detection."""

from __future__ import annotations

from jaxvars.conditions import condition_key
from jaxvars.report import paper
from jaxvars.report.rows import is_paper_defence, records
from jaxvars.report.tables import fmt, label, md_table


def _cell(d: dict | None) -> str:
  if not d:
    return ""
  ci = d.get("ci95")
  return fmt(d["value"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def _systems(t: dict) -> list[str]:
  seen = {}
  for row in t.get("attacks", {}).values():
    for name in row.get("systems", {}):
      seen.setdefault(name, None)
  return list(seen)


def table6(results: dict) -> list[str]:
  """Prediction shift (mean over targets of the mean over users of the score change; 95%
  interval over targets) of the undefended recommender and of OURS / OURS-rand on the
  attacked photos, by eps, beside the paper's Table 6 (Amazon Men)."""
  t = results.get("targeted", {})
  eps = records(results).targeted_budgets()
  names = _systems(t)
  undefended = names[0] if names else None
  defended = [n for n in names if is_paper_defence(n)]
  rows = []
  for title, attack in paper.TABLE6_ATTACKS.items():
    for system, is_def in [(undefended, False)] + [(n, True) for n in defended]:
      cells = [_cell(t["attacks"].get(condition_key(attack, e), {}).get("systems", {}).get(
          system, {}).get("prediction_shift")) for e in eps]
      if not any(cells):
        continue
      ref = paper.TABLE6.get((title, is_def))
      rows.append([title + (" (defense)" if is_def else ""), label(results, system)] + cells
                  + ([fmt(v) for v in ref] if ref else [""] * len(paper.TABLE6_EPS)))
  header = (["attack", "system"] + [f"eps={e:g}" for e in eps]
            + [f"paper eps={e}" for e in paper.TABLE6_EPS])
  return md_table(header, rows) if rows else []


def hit_table(results: dict, metric: str) -> list[str]:
  """AIP-style: the targets' ``metric`` (HR@N over users, 95% interval over targets; or CHR@K
  over users) by attack and system, with the paired change from the clean photos."""
  t = results.get("targeted", {})
  names = _systems(t)
  rows, clean_row = [], None
  for key, row in t.get("attacks", {}).items():
    cells = []
    for n in names:
      m = row.get("systems", {}).get(n, {}).get(metric)
      if not m:
        cells.append("")
        continue
      d = m["diff"]
      cells.append(f"{_cell(m)} ({d['diff']:+.4f}, {d['effect']})")
      if clean_row is None:
        clean_row = {}
      clean_row.setdefault(n, fmt(m["clean"]))
    rows.append([key, row.get("threat", "")] + cells)
  if clean_row:
    rows.insert(0, ["clean (cooperative)", ""] + [clean_row.get(n, "") for n in names])
  header = ["attack", "threat model"] + [label(results, n) for n in names]
  return md_table(header, rows) if rows else []


def photo_table(results: dict) -> list[str]:
  """Per attack: SR (the classifier's target class, as uploaded and after D), FL, the share
  the deployed detector flags, and the attacked photos' distances from the clean ones."""
  t = results.get("targeted", {})
  rows = []
  for key, row in t.get("attacks", {}).items():
    img = row.get("images", {})
    sr = row.get("success_rate", {})
    rows.append([key, _cell(sr), _cell(sr.get("after_denoiser")), _cell(row.get("feature_loss")),
                 _cell(row.get("detected")), fmt(img.get("linf_255")), fmt(img.get("l2")),
                 fmt(img.get("psnr")), fmt(img.get("ssim"))])
  header = ["attack", "SR (uploaded)", "SR (after D)", "FL (feature MSE)", "flagged by the detector",
            "L-inf (1/255)", "L2", "PSNR dB", "SSIM"]
  return md_table(header, rows) if rows else []
