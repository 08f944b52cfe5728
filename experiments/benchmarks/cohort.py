"""Cohort prediction throughput (issue 16): one JSON line.

Slides are whole HER2ST C-section H&E images (read at 1/4 resolution, written as tiled
pyramidal TIFFs with 2 µm/px in the tags); the model is an EfficientNet-Lite0 NB ensemble of
3 members (randomly initialised: the weights do not change the speed), exported to
ONNX, 224 px tiles of 100 µm. Runs, each into a fresh output folder:

- ``single``: the single-slide pipeline (``predict_slide`` in this process, one session with
  all cores), slide after slide — the reference;
- ``workers1``, ``workers2``: ``predict_cohort(workers=N)`` (N spawned processes, cores / N
  intra-op threads each);
- ``dask_local2``: a 2-worker ``LocalCluster``;
- ``rerun``: ``workers2`` again on its finished folder (everything skipped by fingerprint).

Per run: wall seconds (worker start-up included), slides/hour, tiles/s, ``ratio`` = tiles/s
over the single-slide pipeline's (the ideal on these 2 cores is 1.0: the single pipeline
already uses both cores through onnxruntime's threads), peak RSS per worker (MiB). CPU flags
(avx512/vnni/amx) from /proc/cpuinfo.

Usage: python experiments/benchmarks/cohort.py [--slides 4] [--tile-px 224] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import cpu_flags  # noqa: E402  (this directory is on sys.path)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))




def make_model(path: Path, tile_px: int) -> Path:
    """EfficientNet-Lite0 + NB head, exported (JAX is used here only, never by the cohort runs)."""
    from flax import nnx

    from export.to_onnx import export_onnx
    from stimage_jax import __version__
    from stimage_jax.ensemble.model import EnsembleModel
    from stimage_jax.features.registry import create_backbone
    from stimage_jax.nb.head import NBHead

    bb = create_backbone("efficientnet_lite0", rngs=nnx.Rngs(0))
    genes = 14
    heads = [NBHead(bb.num_features, genes, rngs=nnx.Rngs(1 + i)) for i in range(3)]
    for h in heads:
        h.eval()
    cfg = {"genes": [f"G{i}" for i in range(genes)], "tile_um": 100.0, "tile_px": tile_px,
           "backbone": "efficientnet_lite0", "members": 3, "fine_tune": False, "version": __version__,
           "training_samples": [], "nb_parameterisation": "mean-dispersion (log link): var = mu + mu^2/r",
           "train": {"loss": "nb"}, "num_features": bb.num_features,
           "sources": [{"name": "efficientnet_lite0", "kind": "backbone", "backbone": "efficientnet_lite0",
                        "num_features": bb.num_features}],
           "member_sources": ["efficientnet_lite0"] * 3}
    return export_onnx(EnsembleModel(cfg, {"efficientnet_lite0": bb}, heads), path)


def make_slides(shared: Path, d: Path, n: int) -> Path:
    import cv2
    import tifffile

    files = sorted(glob.glob(str(shared / "data" / "her2st" / "data" / "ST-imgs" / "C" / "C*" / "*.jpg")))
    (d / "slides").mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,path"]
    kw = dict(tile=(256, 256), photometric="rgb", compression="zlib", metadata=None)
    for i in range(n):
        img = np.ascontiguousarray(cv2.imread(files[i % len(files)], cv2.IMREAD_REDUCED_COLOR_4)[:, :, ::-1])
        p = d / "slides" / f"slide{i}.tif"
        with tifffile.TiffWriter(p) as tw:
            tw.write(img, subifds=1, resolution=(1e4 / 2.0, 1e4 / 2.0), resolutionunit="CENTIMETER", **kw)
            tw.write(np.ascontiguousarray(img[::4, ::4]), subfiletype=1, **kw)
        rows.append(f"slide{i},slides/slide{i}.tif")
    (d / "slides.csv").write_text("\n".join(rows) + "\n")
    return d / "slides.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--tile-px", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workdir", help="keep slides and model here (reused when present)")
    a = ap.parse_args()
    shared = Path(os.environ.get("STIMAGE_SHARED", "../shared"))
    d = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="cohort_bench_"))
    d.mkdir(parents=True, exist_ok=True)
    model = d / f"eff{a.tile_px}.onnx"
    if not model.exists():  # exported in a child process, so this one (which runs workers1 itself) holds no JAX
        import subprocess

        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import cohort; "
                        f"cohort.make_model(__import__('pathlib').Path({str(model)!r}), {a.tile_px})"], check=True)
    table = d / "slides.csv" if (d / "slides.csv").exists() and \
        len((d / "slides.csv").read_text().split()) == a.slides + 1 else make_slides(shared, d, a.slides)

    from data_pipelines.wsi import open_slide
    from export.cohort import predict_cohort, read_slide_table
    from export.cohort.worker import load_predictor
    from export.runtime.prediction import predict_slide

    out: dict = {"benchmark": "cohort", **cpu_flags(), "slides": a.slides, "tile_px": a.tile_px,
                 "model": "efficientnet_lite0 x3 members, 14 genes (ONNX)", "runs": {}}
    # the single-slide pipeline, one process, all cores
    t0 = time.perf_counter()
    m = load_predictor(str(model), os.cpu_count())
    tiles = 0
    for r in read_slide_table(table):
        tiles += predict_slide(open_slide(r["path"]), m, batch_size=a.batch, progress=False).n_obs
    single = time.perf_counter() - t0
    out["tiles"] = tiles
    out["runs"]["single"] = {"seconds": round(single, 1), "tiles_s": round(tiles / single, 2),
                             "slides_h": round(a.slides / single * 3600, 1)}

    def run(name, folder, **kw):
        t = time.perf_counter()
        r = predict_cohort(str(model), table, folder, batch_size=a.batch, progress=False, **kw)
        s = time.perf_counter() - t
        assert r["failed"] == 0, r
        rss = {}
        for v in r["results"].values():
            if "pid" in v:
                rss[v["pid"]] = max(rss.get(v["pid"], 0.0), v.get("peak_rss_mib", 0.0))
        out["runs"][name] = {"seconds": round(s, 2), "tiles_s": round(tiles / s, 2),
                             "slides_h": round(a.slides / s * 3600, 1), "ratio": round(single / s, 3),
                             "skipped": r["skipped"], "peak_rss_mib_per_worker": sorted(rss.values())}

    for name, kw in (("workers1", {"workers": 1}), ("workers2", {"workers": 2}), ("dask_local2", {"dask_local": 2})):
        shutil.rmtree(d / name, ignore_errors=True)
        run(name, d / name, **kw)
    run("rerun", d / "workers2", workers=2)
    out["rerun_fraction_of_first"] = round(out["runs"]["rerun"]["seconds"] / out["runs"]["workers2"]["seconds"], 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
