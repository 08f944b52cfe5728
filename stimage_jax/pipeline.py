"""End-to-end steps the CLI calls: train a model in a workdir, predict an AnnData.

slide/AnnData → tiles (cached) → features (cached) → NB parameters per member →
ensemble moments. Every output lives under one ``workdir``; a rerun with the same
request resumes (finished members and caches are reused, a killed member continues from
its last checkpoint).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
from pathlib import Path

import anndata as ad
import jax
import numpy as np
import pandas as pd
from flax import nnx

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_path
from data_pipelines.slides import read_h5ad
from data_pipelines.tiles import spot_tiles, tile_geometry
from export.prediction import build_prediction
from stimage_jax import __version__
from stimage_jax.ensemble.model import MODEL_FORMAT, EnsembleModel, STimageNet, build_member
from stimage_jax.ensemble.train import TrainConfig, fit_member
from stimage_jax.features.extract import cached_features, weights_fingerprint
from stimage_jax.features.registry import BACKBONES, DEFAULT_WEIGHTS, create_backbone
from stimage_jax.genes import check_genes, select_genes
from stimage_jax.nb.head import init_head_from_data

__all__ = ["train", "predict", "provenance", "split_samples", "counts_matrix", "sample_features"]

log = logging.getLogger("stimage")


def split_samples(adatas) -> list[ad.AnnData]:
    """Per-sample AnnData views, in input order; sample ids must be unique."""
    out, seen = [], set()
    for a in adatas:
        for s in pd.unique(a.obs[keys.SAMPLE].astype(str)):
            if s in seen:
                raise StimageError(f"sample {s!r} appears twice in the training data")
            seen.add(s)
            sub = a[a.obs[keys.SAMPLE].astype(str) == s]
            if sub.n_obs == 0:
                raise StimageError(f"sample {s!r} has no spots")
            out.append(sub)
    return out


def counts_matrix(adata: ad.AnnData, genes) -> np.ndarray:
    """(N, G) float32 dense raw counts of ``genes``."""
    x = adata[:, list(genes)].X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return x.astype(np.float32)


def _load(data) -> list[ad.AnnData]:
    return [d if isinstance(d, ad.AnnData) else read_h5ad(d) for d in data]


def _sample_id(a) -> str:
    return str(a.obs[keys.SAMPLE].iloc[0])


def _tile_um(adatas, tile_um):
    """One physical tile size for all training samples (default: their common spot diameter)."""
    if tile_um is not None:
        return float(tile_um)
    ums = {tile_geometry(a)["tile_um"] for a in adatas}
    if len(ums) != 1:
        raise StimageError(f"training samples have different spot diameters {sorted(ums)} µm; "
                           "pass --tile-um to tile them all at one physical size")
    return ums.pop()


def sample_features(backbone, adatas, geometry, weights_fp, cache: Path, batch_size=32, progress=True):
    """Per-sample (N_s, D) features of spot tiles, both cached under ``cache``."""
    feats = []
    for a in adatas:
        s = _sample_id(a)
        tiles = spot_tiles(a, tile_um=geometry["tile_um"], tile_px=geometry["tile_px"],
                           cache_dir=cache / "tiles", progress=progress)
        name = f"{s}__{geometry['backbone']}__{weights_fp}__{geometry['tile_um']:g}um{geometry['tile_px']}px.npy"
        feats.append(cached_features(backbone, tiles, cache / "features" / name,
                                     batch_size=batch_size, progress=progress, desc=f"features {s}"))
    return feats


def train(data, workdir: str | os.PathLike, *, genes: str = "markers",
          backbone: str = "efficientnet_lite0", weights: str | os.PathLike | None = None,
          members: int = 1, fine_tune: bool = False, tile_um: float | None = None,
          tile_px: int = 299, val_samples: list[str] | None = None,
          config: TrainConfig = TrainConfig(), head_hidden: int = 0, dropout: float = 0.0,
          seed: int = 0, feature_batch_size: int = 32, progress: bool = True,
          overwrite: bool = False, cache_dir: str | os.PathLike | None = None) -> EnsembleModel:
    """Train an ensemble of ``members`` NB models; return it (also saved in ``workdir/model``).

    data: .h5ad paths or AnnData objects (one or more samples each). Validation (early
    stopping) uses whole samples: ``val_samples``, or by default the last training sample
    when there are at least two; never spots of a training sample. Tiles and features are
    cached under ``cache_dir`` (default ``workdir/cache``; share one across runs to reuse them).
    """
    if members < 1:
        raise StimageError(f"--members must be >= 1 (got {members})")
    if backbone not in BACKBONES:
        raise StimageError(f"unknown backbone {backbone!r}; choose from {', '.join(sorted(BACKBONES))}")
    workdir = Path(workdir).absolute()
    adatas = split_samples(_load(data))
    weights = weights if weights is not None else DEFAULT_WEIGHTS.get(backbone)
    if weights is not None and not Path(weights).is_file():
        raise StimageError(f"weights file {weights} not found")
    gene_list = select_genes(genes, adatas)
    sample_ids = [_sample_id(a) for a in adatas]
    if val_samples is None:
        val_samples = sample_ids[-1:] if len(sample_ids) >= 2 else []
    unknown = [v for v in val_samples if v not in sample_ids]
    if unknown:
        raise StimageError(f"validation sample(s) {unknown} not among the data's samples {sample_ids}")
    geometry = {"backbone": backbone, "tile_um": _tile_um(adatas, tile_um), "tile_px": int(tile_px)}
    request = {"data_samples": sample_ids, "genes": gene_list, "weights_fingerprint": weights_fingerprint(weights),
               "members": members, "fine_tune": fine_tune, "val_samples": list(val_samples),
               "train": dataclasses.asdict(config), "head": {"hidden": head_hidden, "dropout": dropout},
               "seed": seed, **geometry}

    req_file = workdir / "request.json"
    if req_file.exists():
        old = json.loads(req_file.read_text())
        if old != request:
            if not overwrite:
                diff = sorted(k for k in set(old) | set(request) if old.get(k) != request.get(k))
                raise StimageError(f"workdir {workdir} holds a different run (differs in {', '.join(diff)}); "
                                   "use another --workdir or pass --overwrite")
            for sub in ("checkpoints", "model"):
                shutil.rmtree(workdir / sub, ignore_errors=True)
        elif (workdir / "model" / "model.json").exists():
            log.info("workdir %s already holds this trained model; loading it", workdir)
            return EnsembleModel.load(workdir / "model")
    workdir.mkdir(parents=True, exist_ok=True)
    with atomic_path(req_file) as tmp:
        tmp.write_text(json.dumps(request, indent=1))

    if weights is None:
        log.warning("backbone %s has no pretrained weights: features come from a random "
                    "initialisation (pass --weights FILE)", backbone)
    rngs = nnx.Rngs(seed)
    bb = create_backbone(backbone, rngs=rngs, weights=weights)
    cache = Path(cache_dir).absolute() if cache_dir is not None else workdir / "cache"
    feats = sample_features(bb, adatas, geometry, request["weights_fingerprint"], cache,
                            feature_batch_size, progress)
    is_val = [s in val_samples for s in sample_ids]
    counts = [counts_matrix(a, gene_list) for a in adatas]
    pick = lambda xs, v: np.concatenate([x for x, f in zip(xs, is_val) if f == v]) if any(f == v for f in is_val) else None
    f_tr, y_tr, f_va, y_va = pick(feats, False), pick(counts, False), pick(feats, True), pick(counts, True)
    if f_tr is None:
        raise StimageError("every sample is a validation sample: nothing left to train on")
    if fine_tune:
        tiles = [np.asarray(spot_tiles(a, tile_um=geometry["tile_um"], tile_px=geometry["tile_px"],
                                       cache_dir=cache / "tiles", progress=False)) for a in adatas]
        x_tr, x_va = pick(tiles, False), pick(tiles, True)
    else:
        x_tr, x_va = f_tr, f_va

    cfg = {"format": MODEL_FORMAT, "version": __version__, "genes": gene_list, "backbone": backbone,
           "weights": str(weights) if weights else None, "num_features": int(bb.num_features),
           "fine_tune": fine_tune, "members": members, "head": {"hidden": head_hidden, "dropout": dropout},
           "tile_um": geometry["tile_um"], "tile_px": geometry["tile_px"], "train": dataclasses.asdict(config),
           "seed": seed, "training_samples": [s for s, v in zip(sample_ids, is_val) if not v],
           "validation_samples": list(val_samples), "nb_parameterisation": "mean-dispersion (log link): var = mu + mu^2/r"}
    key = jax.random.key(seed)
    trained, logs, best_epochs = [], [], []
    for m in range(members):
        mkey = jax.random.fold_in(key, m)
        member = build_member(cfg, rngs=nnx.Rngs(jax.random.fold_in(mkey, 0)),
                              backbone=create_backbone(backbone, rngs=nnx.Rngs(0), weights=weights) if fine_tune else None)
        head = member.head if fine_tune else member
        init_head_from_data(head, f_tr, y_tr)
        mode = (lambda net: (net.train(), net.backbone.eval())) if fine_tune else None
        member, hist = fit_member(member, x_tr, y_tr, x_va, y_va, key=jax.random.fold_in(mkey, 1),
                                  config=config, ckpt_dir=workdir / "checkpoints" / f"member_{m:03d}",
                                  set_train_mode=mode, progress=progress, desc=f"member {m + 1}/{members}")
        trained.append(member)
        logs += [{"member": m, **h} for h in hist]
        val = [h["val_loss"] for h in hist]
        best_epochs.append(int(np.nanargmin(val)) if y_va is not None and len(val) else len(hist) - 1)
        log.info("member %d/%d: %d epochs, best epoch %d", m + 1, members, len(hist), best_epochs[-1])
    cfg["best_epochs"] = best_epochs
    cfg["trained_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_path(workdir / "train_log.csv") as tmp:
        pd.DataFrame(logs).to_csv(tmp, index=False)
    model = EnsembleModel(cfg, None if fine_tune else bb, trained)
    model.save(workdir / "model")
    return model


def predict(adata: ad.AnnData, model: EnsembleModel, *, batch_size: int = 32,
            progress: bool = True, tiles: np.ndarray | None = None,
            features: np.ndarray | None = None, interval: float = 0.8) -> ad.AnnData:
    """Predict NB moments for every spot of ``adata`` → a new AnnData.

    X = ensemble mean; layers var_aleatoric, var_epistemic (zeros for one member), q_lo and
    q_hi (the central ``interval`` of the members' NB mixture); ``features`` (N, D) from the
    model's own frozen backbone skip tiling and extraction (benchmarks reuse a cache);
    same obs, obsm["spatial"] and uns["spatial"] as the input; uns["stimage"] provenance.
    """
    cfg = model.config
    if features is not None:
        if model.backbone is None or features.shape != (adata.n_obs, cfg["num_features"]):
            raise StimageError(f"features of shape {features.shape} do not fit this model "
                               f"(needs ({adata.n_obs}, {cfg['num_features']}) from a frozen backbone)")
        tiles = np.zeros((adata.n_obs, 0, 0, 3), np.uint8)  # never read
    elif tiles is None:
        tiles = spot_tiles(adata, tile_um=cfg["tile_um"], tile_px=cfg["tile_px"], progress=progress)
    elif tiles.shape[1:] != (cfg["tile_px"], cfg["tile_px"], 3):
        raise StimageError(f"tiles have shape {tiles.shape[1:]}, the model expects "
                           f"({cfg['tile_px']}, {cfg['tile_px']}, 3)")
    mu, r = model.member_params(tiles, batch_size=batch_size, progress=progress, features=features)
    return build_prediction(adata, mu, r, cfg["genes"], provenance(cfg), interval=interval)


def provenance(cfg: dict) -> dict:
    """What a prediction records about the model that made it (model.json → uns)."""
    return {"backbone": cfg["backbone"], "genes": cfg["genes"], "tile_um": cfg["tile_um"],
            "tile_px": cfg["tile_px"], "members": cfg["members"], "fine_tune": cfg["fine_tune"],
            "model_version": cfg["version"], "version": __version__, "training_samples": cfg["training_samples"],
            "nb_parameterisation": cfg["nb_parameterisation"], "target": cfg["train"]["loss"]}
