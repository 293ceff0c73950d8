"""Tang et al.'s feature-space attack (the perturbation AMR trains against;
``jaxvars/evaluation/feature_attack.py``) over a sweep of eps, on every recommender with a
visual term of a finished run with ``config.recommenders`` (issue 35: "AMR: its robustness
to the feature-space perturbation it trains on"). A run evaluates the attack at AMR's own
``adv_eps`` only; this restores the run's recommenders and measures the sweep.

  python benchmarks/feature_attack_eps.py --workdir=/work/runs/hm_fam --preset=cpu,hm,vbpr \\
      --recommenders=vbpr,amr,bprmf --eps=0.4,2,8,32 \\
      --out=results/benchmarks/feature_attack_eps_hm.json

For each recommender and eps: HR@10 and NDCG@10 (sampled protocol, the run's negatives) with
95% bootstrap intervals over users, the paired drop from eps 0 (the clean ranking), and for
every recommender other than the run's defence recommender the paired difference from it at
the same eps. eps is the L2 norm of each item's perturbation in normalised-feature units
(the run's item features are standardised per dimension, ``backbone.feature_norm``); for
scale, AMR trains at 0.4, and an image FGSM at 8/255 moves H&M's EfficientNet-Lite0
features by a median L2 of 57 (configs/joint.py). Prints the table, writes JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished run (its checkpoints).")
_PRESET = flags.DEFINE_string("preset", "cpu,hm,vbpr", "The run's presets of configs/joint.py.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", "", "config.data.manual_dir, if not the preset's.")
_RECS = flags.DEFINE_list("recommenders", ["vbpr", "amr", "bprmf"], "The run's config.recommenders.")
_EPS = flags.DEFINE_list("eps", ["0.4", "2", "8", "32"], "L2 norms of the perturbation per item.")
_OUT = flags.DEFINE_string("out", "/tmp/feature_attack_eps.json", "JSON output.")


def main(argv):
  del argv
  import jax
  import numpy as np

  from configs import joint
  from jaxvars import families, provenance
  from jaxvars.evaluation import feature_attack, summary
  from jaxvars.experiment import build, make_consts
  from jaxvars.training import recommender as rec_training

  t0 = time.perf_counter()
  workdir = _WORKDIR.value
  config = joint.get_config(_PRESET.value)
  config.recommenders = tuple(_RECS.value)
  if _MANUAL_DIR.value:
    config.data.manual_dir = _MANUAL_DIR.value
  exp = build(config, workdir)
  consts = make_consts(exp)
  main_name = str(config.recommender.name)
  key = jax.random.fold_in(jax.random.key(int(config.seed)), families.FEATURE_ATTACK_SALT)
  kw = dict(resamples=int(config.eval.bootstrap_resamples), seed=int(config.eval.bootstrap_seed))
  ks = tuple(config.eval.ks)
  eps_list = [float(e) for e in _EPS.value]
  ranks = {}
  for name in families.names(config):
    ex = exp if name == main_name else families.experiment_for(exp, name, workdir)
    rec = ex.models.recommender
    if not rec.uses_features:
      continue
    sub = workdir if name == main_name else families.recommender_dir(workdir, name)
    state, _, _ = rec_training.restore(ex, sub)
    for eps in [0.0] + eps_list:
      ranks[(name, eps)] = feature_attack.ranks(rec, state.params, consts["features"], exp.data,
                                                eps=eps, key=key,
                                                batch_users=int(config.eval.batch_users))
  rows = []
  for (name, eps), r in ranks.items():
    s = summary.row_summary(r, ks, **kw)
    row = {"recommender": name, "eps": eps, "HR@10": s["HR@10"],
           "HR@10 ci95": s["ci95"]["HR@10"], "NDCG@10": s["NDCG@10"], "users": s["users"]}
    if eps > 0:
      d = summary.comparison(r, ranks[(name, 0.0)], ks, **kw)["HR@10"]
      row["HR@10 - clean"], row["HR@10 - clean ci95"] = d["diff"], d["ci95"]
    if name != main_name and (main_name, eps) in ranks:
      d = summary.comparison(r, ranks[(main_name, eps)], ks, **kw)["HR@10"]
      row[f"HR@10 - {main_name}"], row[f"HR@10 - {main_name} ci95"] = d["diff"], d["ci95"]
    rows.append(row)
  print(f"{'recommender':12}{'eps':>7}  {'HR@10 [95%]':28}{'minus clean':30}{'minus ' + main_name}")
  for row in rows:
    def ci(k):
      return (f"{row[k]:+.4f} [{row[k + ' ci95'][0]:+.4f}, {row[k + ' ci95'][1]:+.4f}]"
              if k in row else "")
    print(f"{row['recommender']:12}{row['eps']:7.1f}  {row['HR@10']:.4f} [{row['HR@10 ci95'][0]:.4f}, "
          f"{row['HR@10 ci95'][1]:.4f}]  {ci('HR@10 - clean'):30}{ci(f'HR@10 - {main_name}')}")
  out = {"workdir": workdir, "preset": _PRESET.value, "recommenders": list(_RECS.value),
         "threat_model": "white-box, feature space: every item feature moved by eps along "
                         "the gradient of the training BPR loss (Tang et al. 2020)",
         "rows": [{k: (v if not isinstance(v, list) else f"[{v[0]:+.4f}, {v[1]:+.4f}]")
                   for k, v in row.items()} for row in rows],
         "wall_s": time.perf_counter() - t0, "provenance": provenance.describe()}
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
