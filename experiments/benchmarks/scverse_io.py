"""What scverse-ready outputs cost on one real HER2ST section (C6, 9,288 x 9,907 px JPEG, 178 spots).

Prints one JSON line: write time and file size of the .h5ad without and with the scverse
images (hires ≤ 2,000 px + lowres ≤ 600 px), the SpatialData .zarr at full resolution
(5-level pyramid) and with a 2,000 px image, read-back times, and the CPU flags.

    python experiments/benchmarks/scverse_io.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from _common import cpu_flags as _cpu  # noqa: E402  (this directory is on sys.path)




def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=os.environ.get("STIMAGE_SHARED", str(Path(__file__).resolve().parents[3] / "shared")))
    a = ap.parse_args()
    warnings.simplefilter("ignore")
    from data_pipelines.io import write_h5ad
    from data_pipelines.slides import read_her2st
    from data_pipelines.slides.h5ad import read_anndata
    from data_pipelines.spatialdata_io import write_spatialdata

    adata = read_her2st(Path(a.shared) / "data" / "her2st", "C6", require_image=True)
    out: dict = {"section": "C6", "spots": adata.n_obs, "genes": adata.n_vars}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        adata.write_h5ad(tmp / "plain.h5ad", compression="gzip")  # what the project wrote before
        out["h5ad_plain_s"] = round(time.perf_counter() - t, 2)
        out["h5ad_plain_mb"] = round(_size(tmp / "plain.h5ad") / 1e6, 2)
        t = time.perf_counter()
        write_h5ad(adata, tmp / "scverse.h5ad")
        out["h5ad_scverse_s"] = round(time.perf_counter() - t, 2)
        out["h5ad_scverse_mb"] = round(_size(tmp / "scverse.h5ad") / 1e6, 2)
        t = time.perf_counter()
        read_anndata(tmp / "scverse.h5ad")
        out["h5ad_scverse_read_s"] = round(time.perf_counter() - t, 2)
        again = read_anndata(tmp / "scverse.h5ad")
        t = time.perf_counter()
        write_h5ad(again, tmp / "rewrite.h5ad")  # images already there: nothing decoded
        out["h5ad_rewrite_s"] = round(time.perf_counter() - t, 2)
        for name, px in (("zarr_full", None), ("zarr_2000px", 2000)):
            t = time.perf_counter()
            write_spatialdata(adata, tmp / f"{name}.zarr", max_image_px=px)
            out[f"{name}_write_s"] = round(time.perf_counter() - t, 2)
            out[f"{name}_mb"] = round(_size(tmp / f"{name}.zarr") / 1e6, 1)
            t = time.perf_counter()
            read_anndata(tmp / f"{name}.zarr")
            out[f"{name}_read_s"] = round(time.perf_counter() - t, 2)
        out["jpeg_mb"] = round(Path(adata.uns["spatial"]["C6"]["metadata"]["image_path"]).stat().st_size / 1e6, 2)
    out.update(_cpu())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
