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
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from data_pipelines import keys
from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_path
from data_pipelines.slides import read_h5ad
from data_pipelines.stain_normalisation import fit_stain
from data_pipelines.tissue import DEFAULT_MIN_COVERAGE, filter_by_coverage
from data_pipelines.tiles import load_image, lowres_view, sample_image_path, spot_tiles, stain_tag, tile_geometry
from export.prediction import build_prediction
from stimage_jax import __version__
from stimage_jax.ensemble.model import MODEL_FORMAT, EnsembleModel, build_member
from stimage_jax.ensemble.stacked import create_members, fit_ensemble, resolve_strategy, stack_members, unstack_members
from stimage_jax.ensemble.train import TrainConfig
from stimage_jax.features.embeddings import embedding_source_name, load_embeddings
from stimage_jax.features.extract import cached_features, weights_fingerprint
from stimage_jax.features.registry import BACKBONES, DEFAULT_WEIGHTS, create_backbone
from stimage_jax.genes import check_genes, select_genes
from stimage_jax.nb.head import init_head_from_data

__all__ = ["train", "predict", "train_classifier", "predict_classifier", "load_model", "provenance",
           "split_samples", "counts_matrix", "sample_features"]

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


def sample_features(backbone, adatas, geometry, weights_fp, cache: Path, batch_size=32, progress=True,
                    stain=None):
    """Per-sample (N_s, D) features of spot tiles (stain-normalised towards ``stain`` when
    given), both cached under ``cache``."""
    feats = []
    for a in adatas:
        s = _sample_id(a)
        tiles = spot_tiles(a, tile_um=geometry["tile_um"], tile_px=geometry["tile_px"],
                           cache_dir=cache / "tiles", progress=progress, stain=stain)
        tag = "" if stain is None else f"__{stain_tag(stain)}"
        name = (f"{s}__{geometry['backbone']}__{weights_fp}__{geometry['tile_um']:g}um{geometry['tile_px']}px"
                f"{tag}.npy")
        feats.append(cached_features(backbone, tiles, cache / "features" / name,
                                     batch_size=batch_size, progress=progress, desc=f"features {s}"))
    return feats


def _parse_sources(backbone, embeddings, weights) -> list[dict]:
    """--backbone a,b and --embeddings KEY → feature sources (see ensemble.model)."""
    names = [] if backbone is None else ([b.strip() for b in backbone.split(",") if b.strip()]
                                         if isinstance(backbone, str) else list(backbone))
    if not names and embeddings is None:
        names = ["efficientnet_lite0"]
    for b in names:
        if b not in BACKBONES:
            raise StimageError(f"unknown backbone {b!r}; choose from {', '.join(sorted(BACKBONES))}")
    if len(set(names)) != len(names):
        raise StimageError(f"backbone listed twice in {','.join(names)}")
    if weights is None:
        wlist = [DEFAULT_WEIGHTS.get(b) for b in names]
    else:
        wlist = [w.strip() for w in weights.split(",")] if isinstance(weights, str) else list(
            weights if isinstance(weights, (list, tuple)) else [weights])
        if len(wlist) != len(names):
            raise StimageError(f"{len(wlist)} weights file(s) for {len(names)} backbone(s): give one per backbone")
        # In a list, "default" (or an empty entry) keeps a backbone's shipped weights and
        # "none" asks for a random initialisation.
        wlist = [DEFAULT_WEIGHTS.get(b) if w in (None, "", "default") else (None if w == "none" else w)
                 for b, w in zip(names, wlist)]
    sources = []
    for b, w in zip(names, wlist):
        if w is not None and not Path(w).is_file():
            raise StimageError(f"weights file {w} not found")
        sources.append({"name": b, "kind": "backbone", "backbone": b, "weights": None if w is None else str(w)})
    if embeddings is not None:
        sources.append({"name": embedding_source_name(embeddings), "kind": "embeddings", "key": str(embeddings)})
    return sources


AUGMENTATIONS = ("none", "default", "hed")
_REQUEST_DEFAULTS = {"augment": "none", "augment_views": 0}  # request keys older runs lack


def augment_config(name: str):
    """``none`` → None; ``default`` → STimage's flips/rot90/affine/one-of photometric set;
    ``hed`` → the same plus HED stain jitter (Tellez et al. 2019, σ 0.05)."""
    if name in (None, "none"):
        return None
    if name not in AUGMENTATIONS:
        raise StimageError(f"unknown augmentation {name!r}; choose from {', '.join(AUGMENTATIONS)}")
    from data_pipelines.augmentation import AugmentConfig

    return AugmentConfig() if name == "default" else AugmentConfig(stain_p=1.0, stain_sigma=0.05)


def augmented_features(backbone, adata, geometry, weights_fp, cache: Path, aug_name: str, views: int, key,
                       *, batch_size: int = 32, progress: bool = True, stain=None) -> list[np.ndarray]:
    """``views`` augmented copies of one sample's tiles → their features, each (N, D),
    computed once and cached next to the plain features (frozen backbones only)."""
    import zlib

    from data_pipelines.augmentation import augment

    cfg = augment_config(aug_name)
    s = _sample_id(adata)
    tiles = spot_tiles(adata, tile_um=geometry["tile_um"], tile_px=geometry["tile_px"], cache_dir=cache / "tiles",
                       progress=progress, stain=stain)
    tag = "" if stain is None else f"__{stain_tag(stain)}"
    base = jax.random.fold_in(key, zlib.crc32(s.encode()))
    out = []
    for v in range(views):
        name = (f"{s}__{geometry['backbone']}__{weights_fp}__{geometry['tile_um']:g}um{geometry['tile_px']}px"
                f"{tag}__aug-{aug_name}-{int(jax.random.key_data(key).ravel()[-1])}-v{v}.npy")
        path = cache / "features" / name
        if path.exists():
            f = np.load(path)
            if f.shape == (len(tiles), backbone.num_features):
                out.append(f)
                continue
        kv = jax.random.fold_in(base, v)
        aug = np.concatenate([np.asarray(augment(jax.random.fold_in(kv, i), np.asarray(tiles[i:i + 64]), cfg))
                              for i in range(0, len(tiles), 64)])
        out.append(cached_features(backbone, aug, path, batch_size=batch_size, progress=progress,
                                   desc=f"features {s} view {v + 1}/{views}"))
    return out


def train(data, workdir: str | os.PathLike, *, genes: str = "markers",
          backbone: str | list[str] | None = "efficientnet_lite0", weights=None,
          embeddings: str | None = None, members: int = 1, fine_tune: bool = False,
          tile_um: float | None = None, tile_px: int = 299, val_samples: list[str] | None = None,
          config: TrainConfig = TrainConfig(), head_hidden: int = 0, dropout: float = 0.0,
          seed: int = 0, strategy: str = "auto", feature_batch_size: int = 32, progress: bool = True,
          overwrite: bool = False, cache_dir: str | os.PathLike | None = None,
          stain: str | None = None, stain_template: str | os.PathLike | None = None,
          min_coverage: float = DEFAULT_MIN_COVERAGE, augment: str = "none",
          augment_views: int = 4) -> EnsembleModel:
    """Train an ensemble of NB models; return it (also saved in ``workdir/model``).

    data: .h5ad paths or AnnData objects (one or more samples each). ``members`` models
    are trained per feature source: each backbone of ``backbone`` (a list or "a,b") and
    the precomputed ``embeddings`` (obsm key or folder of <sample>.npy) — FSTimage when
    there are several. Validation (early stopping) uses whole samples: ``val_samples``, or
    by default the last training sample when there are at least two; never spots of a
    training sample. ``strategy``: auto|vmap|loop (see :mod:`stimage_jax.ensemble.stacked`).
    Tiles and features are cached under ``cache_dir`` (default ``workdir/cache``).
    ``stain``: vahadane|macenko|reinhard normalises every tile towards a template — the
    image ``stain_template``, or a low-resolution view of the first training sample's
    image; the fitted reference is stored with the model and reused at prediction.
    Spots whose tile is less than ``min_coverage`` tissue are left out of training (counted
    in ``uns["stimage"]["dropped"]``, coverage in ``obs["tissue_coverage"]``).
    ``augment`` (none|default|hed) applies to training tiles only: fine-tuning augments every
    batch; a frozen backbone sees ``augment_views`` augmented copies of each training tile,
    whose features are computed once and cached.
    """
    aug_cfg = augment_config(augment)
    if aug_cfg is not None and augment_views < 1 and not fine_tune:
        raise StimageError(f"--augment-views must be >= 1 (got {augment_views})")
    if members < 1:
        raise StimageError(f"--members must be >= 1 (got {members})")
    sources = _parse_sources(backbone, embeddings, weights)
    backbone_sources = [s for s in sources if s["kind"] == "backbone"]
    if fine_tune and (len(sources) != 1 or not backbone_sources):
        raise StimageError("--fine-tune trains one backbone: give exactly one --backbone and no --embeddings")
    resolved = resolve_strategy(strategy, trains_backbone=fine_tune)
    workdir = Path(workdir).absolute()
    adatas = split_samples(_load(data))
    gene_list = select_genes(genes, adatas)
    sample_ids = [_sample_id(a) for a in adatas]
    if val_samples is None:
        val_samples = sample_ids[-1:] if len(sample_ids) >= 2 else []
    unknown = [v for v in val_samples if v not in sample_ids]
    if unknown:
        raise StimageError(f"validation sample(s) {unknown} not among the data's samples {sample_ids}")
    # Embeddings are checked before any slow step: a spot-count mismatch fails at once.
    emb_feats = {s["name"]: [load_embeddings(a, s["key"]) for a in adatas]
                 for s in sources if s["kind"] == "embeddings"}
    for s in sources:
        s["weights_fingerprint"] = weights_fingerprint(s.get("weights")) if s["kind"] == "backbone" else None
    geometry = ({"tile_um": _tile_um(adatas, tile_um), "tile_px": int(tile_px)} if backbone_sources
                else {"tile_um": None, "tile_px": None})
    low_coverage = {s: 0 for s in sample_ids}
    if backbone_sources and min_coverage > 0:
        # Tile QC: a tile that is mostly glass says little about its spot's expression.
        kept = [filter_by_coverage(a, min_coverage, tile_um=geometry["tile_um"], tile_px=geometry["tile_px"])
                for a in adatas]
        for name, per_sample in emb_feats.items():
            emb_feats[name] = [f[a.obs_names.get_indexer(k.obs_names)] for f, a, k in zip(per_sample, adatas, kept)]
        low_coverage = {s: a.n_obs - k.n_obs for s, a, k in zip(sample_ids, adatas, kept)}
        adatas = kept
    stain_ref = None
    if stain not in (None, "none"):
        if not backbone_sources:
            raise StimageError("--stain normalises tiles, but an embeddings-only model reads no tiles")
        template = stain_template
        if template is None:
            first = next(a for a, sid in zip(adatas, sample_ids) if sid not in val_samples)
            template = sample_image_path(first, _sample_id(first))
        stain_ref = fit_stain(stain, lowres_view(load_image(template)))
        log.info("stain normalisation: %s towards %s", stain, template)
    request = {"data_samples": sample_ids, "genes": gene_list, "stain": stain_tag(stain_ref),
               "sources": [{k: v for k, v in s.items() if k != "weights"} for s in sources],
               "members": members, "fine_tune": fine_tune, "val_samples": list(val_samples),
               "train": dataclasses.asdict(config), "head": {"hidden": head_hidden, "dropout": dropout},
               "seed": seed, "min_coverage": min_coverage if backbone_sources else None,
               "augment": augment or "none", "augment_views": augment_views if aug_cfg and not fine_tune else 0,
               **geometry}

    req_file = workdir / "request.json"
    if req_file.exists():
        # Keys added after a run was made mean what that run did: fill them in first.
        old = {**_REQUEST_DEFAULTS, **json.loads(req_file.read_text())}
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

    cache = Path(cache_dir).absolute() if cache_dir is not None else workdir / "cache"
    backbones, feats = {}, dict(emb_feats)
    for s in backbone_sources:
        if s["weights"] is None:
            log.warning("backbone %s has no pretrained weights: features come from a random "
                        "initialisation (pass --weights FILE)", s["backbone"])
        bb = create_backbone(s["backbone"], rngs=nnx.Rngs(seed), weights=s["weights"])
        backbones[s["name"]] = bb
        feats[s["name"]] = sample_features(bb, adatas, {"backbone": s["backbone"], **geometry},
                                           s["weights_fingerprint"], cache, feature_batch_size, progress,
                                           stain=stain_ref)
    for s in sources:
        s["num_features"] = int(feats[s["name"]][0].shape[1])
    is_val = [s in val_samples for s in sample_ids]
    if all(is_val):
        raise StimageError("every sample is a validation sample: nothing left to train on")
    counts = [counts_matrix(a, gene_list) for a in adatas]

    def pick(xs, v):
        return np.concatenate([x for x, f in zip(xs, is_val) if f == v]) if any(f == v for f in is_val) else None

    y_tr, y_va = pick(counts, False), pick(counts, True)
    cfg = {"format": MODEL_FORMAT, "version": __version__, "genes": gene_list,
           "backbone": ",".join(s["name"] for s in sources), "sources": sources,
           "member_sources": [s["name"] for s in sources for _ in range(members)],
           "fine_tune": fine_tune, "members": members * len(sources), "members_per_source": members,
           "stain": None if stain_ref is None else stain_ref.to_dict(),
           "head": {"hidden": head_hidden, "dropout": dropout},
           "tile_um": geometry["tile_um"], "tile_px": geometry["tile_px"], "train": dataclasses.asdict(config),
           "seed": seed, "min_coverage": request["min_coverage"], "augment": request["augment"],
           "augment_views": request["augment_views"],
           "dropped_low_coverage": low_coverage, "strategy": resolved, "training_samples": [s for s, v in zip(sample_ids, is_val) if not v],
           "validation_samples": list(val_samples), "nb_parameterisation": "mean-dispersion (log link): var = mu + mu^2/r"}
    if len(backbone_sources) == 1 and len(sources) == 1:
        cfg["num_features"] = sources[0]["num_features"]  # what ONNX consumers of /1 models read
    key = jax.random.key(seed)
    trained, logs, best_epochs = [], [], []
    for si, src in enumerate(sources):
        f_tr, f_va = pick(feats[src["name"]], False), pick(feats[src["name"]], True)
        ids = [si * members + m for m in range(members)]   # global member index: distinct seeds
        init_keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, i), 0) for i in ids])
        train_keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, i), 1) for i in ids])
        y_src = y_tr
        if fine_tune:
            tiles = [np.asarray(spot_tiles(a, tile_um=geometry["tile_um"], tile_px=geometry["tile_px"],
                                           cache_dir=cache / "tiles", progress=False, stain=stain_ref))
                     for a in adatas]
            x_tr, x_va = pick(tiles, False), pick(tiles, True)
            stacked = stack_members([build_member(cfg, rngs=nnx.Rngs(k), source=src, backbone=create_backbone(
                src["backbone"], rngs=nnx.Rngs(0), weights=src["weights"])) for k in init_keys])
            init_head_from_data(stacked.head, f_tr, y_tr, loss=config.loss)
            mode = lambda net: (net.train(), net.backbone.eval())  # noqa: E731  BN statistics stay frozen
        else:
            x_tr, x_va = f_tr, f_va
            if aug_cfg is not None and src["kind"] == "backbone":
                # Frozen backbone: K augmented views of every training tile, as extra spots.
                views = [augmented_features(backbones[src["name"]], a, {"backbone": src["backbone"], **geometry},
                                            src["weights_fingerprint"], cache, augment, augment_views,
                                            jax.random.fold_in(key, 0xA06), batch_size=feature_batch_size,
                                            progress=progress, stain=stain_ref)
                         for a, v in zip(adatas, is_val) if not v]
                x_tr = np.concatenate([f_tr] + [np.concatenate([vs[k] for vs in views]) for k in range(augment_views)])
                y_src = np.concatenate([y_tr] * (augment_views + 1))
            stacked = create_members(lambda r: build_member(cfg, rngs=r, source=src), init_keys)  # noqa: B023
            init_head_from_data(stacked, x_tr, y_src, loss=config.loss)
            mode = None
        log.info("training %d member(s) on %s (%s strategy)", members, src["name"], resolved)
        stacked, hists = fit_ensemble(stacked, x_tr, y_src, x_va, y_va, keys=train_keys,
                                      config=config, strategy=resolved,
                                      ckpt_dir=workdir / "checkpoints" / src["name"], set_train_mode=mode,
                                      progress=progress, augment=aug_cfg if fine_tune else None)
        trained += unstack_members(stacked)
        for i, hist in zip(ids, hists):
            logs += [{"member": i, "source": src["name"], **h} for h in hist]
            val = [h["val_loss"] for h in hist]
            best_epochs.append(int(np.nanargmin(val)) if y_va is not None and len(val) else len(hist) - 1)
    cfg["best_epochs"] = best_epochs
    cfg["trained_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    with atomic_path(workdir / "train_log.csv") as tmp:
        pd.DataFrame(logs).to_csv(tmp, index=False)
    model = EnsembleModel(cfg, {} if fine_tune else backbones, trained)
    model.save(workdir / "model")
    return model


def predict(adata: ad.AnnData, model: EnsembleModel, *, batch_size: int = 32,
            progress: bool = True, tiles: np.ndarray | None = None,
            features=None, embeddings: str | None = None, interval: float = 0.8) -> ad.AnnData:
    """Predict NB moments for every spot of ``adata`` → a new AnnData.

    X = ensemble mean; layers var_aleatoric, var_epistemic (zeros for one member), q_lo and
    q_hi (the central ``interval`` of the members' NB mixture); same obs, obsm["spatial"]
    and uns["spatial"] as the input; uns["stimage"] provenance. ``features``: (N, D) from
    the model's own frozen backbone, or a dict by source name — skip tiling and extraction
    (benchmarks reuse a cache). Embedding sources read ``obsm[key]`` / ``key/<sample>.npy``
    (``embeddings`` overrides the key the model was trained with).
    """
    cfg = model.config
    if features is not None and not isinstance(features, dict):
        if model.backbone is None:
            raise StimageError("plain features fit only a model with one frozen backbone; "
                               "pass a dict by source name")
        features = {model.sources[0]["name"]: features}
    features = dict(features or {})
    for src in model.embedding_sources():
        if src["name"] not in features:
            features[src["name"]] = load_embeddings(adata, embeddings or src["key"])
    for name, f in features.items():
        if np.shape(f)[0] != adata.n_obs:
            raise StimageError(f"features for {name} have {np.shape(f)[0]} rows for {adata.n_obs} spots")
    needs_tiles = cfg["fine_tune"] or any(s["name"] not in features for s in model.sources)
    if not needs_tiles:
        tiles = None
    elif tiles is None:
        tiles = spot_tiles(adata, tile_um=cfg["tile_um"], tile_px=cfg["tile_px"], progress=progress,
                           stain=model.stain)
    elif tiles.shape[1:] != (cfg["tile_px"], cfg["tile_px"], 3):
        raise StimageError(f"tiles have shape {tiles.shape[1:]}, the model expects "
                           f"({cfg['tile_px']}, {cfg['tile_px']}, 3)")
    mu, r = model.member_params(tiles, batch_size=batch_size, progress=progress, features=features or None)
    out = build_prediction(adata, mu, r, cfg["genes"], provenance(cfg), interval=interval)
    if tiles is not None and keys.TISSUE_COVERAGE not in out.obs:
        # Record each spot's tile QC (training dropped tiles under cfg["min_coverage"]):
        # predictions on mostly-glass tiles are extrapolations a user may want to mask.
        from data_pipelines.tissue import spot_tissue_coverage

        out.obs[keys.TISSUE_COVERAGE] = spot_tissue_coverage(adata, tile_um=cfg["tile_um"], tile_px=cfg["tile_px"])
    return out


def provenance(cfg: dict) -> dict:
    """What a prediction records about the model that made it (model.json → uns)."""
    return {"backbone": cfg["backbone"], "genes": cfg["genes"], "tile_um": cfg["tile_um"],
            "tile_px": cfg["tile_px"], "members": cfg["members"], "fine_tune": cfg["fine_tune"],
            "model_version": cfg["version"], "version": __version__, "training_samples": cfg["training_samples"],
            "nb_parameterisation": cfg["nb_parameterisation"], "target": cfg["train"]["loss"],
            "stain": (cfg.get("stain") or {}).get("method", "none")}


def train_classifier(data, workdir: str | os.PathLike, *, genes: str = "markers",
                     backbone: str = "efficientnet_lite0", weights=None, tile_um: float | None = None,
                     tile_px: int = 299, C: float = 0.1, l1_ratio: float = 0.5, seed: int = 0,
                     stain: str | None = None, stain_template=None, min_coverage: float = DEFAULT_MIN_COVERAGE,
                     feature_batch_size: int = 32, progress: bool = True, overwrite: bool = False,
                     cache_dir: str | os.PathLike | None = None):
    """The paper's classification model: frozen-backbone features → per-gene elastic-net
    logistic regression of high (per-sample z > 0) vs low; saved in ``workdir/model``.
    Every sample trains (no early stopping to validate)."""
    from stimage_jax.classify import CLASSIFIER_FORMAT, ClassifierModel, fit_classifier

    sources = _parse_sources(backbone, None, weights)
    if len(sources) != 1:
        raise StimageError("--task classify uses one backbone")
    src = sources[0]
    workdir = Path(workdir).absolute()
    adatas = split_samples(_load(data))
    gene_list = select_genes(genes, adatas)
    geometry = {"tile_um": _tile_um(adatas, tile_um), "tile_px": int(tile_px)}
    stain_ref = None
    if stain not in (None, "none"):
        template = stain_template or sample_image_path(adatas[0], _sample_id(adatas[0]))
        stain_ref = fit_stain(stain, lowres_view(load_image(template)))
    fp = weights_fingerprint(src["weights"])
    request = {"task": "classify", "data_samples": [_sample_id(a) for a in adatas], "genes": gene_list,
               "backbone": src["backbone"], "weights_fingerprint": fp, "C": C, "l1_ratio": l1_ratio, "seed": seed,
               "stain": stain_tag(stain_ref), "min_coverage": min_coverage, **geometry}
    req_file = workdir / "request.json"
    if req_file.exists() and json.loads(req_file.read_text()) != request and not overwrite:
        raise StimageError(f"workdir {workdir} holds a different run; use another --workdir or pass --overwrite")
    if req_file.exists() and json.loads(req_file.read_text()) == request and (workdir / "model" / "model.json").exists():
        return ClassifierModel.load(workdir / "model")
    workdir.mkdir(parents=True, exist_ok=True)
    with atomic_path(req_file) as tmp:
        tmp.write_text(json.dumps(request, indent=1))
    low = {}
    if min_coverage > 0:
        kept = [filter_by_coverage(a, min_coverage, **geometry) for a in adatas]
        low = {_sample_id(a): a.n_obs - k.n_obs for a, k in zip(adatas, kept)}
        adatas = kept
    cache = Path(cache_dir).absolute() if cache_dir is not None else workdir / "cache"
    bb = create_backbone(src["backbone"], rngs=nnx.Rngs(seed), weights=src["weights"])
    feats = sample_features(bb, adatas, {"backbone": src["backbone"], **geometry}, fp, cache, feature_batch_size,
                            progress, stain=stain_ref)
    counts = np.concatenate([counts_matrix(a, gene_list) for a in adatas])
    samples = np.concatenate([np.full(a.n_obs, _sample_id(a)) for a in adatas])
    ref = fit_classifier(np.concatenate(feats), counts, samples, gene_list, C=C, l1_ratio=l1_ratio, seed=seed,
                         progress=progress)
    cfg = {"format": CLASSIFIER_FORMAT, "task": "classify", "version": __version__, "genes": gene_list,
           "backbone": src["backbone"], "weights": src["weights"], "weights_fingerprint": fp,
           "num_features": int(feats[0].shape[1]), "seed": seed, "classifier": ref.params,
           "labels": "high = count above the gene's mean within its sample (per-sample z-score > 0)",
           "stain": None if stain_ref is None else stain_ref.to_dict(), "min_coverage": min_coverage,
           "dropped_low_coverage": low, "training_samples": [_sample_id(a) for a in adatas],
           "trained_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **geometry}
    model = ClassifierModel(cfg, bb, ref)
    model.save(workdir / "model")
    return model


def predict_classifier(adata: ad.AnnData, model, *, batch_size: int = 32, progress: bool = True,
                       features: np.ndarray | None = None) -> ad.AnnData:
    """``layers["p_high"]`` (and X) = probability of high expression per spot and gene."""
    cfg = model.config
    if features is None:
        tiles = spot_tiles(adata, tile_um=cfg["tile_um"], tile_px=cfg["tile_px"], progress=progress, stain=model.stain)
        p = model.p_high(tiles, batch_size=batch_size, progress=progress)
    else:
        p = model.p_high(features=features)
    out = ad.AnnData(X=p, obs=adata.obs.copy(), var=pd.DataFrame(index=pd.Index(model.genes)))
    out.layers[keys.P_HIGH] = p
    if keys.SPATIAL in adata.obsm:
        out.obsm[keys.SPATIAL] = np.asarray(adata.obsm[keys.SPATIAL])
    if keys.SPATIAL_UNS in adata.uns:
        out.uns[keys.SPATIAL_UNS] = adata.uns[keys.SPATIAL_UNS]
    src = dict(adata.uns.get(keys.STIMAGE_UNS, {}))
    out.uns[keys.STIMAGE_UNS] = {
        **{k: v for k, v in src.items() if k in (keys.MPP, keys.SPOT_DIAMETER_UM, keys.PLATFORM, keys.LIBRARY_ID)},
        keys.PREDICTION: {"task": "classify", "backbone": cfg["backbone"], "genes": cfg["genes"],
                          "tile_um": cfg["tile_um"], "tile_px": cfg["tile_px"], "version": __version__,
                          "training_samples": cfg["training_samples"],
                          "stain": (cfg.get("stain") or {}).get("method", "none")}}
    return out


def load_model(path: str | os.PathLike):
    """An :class:`EnsembleModel` or a classification model, by what ``model.json`` says."""
    from stimage_jax.classify import CLASSIFIER_FORMAT, ClassifierModel

    p = Path(path)
    meta = p / "model" / "model.json" if (p / "model" / "model.json").is_file() else p / "model.json"
    if meta.is_file():
        try:
            cfg = json.loads(meta.read_text())
        except json.JSONDecodeError as e:
            raise StimageError(f"{meta} is corrupt: {e}") from None
        if cfg.get("format") == CLASSIFIER_FORMAT:
            return ClassifierModel.load(meta.parent, cfg)
    return EnsembleModel.load(path)
