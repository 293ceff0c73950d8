"""DVBPR (jaxvars/recommenders/dvbpr.py, Kang et al. 2017): a recommender that embeds the
photos with its own CNN, trained end to end with BPR.

* CNN-F's layout: the embedding's shape, the resize to ``dvbpr_input_size``, and the L2
  term over the weight matrices only (against a sum computed from the parameter tree);
* the BPR gradient reaches the CNN: a directional derivative of the training objective on
  photos against a central finite difference;
* training on the photos raises the pairwise accuracy above chance;
* the features of a trained DVBPR are its CNN's everywhere (``recommender_consts``,
  ``Models.features``), and an FGSM crafted against it is crafted through its CNN: it stays
  in the eps-ball, it lowers DVBPR's scores of the attacked items for their buyers, and it
  differs from the FGSM crafted against VBPR;
* in the shared tiny run (conftest.tiny_run), DVBPR's cached attack equals a fresh crafting
  on its restored parameters, and ``--mode=evaluate`` reproduces its rows (test_report);
* AMR on DVBPR ('amr_dvbpr') has DVBPR's features and AMR's two stages; config errors.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from jaxvars import configuration, families, workdir as wd
from jaxvars.attacks.catalogue import cached_attack_catalogue
from jaxvars.errors import ConfigError
from jaxvars.evaluate import attack_specs
from jaxvars.experiment import build, make_consts, recommender_consts
from jaxvars.pixels import to_float
from jaxvars.recommenders import build_recommender
from jaxvars.recommenders.base import ENCODER_CONSTS
from jaxvars.training import recommender as rec_training


def _config(tfds_dir, **kw):
  return tiny_config(tfds_dir, **{"recommender.name": "dvbpr", **kw})


def test_cnn_f_embedding_and_l2_terms(tfds_dir):
  rc = _config(tfds_dir).recommender
  rec = build_recommender(rc, num_users=7, num_items=11, feature_dim=999)
  assert rec.reads_images and rec.uses_features and rec.name == "dvbpr"
  params = rec.init(jax.random.key(0), 999)
  assert set(params) == {"user_factors", "cnn"}
  photos = jax.random.uniform(jax.random.key(1), (3, 48, 48, 3))  # Resized to 32 inside.
  f = rec.encode(params, photos)
  assert f.shape == (3, rc.factors) and f.dtype == jnp.float32
  small = jax.image.resize(photos, (3, 32, 32, 3), "linear", antialias=True)
  np.testing.assert_allclose(rec.encode(params, small), f, rtol=1e-5, atol=1e-6)
  # The score is theta_u . Phi(X_i): no item parameter.
  users = jnp.asarray([0, 6, 3])
  np.testing.assert_allclose(rec.score(params, users, jnp.asarray([1, 2, 3]), f),
                             np.sum(np.asarray(params["user_factors"])[[0, 6, 3]] * f, -1),
                             rtol=1e-5)
  # L2: mean ||theta_u||^2, and every conv/dense kernel's squared sum (biases left out).
  kernels = [np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params["cnn"])
             if k[-1].key == "kernel"]
  assert len(kernels) == 8  # Five convs and three dense layers, as CNN-F.
  with_bias = jax.tree.map(lambda a: a, params)
  with_bias["cnn"]["Dense_0"]["bias"] = with_bias["cnn"]["Dense_0"]["bias"] + 100.0
  for p in (params, with_bias):
    user_sq, cnn_sq = rec.module.apply({"params": p}, users, users, users, method="l2_terms")
    assert float(cnn_sq) == pytest.approx(sum(float(np.sum(k.astype(np.float64) ** 2))
                                              for k in kernels), rel=1e-5)
    assert float(user_sq) == pytest.approx(float(np.mean(np.sum(
        np.asarray(params["user_factors"])[[0, 6, 3]] ** 2, -1))), rel=1e-5)
  with pytest.raises(TypeError, match="frozen backbone's feature table"):
    build_recommender(tiny_config(tfds_dir).recommender, num_users=7, num_items=11,
                      feature_dim=4).encode(params, photos)


def test_bpr_gradient_reaches_the_cnn(tfds_dir):
  rc = _config(tfds_dir).recommender
  rec = build_recommender(rc, num_users=5, num_items=6, feature_dim=1)
  params = rec.init(jax.random.key(2), 1)
  # Users of norm ~3 (not the init's 0.01), so that the loss moves measurably in float32.
  params["user_factors"] = 3.0 * jax.random.normal(jax.random.key(9), (5, rc.factors))
  photos = jax.random.randint(jax.random.key(3), (6, 32, 32, 3), 0, 256).astype(jnp.uint8)
  batch = {"user": jnp.asarray([0, 1, 2, 3, 4, 0]), "pos": jnp.asarray([0, 1, 2, 3, 4, 5]),
           "neg": jnp.asarray([5, 4, 3, 2, 1, 0])}
  loss = jax.jit(lambda p: rec_training.bpr_objective(p, batch, photos, recommender=rec)[0])
  grads = jax.grad(loss)(params)
  # <grad, v> against (L(p + h v) - L(p - h v)) / 2h along a random direction of one
  # layer's kernel (scaled to its spread): the first conv (through every ReLU and max-pool:
  # h small, 5%) and the last dense layer (linear in it: 1%).
  for layer, h, rel in (("Conv_0", 1e-2, 0.05), ("Dense_2", 1e-1, 0.01)):
    kernel = params["cnn"][layer]["kernel"]
    direction = jax.random.normal(jax.random.key(5), kernel.shape) * jnp.std(kernel)
    shift = lambda s: jax.tree.map(lambda a: a, dict(params, cnn=dict(params["cnn"], **{
        layer: dict(params["cnn"][layer], kernel=kernel + s * h * direction)})))
    numeric = (float(loss(shift(1.0))) - float(loss(shift(-1.0)))) / (2 * h)
    analytic = float(jnp.sum(grads["cnn"][layer]["kernel"] * direction))
    assert abs(analytic) > 1e-3, layer  # The BPR gradient reaches this layer.
    assert analytic == pytest.approx(numeric, rel=rel), layer


def test_trains_end_to_end_and_attacks_go_through_its_cnn(tfds_dir, tmp_path):
  config = _config(tfds_dir, **{"recommender.dvbpr_epochs": 6})
  exp = build(config, str(tmp_path))
  consts = make_consts(exp)
  state, history, _, _ = rec_training.train_recommender(exp, consts, str(tmp_path))
  assert [r["epoch"] for r in history] == list(range(1, 7))
  # Chance is 0.5; the tiny synthetic photos carry each item's category, which its buyers
  # prefer. Seed 0: 0.493 in the first epoch, then 0.585, 0.625, 0.650, 0.638, 0.641 (the
  # bound holds by 0.04 and 0.11).
  assert history[-1]["pairwise_accuracy"] > 0.6 > history[0]["pairwise_accuracy"]
  rc = recommender_consts(exp, consts, state.params)
  assert ENCODER_CONSTS in rc and ENCODER_CONSTS not in consts
  photos = to_float(jnp.asarray(exp.data.images[:16]))
  mine = exp.models.recommender.encode(state.params, photos)
  np.testing.assert_allclose(np.asarray(rc["features"][:16]), mine, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(exp.models.features(rc, photos), mine, rtol=1e-5, atol=1e-6)
  assert rc["features"].shape == (exp.data.num_items, config.recommender.factors)
  with pytest.raises(KeyError, match="recommender_encoder"):
    exp.models.features(consts, photos)  # The backbone's consts alone cannot embed for it.
  # FGSM@8 crafted against DVBPR, through its CNN.
  spec = next(s for s in attack_specs(config) if s.condition == "fgsm@8")
  params = dict(exp.params, recommender=state.params)
  kw = dict(cache_dir=None, data=exp.data, mesh=exp.mesh, config=config,
            batch_size=int(config.attack.batch_size))
  adv, _ = cached_attack_catalogue(spec, models=exp.models, params=params, consts=rc, **kw)
  adv = np.asarray(adv)
  clean = np.asarray(exp.data.images)
  assert np.abs(adv.astype(np.int16) - clean.astype(np.int16)).max() <= 8
  assert np.mean(adv != clean) > 0.5
  enc = jax.jit(lambda x: exp.models.recommender.encode(state.params, to_float(x)))
  f_adv = np.concatenate([enc(adv[i:i + 64]) for i in range(0, len(adv), 64)])
  u, i = exp.data.train_users, exp.data.train_items
  theta = np.asarray(state.params["user_factors"])
  f_clean = np.asarray(rc["features"])
  x_clean = np.sum(theta[u] * f_clean[i], -1)
  x_adv = np.sum(theta[u] * f_adv[i], -1)
  assert x_adv.mean() < x_clean.mean()  # The attack lowers the buyers' scores (eq. 3).
  # Against VBPR's table and gradient, other photos.
  vbpr_exp = build(tiny_config(tfds_dir), str(tmp_path / "vbpr"))
  on_vbpr, _ = cached_attack_catalogue(spec, models=vbpr_exp.models,
                                       params=dict(vbpr_exp.params), consts=consts, **kw)
  assert np.mean(np.asarray(on_vbpr) != adv) > 0.1


@pytest.mark.slow
@pytest.mark.xdist_group("tiny_run")
def test_the_runs_dvbpr_attack_is_crafted_on_its_restored_cnn(tiny_run):
  config, workdir, results = tiny_run
  sub = families.recommender_dir(workdir, "dvbpr")
  exp = build(config, workdir)
  consts = make_consts(exp)
  ex = families.experiment_for(exp, "dvbpr", workdir)
  state, _, _ = rec_training.restore(ex, sub)
  rc = recommender_consts(ex, consts, state.params)
  spec = next(s for s in attack_specs(ex.config) if s.condition == "pgd@8")
  fresh, _ = cached_attack_catalogue(spec, cache_dir=None, models=ex.models,
                                     params=dict(exp.params, recommender=state.params),
                                     consts=rc, data=exp.data, mesh=exp.mesh,
                                     batch_size=int(config.attack.batch_size), config=ex.config)
  np.testing.assert_array_equal(np.asarray(fresh),
                                np.load(os.path.join(wd.attacks_dir(sub), "pgd@8.npy")))
  # No no-visual level: DVBPR's score is the photo's embedding alone.
  with open(wd.results_path(sub)) as f:
    assert not [k for k in json.load(f)["ranking"] if k.endswith("/no_visual")]
  training = results["recommenders"]["runs"]["dvbpr"]["training"]
  assert training["epochs"] == config.recommender.dvbpr_epochs == len(training["history"])


def test_amr_on_dvbpr_and_config_errors(tfds_dir):
  rc = _config(tfds_dir, **{"recommender.name": "amr_dvbpr"}).recommender
  rec = build_recommender(rc, num_users=4, num_items=5, feature_dim=3)
  assert rec.reads_images and rec.label == "AMR (DVBPR)"
  assert [(s.name, s.epochs) for s in rec.stages] == [("bpr", rc.dvbpr_epochs),
                                                       ("adversarial", rc.adv_epochs)]
  # The adversarial term on CNN embeddings: finite and it adds to the loss.
  params = rec.init(jax.random.key(0), 3)
  photos = jax.random.randint(jax.random.key(1), (5, 32, 32, 3), 0, 256).astype(jnp.uint8)
  batch = {"user": jnp.asarray([0, 1, 2, 3]), "pos": jnp.asarray([0, 1, 2, 3]),
           "neg": jnp.asarray([4, 3, 2, 1])}
  loss, metrics = rec_training.bpr_objective(params, batch, photos, recommender=rec,
                                             terms=rec.stages[1].terms)
  assert float(metrics["adversarial"]) > 0 and np.isfinite(float(loss))
  for field, value, match in (("dvbpr_channels", (4, 8), "five conv widths"),
                              ("dvbpr_input_size", 0, "positive integer"),
                              ("dvbpr_reg_cnn", -1.0, "finite number >= 0")):
    bad = _config(tfds_dir, **{f"recommender.{field}": value})
    with pytest.raises(ConfigError, match=rf"config.recommender.{field}="):
      configuration.validate(bad)
