"""Leave-one-sample-out benchmark: every method on identical features, folds and genes.

For each held-out sample, train on the others (early stopping on the last of them, a
whole sample — never spots of a training sample), predict the held-out one and score it
with :func:`stimage_jax.metrics.evaluate` (per gene, per sample: never pooled). Methods:

- ``stimage``: the NB ensemble (``members`` seeds), mean of NB means;
- ``stimage_single``: member 0 of that ensemble alone (a single NB model, same seed 0);
- ``ridge``: HEST-Benchmark ridge on the same frozen features (:mod:`stimage_jax.baselines`);
- ``mse``: a one-member MSE head on log1p counts (ST-Net-style point prediction);
- spatial context and test-time augmentation (issue 21), each the same NB ensemble and
  seeds on other features: ``stimage_ctx`` (own features + the mean of the ``context_k``
  nearest spots' features of the same sample), ``stimage_tta`` (features averaged over
  the 8 dihedral views of the tile), ``stimage_smooth`` (each member's NB mean smoothed
  half-and-half with its neighbours' means, moments recomputed) and their combinations
  ``stimage_ctx_smooth``, ``stimage_tta_smooth``, ``stimage_tta_ctx``, ``stimage_tta_ctx_smooth``;
- global context (issue 21, TRIPLEX's global branch; :mod:`stimage_jax.features.global_context`):
  ``stimage_global`` (own features ‖ features of the ``global_um`` µm field around the
  spot resized to the backbone's input), ``stimage_global_mean`` (their mean),
  ``stimage_global_pca`` (own ‖ the field's features projected on ``global_pca``
  principal components fitted on the training samples), each also ``_smooth`` and with
  ``stimage_tta_`` (the tile's features averaged over 8 dihedral views, the field's from
  one view: one extra backbone pass per spot, not eight).
  All are image-only: nothing reads the held-out sample's expression.

Outputs under ``workdir``: ``folds/<sample>/<method>.csv`` (one row per gene; a fold's
files are written when it finishes, so a rerun resumes at the first missing one),
``metrics.csv`` (all folds and methods), ``summary.md`` (a Markdown table) and
``boxplot.png`` (per-gene PCC per method and fold, as the paper's Fig. 2e).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from data_pipelines.errors import StimageError
from data_pipelines.io import atomic_path
from stimage_jax.ensemble.train import TrainConfig

__all__ = ["METHODS", "DEFAULT_METHODS", "CONTEXT_METHODS", "GLOBAL_METHODS", "run_loso", "summary_markdown", "plot_boxplots"]

DEFAULT_METHODS = ("stimage", "stimage_single", "ridge", "mse")
CONTEXT_METHODS = ("stimage_smooth", "stimage_ctx", "stimage_ctx_smooth", "stimage_tta", "stimage_tta_smooth",
                   "stimage_tta_ctx", "stimage_tta_ctx_smooth")
GLOBAL_METHODS = tuple(f"stimage{t}_global{g}{s}" for t in ("", "_tta") for g in ("", "_mean", "_pca")
                       for s in ("", "_smooth"))
METHODS = DEFAULT_METHODS + CONTEXT_METHODS + GLOBAL_METHODS
FEATURE_METHODS = CONTEXT_METHODS + GLOBAL_METHODS  # methods built on the base model's backbone
VARIANT_KEY = "stimage_variant_features"  # obsm key of a variant's features (an embedding source)
log = logging.getLogger("stimage")


def _point_prediction(truth: ad.AnnData, mean: np.ndarray, genes, method: str) -> ad.AnnData:
    from export.runtime.prediction import build_prediction

    mu = np.asarray(mean, np.float32)[None]
    return build_prediction(truth, mu, np.full_like(mu, np.inf), genes, {"method": method}, keep_members=False)


def _variant(method: str) -> tuple[bool, bool, str | None]:
    """A context method's feature variant: (tta, ctx, global mode or None)."""
    glob = ("pca" if "_global_pca" in method else "mean" if "_global_mean" in method
            else "concat" if "_global" in method else None)
    return "_tta" in method, "_ctx" in method, glob


def _variant_name(tta: bool, ctx: bool, glob: str | None) -> str:
    return ("stimage" + ("_tta" if tta else "") + ("_ctx" if ctx else "")
            + ("" if glob is None else "_global" + ("" if glob == "concat" else f"_{glob}")))


def _variant_features(model, adatas: list, *, tta: bool, ctx: bool, context_k: int, cache: Path,
                      progress: bool, glob: str | None = None, global_um: float = 500.0,
                      global_pca: int = 64) -> list[np.ndarray]:
    """Per-sample features of the base model's frozen backbone, TTA-averaged over the 8
    dihedral views, combined with the ``global_um`` field's features (``glob``: concat,
    mean or pca — the projection fitted on ``adatas[:-1]``, the training samples) and/or
    with the neighbours' mean appended."""
    from data_pipelines import keys
    from data_pipelines.tiles import spot_tiles
    from export.runtime.context import context_features, neighbour_index
    from stimage_jax.features.tta import tta_features
    from stimage_jax.pipeline import _sample_id, sample_features, tiles_digest

    src = model.sources[0]
    backbone = model.backbones[src["name"]]
    geometry = {"backbone": src["backbone"], "tile_um": model.config["tile_um"], "tile_px": model.config["tile_px"]}
    out, fields = [], []
    for a in adatas:
        if glob is not None:
            from stimage_jax.features.global_context import global_features

            fields.append(global_features(backbone, a, global_um, geometry["tile_px"], sample=_sample_id(a),
                                          backbone_name=src["backbone"], weights_fp=src["weights_fingerprint"],
                                          cache=cache, views=1, stain=model.stain, progress=progress))
        if tta:
            tiles = spot_tiles(a, tile_um=geometry["tile_um"], tile_px=geometry["tile_px"], cache_dir=cache / "tiles",
                               progress=progress, stain=model.stain)
            stem = cache / "features" / (f"{_sample_id(a)}__{src['backbone']}__{src['weights_fingerprint']}__"
                                         f"{tiles_digest(tiles)}")
            f = tta_features(backbone, tiles, 8, stem, progress=progress, desc=f"features {_sample_id(a)}")
        else:
            f = sample_features(backbone, [a], geometry, src["weights_fingerprint"], cache, progress=progress,
                                stain=model.stain)[0]
        out.append(f)
    if glob is not None:
        from stimage_jax.features.global_context import combine_global, fit_pca

        pca = fit_pca(np.concatenate(fields[:-1]), global_pca) if glob == "pca" else None
        out = [combine_global(f, g, glob, pca) for f, g in zip(out, fields)]
    if ctx:
        out = [context_features(f, neighbour_index(a.obsm[keys.SPATIAL], a.obs[keys.SAMPLE].astype(str).to_numpy(),
                                                   context_k)) for f, a in zip(out, adatas)]
    return out


def _smoothed(pred: ad.AnnData, truth: ad.AnnData, genes, context_k: int, alpha: float, method: str) -> ad.AnnData:
    """The prediction's members smoothed towards their neighbours (see export.runtime.context)."""
    from data_pipelines import keys
    from export.runtime.context import neighbour_index, smooth_members
    from export.runtime.prediction import build_prediction

    mu = np.transpose(np.asarray(pred.obsm[keys.MEMBER_MU]), (1, 0, 2))  # (spots, M, G) → (M, spots, G)
    r = np.transpose(np.asarray(pred.obsm[keys.MEMBER_R]), (1, 0, 2))
    idx = neighbour_index(truth.obsm[keys.SPATIAL], truth.obs[keys.SAMPLE].astype(str).to_numpy(), context_k)
    return build_prediction(truth, smooth_members(mu, idx, alpha), r, genes,
                            {"method": method, "smooth_alpha": alpha, "context_k": context_k})


def _context_methods(model, train_ads, truth, wd: Path, methods, common: dict, *, members, config, context_k,
                     smooth, cache, progress, base_pred, global_um: float = 500.0,
                     global_pca: int = 64) -> dict[str, pd.DataFrame]:
    from stimage_jax.metrics import evaluate
    from stimage_jax.pipeline import predict, train

    out = {}
    if "stimage_smooth" in methods:
        out["stimage_smooth"] = evaluate(_smoothed(base_pred, truth, model.genes, context_k, smooth,
                                                   "stimage_smooth"), truth)[0]
    variants = {_variant(m) for m in methods if m in FEATURE_METHODS and m != "stimage_smooth"}
    for tta, ctx, glob in sorted(variants, key=str):
        name = _variant_name(tta, ctx, glob)
        feats = _variant_features(model, [*train_ads, truth], tta=tta, ctx=ctx, context_k=context_k, cache=cache,
                                  progress=progress, glob=glob, global_um=global_um, global_pca=global_pca)
        ads = []
        for a, f in zip([*train_ads, truth], feats):
            a = a.copy()
            a.obsm[VARIANT_KEY] = f
            ads.append(a)
        opts = {**common, "backbone": ""}
        m_var = train(ads[:-1], wd / name, members=members, config=config, embeddings=VARIANT_KEY, **opts)
        pred = predict(ads[-1], m_var, progress=False)
        if name in methods:
            out[name] = evaluate(pred, truth)[0]
        if f"{name}_smooth" in methods:
            out[f"{name}_smooth"] = evaluate(_smoothed(pred, truth, m_var.genes, context_k, smooth,
                                                       f"{name}_smooth"), truth)[0]
    return out


def _fold(adatas: dict, test: str, wd: Path, methods, *, genes, backbone, members, config, tile_um, tile_px,
          seed, progress, cache, context_k: int = 6, smooth: float = 0.5, global_um: float = 500.0,
          global_pca: int = 64) -> dict[str, pd.DataFrame]:
    from export.runtime.prediction import build_prediction
    from stimage_jax.baselines import apply_ridge, fit_ridge
    from stimage_jax.metrics import evaluate
    from stimage_jax.pipeline import counts_matrix, predict, train

    train_ads = [a for s, a in adatas.items() if s != test]
    truth = adatas[test]
    common = dict(genes=genes, backbone=backbone, tile_um=tile_um, tile_px=tile_px, seed=seed, progress=progress,
                  cache_dir=cache, min_coverage=0.0,  # tile QC was applied to every sample up front
                  tta=1, smooth=0.0)  # each method states its own TTA/smoothing (the run defaults are TTA 8 + smooth)
    out = {}
    need_nb = {"stimage", "stimage_single", "ridge", *FEATURE_METHODS} & set(methods)
    if need_nb:
        model = train(train_ads, wd / "stimage", members=members, config=config, **common)
        from stimage_jax.pipeline import sample_features

        src = model.sources[0]
        geometry = {"backbone": src["backbone"], "tile_um": model.config["tile_um"], "tile_px": model.config["tile_px"]}
        f_test = sample_features(model.backbones[src["name"]], [truth], geometry, src["weights_fingerprint"],
                                 cache, progress=progress, stain=model.stain)[0]
        mu, r = model.member_params(None, features=f_test, progress=False)
        pred = predict(truth, model, features=f_test, progress=False)
        if "stimage" in methods:
            out["stimage"] = evaluate(pred, truth)[0]
        if set(FEATURE_METHODS) & set(methods):
            out.update(_context_methods(model, train_ads, truth, wd, methods, common, members=members, config=config,
                                        context_k=context_k, smooth=smooth, cache=cache, progress=progress,
                                        base_pred=pred, global_um=global_um, global_pca=global_pca))
        if "stimage_single" in methods:
            single = build_prediction(truth, mu[:1], r[:1], model.genes, {"method": "stimage_single"})
            out["stimage_single"] = evaluate(single, truth)[0]
        if "ridge" in methods:
            # Same spots, genes and features as the NB model (ridge has no early stopping, so
            # it also fits the validation sample).
            tr = train_ads
            f_tr = sample_features(model.backbones[src["name"]], tr, geometry, src["weights_fingerprint"], cache,
                                   progress=progress, stain=model.stain)
            ref = fit_ridge(np.concatenate(f_tr), np.concatenate([counts_matrix(a, model.genes) for a in tr]),
                            model.genes, seed=seed)
            out["ridge"] = evaluate(_point_prediction(truth, apply_ridge(ref, f_test), model.genes, "ridge"), truth)[0]
    if "mse" in methods:
        mse_cfg = dataclasses.replace(config, loss="mse_log1p")
        m2 = train(train_ads, wd / "mse", members=1, config=mse_cfg, **common)
        out["mse"] = evaluate(predict(truth, m2, progress=False), truth)[0]
    return out


def _claim_benchmark(wd: Path, settings: dict, adatas: dict, overwrite: bool) -> None:
    """Fold results are reused only for the same settings and the same data (by content).

    Method-specific settings (``context_k``, ``global_um``, ...) are recorded only when
    their methods run, so a run that adds methods with new settings to a workdir extends it
    (settings merged) when every setting both runs name is equal: the old folds hold no
    results of methods that use the new settings."""
    import json
    import shutil

    from data_pipelines.fingerprint import adata_fingerprint

    request = {"settings": settings, "data": {s: adata_fingerprint(a) for s, a in adatas.items()}}
    req = wd / "request.json"
    if req.is_file():
        try:
            old = json.loads(req.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        compatible = (isinstance(old, dict) and old.get("data") == request["data"]
                      and isinstance(old.get("settings"), dict)
                      and all(old["settings"][k] == v for k, v in settings.items() if k in old["settings"]))
        if compatible:
            request = {"settings": {**old["settings"], **settings}, "data": request["data"]}
        elif old != request:
            if not overwrite:
                what = ("the data changed" if isinstance(old, dict) and old.get("data") != request["data"]
                        else "the settings differ")
                raise StimageError(f"benchmark workdir {wd} holds folds of another run ({what}); "
                                   "use another --workdir or pass --overwrite")
            shutil.rmtree(wd / "folds", ignore_errors=True)
    wd.mkdir(parents=True, exist_ok=True)
    with atomic_path(req) as tmp:
        tmp.write_text(json.dumps(request, indent=1))


def run_loso(data, workdir: str | os.PathLike, *, methods=METHODS, genes: str = "top-hvg:50",
             backbone: str = "efficientnet_lite0", members: int = 5, config: TrainConfig = TrainConfig(),
             tile_um: float | None = None, tile_px: int = 299, seed: int = 0, min_coverage: float = 0.7,
             samples: list[str] | None = None, progress: bool = True, overwrite: bool = False,
             context_k: int = 6, smooth: float = 0.5, global_um: float = 500.0, global_pca: int = 64,
             cache_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Run every fold (resuming finished ones) → the table of all folds and methods.

    Finished folds are reused only when the workdir's ``request.json`` — the settings and
    every sample's content hash — equals this run's; otherwise the run is refused (or,
    with ``overwrite``, the old folds are discarded).

    data: .h5ad paths, a folder of them, or AnnData objects; samples are split by
    ``obs["sample"]``. ``samples``: hold out only these (default: each in turn). Genes
    are chosen per fold on its training samples (``genes`` as for ``stimage train``).
    Spots whose tile is under ``min_coverage`` tissue are dropped from every sample first.
    ``cache_dir``: tiles and frozen features (default ``workdir/cache``); keyed by content,
    so several runs (e.g. seeds) may share one.
    """
    from stimage_jax.pipeline import _load, _sample_id, split_samples

    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise StimageError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(METHODS)}")
    from data_pipelines.spatialdata_io import is_zarr

    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir() and not is_zarr(data):
        # A folder of samples: .h5ad files and SpatialData .zarr stores (a store is a folder too).
        data = sorted([*Path(data).glob("*.h5ad"), *Path(data).glob("*.zarr")])
        if not data:
            raise StimageError("no .h5ad files or .zarr stores in the --data folder")
    adatas = {_sample_id(a): a for a in split_samples(_load(list(data) if not isinstance(data, ad.AnnData)
                                                             else [data]))}
    if len(adatas) < 3:
        raise StimageError(f"leave-one-sample-out needs at least 3 samples (2 to train and validate), got "
                           f"{len(adatas)}: {', '.join(adatas)}")
    if min_coverage > 0:
        # Tile QC once, for training and held-out samples alike: every method scores the
        # same spots (STimage drops tiles under 70 % tissue before anything else).
        from data_pipelines.tissue import filter_by_coverage

        adatas = {s: filter_by_coverage(a, min_coverage, tile_um=tile_um, tile_px=tile_px) for s, a in adatas.items()}
    held = list(adatas) if samples is None else list(samples)
    unknown = [s for s in held if s not in adatas]
    if unknown:
        raise StimageError(f"sample(s) {', '.join(unknown)} not in the data ({', '.join(adatas)})")
    wd = Path(workdir).absolute()
    _claim_benchmark(wd, {"genes": genes, "backbone": backbone, "members": members,
                          "train": dataclasses.asdict(config), "tile_um": tile_um, "tile_px": tile_px, "seed": seed,
                          "min_coverage": min_coverage,
                          **({"context_k": context_k, "smooth": smooth}
                             if (set(CONTEXT_METHODS) | {m for m in GLOBAL_METHODS if m.endswith("_smooth")}) & set(methods)
                             else {}),
                          **({"global_um": global_um, "global_pca": global_pca}
                             if set(GLOBAL_METHODS) & set(methods) else {})},
                      adatas, overwrite)
    cache = wd / "cache" if cache_dir is None else Path(cache_dir).absolute()
    tables = []
    for i, test in enumerate(held):
        fold_dir = wd / "folds" / test
        files = {m: fold_dir / f"{m}.csv" for m in methods}
        todo = [m for m, f in files.items() if not f.exists()]  # finished methods of a fold are kept
        if todo:
            log.info("fold %d/%d: holding out %s", i + 1, len(held), test)
            got = _fold(adatas, test, fold_dir, todo, genes=genes, backbone=backbone, members=members,
                        config=config, tile_um=tile_um, tile_px=tile_px, seed=seed, progress=progress, cache=cache,
                        context_k=context_k, smooth=smooth, global_um=global_um, global_pca=global_pca)
            for m, t in got.items():
                with atomic_path(files[m]) as tmp:
                    t.to_csv(tmp, index=False)
        for m, f in files.items():
            t = pd.read_csv(f)
            t.insert(0, "method", m)
            t.insert(1, "fold", test)
            tables.append(t)
    table = pd.concat(tables, ignore_index=True)
    with atomic_path(wd / "metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(wd / "summary.md") as tmp:
        tmp.write_text(summary_markdown(table))
    plot_boxplots(table, wd / "boxplot.png")
    return table


def summary_markdown(table: pd.DataFrame) -> str:
    """Per-method means over folds and genes, and per-fold mean PCC, as Markdown tables."""
    cols = [c for c in ("pcc", "spearman", "auc", "moran_bv", "iou", "nll", "pit_coverage") if c in table]
    agg = table.groupby("method", sort=False)[cols].mean()
    pos = table.groupby("method", sort=False)["pcc"].apply(lambda p: f"{int((p > 0).sum())}/{int(p.notna().sum())}")
    lines = ["| method | " + " | ".join(f"mean {c}" for c in cols) + " | genes with PCC > 0 |",
             "| --- |" + " --- |" * (len(cols) + 1)]
    for m, row in agg.iterrows():
        vals = " | ".join("" if pd.isna(v) else f"{v:.3f}" for v in row)
        lines.append(f"| {m} | {vals} | {pos[m]} |")
    folds = table.pivot_table(index="fold", columns="method", values="pcc", aggfunc="mean", sort=False)
    lines += ["", "Mean PCC per held-out sample (per gene within the sample, then averaged):", "",
              "| held out | " + " | ".join(folds.columns) + " |", "| --- |" + " --- |" * len(folds.columns)]
    for f, row in folds.iterrows():
        lines.append(f"| {f} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    from stimage_jax.metrics import top_genes

    best = table["method"].iloc[0]
    top = top_genes(table[table["method"] == best], n=10)
    lines += ["", f"Most predictable genes ({best}, mean PCC over held-out samples):", "",
              "| gene | mean PCC | worst sample | samples |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.gene} | {r.mean_pcc:.3f} | {r.min_pcc:.3f} | {r.samples} |" for r in top.itertuples()]
    return "\n".join(lines) + "\n"


def plot_boxplots(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Per-gene PCC, one box per method within each held-out sample (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folds = list(pd.unique(table["fold"]))
    methods = list(pd.unique(table["method"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(folds) * len(methods) / 2), 4.0))
    width = 0.8 / len(methods)
    colours = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        data = [table[(table["fold"] == f) & (table["method"] == m)]["pcc"].dropna().to_numpy() for f in folds]
        pos = np.arange(len(folds)) + (j - (len(methods) - 1) / 2) * width
        bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True, showfliers=False)
        for b in bp["boxes"]:
            b.set_facecolor(colours(j))
        ax.plot([], [], color=colours(j), lw=8, label=m)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(np.arange(len(folds)), folds)
    ax.set_xlabel("held-out sample")
    ax.set_ylabel("PCC per gene")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)
