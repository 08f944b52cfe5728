"""Ensembles of NB models and their moments."""

from stimage_jax.ensemble.moments import ensemble_moments

__all__ = ["ensemble_moments"]
