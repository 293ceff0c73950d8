"""Attacks beyond the paper's transfer setting: the stronger objectives against numpy, the
white-box loss through a defence (EOT, BPDA, detector-aware), restarts, the item subset,
splicing and the worst case per system."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config, tiny_models
from jaxvars.attacks.objectives.bpr_all import all_user_bpr_loss
from jaxvars.attacks.objectives.demote import mean_score
from jaxvars.attacks.spec import AttackSpec
from jaxvars.attacks.whitebox import attack_loss
from jaxvars.evaluation import adaptive
from jaxvars.conditions import parse_condition
from jaxvars.evaluation import tables as eval_tables
from jaxvars.report import robustness


def _tables(ranks, config, unseen, **kw):
  return eval_tables.ranking_tables(ranks, config, unseen, **kw)


def _robust(ranks, names, config, unseen, attacked=None):
  rows = {k: tuple(k.split("/", 1)) for k in ranks}
  eps_of = {c: parse_condition(c)[1] for _, c in rows.values()}
  return eval_tables.worst_case(ranks, rows, eps_of, names, config, unseen, attacked=attacked)


def _comparisons(ranks, names, conditions, config, unseen, *, partial, attacked, longer=None):
  pairs, steps = eval_tables.comparison_pairs(ranks, names, conditions, longer or {})
  return eval_tables.comparisons(ranks, pairs, config, unseen, partial=partial,
                                 attacked=attacked, longer=steps)


def test_demote_and_all_user_bpr_match_numpy():
  rng = np.random.default_rng(0)
  p, q, e = rng.normal(size=(5, 3)), rng.normal(size=(7, 3)), rng.normal(size=(4, 3))
  score = lambda u, i, f: jnp.sum(jnp.asarray(p)[u] * (jnp.asarray(q)[i] + f @ jnp.asarray(e)),
                                  axis=-1)
  f = rng.normal(size=(2, 4))
  items = jnp.array([1, 6])
  want = [np.mean([p[u] @ (q[i] + f[k] @ e) for u in range(5)]) for k, i in enumerate([1, 6])]
  np.testing.assert_allclose(mean_score(jnp.asarray(f), items=items, score_fn=score, num_users=5),
                             want, rtol=1e-5)
  bought = (rng.random((2, 5)) < 0.4).astype(np.float32)
  table = rng.normal(size=(7, 4))
  upos, uneg = rng.integers(0, 7, 5), rng.integers(0, 7, 5)
  sp = lambda z: np.log1p(np.exp(z))
  x = lambda u, i, feat: p[u] @ (q[i] + feat @ e)
  want = [sum(bought[k, u] * sp(x(u, uneg[u], table[uneg[u]]) - x(u, i, f[k]))
              + (1 - bought[k, u]) * sp(x(u, i, f[k]) - x(u, upos[u], table[upos[u]]))
              for u in range(5)) for k, i in enumerate([1, 6])]
  got = all_user_bpr_loss(jnp.asarray(f), items=items, bought=jnp.asarray(bought), score_fn=score,
                          user_pos=jnp.asarray(upos), user_neg=jnp.asarray(uneg),
                          table=jnp.asarray(table))
  np.testing.assert_allclose(got, want, rtol=1e-4)


def _setup(tfds_dir):
  models, params, consts, images, users, items = tiny_models()
  config = tiny_config(tfds_dir)
  x = jnp.asarray(images[:4], jnp.float32) / 255.0
  return models, params, consts, config, x


@pytest.mark.parametrize("through", ["defended", "defended_rand"])
def test_white_box_loss_differentiates_through_the_defence(through, tfds_dir):
  models, params, consts, config, x = _setup(tfds_dir)
  items = jnp.arange(4)
  spec = AttackSpec(method="pgd", objective="feature", through=through, eot=2)
  loss, stochastic = attack_loss(spec, models=models, params=params, consts=consts,
                                 config=config, items=items)
  assert stochastic == (through == "defended_rand")
  # Jitted: one program each instead of hundreds of op-by-op compilations.
  call = jax.jit((lambda z: loss(z, jax.random.key(0))) if stochastic else loss)
  # Moved photos: the distance of their (defended) features to the clean ones, per photo.
  moved = x + 4 / 255 * jnp.sign(jax.random.normal(jax.random.key(1), x.shape))
  assert call(moved).shape == (4,) and np.all(np.asarray(call(moved)) > 1e-6)
  g = jax.jit(jax.grad(lambda z: jnp.sum(call(z))))(moved)
  assert float(jnp.max(jnp.abs(g))) > 0  # Gradients reach the photo through D (and rand).
  # Changing D changes the loss: the attacker sees the defence.
  other = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(7), a.shape),
                       params["denoiser"])  # D starts as the identity: perturb every weight.
  loss2, _ = attack_loss(spec, models=models, params=dict(params, denoiser=other), consts=consts,
                         config=config, items=items)
  call2 = jax.jit((lambda z: loss2(z, jax.random.key(0))) if stochastic else loss2)
  assert not np.allclose(call(moved), call2(moved))


def test_detector_aware_loss_subtracts_the_excess_score(tfds_dir):
  models, params, consts, config, x = _setup(tfds_dir)
  items = jnp.arange(4)
  base = AttackSpec(method="pgd", objective="feature", through="defended")
  scores = np.asarray(models.detection_scores(params, consts, x))
  threshold = float(np.median(scores))
  plain, _ = attack_loss(base, models=models, params=params, consts=consts, config=config,
                         items=items, threshold=threshold)
  aware, _ = attack_loss(dataclasses.replace(base, detector_lambda=10.0), models=models,
                         params=params, consts=consts, config=config, items=items,
                         threshold=threshold)
  want = np.asarray(plain(x)) - 10.0 * np.maximum(scores - threshold, 0)
  np.testing.assert_allclose(aware(x), want, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="needs the deployed threshold"):
    attack_loss(dataclasses.replace(base, detector_lambda=1.0), models=models, params=params,
                consts=consts, config=config, items=items)


def test_restarts_keep_each_photos_best():
  x = jnp.full((3, 2, 2, 3), 0.5)
  w = jax.random.normal(jax.random.key(0), x.shape)
  losses = lambda z: jnp.sum(jnp.sin(20 * (z - 0.5)) * w, axis=(1, 2, 3))
  one = AttackSpec(method="pgd", eps=8, steps=2, alpha_ratio=0.25, restarts=1)
  four = dataclasses.replace(one, restarts=4)
  a = one.run_loss(losses, x, jax.random.key(3))
  b = four.run_loss(losses, x, jax.random.key(3))
  assert np.all(np.asarray(losses(b)) >= np.asarray(losses(a)) - 1e-6)
  assert four.name == "pgd-r4"


def test_attack_items_put_held_out_items_first():
  data = type("D", (), {"num_items": 50, "test_items": np.array([3, 3, 7, 9, 12])})()
  got = adaptive.attack_items(data, 8, seed=0)
  assert len(got) == 8 and {3, 7, 9, 12} <= set(got) and np.all(np.diff(got) > 0)
  assert adaptive.attack_items(data, 0, seed=0) is None
  assert set(adaptive.attack_items(data, 2, seed=0)) <= {3, 7, 9, 12}


def test_splice_replaces_only_the_attacked_rows():
  clean = np.arange(24, dtype=np.float32).reshape(2, 6, 2)  # [K, I, F]
  out = adaptive.splice(clean, np.array([1, 4]), -np.ones((2, 2, 2), np.float32))
  assert np.all(out[:, [1, 4]] == -1) and np.array_equal(out[:, [0, 2, 3, 5]], clean[:, [0, 2, 3, 5]])


def test_worst_case_counts_a_hit_only_under_every_attack():
  config = ml_collections.ConfigDict({"eval": {"ks": (10,), "bootstrap_resamples": 50,
                                               "bootstrap_seed": 0}, "ablation": {"eps": 8.0}})
  ranks = {"d/clean": np.array([0, 0, 0, 20]), "d/pgd@8": np.array([0, 15, 0, 20]),
           "d/fgsm@8": np.array([12, 0, 0, 0]), "d/pgd@4": np.array([30, 30, 30, 30])}
  robust = _robust(ranks, ["d"], config, np.array([True, False, True, False]))
  assert robust["d"]["HR@10"] == 0.25  # Only user 2 is in the top 10 under both attacks at 8.
  assert set(robust["d"]["attacks"]) == {"pgd@8", "fgsm@8"}
  assert robust["d"]["unseen"]["HR@10"] == 0.5


def test_item_subset_rows_are_scored_on_the_users_whose_item_was_attacked():
  # Six users; the subset attack perturbed the held-out items of users 0, 1, 2 only.
  data = type("D", (), {"num_items": 40, "test_items": np.array([5, 6, 7, 8, 9, 10])})()
  subset = adaptive.attack_items(data, 3, seed=0)
  attacked = adaptive.attacked_users(data.test_items, subset)
  assert attacked.sum() == 3 and set(data.test_items[attacked]) == set(subset)
  assert adaptive.attacked_users(data.test_items, np.arange(40)) is None
  assert adaptive.attacked_users(data.test_items, None) is None
  attacked = np.array([True, True, True, False, False, False])
  unseen = np.array([True, False, True, True, False, False])
  config = ml_collections.ConfigDict({"eval": {"ks": (10,), "bootstrap_resamples": 50,
                                               "bootstrap_seed": 0}, "ablation": {"eps": 8.0}})
  ranks = {"d/clean": np.array([0, 0, 0, 0, 0, 20]), "d/pgd@8": np.array([0, 15, 0, 0, 0, 20]),
           "d/pgd-wb@8": np.array([30, 0, 0, 0, 0, 0])}  # Users 3-5: not attacked white-box.
  partial = {"d/pgd-wb@8"}
  tables = _tables(ranks, config, unseen, partial=partial, attacked=attacked)
  assert tables["ranking"]["d/pgd@8"]["HR@10"] == 4 / 6  # A transfer row: every user.
  assert tables["ranking"]["d/pgd-wb@8"]["HR@10"] == 2 / 3  # Not 5 / 6 over all six.
  assert tables["ranking"]["d/pgd-wb@8"]["users"] == 3
  assert tables["ranking_unseen"]["d/pgd-wb@8"]["users"] == 2  # Users 0 and 2.
  assert tables["ranking_seen"]["d/pgd-wb@8"]["HR@10"] == 1.0  # User 1 only.
  assert tables["ranking_attacked"]["d/pgd@8"]["HR@10"] == 2 / 3
  assert tables["ranking_attacked"]["d/clean"]["users"] == 3
  robust = _robust(ranks, ["d"], config, unseen, attacked=attacked)
  assert robust["d"]["HR@10"] == 1 / 3 and robust["d"]["users"] == 3  # Only user 2 survives.
  assert robust["d"]["unseen"]["HR@10"] == 0.5  # Users 0 and 2.
  comps = _comparisons(ranks, ["d"], ["clean", "pgd@8", "pgd-wb@8"], config, unseen,
                       partial=partial, attacked=attacked)
  assert comps["d/pgd-wb@8 - d/clean"]["all"]["HR@10"]["diff"] == pytest.approx(-1 / 3)
  assert comps["d/pgd@8 - d/clean"]["all"]["HR@10"]["diff"] == pytest.approx(-1 / 6)


def test_more_steps_check_compares_every_users_rank_and_reads_mixed_results():
  """Carlini's more-steps check: the '-2xsteps' pair (only it) also carries the held-out
  item's paired mean rank, on the attacked users; the report flags the defence as helped
  only when HR@10 rises without the mean rank falling further."""
  config = ml_collections.ConfigDict({"eval": {"ks": (10,), "bootstrap_resamples": 200,
                                               "bootstrap_seed": 0}, "ablation": {"eps": 8.0}})
  unseen = np.array([True, False, True, False, True])
  attacked = np.array([True, True, True, True, False])
  # Twice the steps lifts user 0 into the top 10 and pushes users 1-3 far down.
  ranks = {"d/clean": np.array([0, 0, 0, 0, 0]), "d/pgd-wb@8": np.array([12, 20, 30, 40, 0]),
           "d/pgd-wb-2xsteps@8": np.array([3, 60, 70, 80, 0])}
  comps = _comparisons(ranks, ["d"], ["clean", "pgd-wb@8", "pgd-wb-2xsteps@8"], config, unseen,
                       partial={"d/pgd-wb@8", "d/pgd-wb-2xsteps@8"}, attacked=attacked,
                       longer={"pgd-wb-2xsteps@8": "pgd-wb@8"})
  steps = comps["d/pgd-wb-2xsteps@8 - d/pgd-wb@8"]
  assert steps["all"]["mean_rank"]["diff"] == pytest.approx((-9 + 40 + 40 + 40) / 4)
  assert steps["unseen"]["mean_rank"]["diff"] == pytest.approx((-9 + 40) / 2)  # Users 0, 2.
  assert steps["all"]["HR@10"]["diff"] == pytest.approx(1 / 4)
  assert "mean_rank" not in comps["d/pgd-wb@8 - d/clean"]["all"]
  # A randomised system's [K, U] ranks: each user's rank averaged over the draws first.
  from jaxvars.evaluation import summary
  two = summary.rank_comparison(np.array([[2, 4], [4, 8]]), np.array([1, 1]), resamples=10,
                                seed=0)
  assert two["diff"] == pytest.approx(((3 - 1) + (6 - 1)) / 2)

  hr = lambda effect: {"diff": 0.03, "ci95": [0.01, 0.05] if effect == "higher" else
                       [0.0, 0.06], "effect": effect}
  rank = lambda effect: {"diff": 4.8, "ci95": [2.0, 7.7] if effect == "higher" else
                         [-1.0, 7.0], "effect": effect}
  results = {"attack": {"pgd-wb@8@defended": {"loss_curve": [2.0, 85.02]},
                        "pgd-wb-2xsteps@8@defended": {"loss_curve": [2.0, 85.0, 153.68]}},
             "systems": {"d": {"system": "defended"}}}
  key = "d/pgd-wb-2xsteps@8 - d/pgd-wb@8"
  line = robustness._steps_check(results, key, {"HR@10": hr("higher"),
                                                "mean_rank": rank("higher")})
  assert "**mixed**" in line and "+4.80 [+2.00, +7.70]" in line and "85.02 -> 153.7" in line
  line = robustness._steps_check(results, key, {"HR@10": hr("higher"),
                                                "mean_rank": rank("none")})
  assert "**more steps helped the defence**" in line
  line = robustness._steps_check(results, key, {"HR@10": hr("none"), "mean_rank": rank("higher")})
  assert "no help to the defence: the longer attack pushes" in line
  # Results written before the rank comparison existed: HR@10 alone decides.
  assert "**more steps helped" in robustness._steps_check({}, key, {"HR@10": hr("higher")})


def test_robustness_section_reads_the_attacked_users_rows():
  row = lambda v: {"HR@10": v, "ci95": {"HR@10": [v - 0.1, v + 0.1]}}
  results = {"ranking": {"d/clean": row(0.9), "d/pgd@8": row(0.8), "d/pgd-wb@8": row(0.5)},
             "ranking_attacked": {"d/clean": row(0.7), "d/pgd@8": row(0.6),
                                  "d/pgd-wb@8": row(0.5)},
             "robust": {"d": row(0.4)}, "attack": {}}
  table = "\n".join(robustness.worst_case_table(results, 8.0))
  assert "0.6000 [0.5000, 0.7000]" in table and "0.7000 [0.6000, 0.8000]" in table
  assert "0.8000 [" not in table and "0.9000 [" not in table
  del results["ranking_attacked"]  # Every held-out item attacked: all users' rows.
  table = "\n".join(robustness.worst_case_table(results, 8.0))
  assert "0.8000 [0.7000, 0.9000]" in table and "0.9000 [0.8000, 1.0000]" in table
