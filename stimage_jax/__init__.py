"""stimage-jax: spatial gene expression from H&E with negative-binomial ensembles."""

__version__ = "0.1.0"
