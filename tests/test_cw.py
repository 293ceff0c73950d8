"""C&W L2 (jaxvars/attacks/cw.py): the box and the 8-bit grid, the closed-form minimum of a
linear problem, the binary search's c trajectory against the reference's rule, targeted
TAaMR on a tiny classifier, the catalogue and plan wiring, and config errors."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config, tiny_models
from jaxvars import configuration, sharding
from jaxvars.attacks import pgd
from jaxvars.attacks.catalogue import attack_catalogue
from jaxvars.attacks.cw import cw_l2
from jaxvars.attacks.objectives import OBJECTIVES, AttackContext
from jaxvars.attacks.objectives.bpr import item_bpr_loss, item_bpr_margin
from jaxvars.attacks.objectives.bpr_all import all_user_bpr_margin
from jaxvars.attacks.objectives.taamr import target_margin
from jaxvars.attacks.spec import AttackSpec, attack_spec
from test_objectives import _data
from jaxvars.errors import ConfigError
from jaxvars.evaluate import attack_specs
from jaxvars.evaluation.plan import PlanInputs, make_plan


def _linear(shape, margins, seed=0):
  """v(x) = w . (x - 0.5) - m per image: adversarial (v > 0) from 0.5 at the L2 distance
  m / ||w||, along w (no box constraint binds while that step stays inside [0, 1])."""
  w = jax.random.normal(jax.random.key(seed), shape)
  m = jnp.asarray(margins, jnp.float32)
  value = lambda z: jnp.sum((w * (z - 0.5)).reshape(shape[0], -1), axis=1) - m
  return value, np.asarray(m) / np.linalg.norm(np.asarray(w).reshape(shape[0], -1), axis=1)


def test_cw_finds_the_closed_form_minimum_of_a_linear_problem():
  x = jnp.full((3, 2, 2, 3), 0.5)
  value, closed = _linear(x.shape, [0.2, 0.4, 0.6])
  adv, trace = jax.jit(lambda z: cw_l2(value, z, steps=300, binary_search_steps=9,
                                       quantize=False, return_trace=True))(x)
  assert np.all(np.asarray(trace["success"])) and np.all(np.asarray(value(adv)) > 0)
  l2 = np.linalg.norm(np.asarray(adv - x).reshape(3, -1), axis=1)
  np.testing.assert_allclose(l2, closed, rtol=0.01)  # Measured: within 0.03%.
  np.testing.assert_allclose(trace["l2"], l2, rtol=1e-5)
  # Along w: the minimal perturbation is parallel to the hyperplane's normal.
  w = np.asarray(jax.grad(lambda z: jnp.sum(value(z)))(x)).reshape(3, -1)
  d = np.asarray(adv - x).reshape(3, -1)
  cos = np.sum(w * d, axis=1) / np.linalg.norm(w, axis=1) / np.linalg.norm(d, axis=1)
  assert np.all(cos > 0.999), cos


def test_cw_outputs_are_8_bit_in_the_box_and_adversarial_after_rounding():
  key = jax.random.key(3)
  x = jnp.round(jax.random.uniform(key, (4, 3, 3, 3), minval=0.2, maxval=0.8) * 255) / 255
  w = jax.random.normal(jax.random.key(1), x.shape)
  m = jnp.array([0.05, 0.1, 0.2, 50.0])  # The last one: out of reach in [0, 1].
  value = lambda z: jnp.sum((w * (z - x)).reshape(4, -1), axis=1) - m
  for eps in (255.0, 6.0):
    adv, trace = jax.jit(lambda z, eps=eps: cw_l2(value, z, steps=60, binary_search_steps=5,
                                                  eps=eps, return_trace=True))(x)
    a, xs = np.asarray(adv, np.float64), np.asarray(x, np.float64)
    assert np.all(a >= 0) and np.all(a <= 1)
    np.testing.assert_allclose(a * 255, np.round(a * 255), atol=1e-4)  # On the 8-bit grid.
    assert np.max(np.abs(a - xs)) <= eps / 255 + 1e-6
    success = np.asarray(trace["success"])
    # Re-checked on the returned (rounded) photos: the reachable ones succeed, the last
    # fails and is returned clean.
    np.testing.assert_array_equal(success, np.asarray(value(adv)) > 0)
    assert success[:3].all() and not success[3]
    np.testing.assert_array_equal(a[3], xs[3])
  l2_capped = np.asarray(trace["l2"])  # eps = 6: a longer way round the cap, or the same.
  assert np.all(l2_capped[:3] > 0)


def _reference_trajectory(found, initial_c, runs):
  """Carlini & Wagner's l2_attack.py rule, in plain Python, from which runs succeeded."""
  c, lower, upper, out = initial_c, 0.0, 1e10, []
  for s in range(runs):
    if runs >= 10 and s == runs - 1:
      c = upper
    out.append(c)
    if found[s]:
      upper = min(upper, c)
      if upper < 1e9:
        c = (lower + upper) / 2
    else:
      lower = max(lower, c)
      c = (lower + upper) / 2 if upper < 1e9 else c * 10
  return np.array(out)


def test_binary_search_multiplies_c_until_success_then_bisects():
  """A linear problem whose runs succeed exactly where c > c* = 2 m / ||w||^2 (the
  minimiser of ||d||^2 - c (w . d - m) is d = c w / 2): c* = 0.45, so from c = 1e-3 the
  runs at 1e-3, 1e-2, 0.1 fail (x10 each), 1 succeeds, then bisection: 0.55 succeeds
  (down), 0.325 fails (up to 0.4375), ...; with 10 runs the last repeats the smallest
  successful c. Every run's c is the reference's rule applied to which runs succeeded."""
  x = jnp.full((4, 2, 2, 3), 0.5)
  w = jax.random.normal(jax.random.key(2), x.shape) * 0.5
  c_star = 0.45
  m = c_star * jnp.sum(jnp.square(w).reshape(4, -1), axis=1) / 2
  value = lambda z: jnp.sum((w * (z - 0.5)).reshape(4, -1), axis=1) - m
  _, trace = jax.jit(lambda z: cw_l2(value, z, steps=300, binary_search_steps=10,
                                     initial_c=1e-3, lr=5e-3, quantize=False,
                                     return_trace=True))(x)
  c, found = np.asarray(trace["c"]).T, np.asarray(trace["found"]).T  # [B, S]
  np.testing.assert_allclose(c[:, :7], np.tile([1e-3, 1e-2, 0.1, 1.0, 0.55, 0.325, 0.4375],
                                               (4, 1)), rtol=1e-5)
  far = np.abs(c / c_star - 1) > 0.1  # Where Adam's convergence cannot blur the outcome.
  np.testing.assert_array_equal(found[far], (c > c_star)[far])
  for b in range(4):
    np.testing.assert_allclose(c[b], _reference_trajectory(found[b], 1e-3, 10), rtol=1e-5)
    assert c[b, 9] == pytest.approx(c[b, :9][found[b, :9]].min(), rel=1e-6)  # The repeat.


def test_cw_keeps_an_already_adversarial_photo_and_returns_failures_clean():
  x = jnp.full((2, 2, 2, 3), 128 / 255)  # On the 8-bit grid.
  value = lambda z: jnp.stack([jnp.float32(1.0) + 0 * jnp.sum(z[0]), -1.0 + 0 * jnp.sum(z[1])])
  adv, trace = cw_l2(value, x, steps=5, binary_search_steps=2, return_trace=True)
  np.testing.assert_array_equal(adv, x)
  np.testing.assert_array_equal(trace["success"], [True, False])
  with pytest.raises(ValueError, match="binary_search_steps >= 1"):
    cw_l2(value, x, steps=5, binary_search_steps=0)


def test_the_recommender_objectives_margins_match_numpy():
  """eq. 3's margin: the mean over an item's valid triplets of x_uk - x_uj (buyers) and
  x_ui - x_uk (non-buyers); negative exactly where the order is, on average, flipped, and
  the BPR loss then exceeds n log 2. bpr_all's: the same over every user."""
  rng = np.random.default_rng(0)
  p, table = rng.normal(size=(5, 3)), rng.normal(size=(6, 3))
  score = lambda u, i, f: jnp.sum(jnp.asarray(p)[u] * f, axis=-1)
  feats = jnp.asarray(rng.normal(size=(2, 3)))
  t = {"pos_users": np.array([[0, 1, 2], [3, 4, 0]]), "pos_negs": np.array([[2, 3, 4], [5, 0, 1]]),
       "pos_mask": np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]),
       "neg_users": np.array([[3, 4, 1], [1, 2, 2]]), "neg_pos": np.array([[0, 5, 5], [2, 3, 4]])}
  items = jnp.array([0, 1])
  flipped = 0
  for sign in (1.0, -1.0):  # -feats: one item's order flipped on average (margin -0.71).
    got = item_bpr_margin(sign * feats, items=items, triplets=t, score_fn=score,
                          other_features=table)
    loss = item_bpr_loss(sign * feats, items=items, triplets=t, score_fn=score,
                         other_features=table)
    f = sign * np.asarray(feats)
    for b in range(2):
      pos = [p[u] @ f[b] - p[u] @ table[j] for u, j, ok in
             zip(t["pos_users"][b], t["pos_negs"][b], t["pos_mask"][b]) if ok]
      neg = [p[u] @ table[i] - p[u] @ f[b] for u, i in zip(t["neg_users"][b], t["neg_pos"][b])]
      assert float(got[b]) == pytest.approx(np.mean(pos + neg), rel=1e-5)
      if float(got[b]) < 0:
        flipped += 1
        assert float(loss[b]) > (len(pos) + len(neg)) * np.log(2)
  assert flipped == 1
  bought = jnp.asarray([[1.0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
  user_pos, user_neg = jnp.array([1, 2, 3, 4, 5]), jnp.array([5, 4, 3, 2, 1])
  got = all_user_bpr_margin(feats, items=items, bought=bought, score_fn=score,
                            user_pos=user_pos, user_neg=user_neg, table=jnp.asarray(table))
  f = np.asarray(feats)
  for b in range(2):
    want = np.mean([p[u] @ f[b] - p[u] @ table[int(user_neg[u])] if bought[b, u] else
                    p[u] @ table[int(user_pos[u])] - p[u] @ f[b] for u in range(5)])
    assert float(got[b]) == pytest.approx(want, rel=1e-5)


def _tiny_classifier(classes=5):
  """A random conv net classifier: images [B, 8, 8, 3] -> logits [B, classes]."""
  k1, k2 = jax.random.split(jax.random.key(7))
  w1 = jax.random.normal(k1, (3, 3, 3, 4)) * 0.5
  w2 = jax.random.normal(k2, (8 * 8 * 4, classes)) / 4

  def logits(x):
    h = jax.lax.conv_general_dilated(x - 0.5, w1, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(h).reshape(x.shape[0], -1) @ w2
  return logits


def test_targeted_taamr_cw_reaches_the_target_class_on_a_tiny_classifier():
  """Through AttackSpec.run and the taamr objective's margin: every photo ends up classified
  as a class none of them had, each with a smaller L2 than the eps = 16 PGD that also gets
  there (C&W minimises the perturbation, PGD spends its budget)."""
  logits = _tiny_classifier()
  x = jnp.round(jax.random.uniform(jax.random.key(8), (6, 8, 8, 3)) * 255) / 255
  clean_top = np.asarray(jnp.argmax(logits(x), -1))
  target = int(next(k for k in range(5) if not np.any(clean_top == k)))  # Nobody's class.
  ctx = AttackContext(features=lambda z: z.reshape(z.shape[0], -1), score_fn=None,
                      visual_fn=None, items=jnp.arange(6), table=jnp.zeros((6, 1)),
                      logits=logits, constants={"target_class": target})
  spec = AttackSpec(method="cw", objective="taamr", eps=255.0, steps=100,
                    binary_search_steps=6, initial_c=1e-2)
  adv = jax.jit(lambda z: spec.run(ctx, z, None))(x)
  assert np.all(np.asarray(jnp.argmax(logits(adv), -1)) == target)
  np.testing.assert_array_less(target_margin(logits(adv), target), 0.0)
  a = np.asarray(adv, np.float64)
  np.testing.assert_allclose(a * 255, np.round(a * 255), atol=1e-4)
  by_pgd = pgd(lambda z: -target_margin(logits(z), target), x, eps=16, alpha=4, steps=20,
               random_start=False)
  assert np.all(np.asarray(jnp.argmax(logits(by_pgd), -1)) == target)
  l2 = lambda z: np.linalg.norm(np.asarray(z - x, np.float64).reshape(6, -1), axis=1)
  np.testing.assert_array_less(l2(adv), l2(by_pgd))
  assert spec.name == "cw-taamr" and spec.condition == "cw-taamr@255"


def test_an_objective_without_a_margin_succeeds_where_its_loss_rose_by_loss_margin():
  """'feature' has no success criterion of its own: C&W's is loss(x') > loss(x) +
  loss_margin, whose minimum for a linear loss is loss_margin / ||w|| in closed form."""
  assert OBJECTIVES.get("feature").margin is None
  x = jnp.full((2, 2, 2, 3), 0.5)
  w = jax.random.normal(jax.random.key(4), x.shape)
  loss = lambda z: jnp.sum((w * z).reshape(2, -1), axis=1)
  spec = AttackSpec(method="cw", objective="feature", eps=255.0, steps=300, loss_margin=0.3)
  adv, curve, success = jax.jit(lambda z: spec.run_loss(
      loss, z, None, return_curve=True, return_success=True))(x)
  gain = np.asarray(loss(adv) - loss(x))
  assert np.all(np.asarray(success)) and np.all(gain > 0.3)
  l2 = np.linalg.norm(np.asarray(adv - x).reshape(2, -1), axis=1)
  closed = 0.3 / np.linalg.norm(np.asarray(w).reshape(2, -1), axis=1)
  np.testing.assert_allclose(l2, closed, atol=0.5 / 255 * np.sqrt(12) + 1e-6, rtol=0.05)
  np.testing.assert_allclose(curve, [np.mean(loss(x)), np.mean(loss(adv))], rtol=1e-5)


def _small_models(num_users=20, num_items=8, size=8):
  """conftest.tiny_models without the defence (a transfer attack needs neither D nor the
  head): seconds instead of ~20 s of eager Flax init on a busy CI core."""
  return tiny_models(num_users=num_users, num_items=num_items, size=size, defence=False)


def test_cw_attacks_a_catalogue_on_eq3_and_reports_its_success_rate():
  """Through the catalogue (the recommender's BPR triplets, its margin objective): 8-bit
  photos, failures returned clean, the mean margin value raised, a success rate in the
  stats; C&W's settings are part of the fingerprint."""
  models, params, consts, images, users, items = _small_models(num_items=8, size=8)
  data = _data(images, users, items)
  spec = AttackSpec(method="cw", objective="bpr", eps=255.0, steps=10, binary_search_steps=2,
                    initial_c=1.0, lr=0.05)
  adv, stats = attack_catalogue(spec, models=models, params=params, consts=consts, data=data,
                                mesh=sharding.make_mesh(1), batch_size=8)
  assert adv.dtype == np.uint8 and adv.shape == images.shape
  changed = np.any(adv != images, axis=(1, 2, 3)).mean()
  assert 0 < stats["success_rate"] <= 1 and changed <= stats["success_rate"] + 1e-9
  curve = stats["loss_curve"]
  assert len(curve) == 2 and curve[1] > curve[0]  # -margin: the preference order moved.
  from jaxvars.attacks.catalogue import fingerprint
  kw = dict(params=params, consts=consts, image_shape=images.shape)
  assert fingerprint(spec, **kw) != fingerprint(dataclasses.replace(spec, kappa=1.0), **kw)


def test_unbounded_cw_is_one_condition_whatever_the_eps_and_bounded_follows_eval_eps(tfds_dir):
  config = tiny_config(tfds_dir)
  config.attack.eval_eps = (4, 8)
  config.attack.methods = ("fgsm", "cw")
  names = [s.condition for s in attack_specs(config)]
  assert names == ["fgsm@4", "cw@255", "fgsm@8"]
  cw = attack_spec(config.attack, "cw", 8)
  assert (cw.steps, cw.binary_search_steps) == (config.attack.cw.steps,
                                                config.attack.cw.binary_search_steps)
  assert cw.gradient_batches == cw.steps * cw.binary_search_steps
  config.targeted.methods = ("pgd", "cw")
  config.targeted.eps = (4.0, 8.0)
  plan = make_plan(config, PlanInputs(systems=("undefended",),
                                      transfer=tuple(attack_specs(config))))
  targeted = [c.name for c in plan if c.kind == "targeted"]
  assert targeted.count("cw-taamr@255") == 1 and "pgd-taamr@4" in targeted
  config.attack.cw.bounded = True
  assert [s.condition for s in attack_specs(config)] == ["fgsm@4", "cw@4", "fgsm@8", "cw@8"]
  configuration.validate(config)


@pytest.mark.parametrize("field,value,message", [
    ("steps", 0, r"config\.attack\.cw\.steps=0 must be an integer > 0"),
    ("binary_search_steps", -1, r"config\.attack\.cw\.binary_search_steps=-1 must be an integer"),
    ("initial_c", 0.0, r"config\.attack\.cw\.initial_c=0\.0 must be a number > 0"),
    ("lr", -0.01, r"config\.attack\.cw\.lr=-0\.01 must be a number > 0"),
    ("kappa", -1.0, r"config\.attack\.cw\.kappa=-1\.0 must be a number >= 0"),
    ("loss_margin", -0.5, r"config\.attack\.cw\.loss_margin=-0\.5 must be a number >= 0"),
    ("bounded", "yes", r"config\.attack\.cw\.bounded='yes' must be True"),
])
def test_a_wrong_cw_setting_is_named(tfds_dir, field, value, message):
  config = tiny_config(tfds_dir)
  # A section rebuilt (as from a JSON config): ConfigDict's type safety would refuse "yes".
  config.attack.cw = ml_collections.ConfigDict(dict(config.attack.cw.to_dict(), **{field: value}))
  with pytest.raises(ConfigError, match=message):
    configuration.validate(config)


def test_the_report_shows_an_unbounded_attack_beside_the_main_eps():
  """The main table is at one eps (8): an attack the run has only unbounded ('cw@255')
  appears there too, and the sweep's column for it says so."""
  from jaxvars.report import tables
  row = {m: 0.5 for m in tables.METRICS}
  results = {"ranking": {f"vbpr/{c}": dict(row) for c in ("clean", "fgsm@8", "cw@255")}}
  lines = tables.main_table(results, 8.0, paper_columns=False)
  assert [ln.split(" | ")[0].lstrip("| ") for ln in lines[2:]] == ["clean", "fgsm@8", "cw@255"]
  assert tables.at_eps(results, "fgsm", 8.0) == "fgsm@8"
  assert "| unbounded |" in tables.sweep_table(results)[0]
