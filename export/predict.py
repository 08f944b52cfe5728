"""ONNX runtime predictor: numpy, onnxruntime, anndata and the project's NumPy code — no JAX.

    python -m export.predict --model model.onnx --data X.h5ad --out P.h5ad
    python -m export.predict --model model.onnx --slide S.svs --out P.h5ad [--genes G1,G2]

writes the same h5ad as ``stimage predict`` with a JAX model (X = mean, var_aleatoric,
var_epistemic, q_lo, q_hi, provenance). Execution providers: TensorRT, then CUDA, when
the installed onnxruntime has them (``onnxruntime-gpu``), else CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from data_pipelines.errors import StimageError

__all__ = ["OnnxEnsemble", "predict_adata", "main"]

ONNX_FORMAT = "stimage-jax-onnx/1"
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxEnsemble:
    """An exported ensemble: ``params(tiles) -> (mu, r)``, each (members, N, genes)."""

    def __init__(self, path: str | Path, providers: list[str] | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise StimageError(f"model file {path} not found")
        avail = ort.get_available_providers()
        providers = providers or [p for p in PREFERRED_PROVIDERS if p in avail]
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as e:
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise StimageError(f"{path} is not an ONNX model onnxruntime can run ({msg})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != ONNX_FORMAT:
            raise StimageError(f"{path} is not a stimage model (metadata 'format' is "
                               f"{meta.get('format')!r}, expected {ONNX_FORMAT!r})")
        self.path = path
        self.meta = meta
        self.genes = json.loads(meta["genes"])
        self.tile_px = int(meta["tile_px"])
        self.tile_um = float(meta["tile_um"])
        self.provenance = json.loads(meta["provenance"])
        stain = json.loads(meta.get("stain_reference", "null"))
        if stain:
            from data_pipelines.stain_normalisation import Reference

            stain = Reference.from_dict(stain, where=f"{path}'s stain reference")
        self.stain = stain or None  # tiles are normalised towards it before the graph runs
        self.providers = self.session.get_providers()

    def params(self, tiles: np.ndarray, *, batch_size: int = 32, progress: bool = False):
        """uint8 tiles (N, tile_px, tile_px, 3) → (mu, r) float32, each (M, N, G)."""
        tiles = np.asarray(tiles) if not isinstance(tiles, np.ndarray) else tiles
        if tiles.ndim != 4 or tiles.shape[1:] != (self.tile_px, self.tile_px, 3):
            raise StimageError(f"tiles have shape {tuple(tiles.shape[1:])}, the model expects "
                               f"({self.tile_px}, {self.tile_px}, 3)")
        from tqdm.auto import tqdm

        mus, rs = [], []
        for s in tqdm(range(0, len(tiles), batch_size), desc="onnx", disable=not progress, leave=False):
            mu, r = self.session.run(["mu", "r"], {"tiles": np.ascontiguousarray(tiles[s:s + batch_size], np.uint8)})
            mus.append(mu)
            rs.append(r)
        return np.concatenate(mus, axis=1), np.concatenate(rs, axis=1)


def predict_adata(adata, model: OnnxEnsemble, *, batch_size: int = 32, progress: bool = True,
                  interval: float = 0.8):
    """Tiles every spot of ``adata`` at the model's geometry and predicts → AnnData."""
    from data_pipelines.tiles import spot_tiles
    from export.prediction import build_prediction

    tiles = spot_tiles(adata, tile_um=model.tile_um, tile_px=model.tile_px, progress=progress, stain=model.stain)
    mu, r = model.params(tiles, batch_size=batch_size, progress=progress)
    prov = {**model.provenance, "runtime": "onnxruntime", "providers": list(model.providers)}
    return build_prediction(adata, mu, r, model.genes, prov, interval=interval)


def _csv(s: str | None) -> list[str]:
    return [g.strip() for g in s.split(",") if g.strip()] if s else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.predict", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="exported .onnx file")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help=".h5ad with spot coordinates and image")
    src.add_argument("--slide", help="an H&E-only slide (pyramidal TIFF/SVS, or JPEG/PNG with --mpp)")
    ap.add_argument("--mpp", type=float, help="µm per pixel of the slide when its metadata lacks it")
    ap.add_argument("--min-coverage", type=float, default=0.7, help="slide tiles need this tissue fraction")
    ap.add_argument("--genes", help="slide: write a heatmap PNG per gene (comma separated), OUT_<gene>.png")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--interval", type=float, default=0.8)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        from data_pipelines.io import check_writable, write_h5ad
        from data_pipelines.slides import read_h5ad

        check_writable(a.out, a.overwrite)
        model = OnnxEnsemble(a.model)
        if a.slide:
            from export.prediction import slide_to_files

            prov = {**model.provenance, "runtime": "onnxruntime", "providers": list(model.providers)}
            pred, maps = slide_to_files(a.slide, lambda t: model.params(t, batch_size=len(t)), model.genes, prov,
                                        a.out, tile_um=model.tile_um, tile_px=model.tile_px, mpp=a.mpp,
                                        heatmap_genes=_csv(a.genes), min_coverage=a.min_coverage,
                                        batch_size=a.batch_size, overwrite=a.overwrite, progress=not a.quiet,
                                        stain=model.stain)
            for p in maps:
                print(f"heatmap -> {p}")
        else:
            pred = predict_adata(read_h5ad(a.data), model, batch_size=a.batch_size, progress=not a.quiet,
                                 interval=a.interval)
            write_h5ad(pred, a.out, overwrite=a.overwrite)
    except StimageError as e:
        print(f"stimage: error: {e}", file=sys.stderr)
        return 2
    print(f"predicted {pred.n_vars} genes for {pred.n_obs} spots with {model.path.name} "
          f"({', '.join(model.providers)}) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
