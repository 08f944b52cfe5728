"""Classical nucleus segmentation: moved to :mod:`export.runtime.nuclei` (NumPy/SciPy/
scikit-image only), so the JAX-free viewer and explainer can use it; this path still works."""

from export.runtime.nuclei import DEFAULT_MPP, NucleiParams, haematoxylin, segment_nuclei

__all__ = ["NucleiParams", "DEFAULT_MPP", "haematoxylin", "segment_nuclei"]
