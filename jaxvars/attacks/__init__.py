"""Adversarial attacks on item photos.

* :mod:`jaxvars.attacks.linf`: FGSM and PGD in the L-inf ball (Goodfellow et al. 2015;
  Madry et al. 2018) for any ``loss_fn(images) -> scalar``, clipped to [0, 1] and
  quantised to 8 bits.
* :mod:`jaxvars.attacks.cw`: Carlini & Wagner's L2 attack (2017) with its binary search over
  c, for any per-image ``loss_fn``; opt-in (method ``'cw'``).
* :mod:`jaxvars.attacks.objectives`: what the attacker maximises (registry; ``bpr`` is the
  paper's untargeted eq. 3, ``feature`` the embedding-disruption objective).
* :mod:`jaxvars.attacks.spec`: an attack built from the config (method, objective, eps,
  the PGD step rule, C&W's settings).
* :mod:`jaxvars.attacks.catalogue`: attacking every photo of a catalogue, cached on disk.
"""

from jaxvars.attacks.cw import cw_l2
from jaxvars.attacks.linf import fgsm, pgd, project_linf, quantize_8bit

__all__ = ["cw_l2", "fgsm", "pgd", "project_linf", "quantize_8bit"]
