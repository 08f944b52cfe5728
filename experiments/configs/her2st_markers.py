"""(a) The paper's 14-marker model on HER2ST: leave one C section out, EfficientNet-Lite0
features, 5-member NB ensemble against its single member, HEST ridge and an MSE head."""

from stimage_jax.ensemble.train import TrainConfig

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]

CONFIG = dict(
    sections=SECTIONS,
    methods=("stimage", "stimage_single", "ridge", "mse"),
    genes="markers",
    backbone="efficientnet_lite0",
    members=5,
    config=TrainConfig(lr=1e-4, max_epochs=200, patience=10),
    tile_um=100.0,
    tile_px=299,
    min_coverage=0.7,
)


def get_config():
    """The same model for ``stimage train --config experiments/configs/her2st_markers.py``
    (big_vision style; options on the command line override it)."""
    from stimage_jax.config import RunConfig

    return RunConfig(genes=CONFIG["genes"], members=CONFIG["members"], train=CONFIG["config"]).override(
        backbone=CONFIG["backbone"], tile_um=CONFIG["tile_um"], tile_px=CONFIG["tile_px"],
        min_coverage=CONFIG["min_coverage"])
