"""The pristine inputs every fuzz case starts from, built once: a tiny synthetic study
(three 16-spot samples with their PNG images), a tiny trained model (``--backbone tiny
--tile-px 32 --max-epochs 2``) and its ONNX export, a prediction, a small pyramidal TIFF
slide, H&E tiles, a nucleus folder (image, instance map, MoNuSeg XML, type table), a tiny
cell model, a HER2ST-layout root and a Space Ranger folder.

Built through the public command line (``stimage train``/``export-onnx``/``predict``/
``cells train``) so the fixtures are what a user would have. Nothing here is mutated:
cases copy what they corrupt.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np

__all__ = ["TINY_TRAIN", "World", "build_world"]

ROOT = Path(__file__).resolve().parents[2]
TINY_TRAIN = ["--backbone", "tiny", "--tile-px", "32", "--max-epochs", "2", "--patience", "2", "--members", "1",
              "--genes", "A,B,C", "--lr", "1e-2"]
CELLS_TINY = ["--backbone", "tiny", "--patch-size", "64", "--stride", "64", "--batch-size", "2", "--steps", "1",
              "--checkpoint-every", "1", "--augment", "none"]


def _load(rel: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclasses.dataclass
class World:
    root: Path
    study: list[Path]          # s0, s1, s2 .h5ad (images s0.png ... beside them)
    images: list[Path]
    wd: Path                   # trained tiny workdir (s0 train, s1 validation)
    onnx: Path
    pred: Path                 # prediction of s2 (ONNX runtime)
    pred_jax: Path             # prediction of s2 (the JAX model): the reference for corrupted models
    slide_tif: Path            # 256x256 pyramidal TIFF, mpp 1.0, a tissue disc
    slide_png: Path            # the same picture as PNG (needs --mpp)
    tile: Path                 # 32x32 tile
    he: Path                   # 96x96 synthetic nuclei (H&E-like)
    cells: Path                # folder: t0.png, t0_instances.png, t0.xml, t0_types.csv
    cell_pred: Path            # p.png (the same nuclei as an instance map) and p_types.csv (id, x, y, type)
    cell_wd: Path | None       # tiny cell model workdir
    her2st: Path               # HER2ST-layout root with sections Z1, Z2
    clinical: Path             # expr.csv, expr.h5ad, bulk.csv, clinical.csv (20 samples), slides.csv
    visium: Path               # Space Ranger folder (new format)
    spot: str                  # an obs name of s2

    def data(self, k: int = 2) -> Path:
        return self.study[k]


def _cli(argv: list[str]) -> None:
    from stimage_jax.cli import main

    code = main([str(a) for a in argv])
    if code != 0:
        raise RuntimeError(f"building the fuzz fixtures: stimage {' '.join(map(str, argv))} exited {code}")


def _synth_nuclei(size: int, seed: int, n: int):
    import cv2

    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    placed = []
    for _ in range(2000):
        c, r = rng.uniform(8, size - 8, 2), rng.uniform(4, 7)
        if all(np.hypot(*(c - c2)) >= 1.1 * (r + r2) for c2, r2 in placed):
            placed.append((c, r))
            cv2.circle(inst, (round(c[0]), round(c[1])), round(r), len(placed), -1)
        if len(placed) == n:
            break
    rgb = np.full((size, size, 3), (230, 180, 210), np.float64)
    rgb[inst > 0] = (70, 35, 120)
    rgb = np.clip(rgb + rng.normal(0, 6, rgb.shape), 0, 255).astype(np.uint8)
    return rgb, inst, placed


def _write_rgb(path: Path, rgb: np.ndarray) -> Path:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


def _visium(root: Path, write_10x_h5) -> Path:
    import cv2
    import pandas as pd

    (root / "spatial").mkdir(parents=True)
    barcodes = ["A-1", "B-1", "C-1"]
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", np.array([[1, 0, 5], [2, 3, 0], [0, 4, 7]]),
                 barcodes, ["GA", "GB", "GC"])
    pos = pd.DataFrame({"barcode": ["C-1", "B-1", "A-1"], "in_tissue": [1, 1, 1],
                        "array_row": [0, 1, 2], "array_col": [0, 2, 4],
                        "pxl_row_in_fullres": [60, 100, 150], "pxl_col_in_fullres": [60, 200, 100]})
    pos.to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 40.0, "tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1}))
    full = np.full((300, 400, 3), 230, np.uint8)
    full[90:110, 190:210] = (0, 0, 255)
    _write_rgb(root / "spatial" / "tissue_hires_image.png", cv2.resize(full, (200, 150), interpolation=cv2.INTER_AREA))
    return root


HER2ST_SPOTS = {"1x1": (1.02, 0.98), "1x2": (0.98, 2.02), "1x3": (1.0, 3.0), "2x2": (2.0, 2.0), "2x3": (2.01, 2.99)}


def _her2st(root: Path, sections=("Z1", "Z2")) -> Path:
    """A clean HER2ST-layout root (it reads without a warning): 5 spots x 3 genes per section,
    pixel = 100 + 50 * array coordinate (mpp 4), a 300x300 image, pathologist labels."""
    import pandas as pd

    data = root / "data"
    for d in ("ST-cnts", "ST-spotfiles", "ST-pat/lbl"):
        (data / d).mkdir(parents=True, exist_ok=True)
    for sec in sections:
        counts = np.arange(len(HER2ST_SPOTS) * 3).reshape(-1, 3) % 7 + 1
        with gzip.open(data / "ST-cnts" / f"{sec}.tsv.gz", "wt") as f:
            f.write("\tG1\tG2\tG3\n")
            for s, row in zip(HER2ST_SPOTS, counts):
                f.write("\t".join([s, *map(str, row)]) + "\n")
        sel = pd.DataFrame([(int(s.split("x")[0]), int(s.split("x")[1]), nx, ny, 100 + 50 * nx, 100 + 50 * ny, 1)
                            for s, (nx, ny) in HER2ST_SPOTS.items()],
                           columns=["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"])
        sel.to_csv(data / "ST-spotfiles" / f"{sec}_selection.tsv", sep="\t", index=False)
        img = np.full((300, 300, 3), 235, np.uint8)
        img[120:260, 120:240] = (200, 120, 170)
        _write_rgb(data / "ST-imgs" / sec[0] / sec / "he.jpg", img)
        lab = pd.DataFrame({"Row.names": list(HER2ST_SPOTS), "x": [v[0] for v in HER2ST_SPOTS.values()],
                            "y": [v[1] for v in HER2ST_SPOTS.values()], "pixel_x": 0, "pixel_y": 0,
                            "label": ["invasive cancer", "stroma", "invasive cancer", "stroma", "stroma"]})
        lab.to_csv(data / "ST-pat" / "lbl" / f"{sec}_labeled_coordinates.tsv", sep="\t", index=False)
    return root


def _clinical(root: Path, slide: Path) -> Path:
    """Tables for ``stimage clinical`` (20 samples x 5 genes; survival and a balanced response)
    and a ``cohort predict`` slide table naming ``slide`` twice."""
    import anndata as ad
    import pandas as pd

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"P{i:02d}" for i in range(20)]
    genes = ["A", "B", "C", "D", "E"]
    expr = pd.DataFrame(rng.gamma(2.0, 3.0, (20, 5)), index=pd.Index(ids, name="sample"), columns=genes)
    expr.to_csv(root / "expr.csv")
    ad.AnnData(expr.to_numpy(np.float32), obs=pd.DataFrame(index=ids), var=pd.DataFrame(index=genes)).write_h5ad(
        root / "expr.h5ad")
    (expr * rng.uniform(0.5, 2.0, (20, 5)) * 100).round().to_csv(root / "bulk.csv")
    pd.DataFrame({"time": rng.uniform(1, 100, 20).round(1), "event": [1, 0] * 10, "response": ["yes", "no"] * 10,
                  "grade": ["1", "2", "3", "2"] * 5}, index=pd.Index(ids, name="sample")).to_csv(root / "clinical.csv")
    (root / "slides.csv").write_text(f"slide_id,path,mpp\nA1,{slide},1.0\nB2,{slide},\n")
    return root


def build_world(root: Path, *, cells: bool = True) -> World:
    """Write every pristine input under ``root`` (about 30-40 s on 2 cores, mostly JIT).
    A folder already holding a finished world (``world.json``) is reused."""
    import cv2
    import pandas as pd

    root = Path(root)
    done = root / "world.json"
    if done.is_file():  # a finished world (experiments/reliability.py --workdir reuses it)
        f = json.loads(done.read_text())
        w = World(**{k: ([Path(p) for p in v] if isinstance(v, list) else
                         Path(v) if isinstance(v, str) and k != "spot" else v) for k, v in f.items()})
        if cells and w.cell_wd is None:
            w.cell_wd = build_cell_model(root / "cell_wd", w.cells)
            _save(w, done)
        return w
    root.mkdir(parents=True, exist_ok=True)
    top = _load("tests/conftest.py", "_reliability_top_conftest")
    dp = _load("tests/data_pipelines/conftest.py", "_reliability_dp_conftest")  # write_10x_h5

    study_dir = root / "study"
    study_dir.mkdir()
    study = []
    for k in range(3):
        a = top.make_sample(study_dir, f"s{k}", seed=k, grid=4)
        p = study_dir / f"s{k}.h5ad"
        a.write_h5ad(p)
        study.append(p)
    images = [study_dir / f"s{k}.png" for k in range(3)]
    spot = "s2_1x1"  # make_sample names spots <sample>_<row>x<col>

    slide_tif = root / "slide.tif"
    top._make_slide(slide_tif, mpp=1.0, size=(256, 256))
    import tifffile

    slide_png = _write_rgb(root / "slide.png", tifffile.imread(slide_tif))
    rgb, inst, placed = _synth_nuclei(96, 0, 12)
    he = _write_rgb(root / "he.png", rgb)
    tile = _write_rgb(root / "tile.png", cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_AREA))

    cdir = root / "cells"
    rgb, inst, placed = _synth_nuclei(64, 1, 8)
    _write_rgb(cdir / "t0.png", rgb)
    cv2.imwrite(str(cdir / "t0_instances.png"), inst.astype(np.uint16))
    regions = []
    for (cx, cy), r in placed:
        ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
        verts = "".join(f'<Vertex X="{cx + r * np.cos(t):.2f}" Y="{cy + r * np.sin(t):.2f}"/>' for t in ang)
        regions.append(f"<Region><Vertices>{verts}</Vertices></Region>")
    (cdir / "t0.xml").write_text('<?xml version="1.0"?>\n<Annotations MicronsPerPixel="0.25"><Annotation><Regions>'
                                 + "".join(regions) + "</Regions></Annotation></Annotations>\n")
    types = pd.DataFrame({"x": [c[0] for c, _ in placed], "y": [c[1] for c, _ in placed],
                          "type": [1 + i % 4 for i in range(len(placed))]})
    types.to_csv(cdir / "t0_types.csv", index=False)
    # a "prediction" of the same nuclei with its type table (stimage cells predict's columns)
    pred_dir = root / "cell_pred"
    pred_dir.mkdir()
    cv2.imwrite(str(pred_dir / "p.png"), inst.astype(np.uint16))
    types.insert(0, "id", np.arange(1, len(types) + 1))
    types.to_csv(pred_dir / "p_types.csv", index=False)

    her2st = _her2st(root / "her2st")
    clinical = _clinical(root / "clinical", slide_tif)
    visium = _visium(root / "visium", dp.write_10x_h5)

    wd, onnx, pred, pred_jax = root / "wd", root / "model.onnx", root / "pred.h5ad", root / "pred_jax.h5ad"
    _cli(["--quiet", "train", "--data", study[0], study[1], "--workdir", wd, *TINY_TRAIN])
    _cli(["--quiet", "export-onnx", "--model", wd, "--out", onnx])
    _cli(["--quiet", "predict", "--model", onnx, "--data", study[2], "--out", pred])
    _cli(["--quiet", "predict", "--model", wd, "--data", study[2], "--out", pred_jax])
    cell_wd = build_cell_model(root / "cell_wd", cdir) if cells else None
    w = World(root, study, images, wd, onnx, pred, pred_jax, slide_tif, slide_png, tile, he, cdir, pred_dir, cell_wd,
              her2st, clinical, visium, spot)
    _save(w, done)
    return w


def _save(w: World, path: Path) -> None:
    fields = {k: ([str(p) for p in v] if isinstance(v, list) else None if v is None else str(v))
              for k, v in dataclasses.asdict(w).items()}
    path.write_text(json.dumps(fields))


def build_cell_model(workdir: Path, cells_folder: Path) -> Path:
    """A tiny cell model (one training step: ~10-20 s of JIT on 2 cores)."""
    if not (workdir / "model" / "model.json").is_file():
        _cli(["--quiet", "cells", "train", "--data", cells_folder, "--workdir", workdir, "--weights", "none",
              *CELLS_TINY])
    return workdir
