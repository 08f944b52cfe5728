"""End-to-end steps the CLI calls: train a model in a workdir, predict an AnnData.

slide/AnnData → tiles (cached) → features (cached) → NB parameters per member →
ensemble moments. Every output lives under one ``workdir``; a rerun with the same
request resumes (finished members and caches are reused, a killed member continues from
its last checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
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
from data_pipelines.io import atomic_path, workdir_lock
from data_pipelines.slides import read_h5ad
from data_pipelines.stain_normalisation import fit_stain
from data_pipelines.tissue import filter_by_coverage
from data_pipelines.tiles import load_image, lowres_view, sample_image_path, spot_tiles, stain_tag, tile_geometry
from export.runtime.prediction import predict_adata
from stimage_jax import __version__, distributed
from stimage_jax.config import AUGMENTATIONS, RunConfig
from stimage_jax.ensemble.model import MODEL_FORMAT, EnsembleModel, build_member, model_provenance
from stimage_jax.ensemble.stacked import create_members, fit_ensemble, resolve_strategy, stack_members, unstack_members
from stimage_jax.ensemble.train import TrainConfig
from stimage_jax.models import load_model  # noqa: F401  (re-exported: stimage_jax.pipeline.load_model)
from stimage_jax.features.embeddings import embedding_source_name, load_embeddings
from stimage_jax.features.extract import cached_features, weights_fingerprint
from stimage_jax.features.tta import tta_features
from stimage_jax.features.registry import BACKBONES, DEFAULT_WEIGHTS, create_backbone
from stimage_jax.genes import select_genes
from stimage_jax.nb.head import init_head_from_data, init_head_from_moments

__all__ = ["train", "predict", "train_classifier", "predict_classifier", "load_model", "provenance",
           "split_samples", "counts_matrix", "sample_features", "run_config"]

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


def tiles_digest(tiles: np.ndarray) -> str:
    """Content hash of a tile stack (N, px, px, 3): feature caches follow the tiles' pixels
    (image, geometry and stain all change them), never a sample's name."""
    h = hashlib.sha1(str(tiles.shape).encode())
    for i in range(0, len(tiles), 256):  # a memmap is hashed in slices, not loaded whole
        h.update(np.ascontiguousarray(tiles[i:i + 256]).tobytes())
    return h.hexdigest()[:12]


def sample_features(backbone, adatas, geometry, weights_fp, cache: Path, batch_size=32, progress=True,
                    stain=None, tta: int = 1):
    """Per-sample (N_s, D) features of spot tiles (stain-normalised towards ``stain`` when
    given; averaged over ``tta`` dihedral views), both cached under ``cache``: tiles by image
    content and geometry, each view's features by the tiles' content and the weights' hash."""
    feats = []
    for a in adatas:
        s = _sample_id(a)
        tiles = spot_tiles(a, tile_um=geometry["tile_um"], tile_px=geometry["tile_px"],
                           cache_dir=cache / "tiles", progress=progress, stain=stain)
        stem = cache / "features" / f"{s}__{geometry['backbone']}__{weights_fp}__{tiles_digest(tiles)}"
        feats.append(tta_features(backbone, tiles, tta, stem, batch_size=batch_size, progress=progress,
                                  desc=f"features {s}"))
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
    digest = tiles_digest(tiles)
    base = jax.random.fold_in(key, zlib.crc32(s.encode()))
    out = []
    for v in range(views):
        name = (f"{s}__{geometry['backbone']}__{weights_fp}__{digest}"
                f"__aug-{aug_name}-{int(jax.random.key_data(key).ravel()[-1])}-v{v}.npy")
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


REQUEST_FORMAT = "stimage-request/2"


def run_config(config: RunConfig | TrainConfig | None = None, **options) -> RunConfig:
    """A checked RunConfig from a RunConfig (or a bare TrainConfig, as older callers pass)
    and flat overrides by field name (``members=5, lr=1e-3, backbone="a,b"``)."""
    if isinstance(config, TrainConfig):
        config = RunConfig(train=config)
    if "head_hidden" in options:
        options["hidden"] = options.pop("head_hidden")
    return (config or RunConfig()).override(**options).check()


@dataclasses.dataclass
class _Run:
    """A training run's inputs after reading, gene choice, tile QC and stain fitting."""

    cfg: RunConfig
    adatas: list
    sample_ids: list[str]
    val_samples: list[str]
    genes: list[str]
    sources: list[dict]
    geometry: dict
    emb_feats: dict
    low_coverage: dict
    stain_ref: object
    fingerprints: dict
    # --dataset (stimage_jax.ensemble.dataset_train): per-sample counts, and lazy training /
    # validation tiles by is_val, instead of reading and tiling ``adatas``
    counts: list | None = None
    tiles_for: object = None
    # --dataset: the training features' (mean, std), accumulated in chunks over the stream
    # (stimage_jax.ensemble.dataset_train) instead of held as arrays
    feature_stats: tuple | None = None

    @property
    def backbone_sources(self) -> list[dict]:
        return [s for s in self.sources if s["kind"] == "backbone"]

    @property
    def is_val(self) -> list[bool]:
        return [s in self.val_samples for s in self.sample_ids]


def _prepare(data, cfg: RunConfig) -> _Run:
    """Read the samples, choose genes and validation samples, check embeddings, apply tile
    QC and fit the stain reference — every check that can fail runs before slow work."""
    from data_pipelines.fingerprint import adata_fingerprint

    f = cfg.features
    sources = _parse_sources(None if f.backbone is None else list(f.backbone), f.embeddings, None if f.weights is None else list(f.weights))
    backbone_sources = [s for s in sources if s["kind"] == "backbone"]
    if f.fine_tune and (len(sources) != 1 or not backbone_sources):
        raise StimageError("--fine-tune trains one backbone: give exactly one --backbone and no --embeddings")
    if cfg.task == "classify" and (len(sources) != 1 or not backbone_sources):
        raise StimageError("--task classify uses one backbone")
    adatas = split_samples(_load(data))
    genes = select_genes(cfg.genes, adatas)
    sample_ids = [_sample_id(a) for a in adatas]
    if cfg.task == "classify":
        val = []  # every sample trains: nothing to stop early on
    elif cfg.val_samples is None:
        val = sample_ids[-1:] if len(sample_ids) >= 2 else []
    else:
        val = list(cfg.val_samples)
    unknown = [v for v in val if v not in sample_ids]
    if unknown:
        raise StimageError(f"validation sample(s) {unknown} not among the data's samples {sample_ids}")
    if val and all(s in val for s in sample_ids):
        raise StimageError("every sample is a validation sample: nothing left to train on")
    fingerprints = {s: adata_fingerprint(a) for s, a in zip(sample_ids, adatas)}
    # Embeddings are checked before any slow step: a spot-count mismatch fails at once.
    emb_feats = {s["name"]: [load_embeddings(a, s["key"]) for a in adatas]
                 for s in sources if s["kind"] == "embeddings"}
    for s in sources:
        s["weights_fingerprint"] = weights_fingerprint(s.get("weights")) if s["kind"] == "backbone" else None
    geometry = ({"tile_um": _tile_um(adatas, f.tile_um), "tile_px": int(f.tile_px)} if backbone_sources
                else {"tile_um": None, "tile_px": None})
    low_coverage = {s: 0 for s in sample_ids}
    if backbone_sources and f.min_coverage > 0:
        # Tile QC: a tile that is mostly glass says little about its spot's expression.
        kept = [filter_by_coverage(a, f.min_coverage, **geometry) for a in adatas]
        for name, per_sample in emb_feats.items():
            emb_feats[name] = [e[a.obs_names.get_indexer(k.obs_names)] for e, a, k in zip(per_sample, adatas, kept)]
        low_coverage = {s: a.n_obs - k.n_obs for s, a, k in zip(sample_ids, adatas, kept)}
        adatas = kept
    stain_ref = None
    if f.stain not in (None, "none"):
        if not backbone_sources:
            raise StimageError("--stain normalises tiles, but an embeddings-only model reads no tiles")
        template = f.stain_template
        if template is None:
            first = next(a for a, sid in zip(adatas, sample_ids) if sid not in val)
            template = sample_image_path(first, _sample_id(first))
        stain_ref = fit_stain(f.stain, lowres_view(load_image(template)))
        log.info("stain normalisation: %s towards %s", f.stain, template)
    return _Run(cfg, adatas, sample_ids, val, genes, sources, geometry, emb_feats, low_coverage, stain_ref,
                fingerprints)


def _request(run: _Run) -> dict:
    """What decides a run's result, by content: the config, each sample's data hash, the
    genes, the weights' hashes and the stain reference. A rerun resumes only when equal."""
    cfg = run.cfg.to_dict()
    cfg["features"].pop("feature_batch_size")  # how fast, not what: a rerun may change it
    request = {"format": REQUEST_FORMAT, "config": cfg, "data": run.fingerprints, "genes": run.genes,
               "weights": {s["name"]: s["weights_fingerprint"] for s in run.sources if s["kind"] == "backbone"},
               "stain": stain_tag(run.stain_ref)}
    return json.loads(json.dumps(request))  # as it reads back from request.json (tuples → lists)


def _what_changed(old: dict, new: dict) -> str:
    """One phrase naming what differs between two requests."""
    if old.get("format") != new.get("format"):
        return "it was made by another version of stimage"
    od, nd = old.get("data", {}), new.get("data", {})
    changed = [s for s in nd if s in od and od[s] != nd[s]]
    if changed:
        return f"the data of sample(s) {', '.join(changed)} changed since it was trained"
    if set(od) != set(nd):
        return f"samples {sorted(od)} → {sorted(nd)}"

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    fo, fn = flat(old), flat(new)
    diff = sorted(k.removeprefix("config.").split(".")[-1] for k in set(fo) | set(fn) if fo.get(k) != fn.get(k))
    return f"differs in {', '.join(diff)}"


def _claim_workdir(workdir: Path, request: dict, overwrite: bool, load):
    """Resume, reuse or refuse: the finished model when ``workdir`` holds this very request,
    else None after recording it (a different run is cleared only with ``overwrite``)."""
    req_file = workdir / "request.json"
    if req_file.exists():
        try:
            old = json.loads(req_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {"format": "unreadable"}
        if old != request:
            if not overwrite:
                raise StimageError(f"workdir {workdir} holds a different run ({_what_changed(old, request)}); "
                                   "use another --workdir or pass --overwrite")
            for sub in ("checkpoints", "model"):
                shutil.rmtree(workdir / sub, ignore_errors=True)
            (workdir / "train_log.csv").unlink(missing_ok=True)
        elif (workdir / "model" / "model.json").exists():
            log.info("workdir %s already holds this trained model; loading it", workdir)
            return load()
    workdir.mkdir(parents=True, exist_ok=True)
    with atomic_path(req_file) as tmp:
        tmp.write_text(json.dumps(request, indent=1))
    return None


def _backbone_features(run: _Run, cache: Path, progress: bool):
    """Frozen backbones by source name, and every source's per-sample features."""
    backbones, feats = {}, dict(run.emb_feats)
    for s in run.backbone_sources:
        if s["weights"] is None:
            log.warning("backbone %s has no pretrained weights: features come from a random "
                        "initialisation (pass --weights FILE)", s["backbone"])
        bb = create_backbone(s["backbone"], rngs=nnx.Rngs(run.cfg.seed), weights=s["weights"])
        backbones[s["name"]] = bb
        feats[s["name"]] = sample_features(bb, run.adatas, {"backbone": s["backbone"], **run.geometry},
                                           s["weights_fingerprint"], cache, run.cfg.features.feature_batch_size,
                                           progress, stain=run.stain_ref, tta=run.cfg.tta_views)
    for s in run.sources:
        s["num_features"] = int(feats[s["name"]][0].shape[1])
    return backbones, feats


def _pick(xs, is_val, v):
    """Concatenate the per-sample arrays of training (v False) or validation (v True) samples."""
    return np.concatenate([x for x, f in zip(xs, is_val) if f == v]) if any(f == v for f in is_val) else None


def _model_config(run: _Run, strategy: str) -> dict:
    """model.json of an ensemble (everything a prediction or an export needs)."""
    c, f, members = run.cfg, run.cfg.features, run.cfg.members
    cfg = {"format": MODEL_FORMAT, "version": __version__, "genes": run.genes,
           "backbone": ",".join(s["name"] for s in run.sources), "sources": run.sources,
           "member_sources": [s["name"] for s in run.sources for _ in range(members)],
           "fine_tune": f.fine_tune, "members": members * len(run.sources), "members_per_source": members,
           "stain": None if run.stain_ref is None else run.stain_ref.to_dict(),
           "head": dataclasses.asdict(c.head), "tile_um": run.geometry["tile_um"],
           "tile_px": run.geometry["tile_px"], "train": dataclasses.asdict(c.train), "seed": c.seed,
           "min_coverage": f.min_coverage if run.backbone_sources else None,
           "augment": f.augment, "augment_views": f.augment_views if f.augment != "none" and not f.fine_tune else 0,
           "dropped_low_coverage": run.low_coverage, "strategy": strategy,
           "training_samples": [s for s, v in zip(run.sample_ids, run.is_val) if not v],
           "validation_samples": list(run.val_samples),
           "nb_parameterisation": "mean-dispersion (log link): var = mu + mu^2/r",
           "tta": c.tta_views if run.backbone_sources else 1,
           "smoothing": {"alpha": c.context.smooth, "k": c.context.smooth_k}}
    if len(run.backbone_sources) == 1 and len(run.sources) == 1:
        cfg["num_features"] = run.sources[0]["num_features"]  # what ONNX consumers of /1 models read
    return cfg


def _members_for(run: _Run, mcfg: dict, src: dict, si: int, backbones, feats, y_tr, cache, progress, key):
    """One source's untrained stacked members and their training arrays:
    (members, x_train, y_train, x_val, set_train_mode, member ids, per-member keys)."""
    c, f = run.cfg, run.cfg.features
    f_tr = f_va = None
    if run.feature_stats is None:
        f_tr, f_va = _pick(feats[src["name"]], run.is_val, False), _pick(feats[src["name"]], run.is_val, True)
    ids = [si * c.members + m for m in range(c.members)]   # global member index: distinct seeds
    init_keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, i), 0) for i in ids])
    train_keys = jnp.stack([jax.random.fold_in(jax.random.fold_in(key, i), 1) for i in ids])
    if f.fine_tune:
        tiles = [] if run.tiles_for is not None else [np.asarray(spot_tiles(
            a, **run.geometry, cache_dir=cache / "tiles", progress=False, stain=run.stain_ref)) for a in run.adatas]
        stacked = stack_members([build_member(mcfg, rngs=nnx.Rngs(k), source=src, backbone=create_backbone(
            src["backbone"], rngs=nnx.Rngs(0), weights=src["weights"])) for k in init_keys])
        if run.feature_stats is not None:
            init_head_from_moments(stacked.head, *run.feature_stats, y_tr, loss=c.train.loss)
        else:
            init_head_from_data(stacked.head, f_tr, y_tr, loss=c.train.loss)
        mode = lambda net: (net.train(), net.backbone.eval())  # noqa: E731  BN statistics stay frozen
        x_tr, x_va = ((run.tiles_for(False), run.tiles_for(True)) if run.tiles_for is not None
                      else (_pick(tiles, run.is_val, False), _pick(tiles, run.is_val, True)))
        return stacked, x_tr, y_tr, x_va, mode, ids, train_keys
    x_tr, y_src = f_tr, y_tr
    if f.augment != "none" and src["kind"] == "backbone":
        # Frozen backbone: K augmented views of every training tile, as extra spots.
        views = [augmented_features(backbones[src["name"]], a, {"backbone": src["backbone"], **run.geometry},
                                    src["weights_fingerprint"], cache, f.augment, f.augment_views,
                                    jax.random.fold_in(key, 0xA06), batch_size=f.feature_batch_size,
                                    progress=progress, stain=run.stain_ref)
                 for a, v in zip(run.adatas, run.is_val) if not v]
        x_tr = np.concatenate([f_tr] + [np.concatenate([vs[k] for vs in views]) for k in range(f.augment_views)])
        y_src = np.concatenate([y_tr] * (f.augment_views + 1))
    stacked = create_members(lambda r: build_member(mcfg, rngs=r, source=src), init_keys)  # noqa: B023
    init_head_from_data(stacked, x_tr, y_src, loss=c.train.loss)
    return stacked, x_tr, y_src, f_va, None, ids, train_keys


def _fit_sources(run: _Run, mcfg: dict, backbones, feats, workdir: Path, cache: Path, progress: bool):
    """Train every source's members → (member modules, log rows, best epochs)."""
    c = run.cfg
    counts = run.counts if run.counts is not None else [counts_matrix(a, run.genes) for a in run.adatas]
    y_tr, y_va = _pick(counts, run.is_val, False), _pick(counts, run.is_val, True)
    key = jax.random.key(c.seed)
    trained, logs, best_epochs = [], [], []
    for si, src in enumerate(run.sources):
        stacked, x_tr, y_src, x_va, mode, ids, train_keys = _members_for(run, mcfg, src, si, backbones, feats,
                                                                         y_tr, cache, progress, key)
        log.info("training %d member(s) on %s (%s strategy)", c.members, src["name"], mcfg["strategy"])
        aug = augment_config(c.features.augment) if c.features.fine_tune else None
        stacked, hists = fit_ensemble(stacked, x_tr, y_src, x_va, y_va, keys=train_keys, config=c.train,
                                      strategy=mcfg["strategy"], ckpt_dir=workdir / "checkpoints" / src["name"],
                                      set_train_mode=mode, progress=progress, augment=aug)
        trained += unstack_members(stacked)
        for i, hist in zip(ids, hists):
            logs += [{"member": i, "source": src["name"], **h} for h in hist]
            val = [h["val_loss"] for h in hist]
            best_epochs.append(int(np.nanargmin(val)) if y_va is not None and len(val) else len(hist) - 1)
    return trained, logs, best_epochs


def train(data, workdir: str | os.PathLike, config: RunConfig | TrainConfig | None = None, *,
          progress: bool = True, overwrite: bool = False, cache_dir: str | os.PathLike | None = None,
          stream_options=None, **options) -> EnsembleModel:
    """Train an ensemble of NB models (or, with ``task="classify"``, the high/low
    classifier); return it (also saved in ``workdir/model``).

    data: .h5ad paths or AnnData objects (one or more samples each). ``config``: a
    :class:`~stimage_jax.config.RunConfig`; ``options`` override its fields by name
    (``genes="markers", members=5, backbone="a,b", lr=1e-3``...). ``members`` models are
    trained per feature source (FSTimage when there are several). Validation (early
    stopping) uses whole samples: ``val_samples``, or the last training sample; never
    spots of a training sample. Tiles and features are cached under ``cache_dir``
    (default ``workdir/cache``), keyed by content. The workdir is locked while a run uses
    it; a rerun with the same config and the same data resumes (or returns the finished
    model), while changed data or settings are refused unless ``overwrite``.
    ``stream_options``: how a ``dataset`` run reads and checkpoints
    (:class:`~stimage_jax.ensemble.dataset_train.StreamOptions`).
    """
    cfg = run_config(config, **options)
    if cfg.task == "classify":
        return train_classifier(data, workdir, cfg, progress=progress, overwrite=overwrite, cache_dir=cache_dir)
    if cfg.dataset is not None:  # tiles streamed from an exported TFDS/ArrayRecord dataset
        from stimage_jax.ensemble.dataset_train import train_from_dataset

        return train_from_dataset(cfg.dataset, workdir, cfg, progress=progress, overwrite=overwrite,
                                  options=stream_options)
    strategy = resolve_strategy(cfg.strategy, trains_backbone=cfg.features.fine_tune)
    workdir = Path(workdir).absolute()
    run = _prepare(data, cfg)
    with _primary_claim(workdir, _request(run), overwrite, lambda: EnsembleModel.load(workdir / "model")) as done:
        if done is not None:
            return done
        cache = Path(cache_dir).absolute() if cache_dir is not None else workdir / "cache"
        backbones, feats = _backbone_features(run, cache, progress)
        mcfg = _model_config(run, strategy)
        trained, logs, best_epochs = _fit_sources(run, mcfg, backbones, feats, workdir, cache, progress)
        mcfg["best_epochs"] = best_epochs
        mcfg["trained_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        model = EnsembleModel(mcfg, {} if cfg.features.fine_tune else backbones, trained)
        if distributed.is_primary():  # one writer; every process holds the same trained model
            with atomic_path(workdir / "train_log.csv") as tmp:
                pd.DataFrame(logs).to_csv(tmp, index=False)
            model.save(workdir / "model")
        distributed.barrier("stimage-model-saved")
    return model


@contextlib.contextmanager
def _primary_claim(workdir: Path, request: dict, overwrite: bool, load):
    """``_claim_workdir`` under the workdir lock, by process 0 alone when several train
    together (the others would otherwise wait on its lock while it waits for them in a
    collective); the others follow its decision once it has cleared or recorded the run."""
    if not distributed.is_multiprocess():
        with workdir_lock(workdir):
            yield _claim_workdir(workdir, request, overwrite, load)
        return
    with workdir_lock(workdir) if distributed.is_primary() else contextlib.nullcontext():
        done = _claim_workdir(workdir, request, overwrite, load) if distributed.is_primary() else None
        finished = distributed.broadcast_flag(done is not None)
        distributed.barrier("stimage-workdir-claimed")
        if finished and done is None:
            done = load()
        yield done


def _as_features(model, features) -> dict:
    """Precomputed features as {source name: (N, D)}: a bare array stands for the only source."""
    if features is None or isinstance(features, dict):
        return dict(features or {})
    if getattr(model, "task", None) == "classify":
        return {model.config["backbone"]: features}
    if model.backbone is None:
        raise StimageError("plain features fit only a model with one frozen backbone; pass a dict by source name")
    return {model.sources[0]["name"]: features}


def predict(adata: ad.AnnData, model, *, batch_size: int = 32, progress: bool = True,
            tiles: np.ndarray | None = None, features=None, embeddings: str | None = None,
            interval: float = 0.8) -> ad.AnnData:
    """Predict every spot of ``adata`` with a JAX model → a new AnnData
    (:func:`~export.runtime.prediction.predict_adata`, which every runtime shares).

    ``features``: (N, D) from the model's own frozen backbone, or a dict by source name —
    skip tiling and extraction (benchmarks reuse a cache). Embedding sources read
    ``obsm[key]`` / ``key/<sample>.npy`` (``embeddings`` overrides the key the model was
    trained with).
    """
    features = _as_features(model, features)
    if embeddings is not None:
        model = dataclasses.replace(model, embeddings_override=embeddings)
    return predict_adata(adata, model, batch_size=batch_size, progress=progress, interval=interval, tiles=tiles,
                         features=features or None)


provenance = model_provenance  # older name, kept for callers


def train_classifier(data, workdir: str | os.PathLike, config: RunConfig | None = None, *,
                     progress: bool = True, overwrite: bool = False,
                     cache_dir: str | os.PathLike | None = None, **options):
    """The paper's classification model: frozen-backbone features → per-gene elastic-net
    logistic regression of high (per-sample z > 0) vs low; saved in ``workdir/model``.
    Every sample trains (no early stopping to validate). Reads, QC, stain, caching and
    resume are the ensemble's (:func:`train`)."""
    from stimage_jax.classify import CLASSIFIER_FORMAT, ClassifierModel, fit_classifier

    cfg = run_config(config, **options).override(task="classify").check()
    workdir = Path(workdir).absolute()
    run = _prepare(data, cfg)
    src = run.sources[0]
    with workdir_lock(workdir):
        done = _claim_workdir(workdir, _request(run), overwrite, lambda: ClassifierModel.load(workdir / "model"))
        if done is not None:
            return done
        cache = Path(cache_dir).absolute() if cache_dir is not None else workdir / "cache"
        backbones, feats = _backbone_features(run, cache, progress)
        counts = np.concatenate([counts_matrix(a, run.genes) for a in run.adatas])
        samples = np.concatenate([np.full(a.n_obs, _sample_id(a)) for a in run.adatas])
        ref = fit_classifier(np.concatenate(feats[src["name"]]), counts, samples, run.genes, C=cfg.classify.C,
                             l1_ratio=cfg.classify.l1_ratio, seed=cfg.seed, progress=progress)
        mcfg = {"format": CLASSIFIER_FORMAT, "task": "classify", "version": __version__, "genes": run.genes,
                "backbone": src["backbone"], "weights": src["weights"], "weights_fingerprint": src["weights_fingerprint"],
                "num_features": src["num_features"], "seed": cfg.seed, "classifier": ref.params,
                "labels": "high = count above the gene's mean within its sample (per-sample z-score > 0)",
                "stain": None if run.stain_ref is None else run.stain_ref.to_dict(),
                "min_coverage": cfg.features.min_coverage, "dropped_low_coverage": run.low_coverage,
                "training_samples": run.sample_ids,
                "trained_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **run.geometry}
        model = ClassifierModel(mcfg, backbones[src["name"]], ref)
        model.save(workdir / "model")
    return model


def predict_classifier(adata: ad.AnnData, model, *, batch_size: int = 32, progress: bool = True,
                       features: np.ndarray | None = None) -> ad.AnnData:
    """``layers["p_high"]`` (and X) = probability of high expression per spot and gene."""
    return predict(adata, model, batch_size=batch_size, progress=progress, features=features)
