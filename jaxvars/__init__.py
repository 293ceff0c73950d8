"""jaxvars: train, attack and defend visually-aware recommender systems in JAX.

Reading order (see :mod:`jaxvars.experiment`): ``main`` (the command line) -> ``run`` /
``run_pretrain`` (a whole run) -> ``experiment`` (everything built from the config, checked by
``configuration``) -> ``training`` / ``evaluation`` / ``ablations`` / ``report`` -> the
components, each package with its registry: ``backbones``, ``recommenders``, ``attacks``,
``defenses``, and ``data``.
"""

__version__ = "0.1.0"
