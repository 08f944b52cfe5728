"""Cells in H&E: classical nucleus segmentation (``nuclei``), HoVer-Net's instance
metrics (``instance_metrics``) and post-processing, and the HoVer-Net-style network
(``hovernet``, ``train``: JAX/Flax). The names imported here (segmentation and metrics)
are NumPy/SciPy/scikit-image only; the network modules import JAX when used.
"""

from stimage_jax.cells.instance_metrics import (aji, aji_plus, centroids, dice, f1_detection, instance_stats,
                                                pair_coordinates, panoptic_quality, per_class_f1, remap_label)
from stimage_jax.cells.nuclei import NucleiParams, haematoxylin, segment_nuclei

__all__ = ["dice", "aji", "aji_plus", "panoptic_quality", "f1_detection", "per_class_f1", "instance_stats",
           "pair_coordinates", "centroids", "remap_label", "NucleiParams", "haematoxylin", "segment_nuclei"]
