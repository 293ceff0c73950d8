"""Adversarial attacks on item images, as pure functions of a ``loss_fn(images) -> scalar``.

* :mod:`jaxvars.attacks.linf`: FGSM and PGD in the L-inf ball (Goodfellow et al. 2015;
  Madry et al. 2018), results clipped to [0, 1] and quantised to 8 bits.
* :mod:`jaxvars.attacks.objectives`: the untargeted VARS objective of the paper (eq. 3):
  the BPR loss of the training triplets an item takes part in.
"""

from jaxvars.attacks.linf import fgsm, pgd, project_linf, quantize_8bit

__all__ = ["fgsm", "pgd", "project_linf", "quantize_8bit"]
