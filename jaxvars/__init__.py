"""jaxvars: train, attack and defend visually-aware recommender systems in JAX.

Layers (data flows one way; no module imports from a layer above it):
``data -> models -> losses -> steps -> train/evaluate -> main``.
"""

__version__ = "0.1.0"
