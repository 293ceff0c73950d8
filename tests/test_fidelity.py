"""PSNR and SSIM against numpy / scikit-image references."""

import numpy as np
import pytest

from jaxvars.evaluation.fidelity import psnr, ssim


def _pair(seed=0, shape=(3, 32, 24, 3), noise=0.05):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:shape[1], 0:shape[2]] / max(shape[1:3])
  base = np.stack([np.stack([rng.random() * yy + rng.random() * xx + 0.1 * rng.random()] * 3,
                            -1) for _ in range(shape[0])])
  base = np.clip(base[..., :shape[3]], 0, 1)
  return base.astype(np.float32), np.clip(base + rng.normal(0, noise, base.shape), 0, 1
                                          ).astype(np.float32)


def test_psnr_matches_its_definition():
  a, b = _pair()
  want = [10 * np.log10(1 / np.mean((x - y) ** 2)) for x, y in zip(a, b)]
  np.testing.assert_allclose(psnr(a, b), want, rtol=1e-5)
  assert float(psnr(a, a)[0]) == 100.0


def test_ssim_matches_scikit_image():
  from conftest import import_reference
  metrics = import_reference("skimage.metrics")  # Fails, not skips, under CI.
  for seed, noise in ((0, 0.02), (1, 0.1), (2, 0.3)):
    a, b = _pair(seed, noise=noise)
    want = [metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=1.0,
                                          channel_axis=-1) for x, y in zip(a, b)]
    np.testing.assert_allclose(ssim(a, b), want, rtol=1e-4, atol=1e-5)


def test_ssim_bounds():
  a, b = _pair(noise=0.2)
  np.testing.assert_allclose(ssim(a, a), 1.0, rtol=1e-5)
  assert np.all(np.asarray(ssim(a, b)) < 0.99)
  with pytest.raises(ValueError, match="at least 11x11"):
    ssim(a[:, :8, :8], b[:, :8, :8])
