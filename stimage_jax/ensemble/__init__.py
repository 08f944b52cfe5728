"""Ensembles of NB models: stacked members, their training and the saved model.

Ensemble moments and the NB-mixture interval live on the JAX-free side
(:mod:`export.runtime.moments`), the one implementation every runtime uses.
"""

__all__: list[str] = []
