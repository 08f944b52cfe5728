"""Negative-binomial distribution maths and the NB regression head."""

from stimage_jax.nb.distribution import (
    LOG_MU_RANGE, LOG_R_RANGE, nb_logpmf, nb_mean_var, nb_nll, params_from_logits,
    to_total_count_probs,
)

__all__ = [
    "LOG_MU_RANGE", "LOG_R_RANGE", "nb_logpmf", "nb_mean_var", "nb_nll",
    "params_from_logits", "to_total_count_probs",
]
