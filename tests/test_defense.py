"""Losses against numpy references; denoiser and detector shapes; random resize + pad;
detection metrics; the joint step on 1 and 8 devices; stage masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax.training.train_state import TrainState

from conftest import tiny_config, tiny_models
from jaxvars import losses, sharding
from jaxvars.attacks.spec import AttackSpec
from jaxvars.data import splits
from jaxvars.defenses import random_resize_pad
from jaxvars.defenses.denoiser import Denoiser
from jaxvars.defenses.detector import ProjectionHead
from jaxvars.evaluation import detection as det
from jaxvars.training.defense_step import make_defense_step, stage_optimizer


def test_info_nce_matches_numpy():
  rng = np.random.default_rng(0)
  pos, neg, t = rng.normal(size=(5, 2)), rng.normal(size=(5, 3)), 0.3
  want = np.mean([-np.log(np.exp(pos[b, p] / t) / (np.exp(pos[b, p] / t) + np.exp(neg[b] / t).sum()))
                  for b in range(5) for p in range(2)])
  got = losses.info_nce(pos_sim=jnp.asarray(pos), neg_sim=jnp.asarray(neg), temperature=t)
  assert float(got) == pytest.approx(want, rel=1e-5)


def test_pair_similarities_follow_the_paper():
  e = np.eye(4, dtype=np.float32)
  z = {"z_clean": e[[0]], "z_clean_denoised": e[[0]], "z_adv": e[[1]], "z_adv_denoised": e[[2]]}
  pos, neg = losses.detector_pair_similarities(**{k: jnp.asarray(v) for k, v in z.items()})
  np.testing.assert_allclose(pos, [[1.0, 0.0]])  # (x, D(x)), (x, D(x_adv)).
  np.testing.assert_allclose(neg, [[0.0, 0.0]])  # (x_adv, x), (x_adv, D(x_adv)).


def test_content_and_perceptual_match_numpy():
  rng = np.random.default_rng(1)
  a, b = rng.random((2, 4, 4, 3)), rng.random((2, 4, 4, 3))
  assert float(losses.content(clean=jnp.asarray(a), denoised=jnp.asarray(b))) == pytest.approx(
      np.mean((a - b) ** 2), rel=1e-5)
  maps_a = {s: rng.random((2, 3, 3, 5)) for s in ("stage1", "stage2", "stage3", "stage4")}
  maps_b = {s: rng.random((2, 3, 3, 5)) for s in maps_a}
  want = sum(np.mean((maps_a[s] - maps_b[s]) ** 2) for s in ("stage2", "stage3", "stage4"))
  assert float(losses.perceptual(clean_maps=maps_a, denoised_maps=maps_b)) == pytest.approx(
      want, rel=1e-5)


@pytest.mark.parametrize("shape", [(1, 16, 16, 3), (3, 32, 24, 3), (2, 8, 40, 3)])
def test_denoiser_keeps_shape_and_starts_as_identity(shape):
  d = Denoiser(channels=4, num_blocks=2, patch=8, attn_dim=16, heads=2)
  x = jax.random.uniform(jax.random.key(0), shape)
  y = d.apply(d.init(jax.random.key(1), x), x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(y - x))) < 2.0 / 512
  assert float(y.min()) > 0.0 and float(y.max()) < 1.0


def test_denoiser_compiles_once_per_shape():
  d = Denoiser(channels=4, num_blocks=1, patch=4, attn_dim=8, heads=2)
  variables = d.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  traces = []

  @jax.jit
  def apply(v, x):
    traces.append(x.shape)
    return d.apply(v, x)

  for _ in range(3):
    apply(variables, jnp.zeros((2, 8, 8, 3)))
  assert len(traces) == 1
  apply(variables, jnp.zeros((2, 16, 16, 3)))
  apply(variables, jnp.ones((2, 16, 16, 3)))
  assert len(traces) == 2


def test_denoiser_rejects_indivisible_patch():
  d = Denoiser(channels=4, num_blocks=1, patch=8, attn_dim=8, heads=2)
  with pytest.raises(ValueError, match="not divisible by patch=8"):
    d.init(jax.random.key(0), jnp.zeros((1, 12, 12, 3)))


def test_random_resize_pad():
  x = jnp.ones((4, 32, 32, 3))
  y = random_resize_pad(x, jax.random.key(0), min_scale=0.5)
  assert y.shape == x.shape
  area = np.asarray(y[..., 0] > 0.5).sum(axis=(1, 2)) / 32**2
  assert np.all(area >= 0.5**2 - 0.1) and np.all(area <= 1.0)
  assert np.any(np.asarray(y) == 0.0)  # Zero padding somewhere.
  same = random_resize_pad(x, jax.random.key(0), min_scale=0.5)
  np.testing.assert_array_equal(y, same)  # Deterministic for a key.
  with pytest.raises(ValueError, match="min_scale"):
    random_resize_pad(x, jax.random.key(0), min_scale=0.0)


def test_random_resize_pad_with_border_colour():
  x = jnp.full((2, 32, 32, 3), 0.9).at[:, 8:24, 8:24].set(0.2)  # Dark item, light border.
  y = np.asarray(random_resize_pad(x, jax.random.key(3), min_scale=0.6, pad="border"))
  assert y.min() > 0.15  # No black padding...
  np.testing.assert_allclose(y[:, 0, 0], 0.9, atol=1e-5)  # ...the corners keep the border colour.
  with pytest.raises(ValueError, match="pad='edge'"):
    random_resize_pad(x, jax.random.key(0), min_scale=0.5, pad="edge")


def test_projection_head_is_unit_norm():
  head = ProjectionHead(hidden=8, out=4)
  h = jax.random.normal(jax.random.key(0), (5, 6))
  z = head.apply(head.init(jax.random.key(1), h), h)
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)


def test_zero_features_give_finite_gradients():
  """A pure white photo has all-zero pooled features through a ReLU6 backbone (H&M, 32 px:
  the no_perceptual ablation's denoiser whitened every photo), so the head's pre-norm
  embedding is its bias, 0 at init. The unit normalisation, the detection score, the l2
  feature normalisation and InfoNCE over such embeddings must give finite gradients
  (jnp.linalg.norm's is NaN at 0, which stopped the cpu,hm,full run's detector stage)."""
  from jaxvars.defenses.detector import detection_score
  from jaxvars.features import normalize_features
  head = ProjectionHead(hidden=8, out=4)
  h = jnp.zeros((3, 6)).at[0].set(1.0)  # Rows 1, 2: a white photo's pooled features.
  variables = head.init(jax.random.key(1), h)
  z = head.apply(variables, h)
  assert np.all(np.asarray(z[1:]) == 0.0) and np.isclose(float(jnp.linalg.norm(z[0])), 1.0)

  def loss(v):
    e = head.apply(v, h)
    pos, neg = losses.detector_pair_similarities(z_clean=e, z_clean_denoised=e[::-1],
                                                 z_adv=e, z_adv_denoised=e)
    return (losses.info_nce(pos_sim=pos, neg_sim=neg, temperature=0.1)
            + jnp.sum(detection_score(e, e[::-1])) + jnp.sum(detection_score(e, e)))

  for leaf in jax.tree.leaves(jax.grad(loss)(variables)):
    assert np.all(np.isfinite(np.asarray(leaf)))
  g = jax.grad(lambda f: jnp.sum(normalize_features(f, {}, "l2") ** 2 + f))(jnp.zeros((2, 5)))
  assert np.all(np.isfinite(np.asarray(g)))


def test_roc_auc_matches_pairwise_count():
  rng = np.random.default_rng(0)
  clean, adv = rng.integers(0, 5, 40).astype(float), rng.integers(2, 8, 30).astype(float)
  pairs = [(a > c) + 0.5 * (a == c) for a in adv for c in clean]
  assert det.roc_auc(clean, adv) == pytest.approx(np.mean(pairs))


def test_detection_metrics_on_separable_scores():
  m = det.detection_metrics(calibration_clean=np.linspace(0, 1, 101), clean=np.full(50, 0.5),
                           adversarial=np.full(50, 3.0), fpr=0.05)
  assert m["accuracy"] == 1.0 and m["roc_auc"] == 1.0 and m["oracle_tpr@fpr=0.05"] == 1.0
  assert m["threshold"] == pytest.approx(0.95)


def _tiny_system():
  return tiny_models()


@pytest.mark.parametrize("mix", [(0, 1, 0), (1, 1, 1)])
def test_joint_step_same_on_one_and_eight_devices(mix):
  system, params, consts, images, users, items = _tiny_system()
  params = jax.device_get(params)  # Host copy: the step donates (deletes) its input state.
  batch_items = np.arange(8, dtype=np.int32)
  triplets = splits.item_triplets(batch_items, train_users=users, train_items=items,
                                  num_users=20, num_items=40,
                                  positive_keys=splits.pair_keys(users, items, 40), per_role=2,
                                  rng=np.random.default_rng(1))
  host_batch = {"images": images[:8], "items": batch_items, "triplets": triplets}
  weights = {"content": 1.0, "perceptual": 1.0, "contrastive": 1.0, "bpr": 0.1}
  attack = AttackSpec(method="pgd", eps=8.0, steps=2, alpha_ratio=0.0, alpha=2.0)
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    state = TrainState.create(apply_fn=None, params=params,
                              tx=stage_optimizer(("denoiser", "detector"), 1e-3))
    state = jax.device_put(state, sharding.replicated(mesh))
    step = make_defense_step(system, mesh, weights=weights, mix=mix, attack=attack,
                             temperature=0.1)
    c = jax.device_put(consts, sharding.replicated(mesh))
    for k in range(2):
      state, m = step(state, sharding.shard_batch(host_batch, mesh), c, jax.random.key(k))
    results.append((jax.device_get(m), jax.device_get(state.params)))
  (m1, p1), (m8, p8) = results
  assert int(m1["input_kind"]) == int(m8["input_kind"])
  for key in ("loss", "content", "perceptual", "contrastive", "bpr"):
    assert float(m1[key]) == pytest.approx(float(m8[key]), rel=1e-4, abs=1e-6), key
  # Adam's first updates are ~lr * sign(g): float noise in a near-zero gradient can move a
  # parameter by up to ~1e-6 (of an lr=1e-3 step); 1e-5 is 1% of a step.
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The mask: the recommender is frozen in this stage, the denoiser is not.
  for a, b in zip(jax.tree.leaves(p1["recommender"]), jax.tree.leaves(params["recommender"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1["denoiser"]),
                                                      jax.tree.leaves(params["denoiser"])))


def test_stage_optimizer_rejects_unknown_group():
  with pytest.raises(ValueError, match="unknown trainable group"):
    stage_optimizer(("denoiser", "resnet"), 1e-3)


def test_joint_step_eps_choices():
  """A step drawing its eps from ``eps_choices`` equals the fixed-eps step when there is one
  choice, and draws every choice when there are several."""
  system, params, consts, images, users, items = _tiny_system()
  params = jax.device_get(params)
  batch_items = np.arange(8, dtype=np.int32)
  triplets = splits.item_triplets(batch_items, train_users=users, train_items=items,
                                  num_users=20, num_items=40,
                                  positive_keys=splits.pair_keys(users, items, 40), per_role=2,
                                  rng=np.random.default_rng(1))
  mesh = sharding.make_mesh(1)
  batch = sharding.shard_batch({"images": images[:8], "items": batch_items,
                                "triplets": triplets}, mesh)
  weights = {"content": 1.0, "perceptual": 1.0, "bpr": 0.1}
  c = jax.device_put(consts, sharding.replicated(mesh))

  def run(attack, keys, eps_choices=()):
    step = make_defense_step(system, mesh, weights=weights, mix=(0, 1, 1), attack=attack,
                             eps_choices=eps_choices, temperature=0.1)
    out = []
    tx = stage_optimizer(("denoiser",), 1e-3)  # One object: a new one per state retraces.
    for k in keys:
      state = jax.device_put(TrainState.create(apply_fn=None, params=params, tx=tx),
                             sharding.replicated(mesh))
      out.append(jax.device_get(step(state, batch, c, jax.random.key(k))[1]))
    return out

  base = AttackSpec(method="pgd", eps=8.0, steps=2, alpha_ratio=0.0, alpha=2.0)
  fixed = run(base, range(2))
  ratio = AttackSpec(method="pgd", eps=99.0, steps=2, alpha_ratio=0.25)
  chosen = run(ratio, range(2), eps_choices=(8.0,))
  for a, b in zip(fixed, chosen):
    assert int(a["input_kind"]) == int(b["input_kind"])
    assert float(b["input_eps"]) == 8.0
    for key in ("loss", "content", "perceptual", "bpr"):
      assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), key
  many = run(ratio, range(8), eps_choices=(2.0, 64.0))
  assert {float(m["input_eps"]) for m in many} == {2.0, 64.0}
  # Larger budgets move the inputs further: the content loss grows with the drawn eps.
  by_eps = {e: np.mean([float(m["content"]) for m in many if float(m["input_eps"]) == e])
            for e in (2.0, 64.0)}
  assert by_eps[64.0] > 10 * by_eps[2.0]


def test_denoiser_passes_input_gradients_at_saturated_pixels():
  """The skip path's clip is straight-through: white backgrounds keep their gradient."""
  d = Denoiser(channels=4, num_blocks=1, patch=8, attn_dim=8, heads=2)
  x = jnp.ones((1, 8, 8, 3)).at[:, :4].set(0.0)  # Pure white and pure black pixels.
  variables = d.init(jax.random.key(0), x)
  g = jax.grad(lambda z: jnp.sum(d.apply(variables, z)))(x)
  assert float(jnp.min(jnp.abs(g))) > 1e-4  # Every pixel, white or black, moves the output.
  y = d.apply(variables, x)
  assert float(jnp.max(jnp.abs(y - x))) < 2.0 / 512  # The forward value is unchanged.


def _one_pass_objective(params, consts, batch, x_adv, is_adv, *, models, weights, temperature):
  """The joint loss with x, D(x), x_adv and D(x_adv) through ONE backbone pass (the
  straightforward form of eq. 12), as a reference for ``defense_objective``'s split passes."""
  from jaxvars.attacks.objectives.bpr import item_bpr_loss
  from jaxvars.backbones import PERCEPTUAL_MAPS
  x = batch["images"].astype(jnp.float32) / 255.0
  b = x.shape[0]
  d_clean = models.denoise(params, x)
  d_adv = models.denoise(params, x_adv)
  four = jnp.concatenate([x, d_clean, x_adv, d_adv])
  out = models.backbone_out(consts, four)
  terms = {
      "content": jnp.mean((d_adv - x) ** 2) + jnp.mean((d_clean - x) ** 2),
      "perceptual": losses.perceptual(
          clean_maps={k: out[k][:b] for k in PERCEPTUAL_MAPS},
          denoised_maps={k: out[k][3 * b:] for k in PERCEPTUAL_MAPS}),
      "bpr": jnp.mean(item_bpr_loss(
          models.normalize(consts, out["pooled"][3 * b:]), items=batch["items"],
          triplets=batch["triplets"], score_fn=models.score_fn(params["recommender"]),
          other_features=consts["features"]))}
  z = models.embed_pooled(params, models.detector_pooled(params, consts, four))
  pos, neg = losses.detector_pair_similarities(z_clean=z[:b], z_clean_denoised=z[b:2 * b],
                                               z_adv=z[2 * b:3 * b], z_adv_denoised=z[3 * b:])
  terms["contrastive"] = is_adv * losses.info_nce(pos_sim=pos, neg_sim=neg,
                                                  temperature=temperature)
  return sum(w * terms[t] for t, w in weights.items())


_DENOISER_TERMS = ("content", "perceptual", "bpr")
_ALL_TERMS = ("content", "perceptual", "contrastive", "bpr")


@pytest.mark.parametrize("terms,encoder,clean", [
    (_DENOISER_TERMS, False, False), (_DENOISER_TERMS, False, True), (("bpr",), False, False),
    (("contrastive",), False, False), (_ALL_TERMS, False, False), (_ALL_TERMS, False, True),
    (_ALL_TERMS, True, False)])
def test_defense_objective_equals_one_backbone_pass(terms, encoder, clean):
  """``defense_objective`` sends each backbone pass only the images a term needs (no
  backward pass through the inputs): loss and gradients equal the one-pass form's, on
  adversarial and clean steps."""
  import dataclasses

  from jaxvars.training.defense_step import defense_objective
  models, params, consts, images, users, items = tiny_models()
  if encoder:
    params = {**params, "detector": {**params["detector"], "encoder": consts["backbone"]["params"]}}
    models = dataclasses.replace(models, detector_encoder=True)
  batch_items = np.arange(6, dtype=np.int32)
  triplets = splits.item_triplets(batch_items, train_users=users, train_items=items,
                                  num_users=20, num_items=40,
                                  positive_keys=splits.pair_keys(users, items, 40), per_role=2,
                                  rng=np.random.default_rng(1))
  batch = {"images": jnp.asarray(images[:6]), "items": batch_items, "triplets": triplets}
  x_adv = jnp.clip(batch["images"] / 255.0 + 0.03 * jax.random.normal(
      jax.random.key(5), batch["images"].shape), 0.0, 1.0)
  is_adv = 0.0 if clean else 1.0
  if clean:  # A clean step: x_adv is x.
    x_adv = batch["images"] / 255.0
  weights = {t: w for t, w in zip(("content", "perceptual", "contrastive", "bpr"),
                                  (1.0, 0.7, 0.5, 0.3)) if t in terms}
  kw = {"models": models, "weights": weights, "temperature": 0.2}
  split = jax.jit(jax.value_and_grad(functools.partial(defense_objective, **kw), has_aux=True))
  one_pass = jax.jit(jax.value_and_grad(functools.partial(_one_pass_objective, **kw)))
  (got, _), g_got = split(params, consts, batch, x_adv, is_adv)
  want, g_want = one_pass(params, consts, batch, x_adv, is_adv)
  assert float(want) > 0
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4,
                               atol=2e-6 * max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("clean", [False, True])
def test_content_clean_weights_clean_inputs_apart(clean):
  """``loss.content_clean`` weights the reconstruction of clean inputs (D(x), and D(x_adv)
  on a clean step) and ``loss.content`` only an attacked input's: on an attacked step the
  loss grows by (w_clean - w) ||x - D(x)||^2, on a clean step it equals eq. 12 with the
  content weight w_clean, and w_clean = w is eq. 12 itself."""
  from jaxvars.training.defense_step import defense_objective, loss_weights
  models, params, consts, images, users, items = tiny_models()
  batch_items = np.arange(6, dtype=np.int32)
  triplets = splits.item_triplets(batch_items, train_users=users, train_items=items,
                                  num_users=20, num_items=40,
                                  positive_keys=splits.pair_keys(users, items, 40), per_role=2,
                                  rng=np.random.default_rng(1))
  batch = {"images": jnp.asarray(images[:6]), "items": batch_items, "triplets": triplets}
  x = batch["images"] / 255.0
  x_adv = x if clean else jnp.clip(x + 0.03 * jnp.sign(jax.random.normal(
      jax.random.key(5), x.shape)), 0.0, 1.0)
  is_adv = 0.0 if clean else 1.0

  def loss(**weights):
    return float(defense_objective(params, consts, batch, x_adv, is_adv, models=models,
                                   weights={"perceptual": 0.7, "bpr": 0.3, **weights},
                                   temperature=0.2)[0])

  plain = loss(content=1.0)
  assert loss(content=1.0, content_clean=1.0) == plain
  if clean:
    np.testing.assert_allclose(loss(content=1.0, content_clean=5.0), loss(content=5.0),
                               rtol=1e-6)
  else:
    recon_clean = float(jnp.mean((models.denoise(params, x) - x) ** 2))
    assert recon_clean > 0
    # The tiny D starts near the identity (recon_clean ~1e-8): large weights make the
    # terms visible in float32.
    np.testing.assert_allclose(loss(content=1.0, content_clean=1.0 + 1e6) - plain,
                               1e6 * recon_clean, rtol=1e-3)
    recon_adv = float(jnp.mean((models.denoise(params, x_adv) - x) ** 2))
    np.testing.assert_allclose(loss(content=1e3, content_clean=0.0)
                               - loss(content=0.0, content_clean=0.0), 1e3 * recon_adv, rtol=1e-4)
  cfg = tiny_config("/unused").loss
  assert "content_clean" not in loss_weights(cfg, ("content", "perceptual"))
  cfg.content_clean = 3000.0
  assert loss_weights(cfg, ("content", "bpr")) == {"content": cfg.content, "bpr": cfg.bpr,
                                                   "content_clean": 3000.0}
  assert loss_weights(cfg, ("contrastive",)) == {"contrastive": cfg.contrastive}
