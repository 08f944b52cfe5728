"""Serving an exported ensemble over the Open Inference Protocol (no JAX): the Triton model
repository (:mod:`.repo`), the repository loader (:mod:`.model`) and the server (:mod:`.server`)."""
