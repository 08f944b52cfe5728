"""A served model as a :class:`~export.runtime.predictor.Predictor`: ``params(tiles)`` calls
``stimage serve`` (or any Open Inference Protocol server holding a stimage serving graph)
with ``tritonclient.http`` and binary tensors, so ``predict_adata(adata, ServedEnsemble(url,
"her2st"))`` predicts a section through the server exactly as through the local file."""

from __future__ import annotations

import json

import numpy as np

from data_pipelines.errors import StimageError
from export.runtime.predictor import REGRESS

__all__ = ["ServedEnsemble"]


class ServedEnsemble:
    task = REGRESS

    def __init__(self, url: str, name: str, version: str = "", *, token: str | None = None):
        try:
            import tritonclient.http as httpclient
            from tritonclient.utils import InferenceServerException
        except ImportError:
            raise StimageError("a served model needs tritonclient[http] (pip install 'tritonclient[http]')") from None
        self._http, self._exc = httpclient, InferenceServerException
        self.url, self.name, self.version = url.removeprefix("http://"), name, version
        self.headers = {"Authorization": f"Bearer {token}"} if token else None
        self.client = httpclient.InferenceServerClient(self.url)
        try:
            meta = self.client.get_model_metadata(name, version, headers=self.headers)
        except (InferenceServerException, OSError) as e:
            raise StimageError(f"model {name!r} at {url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                from None
        p = meta.get("parameters") or {}
        try:
            self.genes, self.tile_px, self.tile_um = list(p["genes"]), int(p["tile_px"]), float(p["tile_um"])
        except (KeyError, TypeError, ValueError):
            raise StimageError(f"model {name!r} at {url} does not describe genes/tile_px/tile_um: not a stimage "
                               "serving graph") from None
        stain = p.get("stain_reference")
        if stain:
            from data_pipelines.stain_normalisation import Reference

            stain = Reference.from_dict(stain, where=f"{url} {name}'s stain reference")
        self.stain = stain or None
        from export.runtime.context import check_smoothing

        sm = p.get("smoothing")
        try:
            sm = json.loads(sm) if isinstance(sm, str) else sm  # Triton's parameters are strings
            self.tta = int(p.get("tta", 1))
        except (json.JSONDecodeError, TypeError, ValueError):
            raise StimageError(f"model {name!r} at {url}: parameters 'smoothing'/'tta' are malformed") from None
        # the server answers per tile; a section predicted through it is smoothed here, as locally
        self.smoothing = check_smoothing(sm, f"model {name!r} at {url}")
        self.provenance = {"runtime": "stimage serve", "url": url, "model": name,
                           "model_version": meta.get("versions", [version])[0] if meta.get("versions") else version}

    def needs_tiles(self, features: dict | None = None) -> bool:
        return True

    def params(self, tiles, *, batch_size: int = 32, progress: bool = False, features: dict | None = None):
        """uint8 tiles (N, px, px, 3) → {"mu", "r"} float32, each (M, N, G), over the wire."""
        if features:
            raise StimageError("a served model reads tiles, not precomputed features")
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[1:] != (self.tile_px, self.tile_px, 3):
            raise StimageError(f"tiles have shape {tuple(tiles.shape[1:])}, the model expects "
                               f"({self.tile_px}, {self.tile_px}, 3)")
        h = self._http
        mus, rs = [], []
        for s in range(0, len(tiles), batch_size):
            t = np.ascontiguousarray(tiles[s:s + batch_size], np.uint8)
            inp = h.InferInput("tiles", list(t.shape), "UINT8")
            inp.set_data_from_numpy(t, binary_data=True)
            try:
                res = self.client.infer(self.name, [inp], model_version=self.version, headers=self.headers,
                                        outputs=[h.InferRequestedOutput("mu"), h.InferRequestedOutput("r")])
            except self._exc as e:
                raise StimageError(f"{self.url} {self.name}: {str(e).splitlines()[0]}") from None
            mus.append(res.as_numpy("mu").transpose(1, 0, 2))
            rs.append(res.as_numpy("r").transpose(1, 0, 2))
        return {"mu": np.concatenate(mus, axis=1), "r": np.concatenate(rs, axis=1)}
