"""Stain normalisation of H&E tiles: Vahadane (default), Macenko and Reinhard, in NumPy.

Papers:
- Vahadane A. et al., "Structure-preserving color normalization and sparse stain separation
  for histological images", IEEE Trans. Med. Imaging 35(8):1962-1971, 2016.
- Macenko M. et al., "A method for normalizing histology slides for quantitative analysis",
  Proc. IEEE ISBI 2009, 1107-1110.
- Reinhard E. et al., "Color transfer between images", IEEE Comput. Graph. Appl. 21(5):34-41, 2001.
Conventions follow staintools (P. Byfield) unless noted; no JAX here, because the JAX-free
ONNX runtime normalises tiles too.

Workflow: at training, ``ref = fit_stain("vahadane", template)`` and ``ref.save(workdir /
"stain_reference.json")``; per slide, ``src = fit_source(ref.method, slide_lowres)`` once
from a low-resolution view; per batch, ``apply_stain(ref, src, tiles)``.

Decisions (each differs from one of the references in a way that matters for tiles):
- Luminosity standardisation (staintools' LuminosityStandardizer): the L channel of OpenCV's
  uint8 LAB is scaled so that its 95th percentile maps to 255. A fitted ``Reference`` /
  ``SourceStains`` stores that percentile (``luminosity``) of the image it was fitted on, and
  ``apply_stain`` standardises every tile of a slide with the *slide's* value, so tiles full
  of tissue are not brightened as if their lightest tissue were glass. Normalising a
  template to itself therefore returns the *standardised* template (the tests compare to it).
- OD = -log(max(I, 1) / 255) per channel (staintools).
- Tissue pixels: LAB lightness < 0.8 after standardisation (staintools), not Macenko's "OD >
  0.15 in every channel", which drops most pale eosin (its red OD is tiny).
- Maximum concentrations: 99th percentile over tissue pixels only (staintools uses every
  pixel), so a low-res slide view full of glass and a template full of tissue agree.
- Concentrations: exact non-negative least squares in closed form (two stains), for both
  methods, at fit and at apply (one estimator on both sides keeps the max-concentration
  ratio consistent). staintools uses a lasso (λ=0.01) for Vahadane and unconstrained least
  squares for Macenko. The cheaper-looking ``clip(OD @ pinv(S), 0)`` was measured and
  rejected: on HER2ST tiles about half the tissue pixels fall outside the cone of
  Vahadane's stains, and normalising a crop to itself then errs by 8 grey levels on average
  against 3.6 with exact NNLS (2.7 unconstrained), at about the same speed.
- Reinhard: mean/std of float LAB (L 0-100) over tissue pixels (original: all pixels, so the
  glass fraction of a view would shift them); the affine map is faded out linearly between
  lightness 80 (tissue) and 95 (glass), which it would otherwise tint.
- ``source=None``: stains (or LAB stats) are estimated on each tile separately, as
  staintools does; slow for Vahadane (a dictionary fit per tile); a tile with too little
  tissue is returned standardised but otherwise unchanged.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Self

import cv2
import numpy as np

from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_path

__all__ = [
    "METHODS", "DEFAULT_METHOD", "Reference", "SourceStains",
    "fit_stain", "fit_source", "apply_stain",
    "fit_vahadane", "fit_macenko", "fit_reinhard", "apply_vahadane", "apply_macenko", "apply_reinhard",
    "standardise_luminosity", "rgb_to_od", "tissue_mask", "concentrations",
    "macenko_stain_matrix", "vahadane_stain_matrix",
]

METHODS = ("vahadane", "macenko", "reinhard")
DEFAULT_METHOD = "vahadane"
FORMAT = "stimage-stain/1"
LUMINOSITY_THRESHOLD = 0.8  # tissue = LAB lightness below this fraction of white
GLASS_LIGHTNESS = 95.0      # Reinhard leaves pixels at least this light (LAB L, 0-100) as they are
MIN_TISSUE_PIXELS = 50      # fewer than this cannot define two stains
CHUNK_PIXELS = 1 << 20      # pixels per vectorised step: bounds the float temporaries (~12 MB)
# OD of every uint8 value: a gather is far cheaper than log over the batch.
_OD_LUT = (-np.log(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)
_FIELDS = ("method", "stain_matrix", "max_conc", "lab_mean", "lab_std", "luminosity")
_SHAPES = {"stain_matrix": (-1, 3), "max_conc": (-1,), "lab_mean": (-1,), "lab_std": (-1,), "luminosity": ()}


class Reference(NamedTuple):
    """Stain statistics of a template image (a NamedTuple, hence a JAX pytree without JAX).

    ``stain_matrix`` (2, 3): unit-norm OD stain vectors, haematoxylin first; ``max_conc``
    (2,): their 99th-percentile concentrations. Reinhard instead fills ``lab_mean`` and
    ``lab_std`` (3,) (float LAB, L in 0-100) and leaves the stain fields empty ((0, 3), (0,)).
    ``luminosity`` (): 95th percentile of the uint8 LAB lightness used for standardisation.
    """

    method: str
    stain_matrix: np.ndarray
    max_conc: np.ndarray
    lab_mean: np.ndarray
    lab_std: np.ndarray
    luminosity: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (Python floats round-trip float64 exactly)."""
        d: dict[str, Any] = {"format": FORMAT, "method": self.method}
        d.update({k: np.asarray(getattr(self, k), np.float64).tolist() for k in _SHAPES})
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "stain reference") -> Self:
        """Inverse of ``to_dict``; any missing key or wrong shape is a ``StimageError``."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise StimageError(f"{where} is not a {FORMAT} stain reference")
        missing = [k for k in _FIELDS if k not in d]
        if missing:
            raise StimageError(f"{where} lacks key(s) {missing}")
        if d["method"] not in METHODS:
            raise StimageError(f"{where}: unknown stain method {d['method']!r} (choose from {METHODS})")
        try:
            arr = {k: np.asarray(d[k], np.float64).reshape(s) for k, s in _SHAPES.items()}
        except (TypeError, ValueError) as e:
            raise StimageError(f"{where}: malformed array ({e})") from None
        ref = cls(method=str(d["method"]), **arr)
        _check(ref, where)
        return ref

    def save(self, path: str | os.PathLike) -> Path:
        """Write a small JSON file atomically (temp file, then ``os.replace``)."""
        with atomic_path(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Self:
        """Read ``save``'s file; missing, unreadable or malformed files raise ``StimageError``."""
        p = Path(path)
        if not p.is_file():
            raise StimageError(f"stain reference {p} not found")
        try:
            d = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StimageError(f"stain reference {p} is unreadable ({type(e).__name__})") from None
        return cls.from_dict(d, where=f"stain reference {p}")


class SourceStains(Reference):
    """The same statistics estimated once per slide from a low-resolution view."""

    __slots__ = ()


def _check(ref: Reference, where: str) -> None:
    """Each method needs its own fields non-empty and positive where divided by."""
    if ref.method == "reinhard":
        ok = ref.lab_mean.shape == (3,) and ref.lab_std.shape == (3,) and bool(np.all(ref.lab_std > 0))
    else:
        ok = ref.stain_matrix.shape == (2, 3) and ref.max_conc.shape == (2,) and bool(np.all(ref.max_conc > 0))
    if not ok or not np.all(np.isfinite(ref.luminosity)):
        raise StimageError(f"{where}: fields do not fit method {ref.method!r}")


def _check_tiles(tiles: np.ndarray) -> np.ndarray:
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise StimageError(f"tiles must be (B, H, W, 3) uint8 RGB, got {tiles.shape} {tiles.dtype}")
    return tiles


def _as_rows(images: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) → one (rows, W, 3) image for OpenCV (colour conversions are per pixel)."""
    return np.ascontiguousarray(images.reshape(-1, images.shape[-2], 3))


def _percentile_u8(values: np.ndarray, q: float) -> np.ndarray:
    """``np.percentile(values, q, axis=1)`` (linear) for uint8 (B, N) via per-row histograms."""
    b, n = values.shape
    offs = (np.arange(b, dtype=np.int64) * 256)[:, None]
    cum = np.bincount((values + offs).ravel(), minlength=256 * b).reshape(b, 256).cumsum(1)
    pos = q / 100.0 * (n - 1)
    lo, frac = int(np.floor(pos)), pos - np.floor(pos)
    v_lo = np.argmax(cum > lo, axis=1)  # value at sorted index lo
    v_hi = np.argmax(cum > min(lo + 1, n - 1), axis=1)
    return v_lo + frac * (v_hi - v_lo)


def _lightness(images: np.ndarray) -> np.ndarray:
    """uint8 LAB lightness (0-255) of (..., H, W, 3) RGB images, same leading shape."""
    return cv2.cvtColor(_as_rows(images), cv2.COLOR_RGB2LAB)[..., 0].reshape(images.shape[:-1])


def standardise_luminosity(images: np.ndarray, luminosity: float | np.ndarray | None = None,
                           percentile: float = 95.0) -> np.ndarray:
    """Scale LAB lightness so ``luminosity`` (default: each image's own percentile) maps to 255.

    images (B, H, W, 3) uint8 → same; ``luminosity`` a scalar or (B,) in uint8 LAB units.
    As staintools' LuminosityStandardizer (OpenCV uint8 LAB, new L truncated to uint8),
    except that a map that is the identity (luminosity ≥ 255) returns the images untouched.
    """
    lab = cv2.cvtColor(_as_rows(images), cv2.COLOR_RGB2LAB).reshape(*images.shape[:-1], 3)
    b = images.shape[0]
    if luminosity is None:
        luminosity = _percentile_u8(lab[..., 0].reshape(b, -1), percentile)
    p = np.broadcast_to(np.maximum(np.asarray(luminosity, np.float64), 1.0), (b,))
    if np.all(p >= 255):  # identity map: skip the lossy LAB round trip
        return images.copy()
    # one 256-entry table per image, truncating like staintools' astype(uint8)
    lut = np.clip(255.0 * np.arange(256)[None, :] / p[:, None], 0, 255).astype(np.uint8)
    lab[..., 0] = np.take_along_axis(lut, lab[..., 0].reshape(b, -1), axis=1).reshape(lab.shape[:-1])
    return cv2.cvtColor(_as_rows(lab), cv2.COLOR_LAB2RGB).reshape(images.shape)


def rgb_to_od(images: np.ndarray) -> np.ndarray:
    """Optical density -log(max(I, 1)/255), float32, same shape as the uint8 input."""
    return _OD_LUT[images]


def tissue_mask(images: np.ndarray, threshold: float = LUMINOSITY_THRESHOLD) -> np.ndarray:
    """True where LAB lightness < ``threshold`` × 255: (..., H, W, 3) uint8 → (..., H, W) bool."""
    return _lightness(images) < threshold * 255


def _nnls_t(od_t: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """NNLS concentrations (2, N) of transposed OD (3, N) for unit-norm stains (2, 3), float32.

    Where the least-squares solution is non-negative it is the NNLS solution; elsewhere NNLS
    uses one stain alone, at concentration max(0, od·u_k), the k with the larger od·u_k
    (it removes more residual). Row layout keeps every elementwise pass contiguous.
    """
    w = np.concatenate([np.linalg.pinv(unit).T, unit]).astype(np.float32)  # (4, 3): LS and dots
    c0, c1, d0, d1 = w @ od_t
    inside = np.minimum(c0, c1) >= 0
    first = d0 >= d1
    r = np.empty((2, od_t.shape[1]), np.float32)
    r[0] = np.where(inside, c0, np.where(first, d0, 0))
    r[1] = np.where(inside, c1, np.where(first, 0, d1))
    return np.maximum(r, 0, out=r)


def _unit(stain_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(stain_matrix, np.float64)
    norms = np.linalg.norm(s, axis=1)
    return s / norms[:, None], norms


def concentrations(od: np.ndarray, stain_matrix: np.ndarray) -> np.ndarray:
    """Exact non-negative least-squares concentrations (..., 2) of OD (..., 3), 2 stains.

    Closed form and vectorised (see ``_nnls_t``); rows of ``stain_matrix`` need not be unit.
    """
    od = np.asarray(od, np.float32)
    unit, norms = _unit(stain_matrix)
    c = _nnls_t(od.reshape(-1, 3).T, unit) / norms.astype(np.float32)[:, None]
    return c.T.reshape(*od.shape[:-1], 2)


def _unit_rows_h_first(m: np.ndarray) -> np.ndarray:
    """Unit-norm rows ordered haematoxylin first: H has the larger red OD (staintools)."""
    m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    return m[::-1].copy() if m[0, 0] < m[1, 0] else m


def macenko_stain_matrix(od: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Macenko stain vectors (2, 3) from tissue OD (N, 3).

    The OD plane of the two largest singular vectors (uncentred, as in the paper), then the
    ``alpha`` and ``100 - alpha`` percentiles of the angle within it: robust extremes.
    """
    od = np.asarray(od, np.float64)
    _, v = np.linalg.eigh(od.T @ od / len(od))
    v = v[:, [2, 1]]
    v *= np.where(v[0] < 0, -1.0, 1.0)  # sign is arbitrary: point into positive red OD
    proj = od @ v
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    vecs = np.stack([v @ [np.cos(lo), np.sin(lo)], v @ [np.cos(hi), np.sin(hi)]])
    return _unit_rows_h_first(vecs)


def vahadane_stain_matrix(od: np.ndarray, alpha: float = 0.1, max_pixels: int = 20_000,
                          seed: int = 0) -> np.ndarray:
    """Vahadane stain vectors (2, 3): sparse non-negative dictionary learning of OD (N, 3).

    staintools runs spams ``trainDL(lambda1=0.1, mode=2, modeD=0, posAlpha, posD)``; the same
    objective (0.5‖X − CD‖² + α‖C‖₁, non-negative C and D, unit atoms) is fitted here with
    scikit-learn's mini-batch solver on at most ``max_pixels`` random tissue pixels (speed),
    with a fixed seed (reproducible). The solver is initialised at Macenko's vectors.
    """
    from sklearn.decomposition import MiniBatchDictionaryLearning  # import cost only when used

    od = np.asarray(od, np.float64)
    if len(od) > max_pixels:
        od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
    dl = MiniBatchDictionaryLearning(n_components=2, alpha=alpha, batch_size=64, max_iter=10,
                                     fit_algorithm="cd", transform_algorithm="lasso_cd",
                                     positive_code=True, positive_dict=True, random_state=seed,
                                     dict_init=macenko_stain_matrix(od))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter from the inner lasso
        dl.fit(od)
    return _unit_rows_h_first(np.maximum(dl.components_, 0))


def _lab_float(images: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 RGB → float32 LAB (L 0-100, a/b about ±127), same shape."""
    rgb = _as_rows(images).astype(np.float32) * np.float32(1 / 255)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab).reshape(images.shape)


def _fit_fields(method: str, image: np.ndarray, what: str) -> tuple:
    """Fields of a Reference for one (H, W, 3) uint8 image; ``what`` names it in errors."""
    if method not in METHODS:
        raise StimageError(f"unknown stain method {method!r}; choose from {', '.join(METHODS)}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise StimageError(f"{what} must be an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
    lum = float(_percentile_u8(_lightness(image[None]).reshape(1, -1), 95.0)[0])
    std = standardise_luminosity(image[None], lum)[0]
    mask = tissue_mask(std)
    if mask.sum() < MIN_TISSUE_PIXELS:
        raise StimageError(f"{what} has no stained tissue ({int(mask.sum())} pixels darker than "
                           f"{LUMINOSITY_THRESHOLD:.0%} lightness after standardisation; need {MIN_TISSUE_PIXELS})")
    empty2, empty1 = np.zeros((0, 3)), np.zeros(0)
    if method == "reinhard":
        lab = _lab_float(std)[mask].astype(np.float64)
        return method, empty2, empty1, lab.mean(0), np.maximum(lab.std(0), 1e-6), np.asarray(lum)
    od = rgb_to_od(std[mask])
    s = vahadane_stain_matrix(od) if method == "vahadane" else macenko_stain_matrix(od)
    max_c = np.percentile(concentrations(od, s), 99, axis=0).astype(np.float64)
    if not np.all(max_c > 0):
        raise StimageError(f"{what} has no stained tissue (a stain's 99th-percentile concentration is 0)")
    return method, s, max_c, empty1, empty1, np.asarray(lum)


def fit_stain(method: str, image: np.ndarray) -> Reference:
    """Reference statistics of a template (H, W, 3) uint8 RGB image for ``method``."""
    return Reference(*_fit_fields(method, image, "template"))


def fit_source(method: str, slide_lowres: np.ndarray) -> SourceStains:
    """A slide's own statistics, from a low-resolution (H, W, 3) uint8 view, fitted once."""
    return SourceStains(*_fit_fields(method, slide_lowres, "slide"))


def fit_vahadane(template_rgb_uint8: np.ndarray) -> Reference:
    """``fit_stain("vahadane", ...)``: sparse NMF stain vectors of an (H, W, 3) uint8 template."""
    return fit_stain("vahadane", template_rgb_uint8)


def fit_macenko(template_rgb_uint8: np.ndarray) -> Reference:
    """``fit_stain("macenko", ...)``: angular-extreme stain vectors of an (H, W, 3) uint8 template."""
    return fit_stain("macenko", template_rgb_uint8)


def fit_reinhard(template_rgb_uint8: np.ndarray) -> Reference:
    """``fit_stain("reinhard", ...)``: tissue LAB mean and std of an (H, W, 3) uint8 template."""
    return fit_stain("reinhard", template_rgb_uint8)


def _apply_od(ref: Reference, src: Reference, std: np.ndarray) -> np.ndarray:
    """Macenko/Vahadane mapping of standardised tiles (B, H, W, 3) uint8, chunk by chunk.

    C = NNLS(OD, S_src) · maxC_ref / maxC_src;  I = 255 · exp(−C @ S_ref).
    """
    unit, norms = _unit(src.stain_matrix)
    # C·r @ S_ref = C_unit @ (r/|s_src|)[:, None]·S_ref: the scaling folds into one (2, 3) matrix
    s_out = ((ref.max_conc / src.max_conc / norms)[:, None] * ref.stain_matrix).astype(np.float32)
    flat = std.reshape(-1, 3)
    out = np.empty_like(flat)
    for a in range(0, len(flat), CHUNK_PIXELS):
        od = _nnls_t(_OD_LUT[flat[a:a + CHUNK_PIXELS]].T, unit).T @ s_out  # (n, 3)
        np.exp(-od, out=od)
        od *= 255
        od += 0.5  # round to nearest
        np.minimum(od, 255, out=od)
        out[a:a + CHUNK_PIXELS] = od
    return out.reshape(std.shape)


def _apply_reinhard(ref: Reference, mean: np.ndarray, sd: np.ndarray, std: np.ndarray) -> np.ndarray:
    """LAB affine map (x − mean)·σ_ref/σ + μ_ref, faded out on glass; mean, sd (3,) or (B, 3)."""
    b = std.shape[0]
    lab = _lab_float(std).reshape(b, -1, 3)
    gain = (ref.lab_std / np.reshape(sd, (-1, 3))).astype(np.float32)[:, None, :]
    shift = (ref.lab_mean - np.reshape(mean, (-1, 3)) * gain[:, 0]).astype(np.float32)[:, None, :]
    # weight 1 on tissue (L < 80), 0 on glass (L > 95): the tissue statistics say nothing
    # about glass, and the shift in a/b would otherwise tint it
    lo, hi = 100 * LUMINOSITY_THRESHOLD, GLASS_LIGHTNESS
    w = np.clip((hi - lab[..., :1]) * np.float32(1 / (hi - lo)), 0, 1)
    lab += w * (lab * (gain - 1) + shift)
    np.clip(lab[..., 0], 0, 100, out=lab[..., 0])
    np.clip(lab[..., 1:], -127, 127, out=lab[..., 1:])
    rgb = cv2.cvtColor(_as_rows(lab.reshape(std.shape)), cv2.COLOR_Lab2RGB)
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8).reshape(std.shape)


def apply_stain(reference: Reference, source: SourceStains | None, tiles: np.ndarray) -> np.ndarray:
    """Normalise tiles (B, H, W, 3) uint8 RGB towards ``reference`` → (B, H, W, 3) uint8.

    ``source``: the slide's statistics from ``fit_source`` (fast, one vectorised pass), or
    None to estimate them per tile (slow path; tiles with too little tissue are only
    luminosity-standardised).
    """
    _check(reference, "stain reference")
    tiles = _check_tiles(tiles)
    if source is not None:
        _check(source, "slide stain statistics")
        if source.method != reference.method:
            raise StimageError(f"slide stains were fitted with {source.method!r}, the reference with {reference.method!r}")
        std = standardise_luminosity(tiles, source.luminosity)
        if reference.method == "reinhard":
            return _apply_reinhard(reference, source.lab_mean, source.lab_std, std)
        return _apply_od(reference, source, std)
    if reference.method == "reinhard":  # per-tile stats, still vectorised
        std = standardise_luminosity(tiles)
        lab = _lab_float(std).reshape(len(tiles), -1, 3).astype(np.float64)
        m = tissue_mask(std).reshape(len(tiles), -1, 1)
        n = m.sum(1)
        few = n[:, 0] < MIN_TISSUE_PIXELS  # glass-only tile: identity map
        mean = np.where(few[:, None], reference.lab_mean, (lab * m).sum(1) / np.maximum(n, 1))
        var = ((lab - mean[:, None]) ** 2 * m).sum(1) / np.maximum(n, 1)
        sd = np.where(few[:, None], reference.lab_std, np.maximum(np.sqrt(var), 1e-6))
        return _apply_reinhard(reference, mean, sd, std)
    out = np.empty_like(tiles)
    for i, tile in enumerate(tiles):  # a stain fit per tile: inherently a loop
        try:
            src = SourceStains(*_fit_fields(reference.method, tile, "tile"))
        except StimageError:
            lum = _percentile_u8(_lightness(tile[None]).reshape(1, -1), 95.0)[0]
            out[i] = standardise_luminosity(tile[None], lum)[0]
            continue
        out[i] = _apply_od(reference, src, standardise_luminosity(tile[None], src.luminosity))[0]
    return out


def apply_vahadane(reference: Reference, source_stains: SourceStains | None, tiles: np.ndarray) -> np.ndarray:
    """``apply_stain`` for a Vahadane reference: (B, H, W, 3) uint8 → same."""
    return _apply_method("vahadane", reference, source_stains, tiles)


def apply_macenko(reference: Reference, source_stains: SourceStains | None, tiles: np.ndarray) -> np.ndarray:
    """``apply_stain`` for a Macenko reference: (B, H, W, 3) uint8 → same."""
    return _apply_method("macenko", reference, source_stains, tiles)


def apply_reinhard(reference: Reference, source_stains: SourceStains | None, tiles: np.ndarray) -> np.ndarray:
    """``apply_stain`` for a Reinhard reference: (B, H, W, 3) uint8 → same."""
    return _apply_method("reinhard", reference, source_stains, tiles)


def _apply_method(method: str, reference: Reference, source: SourceStains | None, tiles: np.ndarray) -> np.ndarray:
    if reference.method != method:
        raise StimageError(f"apply_{method} got a {reference.method!r} stain reference")
    return apply_stain(reference, source, tiles)
