"""Adversarial attacks on item photos.

* :mod:`jaxvars.attacks.linf`: FGSM and PGD in the L-inf ball (Goodfellow et al. 2015;
  Madry et al. 2018) for any ``loss_fn(images) -> scalar``, clipped to [0, 1] and
  quantised to 8 bits.
* :mod:`jaxvars.attacks.objectives`: what the attacker maximises (registry; ``bpr`` is the
  paper's untargeted eq. 3, ``feature`` the embedding-disruption objective).
* :mod:`jaxvars.attacks.spec`: an attack built from the config (method, objective, eps,
  the PGD step rule).
* :mod:`jaxvars.attacks.catalogue`: attacking every photo of a catalogue, cached on disk.
"""

from jaxvars.attacks.linf import fgsm, pgd, project_linf, quantize_8bit

__all__ = ["fgsm", "pgd", "project_linf", "quantize_8bit"]
