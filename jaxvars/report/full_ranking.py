"""The full-ranking protocol beside the sampled one (Krichene & Rendle, KDD 2020): each test
user's held-out item ranked among all the items the user did not buy in training
(``results['ranking_full']``, paired differences in ``results['comparisons_full']``), and
the pairs of systems that the two protocols order differently."""

from __future__ import annotations

from jaxvars.report.rows import records
from jaxvars.report.tables import cell, fmt, label, md_table

METRICS = ("HR@10", "NDCG@10", "MRR")
# The metric whose order the two protocols are compared on.
ORDER_METRIC = "HR@10"


def caption(results: dict) -> str:
  """What 'full' means, for the table's caption."""
  negatives = results.get("data", {}).get("eval_negatives_per_user", "the sampled")
  return ("Full ranking: each test user's held-out item ranked among *all* the items the user "
          f"did not buy in training, instead of among {negatives} sampled negatives (Krichene "
          "& Rendle, KDD 2020: sampled metrics can order systems differently from the full "
          "ones). Recall@K equals HR@K with one held-out item; MRR: the mean reciprocal "
          "rank of the held-out item. Rows of the item-subset attacks are on the attacked "
          "users, as in the sampled table. Each number: the value and its 95% interval "
          "(bootstrap over users).")


def full_table(results: dict) -> list[str]:
  """Every row of ``results['ranking_full']``: the sampled HR@10 beside the full-ranking
  HR@10, NDCG@10 and MRR (95% intervals); [] without a ``ranking_full`` section."""
  full, sampled, rec = results.get("ranking_full") or {}, results.get("ranking", {}), records(
      results)
  rows = []
  for key, row in full.items():
    r = rec.row(key)
    rows.append([r.condition, label(results, r.system), row.get("users", ""),
                 cell(sampled.get(key), ORDER_METRIC)] + [cell(row, m) for m in METRICS])
  header = (["condition", "system", "users", f"{ORDER_METRIC} (sampled)"]
            + [f"{m} (full)" for m in METRICS])
  return md_table(header, rows) if rows else []


def _paired(comps: dict, a: str, b: str) -> str:
  """The paired HR@10 difference of rows ``a`` and ``b`` (either order) over the rows' users,
  and whether its interval excludes 0; or that there is none."""
  for key in (f"{a} - {b}", f"{b} - {a}"):
    d = (comps.get(key) or {}).get("all", {}).get(ORDER_METRIC)
    if d:
      excludes = "excludes 0" if d["effect"] != "none" else "includes 0"
      return (f"`{key}` {d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] "
              f"({excludes})")
  return "no paired comparison of the two in results.json"


def disagreements(results: dict) -> list[str]:
  """One line per pair of rows under the same condition that sampled and full HR@10 order
  oppositely (one says A > B, the other A < B) and that results.json compares pairwise (a
  system against the undefended one), with each protocol's paired interval; one line
  naming the other reversals (two defended systems); or one line saying the protocols
  agree on every pair.
  [] without a ``ranking_full`` section."""
  full, sampled, rec = results.get("ranking_full") or {}, results.get("ranking", {}), records(
      results)
  if not full:
    return []
  by_cond: dict[str, list[str]] = {}
  for key in full:
    if key in sampled:
      by_cond.setdefault(rec.row(key).condition, []).append(key)
  def name(key):
    return label(results, rec.row(key).system)

  out, pairs, unpaired = [], 0, []
  comps, comps_full = results.get("comparisons", {}), results.get("comparisons_full", {})
  compared = lambda a, b: any(f"{x} - {y}" in comps for x, y in ((a, b), (b, a)))
  for cond, keys in by_cond.items():
    for i, a in enumerate(keys):
      for b in keys[i + 1:]:
        pairs += 1
        ds = sampled[a][ORDER_METRIC] - sampled[b][ORDER_METRIC]
        df = full[a][ORDER_METRIC] - full[b][ORDER_METRIC]
        if ds * df >= 0:
          continue
        hi, lo = (a, b) if ds > 0 else (b, a)
        if not compared(a, b):  # Two defended systems: no paired comparison to cite.
          unpaired.append(f"{name(hi)} / {name(lo)} ({cond})")
          continue
        out.append(
            f"* {cond}: sampled {ORDER_METRIC} ranks {name(hi)} above {name(lo)} "
            f"({fmt(sampled[hi][ORDER_METRIC])} vs {fmt(sampled[lo][ORDER_METRIC])}), the full "
            f"ranking the reverse ({fmt(full[hi][ORDER_METRIC])} vs "
            f"{fmt(full[lo][ORDER_METRIC])}); paired, sampled: {_paired(comps, a, b)}; "
            f"full: {_paired(comps_full, a, b)}")
  if unpaired:
    out.append(f"* {len(unpaired)} more reversal(s) between systems that results.json does "
               f"not compare pairwise (sampled order first): {'; '.join(unpaired)}.")
  if not out:
    out.append(f"* The two protocols order every pair of systems under the same condition the "
               f"same way by {ORDER_METRIC} ({pairs} pairs; a tie in either is not a reversal).")
  return out
