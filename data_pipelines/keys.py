"""Every AnnData key stimage reads or writes, defined once.

Follows scanpy/squidpy conventions where they exist (``obsm["spatial"]``,
``uns["spatial"][library_id]["scalefactors"]``, ``obs["array_row"]``). Lives in the
NumPy-only package so the ONNX runtime writes exactly the same keys as the JAX path.
"""

from __future__ import annotations

__all__ = [
    "SAMPLE", "ARRAY_ROW", "ARRAY_COL", "SPATIAL", "SPATIAL_UNS", "STIMAGE_UNS",
    "MPP", "SPOT_DIAMETER_UM", "IMAGE_PATH", "LABEL", "TILE_BORDER_FRAC", "TISSUE_COVERAGE",
    "VAR_ALEATORIC", "VAR_EPISTEMIC", "Q_LO", "Q_HI", "MEMBER_MEAN", "MEMBER_MU", "MEMBER_R", "P_HIGH",
    "SPOT_DIAMETER_FULLRES", "IMAGE_SCALE", "IMAGE_BASE", "IMAGES", "HIRES_SCALEF", "LOWRES_SCALEF", "LIBRARY_ID", "PLATFORM", "DROPPED", "PREDICTION",
]

# obs
SAMPLE = "sample"                    # sample / section id, str
ARRAY_ROW = "array_row"              # spot grid row (int)
ARRAY_COL = "array_col"              # spot grid column (int)
LABEL = "pathologist_label"          # HER2ST pathologist annotation, when present
TILE_BORDER_FRAC = "tile_border_frac"  # fraction of a spot tile that lay outside the image (padded)
TISSUE_COVERAGE = "tissue_coverage"  # fraction (0..1) of a spot's / grid tile's square that is tissue

# obsm
SPATIAL = "spatial"                  # full-resolution image pixel (x, y), float

# uns
SPATIAL_UNS = "spatial"              # uns["spatial"][library_id] = {"scalefactors":..., "metadata":...}
SPOT_DIAMETER_FULLRES = "spot_diameter_fullres"
IMAGE_PATH = "image_path"            # uns["spatial"][lib]["metadata"]["image_path"]; relative to the file
IMAGE_BASE = "image_base"            # ... or, when this says "image_root", to $STIMAGE_IMAGE_ROOT (--image-root)
IMAGES = "images"                    # uns["spatial"][lib]["images"]: {"hires", "lowres"} RGB uint8 (scanpy/squidpy)
HIRES_SCALEF = "tissue_hires_scalef"  # scalefactors: hires image px per full-resolution px
LOWRES_SCALEF = "tissue_lowres_scalef"  # scalefactors: lowres image px per full-resolution px
STIMAGE_UNS = "stimage"              # uns["stimage"]: mpp, spot_diameter_um, provenance
MPP = "mpp"                          # µm per full-resolution pixel
SPOT_DIAMETER_UM = "spot_diameter_um"
IMAGE_SCALE = "image_scale"          # image-file px per full-resolution px (1.0, or tissue_hires_scalef)
LIBRARY_ID = "library_id"            # the key of this sample in uns["spatial"]
PLATFORM = "platform"                # "legacy_st", "visium", ...
DROPPED = "dropped"                  # {reason: number of spots dropped while reading}
PREDICTION = "prediction"            # uns["stimage"]["prediction"]: provenance of a prediction

# layers written by prediction
VAR_ALEATORIC = "var_aleatoric"      # mean over members of NB variance
VAR_EPISTEMIC = "var_epistemic"      # variance over members of NB mean
Q_LO = "q_lo"
Q_HI = "q_hi"
MEMBER_MEAN = "member_mean"          # obsm: (n_spots, members, genes), optional
MEMBER_MU = "nb_member_mu"           # obsm: (n_spots, members, genes) members' NB means
MEMBER_R = "nb_member_r"             # obsm: (n_spots, members, genes) members' NB dispersions
P_HIGH = "p_high"                    # layers: probability of high expression (classification model)
