"""High/low expression classification (STimage's classification model).

Labels follow the paper: a spot is *high* for a gene when its count is above the gene's
mean within the spot's own sample (per-sample z-score > 0), so slides of different depth
share one threshold. Features come from the frozen backbone; one elastic-net logistic
regression per gene (scikit-learn ``saga``, ``l1_ratio`` 0.5, ``C`` 0.1) after
standardisation. The fitted model is a :class:`ClassifierReference` of plain arrays,
applied in NumPy (``apply_classifier``), so prediction needs no scikit-learn object.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_dir, atomic_path
from export.runtime.predictor import CLASSIFY, resolve_model_dir

__all__ = ["high_labels", "ClassifierReference", "fit_classifier", "apply_classifier", "ClassifierModel",
           "CLASSIFIER_FILE", "CLASSIFIER_FORMAT"]

CLASSIFIER_FILE = "classifier.npz"


def high_labels(counts: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """counts (N, G), samples (N,) → bool (N, G): above the gene's mean in the spot's sample."""
    counts = np.asarray(counts, np.float64)
    samples = np.asarray(samples).astype(str)
    out = np.zeros(counts.shape, bool)
    for s in np.unique(samples):
        m = samples == s
        out[m] = counts[m] > counts[m].mean(0)
    return out


@dataclasses.dataclass(frozen=True)
class ClassifierReference:
    """Per-gene logistic models on standardised features (all arrays; saveable).

    mean, scale: (D,) feature standardisation; coef: (G, D); intercept: (G,).
    """

    genes: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    params: dict

    def save(self, path: str | os.PathLike) -> Path:
        with atomic_path(path, overwrite=True) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mean=self.mean, scale=self.scale, coef=self.coef, intercept=self.intercept,
                         meta=np.asarray(json.dumps({"genes": list(self.genes), "params": self.params})))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassifierReference":
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                ref = cls(tuple(meta["genes"]), z["mean"], z["scale"], z["coef"], z["intercept"], meta["params"])
        except FileNotFoundError:
            raise StimageError(f"classifier {path} not found") from None
        except Exception as e:  # zip/npz/json errors of a truncated file
            raise StimageError(f"classifier {path} is corrupt ({type(e).__name__}); retrain") from None
        if ref.coef.shape != (len(ref.genes), ref.mean.shape[0]) or ref.intercept.shape != (len(ref.genes),):
            raise StimageError(f"classifier {path} has inconsistent shapes {ref.coef.shape}, {ref.intercept.shape}")
        return ref


def fit_classifier(feats: np.ndarray, counts: np.ndarray, samples: np.ndarray, genes, *, C: float = 0.1,
                   l1_ratio: float = 0.5, max_iter: int = 500, seed: int = 0,
                   progress: bool = True) -> ClassifierReference:
    """feats (N, D), counts (N, G), samples (N,) → fitted reference.

    A gene with one class only in training gets weight 0 and the class frequency as its
    probability (and a warning), rather than failing the whole fit.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    feats = np.asarray(feats, np.float64)
    y = high_labels(counts, samples)
    mean = feats.mean(0)
    std = feats.std(0)
    alive = std > 1e-6
    scale = np.where(alive, std, np.inf)  # a constant feature gets weight 0 (see NBHead)
    z = (feats - mean) / scale
    coef = np.zeros((y.shape[1], feats.shape[1]))
    intercept = np.zeros(y.shape[1])
    one_class = []
    for g in tqdm(range(y.shape[1]), desc="classifiers", disable=not progress, leave=False):
        pos = y[:, g].mean()
        if pos in (0.0, 1.0):
            one_class.append(genes[g])
            intercept[g] = np.log(max(pos, 1e-6) / max(1 - pos, 1e-6))
            continue
        with warnings.catch_warnings():
            # saga stops at max_iter on a few genes; the fit is still usable, and a
            # per-gene warning would bury the user in lines.
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(solver="saga", l1_ratio=l1_ratio, C=C, max_iter=max_iter, random_state=seed)
            clf.fit(z, y[:, g])
        coef[g], intercept[g] = clf.coef_[0], clf.intercept_[0]
    if one_class:
        warnings.warn(f"{len(one_class)} gene(s) have one class only in training (constant probability): "
                      f"{', '.join(one_class[:5])}", stacklevel=2)
    return ClassifierReference(tuple(genes), mean.astype(np.float32), scale.astype(np.float32),
                               coef.astype(np.float32), intercept.astype(np.float32),
                               {"C": C, "l1_ratio": l1_ratio, "max_iter": max_iter, "seed": seed})


def apply_classifier(ref: ClassifierReference, feats: np.ndarray) -> np.ndarray:
    """(N, D) features → (N, G) probability of *high* expression."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[1] != ref.mean.shape[0]:
        raise StimageError(f"features have shape {feats.shape}, the classifier expects (N, {ref.mean.shape[0]})")
    logits = ((feats - ref.mean) / ref.scale) @ ref.coef.T.astype(np.float64) + ref.intercept
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


CLASSIFIER_FORMAT = "stimage-jax-classifier/1"


def _legacy_fingerprint(path) -> str:
    """The weights hash models saved before 2026-11-29 recorded (SHA-1 of the first MiB and
    the size), so they still load; new models record the whole file's SHA-256."""
    import hashlib

    if path is None:
        return "random"
    h = hashlib.sha1()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
    h.update(str(os.path.getsize(path)).encode())
    return h.hexdigest()[:10]


class ClassifierModel:
    """A frozen backbone plus per-gene classifiers (``workdir/model``: model.json,
    classifier.npz). The backbone is the pretrained one named in model.json and is rebuilt
    from its weights file, whose content hash must match the one trained with.

    A :class:`~export.runtime.predictor.Predictor` (task ``classify``): ``params(tiles)``
    returns ``{"p_high": (N, G)}``.
    """

    task = CLASSIFY

    def __init__(self, config: dict, backbone, ref: ClassifierReference):
        self.config, self.backbone, self.ref = config, backbone, ref

    @property
    def genes(self) -> list[str]:
        return list(self.ref.genes)

    @property
    def tile_um(self) -> float:
        return float(self.config["tile_um"])

    @property
    def tile_px(self) -> int:
        return int(self.config["tile_px"])

    @property
    def provenance(self) -> dict:
        cfg = self.config
        from stimage_jax import __version__

        return {"task": CLASSIFY, "backbone": cfg["backbone"], "genes": cfg["genes"], "tile_um": cfg["tile_um"],
                "tile_px": cfg["tile_px"], "version": __version__, "training_samples": cfg["training_samples"],
                "stain": (cfg.get("stain") or {}).get("method", "none"), "runtime": "jax"}

    def needs_tiles(self, features: dict | None = None) -> bool:
        return not features

    def params(self, tiles, *, batch_size: int = 32, progress: bool = False, features=None) -> dict:
        """uint8 tiles (N, px, px, 3), or features {backbone: (N, D)} → {"p_high": (N, G)}."""
        f = None if not features else next(iter(features.values()))
        return {"p_high": self.p_high(tiles, features=f, batch_size=batch_size, progress=progress)}

    @property
    def stain(self):
        d = self.config.get("stain")
        if not d:
            return None
        from data_pipelines.stain_normalisation import Reference

        return Reference.from_dict(d, where="the model's stain reference")

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write atomically: a temporary sibling folder renamed onto ``model_dir``, so an
        old model is never left half-replaced."""
        model_dir = Path(model_dir).absolute()
        with atomic_dir(model_dir) as tmp:
            self.ref.save(tmp / CLASSIFIER_FILE)
            (tmp / "model.json").write_text(json.dumps(self.config, indent=1))
        return model_dir

    @classmethod
    def load(cls, model_dir: str | os.PathLike, config: dict | None = None) -> "ClassifierModel":
        from flax import nnx

        from stimage_jax.features.extract import weights_fingerprint
        from stimage_jax.features.registry import create_backbone

        model_dir = resolve_model_dir(model_dir)
        if config is None:
            try:
                config = json.loads((model_dir / "model.json").read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise StimageError(f"{model_dir / 'model.json'} is missing or corrupt ({type(e).__name__})") from None
        if config.get("format") != CLASSIFIER_FORMAT:
            raise StimageError(f"{model_dir} is not a classification model (format {config.get('format')!r})")
        w = config.get("weights")
        if w is not None and not Path(w).is_file():
            raise StimageError(f"the classifier's backbone weights {w} are missing")
        if config["weights_fingerprint"] not in (weights_fingerprint(w), _legacy_fingerprint(w)):
            raise StimageError(f"backbone weights {w} changed since training (fingerprint differs); retrain")
        backbone = create_backbone(config["backbone"], rngs=nnx.Rngs(config.get("seed", 0)), weights=w)
        ref = ClassifierReference.load(model_dir / CLASSIFIER_FILE)
        if list(ref.genes) != list(config["genes"]):
            raise StimageError(f"{model_dir}: classifier genes differ from model.json")
        return cls(config, backbone, ref)

    def p_high(self, tiles: np.ndarray | None = None, *, features: np.ndarray | None = None,
               batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """(N, G) probabilities from tiles (N, px, px, 3) uint8 or precomputed features."""
        if features is None:
            from stimage_jax.features.extract import extract_features

            features = extract_features(self.backbone, tiles, batch_size=batch_size, progress=progress)
        return apply_classifier(self.ref, features)
