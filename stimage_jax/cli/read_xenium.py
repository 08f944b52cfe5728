"""``stimage read xenium DIR --he HE.tif --out cells.h5ad``: Xenium cells typed by marker
panel, registered onto the H&E; the type table ``stimage cells train`` reads; pseudo-spots.

Options are added to the ``read`` parser (``--he`` etc. are ignored by the other formats).
"""

from __future__ import annotations

from pathlib import Path

from data_pipelines.errors import StimageError
from stimage_jax.cli.common import positive_float, quiet


def add_arguments(r) -> None:
    g = r.add_argument_group("xenium")
    g.add_argument("--he", help="xenium: the H&E image of the same section (WSI, TIFF or PNG)")
    g.add_argument("--he-mpp", type=positive_float, help="xenium: µm per H&E pixel (default: the image's metadata)")
    g.add_argument("--markers", help="xenium: JSON {class: [genes]} replacing the default marker panel")
    g.add_argument("--min-counts", type=int, default=10, help="xenium: cells with fewer transcripts stay unknown")
    g.add_argument("--types-out", help="xenium: x,y,type CSV for `stimage cells train` "
                                       "(default: <H&E stem>_types.csv beside --out)")
    g.add_argument("--pseudo-spots", type=positive_float, metavar="UM",
                   help="xenium: also sum cells into Visium-like spots of UM µm (100/55 of it apart) "
                        "-> <out stem>_spots.h5ad")


def run(a) -> None:
    from data_pipelines.io import atomic_path, check_writable, write_h5ad
    from data_pipelines.slides.xenium import pseudo_spots, read_markers, read_xenium, type_table

    if not a.he:
        raise StimageError("read xenium needs --he, the H&E image of the section")
    out = Path(a.out)
    if out.suffix != ".h5ad":
        raise StimageError(f"read xenium writes cells to a .h5ad file, got --out {out}")
    types_out = Path(a.types_out) if a.types_out else out.parent / f"{Path(a.he).stem}_types.csv"
    spots_out = out.with_name(f"{out.stem}_spots.h5ad") if a.pseudo_spots else None
    targets = [p for p in (out, types_out, spots_out) if p is not None]
    if len({t.resolve() for t in targets}) < len(targets):
        raise StimageError(f"read xenium: the outputs {', '.join(map(str, targets))} must be different files")
    for t in targets:  # refuse before reading anything
        check_writable(t, a.overwrite, inputs=[a.path, a.he])
    markers = read_markers(a.markers)
    say = (lambda msg: None) if quiet(a) else (lambda msg: print(f"[xenium] {msg}", flush=True))
    cells = read_xenium(a.path, a.he, he_mpp=a.he_mpp, markers=markers, min_counts=a.min_counts, progress=say)
    spots = pseudo_spots(cells, spot_um=a.pseudo_spots, he_path=a.he) if a.pseudo_spots else None
    table = type_table(cells)
    write_h5ad(cells, out, overwrite=a.overwrite)
    with atomic_path(types_out) as tmp:
        table.to_csv(tmp, index=False)
    counts = cells.obs["cell_type"].astype(str).value_counts().to_dict()
    print(f"{cells.n_obs} cells x {cells.n_vars} genes -> {out}; types {counts}")
    print(f"{len(table)} typed cells on the H&E -> {types_out}")
    if spots is not None:
        write_h5ad(spots, spots_out, overwrite=a.overwrite)
        print(f"{spots.n_obs} pseudo-spots of {a.pseudo_spots:g} µm -> {spots_out}")
