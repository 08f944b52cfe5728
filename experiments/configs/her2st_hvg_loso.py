"""(b) Top-50 HVGs (chosen per fold on its training sections), leave one C section out,
EfficientNet-Lite0 features: the core comparison, sized for < 30 min on 2 cores."""

from experiments.configs.her2st_markers import CONFIG as MARKERS

CONFIG = {**MARKERS, "genes": "top-hvg:50"}
