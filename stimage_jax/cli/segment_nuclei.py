"""``stimage segment-nuclei --image TILE --out INSTANCES.png [--mpp 0.25] [--nuclei cellpose
--cellpose-model M.pt]``: a nucleus segmenter on one image — the classical one (colour
deconvolution, Otsu, local contrast, watershed) or a cellpose 3 model file
(``export.runtime.segmenters``).

Writes a single-channel integer instance map (0 = background, 1..N nuclei): a 16-bit PNG
or TIFF, or ``.npy`` (int32) when N exceeds 65,535 or the name asks for it.
"""

from __future__ import annotations

from pathlib import Path

from data_pipelines.errors import StimageError
from export.runtime.segmenters import add_nuclei_options
from stimage_jax.cli.common import add_overwrite, positive_float


def add_parser(sub, parents) -> None:
    s = sub.add_parser("segment-nuclei", parents=list(parents),
                       help="segment the nuclei of an H&E image into an instance map (classical or cellpose)")
    s.add_argument("--image", required=True, help="H&E image (PNG, JPEG, TIFF)")
    s.add_argument("--out", required=True, help="instance map: .png (16-bit), .tif or .npy")
    s.add_argument("--mpp", type=positive_float, help="µm per pixel of the image (default 0.25, 40x)")
    add_nuclei_options(s)
    add_overwrite(s)
    s.set_defaults(func=run)


def run(a) -> None:
    import numpy as np

    from data_pipelines.cell_patches import write_instances
    from data_pipelines.io import atomic_path, check_distinct, check_writable
    from data_pipelines.tiles import load_image
    from export.runtime.segmenters import segmenter_from_args
    from stimage_jax.cells.outputs import prediction_paths

    out = prediction_paths(a.out)[0]  # checks the suffix
    check_writable(out, a.overwrite)
    check_distinct(out, a.image)
    if not Path(a.image).is_file():
        raise StimageError(f"image {a.image} not found")
    segment = segmenter_from_args(a)  # a bad or missing model file stops here, before any work
    labels = segment(load_image(a.image), a.mpp)
    n = int(labels.max(initial=0))
    if n > 65535 and out.suffix.lower() != ".npy":
        raise StimageError(f"{n} nuclei do not fit a 16-bit image: write --out as .npy")
    with atomic_path(out, overwrite=a.overwrite) as tmp:
        write_instances(tmp, labels)
    areas = np.bincount(labels.ravel())[1:]
    print(f"{n} nuclei (median area {float(np.median(areas)) if n else 0:.0f} px) -> {out}")
