"""Linear-probe accuracy of frozen backbone features on the item categories (what a
backbone buys; used by self-supervised pretraining and the backbone comparison)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def linear_probe(features: np.ndarray, labels: np.ndarray, *, seed: int = 0,
                 min_per_class: int = 5, test_fraction: float = 0.2, steps: int = 500,
                 lr: float = 0.05, l2: float = 1e-4) -> dict:
  """Accuracy of a softmax-regression probe on frozen features, on a held-out split.

  Items with an empty label, or whose class has fewer than ``min_per_class`` labelled
  items, are left out. The split is a seeded random permutation; features are
  standardised with the training split's statistics; the probe is trained full-batch
  with Adam for ``steps`` steps (L2 weight ``l2``).

  Args:
    features: float [N, F]. labels: str [N] ('' = unlabelled).

  Returns:
    {'accuracy', 'majority_accuracy' (always predicting the most frequent training class),
     'classes', 'train_items', 'test_items'}.
  """
  labels = np.asarray(labels)
  names, counts = np.unique(labels[labels != ""], return_counts=True)
  keep_names = names[counts >= min_per_class]
  keep = np.isin(labels, keep_names)
  x, y = np.asarray(features, np.float32)[keep], np.searchsorted(keep_names, labels[keep])
  order = np.random.default_rng(seed).permutation(len(y))
  n_test = max(1, int(round(len(y) * test_fraction)))
  test, train_ = order[:n_test], order[n_test:]
  mean, std = x[train_].mean(0), x[train_].std(0) + 1e-6
  xtr, xte = (x[train_] - mean) / std, (x[test] - mean) / std
  num_classes = len(keep_names)
  tx = optax.adam(lr)
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros(num_classes)}

  def loss(p):
    logits = xtr @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[train_]).mean()
    return ce + l2 * jnp.sum(p["w"] ** 2)

  def body(carry, _):
    p, s = carry
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  pred = np.asarray(jnp.argmax(xte @ params["w"] + params["b"], axis=-1))
  majority = np.bincount(y[train_], minlength=num_classes).argmax()
  return {"accuracy": float(np.mean(pred == y[test])),
          "majority_accuracy": float(np.mean(y[test] == majority)),
          "classes": int(num_classes), "train_items": int(len(train_)),
          "test_items": int(len(test))}
